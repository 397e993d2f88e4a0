"""Index keys on real text: which one reaches knn's recall target fastest (issue 24).

    OMP_NUM_THREADS=1 python benchmarks/bench_real_index_keys.py --db DB --work WORK --threads 1 \
        --keys "current;OPQ48_384,IVF2048_HNSW32,PQ48x4np;IVF8192_HNSW32,SQ8" --rerank "1;0;1"

Why: on real MiniLM embeddings (docs/BENCHMARKS.md, "bench_scale_real") the index stage's
``IVF2048_HNSW32,SQ8`` needs nprobe 64 of 2,048 lists for recall@2 0.95 where the synthetic 1.1M
vectors need 4: every query scans ~45k SQ8 codes. This script trains candidate keys on the DB's
own embeddings (read-only: nothing is written into DB) and, for each, walks the knn tuner's
ladder of search parameters (index_builder.knn.tuning.candidate_params) until the final
neighbours reach the target, timing every step.

The measured pipeline is the knn stage's own (KnnStage._final_train): k + extra candidates,
the training-sequence exclusion and blank chunks, short rows searched again with the excluded
range skipped (range_exclusion) and widened, re-ranked by true distance from the fp16 embeddings
where a ``rerank`` factor > 1 is given (index_builder.knn.rerank). Queries: a seeded sample of
the train rows knn searches (retrieval-only rows are never queries). Ground truth: exact search
with the same exclusions inside the pass; recall@k counts ties at the k-th exact distance as hits
(index_builder.knn.tuning.neighbour_recall), as the stage's tuning does.

Keys: ``current`` (the DB's own index file, read into memory), any faiss factory key of an IVF
(trained here: seeded sample, torch bf16 k-means and assignment as the index stage does on this
CPU; the centroids of a given nlist are cached in WORK and shared by every codec; an OPQ key
rotates them, which leaves every nearest centroid unchanged), ``...x4fs`` (4-bit PQ fast scan:
built as the plain 4-bit IVF-PQ, then converted, since faiss's add_core crashes on fast-scan
lists), ``...x4np`` (the key chooser's plain 4-bit IVF-PQ: searched through its fast-scan copy
as knn does, unless --plain) and ``HNSW32`` (flat HNSW over every vector). Built indexes are
cached in WORK; the DB is only read.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chunk_store.layout import DBLayout  # noqa: E402
from chunk_store.manifest import load_manifest  # noqa: E402
from chunk_store.shards import retrieval_only_ranges  # noqa: E402
from chunk_store.store import ChunkStore  # noqa: E402
from index_builder.embed.stage import open_embeddings  # noqa: E402
from index_builder.index.exact_search import ExactSearchConfig, exact_search, read_block  # noqa: E402
from index_builder.index.ivf_build import (ADD_BATCH, CODEC_TRAIN_MAX, OPQ_ITERS, add_assigned,  # noqa: E402
                                           gather_rows, sample_ids, train_coarse)
from index_builder.index.faiss_params import apply_search_params  # noqa: E402
from index_builder.index.fast_scan import fast_scan_view  # noqa: E402
from index_builder.index.plan import OPQ_TRAIN_MAX  # noqa: E402
from index_builder.knn.exclusion import search_with_exclusion, sequence_doc_ranges  # noqa: E402
from index_builder.knn.range_exclusion import faiss_range_search, prefer_range_first, selector_pays  # noqa: E402
from index_builder.knn.ranged_reads import chunk_ranges_of  # noqa: E402
from index_builder.knn.rerank import (default_factor, pick_rows, reranked, reranked_ranges, take_rows,  # noqa: E402
                                     true_distances)
from index_builder.knn.tuning import candidate_params, neighbour_recall  # noqa: E402


@dataclass
class Db:
    """The DB's read-only tables the knn pipeline needs, its embeddings cut to ``ntotal`` rows."""

    shards: list[np.ndarray]
    ntotal: int
    docs: Any
    seq_starts: Any
    chunks_per_seq: int
    content: Any
    searched: int  # train rows knn searches (not retrieval-only)


@dataclass
class Step:
    param: str
    recall: float
    cpu_s: float
    wall_s: float
    qps_cpu: float
    qps_wall: float


@dataclass
class Result:
    key: str
    rerank: int
    build: dict[str, Any]
    bytes_per_vector: float
    short_share: float
    range_first: bool
    steps: list[Step] = field(default_factory=list)
    chosen: Step | None = None


def open_db(db: Path, rows: int) -> Db:
    manifest = load_manifest(db)
    store = ChunkStore.open(db, "train")
    shards, left = [], rows or 1 << 62
    for arr in open_embeddings(db, "train"):
        if left <= 0:
            break
        shards.append(arr if arr.shape[0] <= left else arr[:left])
        left -= shards[-1].shape[0]
    ntotal = sum(s.shape[0] for s in shards)
    unread = retrieval_only_ranges(manifest, "train")
    searched_rows = ntotal - sum(max(0, min(hi, ntotal) - lo) for lo, hi in unread if lo < ntotal)
    return Db(shards, ntotal, store.doc_ids, store.seq_starts,
              int(manifest["seq_len"]) // int(manifest["chunk_size"]), store.content_lookup(), searched_rows)


def query_rows(db: Db, unread: list[tuple[int, int]], n: int, seed: int = 0) -> np.ndarray:
    """KnnStage._sample_rows: a seeded sample of the searched rows, as global rows."""
    rows = np.asarray(sample_ids(db.searched, n, seed=seed), dtype=np.int64)
    for lo, hi in unread:
        rows = np.where(rows >= lo, rows + (hi - lo), rows)
    return rows[rows < db.ntotal]


def ground_truth(db: Db, rows: np.ndarray, queries: np.ndarray, k: int, cache: Path) -> np.ndarray:
    """Exact final distances (q, k) with the sequence exclusion and blank chunks applied."""
    if cache.exists():
        return np.load(cache)
    ranges = sequence_doc_ranges(db.docs, db.seq_starts, db.chunks_per_seq, rows)
    t = time.process_time()
    _, exact_d = exact_search(queries, db.shards, k, ExactSearchConfig(),
                              exclude=chunk_ranges_of(ranges, db.docs), valid=db.content)
    print(f"ground truth: {time.process_time() - t:.0f} CPU s", file=sys.stderr, flush=True)
    np.save(cache, exact_d)
    return exact_d


def safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def centroids_for(db: Db, nlist: int, train_size: int, work: Path, stats: dict[str, Any]) -> np.ndarray:
    """The coarse centroids of ``nlist`` lists (cached: every codec of that nlist shares them)."""
    path = work / f"centroids-{db.ntotal}-{nlist}-{train_size}.npy"
    if path.exists():
        stats["kmeans"] = "cached"
        return np.load(path)
    t, c = time.time(), time.process_time()
    x = gather_rows(db.shards, sample_ids(db.ntotal, train_size, 0))
    cent, how = train_coarse(x, nlist, "cpu", False, 0, bf16=True)
    stats.update(kmeans=how, kmeans_s=round(time.time() - t, 1), kmeans_cpu_s=round(time.process_time() - c, 1))
    np.save(path, cent)
    return cent


def build_ivf_key(db: Db, key: str, work: Path, per_list: int, train_max: int) -> tuple[Any, dict[str, Any]]:
    """Train and fill an IVF key as index_builder.index.ivf_build does, the centroids shared."""
    import faiss
    from tqdm.auto import tqdm

    from index_builder.index.centroid_assign import Bf16Assigner

    fast_scan = key.endswith("fs")
    build_key = key[:-2] if fast_scan else key
    dim = db.shards[0].shape[1]
    index = faiss.index_factory(dim, build_key, faiss.METRIC_L2)
    ivf = faiss.extract_index_ivf(index)
    stats: dict[str, Any] = {}
    train_size = min(db.ntotal, ivf.nlist * per_list, train_max)
    stats["train_vectors"] = train_size
    cent = centroids_for(db, ivf.nlist, train_size, work, stats)
    t, c = time.time(), time.process_time()
    x = gather_rows(db.shards, sample_ids(db.ntotal, min(train_size, max(CODEC_TRAIN_MAX, OPQ_TRAIN_MAX)), 1))
    pre = faiss.downcast_index(index)
    if isinstance(pre, faiss.IndexPreTransform):
        opq = faiss.downcast_VectorTransform(pre.chain.at(0))
        opq.niter = OPQ_ITERS
        opq.train(x[:OPQ_TRAIN_MAX])
        x, cent = opq.apply(x), opq.apply(cent)  # a rotation: nearest centroids unchanged
    quantizer = faiss.downcast_index(ivf.quantizer)
    quantizer.add(np.ascontiguousarray(cent, dtype=np.float32))
    ivf.train(x[:CODEC_TRAIN_MAX])
    index.is_trained = True
    stats.update(codec_s=round(time.time() - t, 1), codec_cpu_s=round(time.process_time() - c, 1))
    t, c = time.time(), time.process_time()
    assigner = Bf16Assigner(cent)
    with tqdm(total=db.ntotal, unit="vec", desc=f"add {key}", leave=False) as bar:
        for arr in db.shards:
            for b0 in range(0, arr.shape[0], ADD_BATCH):
                batch = read_block(arr, b0, min(b0 + ADD_BATCH, arr.shape[0]))
                add_assigned(index, ivf, batch, assigner)
                bar.update(len(batch))
    stats.update(add_s=round(time.time() - t, 1), add_cpu_s=round(time.process_time() - c, 1))
    if fast_scan:  # faiss's IndexIVFPQFastScan(IndexIVFPQ): the same codes, packed for SIMD scans
        fs = faiss.IndexIVFPQFastScan(faiss.downcast_index(ivf))
        out = faiss.IndexPreTransform(pre.chain.at(0), fs) if isinstance(pre, faiss.IndexPreTransform) else fs
        tmp = work / "convert.tmp"
        faiss.write_index(out, str(tmp))
        del out, fs
        index = faiss.read_index(str(tmp))
        tmp.unlink()
    return index, stats


def build_hnsw(db: Db, key: str) -> tuple[Any, dict[str, Any]]:
    """HNSW{M},Flat over every vector (autofaiss's choice below hnsw_max), added in batches."""
    import faiss
    from tqdm.auto import tqdm

    index = faiss.index_factory(db.shards[0].shape[1], key, faiss.METRIC_L2)
    t, c = time.time(), time.process_time()
    with tqdm(total=db.ntotal, unit="vec", desc=f"add {key}", leave=False) as bar:
        for arr in db.shards:
            for b0 in range(0, arr.shape[0], ADD_BATCH):
                batch = read_block(arr, b0, min(b0 + ADD_BATCH, arr.shape[0]))
                index.add(batch)
                bar.update(len(batch))
    return index, {"add_s": round(time.time() - t, 1), "add_cpu_s": round(time.process_time() - c, 1)}


def get_index(db: Db, dbpath: Path, key: str, work: Path, per_list: int, train_max: int) -> tuple[Any, dict[str, Any]]:
    """``key``'s index over the DB's first ntotal vectors: loaded from WORK (or the DB, for
    ``current``) or built and saved there (atomically: temp + rename)."""
    import faiss

    if key == "current":
        index = faiss.read_index(str(DBLayout(dbpath).index))  # a copy in memory: the DB stays untouched
        if index.ntotal != db.ntotal:
            raise SystemExit(f"current: the DB's index holds {index.ntotal} vectors, --rows asks for {db.ntotal}")
        return index, load_manifest(dbpath).get("stages", {}).get("index", {}).get("stats", {}).get("build", {})
    path = work / f"{safe(key)}-{db.ntotal}.index"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        return faiss.read_index(str(path)), json.loads(meta.read_text())
    index, stats = build_hnsw(db, key) if key.startswith("HNSW") else build_ivf_key(db, key, work, per_list, train_max)
    tmp = path.with_suffix(".tmp")
    faiss.write_index(index, str(tmp))
    tmp.rename(path)
    meta.write_text(json.dumps(stats))
    return index, stats


def pipeline(db: Db, index: Any, factor: int, k: int, extra: int, rows: np.ndarray,
             queries: np.ndarray) -> tuple[Callable[[], np.ndarray], float, bool]:
    """(final-neighbour ids of the sample with the index as set, short share, range-first): the
    knn stage's search (KnnStage.setup and _final_train) over this index."""
    def index_search(q: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        d, i = index.search(np.ascontiguousarray(q, dtype=np.float32), c)
        return i.astype(np.int64), d.astype(np.float32)

    read = lambda ids: take_rows(db.shards, ids)  # noqa: E731
    search = reranked(index_search, factor, read, db.ntotal) if factor > 1 else index_search
    ranges = sequence_doc_ranges(db.docs, db.seq_starts, db.chunks_per_seq, rows)
    chunk_r = chunk_ranges_of(ranges, db.docs)
    from index_builder.knn.exclusion import select_neighbours

    cand_i, cand_d = search(queries, min(k + extra, db.ntotal))
    short_share = float(select_neighbours(cand_i, cand_d, k, rows, db_docs=db.docs, doc_ranges=ranges,
                                          content=db.content)[2].mean())
    range_first = prefer_range_first(index, short_share)
    range_search = None
    if range_first or selector_pays(index):
        range_search = faiss_range_search(index, 1)
        if factor > 1:
            range_search = reranked_ranges(range_search, factor, read, db.ntotal)

    def final() -> np.ndarray:
        return search_with_exclusion(search, queries, k, extra, db.ntotal, query_ids=rows, db_docs=db.docs,
                                     doc_ranges=ranges, content=db.content,
                                     row_search=None if range_search is None else
                                     (lambda q, r, c: range_search(q, chunk_r[r], c)),
                                     range_first=range_first)[0]
    return final, short_share, range_first


def params_ladder(index: Any, start: str) -> list[str]:
    """The knn tuner's candidates, cheapest first, from ``start`` (a prefix such as "nprobe=16")."""
    cands = candidate_params(index)
    if start:
        hit = [i for i, p in enumerate(cands) if p.startswith(start + ",") or p == start]
        cands = cands[hit[0]:] if hit else cands
    return cands


def index_bytes(index: Any) -> int:
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def measure(db: Db, index: Any, key: str, factor: int, build: dict[str, Any], args: argparse.Namespace,
            rows: np.ndarray, queries: np.ndarray, exact_d: np.ndarray, start: str) -> Result:
    """Walk ``index``'s parameter ladder from ``start`` until the target; a plain 4-bit IVF-PQ
    (the key chooser's) is searched through its fast-scan copy, as knn does; ``factor`` 0: knn's
    default re-rank for these codes."""
    size = index_bytes(index)
    t = time.perf_counter()
    view = None if args.plain else fast_scan_view(index)
    if view is not None:
        index, build = view, {**build, "searched": "fast-scan copy (index_builder.index.fast_scan)",
                              "view_s": round(time.perf_counter() - t, 2)}
    factor = factor or default_factor(index)
    final, short, range_first = pipeline(db, index, factor, args.k, args.extra, rows, queries)
    res = Result(key, factor, build, round(size / db.ntotal, 1), round(short, 4), range_first)
    read = lambda ids: take_rows(db.shards, ids)  # noqa: E731
    for param in params_ladder(index, start):
        apply_search_params(index, param)
        final()  # warm: the lists' pages and the rows re-ranked
        t, c = time.perf_counter(), time.process_time()
        ids = final()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        rec = round(neighbour_recall(true_distances(queries, ids, read), exact_d), 4)
        step = Step(param, rec, round(cpu, 3), round(wall, 3), round(len(queries) / cpu, 1),
                    round(len(queries) / wall, 1))
        res.steps.append(step)
        print(f"{key} x{factor} {param}: recall@{args.k} {rec} {step.qps_cpu:.0f} q/s (CPU) "
              f"{step.qps_wall:.0f} (wall)", file=sys.stderr, flush=True)
        if rec >= args.target:
            res.chosen = step
            break
    return res


def table(results: list[Result], k: int) -> str:
    base = next((r.chosen.qps_cpu for r in results if r.key == "current" and r.chosen), None)
    lines = [f"| key | re-rank | build s (CPU) | bytes/vector | search param | recall@{k} | q/s (CPU) | q/s (wall) | "
             "vs current |", "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in results:
        cpu_s = sum(v for kk, v in r.build.items() if kk.endswith("cpu_s"))
        c = r.chosen or (max(r.steps, key=lambda s: s.recall) if r.steps else None)
        if c is None:
            continue
        vs = f"{c.qps_cpu / base:.2f}x" if base and r.chosen else "-"
        lines.append(f"| `{r.key}` | x{r.rerank} | {cpu_s:.0f} | {r.bytes_per_vector:.0f} | `{c.param}` | "
                     f"{c.recall:.4f}{'' if r.chosen else ' (target not reached)'} | {c.qps_cpu:,.0f} | "
                     f"{c.qps_wall:,.0f} | {vs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import faiss
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", type=Path, required=True, help="a DB with embeddings (opened read-only)")
    ap.add_argument("--work", type=Path, required=True, help="cache of ground truth, centroids and built indexes")
    ap.add_argument("--keys", default="current", help="keys separated by ';' (factory keys contain commas)")
    ap.add_argument("--rerank", default="0", help="re-rank factors for the keys, ';'-separated, one a key or one "
                    "for all (0: knn's default for the key's codes)")
    ap.add_argument("--start", default="", help="first ladder step, ';'-separated a key (e.g. nprobe=16)")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=0, help="the DB's first ROWS vectors only (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--extra", type=int, default=10, help="knn's --extra: candidates beyond k")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--per-list", type=int, default=64, help="k-means sample a list")
    ap.add_argument("--train-max", type=int, default=262144, help="k-means sample at most")
    ap.add_argument("--plain", action="store_true", help="search 4-bit IVF-PQ codes as stored (no fast-scan copy)")
    ap.add_argument("--json", type=Path, help="append the results here (one JSON line a key)")
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    db = open_db(args.db, args.rows)
    unread = retrieval_only_ranges(load_manifest(args.db), "train")
    rows = query_rows(db, unread, args.queries)
    queries = pick_rows(db.shards, rows)
    exact_d = ground_truth(db, rows, queries, args.k, args.work / f"truth-{db.ntotal}-{len(rows)}-k{args.k}.npy")
    keys = [s.strip() for s in args.keys.split(";") if s.strip()]
    factors = [int(f) for f in args.rerank.split(";")]
    starts = args.start.split(";")
    results = []
    for i, key in enumerate(keys):
        index, build = get_index(db, args.db, key, args.work, args.per_list, args.train_max)
        factor = factors[i] if len(factors) == len(keys) else factors[0]
        start = starts[i] if len(starts) == len(keys) else starts[0]
        res = measure(db, index, key, factor, build, args, rows, queries, exact_d, start)
        results.append(res)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps({**asdict(res), "ntotal": db.ntotal, "queries": len(rows),
                                    "threads": args.threads}) + "\n")
        del index
    print(table(results, args.k))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
