"""The database at scale: chunk, index and knn stages at growing N, their growth, and 1T tokens.

    nice -n 10 python benchmarks/bench_scale.py --sizes 1M,4M          # docs/BENCHMARKS.md section
    python benchmarks/bench_scale.py --sizes 3000,12000 --tiny --no-write  # the test's size

For each size N (train chunks):
- chunk: the real `retro-build-index chunk` on ceil(N / base) hard-linked copies of a real corpus
  (default: the Python standard library's *.py, 64-token chunks, one sentencepiece model trained
  once on the base corpus and passed with --tokenizer): the chunk arrays are real text tiled, and
  every copy's documents get their own doc ids (no copy excludes another);
- embeddings: synthetic, written as the embed stage would (float16 shards, the stage recorded in
  the manifest with embedder "synthetic-clustered"): each chunk is L2-normalised
  topic centre (1024 topics, norm 1) + document offset (norm ~0.6, in a 32-dimensional subspace)
  + chunk noise, the noise scale drawn per document in [0.15, 0.6]: a document's chunks are
  near-duplicates of each other, as in real corpora (code, boilerplate), so the knn exclusions
  force re-searches. BERT is not run (its cost is in
  bench_embed's section; at this scale it is the GPU's job);
- index: the real `retro-build-index index --max-index-memory 2G --current-memory 8G` (the
  key chooser decides; its plan, the build's phases and recall vs exact search are reported);
- knn: the knn stage's own code (KnnStage: index load, recall tuning, then its search with the
  sequence exclusion) on the first ``--knn-queries`` train chunks, beside raw faiss on the same
  index, parameters and queries (k + extra candidates, no exclusion, no re-rank): the 1.2x
  target; where the stage re-ranks PQ candidates (index_builder.knn.rerank) and a float32 copy of
  the vectors fits 8 GiB, faiss's own re-rank (IndexRefine, same k_factor) as well.
  ``--knn-stage SIZES`` also runs the whole `retro-build-index knn` at those sizes (every train
  chunk a query: 13 minutes at 4M here, hours at 16M). ``--real-db DB`` adds the sample
  comparison on a DB with real embeddings (MiniLM-embedded stdlib), where near-duplicates are real.

Each stage runs in its own process: wall seconds, CPU seconds (user + system of the tree: they
do not depend on the shared machine's load) and peak RSS of the process tree (sampled every
20 ms from /proc; memory-mapped pages count), with its private part (RssAnon) beside it.
Growth exponent: the slope of log(CPU s) against log(N) between the smallest and largest size. Projection to 1T tokens (15.6B chunks of 64):
each stage's CPU seconds at the largest size times (15.6B / N)^exponent, divided over M
machines like this one; assumptions are printed with the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_chunk import run_measured  # noqa: E402
from chunk_store.framework import registry  # noqa: E402
from report import machine, write_section  # noqa: E402

TOKENS_1T = 10 ** 12
ASSUMPTIONS = """Assumptions: CPU seconds (not wall: the machine is shared) at the largest size, grown
by the measured exponent between the smallest and largest size (knn: CPU a query times N, its
per-query exponent added), divided by this machine's cores and by M machines: chunk and knn shard
by documents / query ranges with no communication (the stages already shard over torchrun ranks);
the index is one IVF over 15.6B vectors, built as M shards whose lists are merged (faiss
merge_from / OnDiskInvertedLists; issue 9), its k-means on a sample independent of N (a fixed
2-5M vectors, GPU minutes). Not included: BERT embedding (the GPU's job: 15.6B chunks at the
50k chunks/s an H100 target of bench_embed = 3.6 GPU-days), storage (fp16 embeddings 12 TB at
384 dims; SQ8 codes 6 TB, PQ96 1.5 TB) and the bigger nlist (~2^18) that 15.6B vectors want,
which raises the per-query cost by the growth of nprobe needed for recall 0.95. PQ codes are
re-ranked from the fp16 embeddings (48 random rows a query): here they sat in the page cache;
at 12 TB they are NVMe reads, ~48 4-KB reads a query (60k IOPS at this machine's 16M rate)."""
TOPICS = 1024
DOC_OFFSET = 0.6  # a document's offset from its topic centre (norm), the centres of norm 1
STAGES = tuple(e.name for e in registry.stages() if e.in_all)  # chunk, embed, index, knn


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def py(*args: Any) -> list[str]:
    return [sys.executable, *map(str, args)]


# ----------------------------------------------------------------------------- the corpus and chunk


def tile_corpus(src: Sequence[Path], dst: Path, copies: int) -> Path:
    """``copies`` hard-linked (or copied) copies of the files under ``dst/cNNNN/``."""
    import shutil

    for c in range(copies):
        for i, f in enumerate(src):
            out = dst / f"c{c:04d}" / f"{i // 500:03d}" / f.name
            if out.exists():
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, out)
            except OSError:
                shutil.copyfile(f, out)
    return dst


def corpus_files(folder: Path, glob: str, limit_mb: float) -> list[Path]:
    out, total = [], 0
    for f in sorted(folder.rglob(glob)):
        if f.is_file() and "site-packages" not in f.parts and f.stat().st_size > 0:
            out.append(f)
            total += f.stat().st_size
            if total >= limit_mb * 2 ** 20:
                break
    return out


def chunk_cmd(db: Path, corpus: Path, args: argparse.Namespace, tokenizer: Path | None) -> list[str]:
    tok = ["--tokenizer", tokenizer] if tokenizer else ["--vocab-size", args.vocab_size]
    return py("-m", "index_builder", "chunk", "--out", db, "--input", corpus, "--glob", args.glob,
              *tok, "--chunk-size", 64, "--seq-len", args.seq_len, "--val-fraction", 0.002,
              "--workers", args.threads, "--keep-duplicates")  # the tiled copies are the point


# ----------------------------------------------------------------------------- synthetic embeddings


def synthetic_embeddings(doc_ids: np.ndarray, dim: int, seed: int, shard: int) -> np.ndarray:
    """(len(doc_ids), dim) float16, L2-normalised: topic + document + chunk noise (see the module)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((TOPICS, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = rng.standard_normal((32, dim)).astype(np.float32) / math.sqrt(dim)
    freq, phase = rng.uniform(0.1, 10, 32), rng.uniform(0, 2 * math.pi, 32)
    docs = np.asarray(doc_ids, dtype=np.int64)
    h = (docs * 2654435761 + seed) % (2 ** 32)
    topic = h % TOPICS
    doc_code = np.sin(docs[:, None] * freq[None, :] + phase[None, :]).astype(np.float32) * math.sqrt(2)
    scale = 0.15 + 0.45 * ((h >> 10) % 1000 / 1000.0)
    noise = np.random.default_rng([seed, shard]).standard_normal((len(docs), dim)).astype(np.float32)
    # the document offset has norm ~0.6 against the unit topic centre (doc_code @ basis has norm
    # ~sqrt(32): unscaled, documents swamped topics and nothing was clustered)
    offset = (DOC_OFFSET / math.sqrt(basis.shape[0])) * doc_code @ basis
    x = centres[topic] + offset + (scale / math.sqrt(dim))[:, None].astype(np.float32) * noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def write_embeddings(db: Path, dim: int, seed: int = 0, shard_size: int = 262144) -> float:
    """The embed stage's outputs and manifest record, synthetic; returns seconds."""
    from chunk_store import ChunkStore
    from chunk_store.layout import DBLayout
    from chunk_store.manifest import load_manifest, now_iso, record_stage
    from chunk_store.framework.atomic import atomic_save_npy

    t0, started = time.time(), now_iso()
    paths = DBLayout(db)
    manifest = load_manifest(db)
    if manifest.get("stages", {}).get("embed", {}).get("finished"):
        return 0.0
    for split in ("train", "val"):
        docs = ChunkStore.open(db, split).doc_ids  # global doc ids over every shard
        if not len(docs):
            continue
        offset = 10 ** 9 if split == "val" else 0  # val documents are not train's
        paths.embeddings_dir(split).mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(range(0, len(docs), shard_size)):
            emb = synthetic_embeddings(np.asarray(docs[a:a + shard_size]) + offset, dim, seed, i)
            atomic_save_npy(paths.embedding_shard(split, i), emb)
    record_stage(db, "embed", params={"embedder": "synthetic-clustered",
                                      "embedder_id": f"synthetic-clustered-v2-{seed}-{dim}",
                                      "dim": dim, "storage_dtype": "float16", "shard_size": shard_size},
                 started=started, finished=now_iso(), stats={"synthetic": True}, manifest=manifest)
    return time.time() - t0


# ----------------------------------------------------------------------------- knn: ours vs raw faiss


def knn_sample(db: Path, queries: int, k: int, threads: int, target: float, out: Path,
               tune_sample: int = 1000, repeat: int = 1) -> None:
    """(a subprocess) The knn stage's setup (with recall tuning) and search on the first
    ``queries`` train chunks, beside raw faiss on the same index, parameters and queries
    (``repeat`` times over, for a small DB whose one pass takes under a second)."""
    from index_builder.embed.stage import read_rows
    from index_builder.knn.stage import KnnConfig, KnnStage
    from index_builder.knn.rerank import release_pages

    stage = KnnStage(db, KnnConfig(k=k, threads=threads, target_recall=target, device="cpu", exact=False,
                                   tune_sample=tune_sample))
    stage.params(stage.open_manifest())
    t0 = time.time()
    stage.setup()
    setup_s = time.time() - t0
    n = min(queries, stage.ntotal) if queries else stage.ntotal
    emb = stage.emb["train"]
    c = min(k + stage.cfg.extra, stage.ntotal)
    block = stage.cfg.shard_size
    calls = {"rows": 0, "searches": 0}
    base, raw_search = stage.search, stage.raw_search  # ours (re-ranked where the codes are PQ), the index alone

    def counted(q: np.ndarray, cc: int) -> tuple[np.ndarray, np.ndarray]:
        calls["searches"] += 1
        calls["rows"] += len(q)
        return base(q, cc)

    def counted_range(q: np.ndarray, ranges: np.ndarray, cc: int) -> tuple[np.ndarray, np.ndarray]:
        calls["rows"] += len(q)
        return stage.range_search(q, ranges, cc)

    refine = refine_index(stage, emb) if stage.rerank > 1 else None
    ours = raw = refined = 0.0
    missing = 0
    for a in [a for _ in range(repeat) for a in range(0, n, block)]:  # interleaved: the same load for both
        b = min(a + block, n)
        q = read_rows(emb, a, b)
        t = time.perf_counter()
        raw_search(q, c)
        raw += time.perf_counter() - t
        if refine is not None:
            t = time.perf_counter()
            refine.search(q, c)
            refined += time.perf_counter() - t
        t = time.perf_counter()
        ids, _ = stage._final_train(counted, q, np.arange(a, b, dtype=np.int64),
                                    None if stage.range_search is None else counted_range)
        ours += time.perf_counter() - t
        missing += int((ids < 0).sum())
        release_pages(emb)  # as the knn stage does after each shard
    tuning = stage.tuning.as_dict() if stage.tuning is not None else None
    n *= repeat
    out.write_text(json.dumps({"queries": n, "repeat": repeat, "setup_s": setup_s, "ours_s": ours, "raw_s": raw,
                               "ours_rate": n / ours, "raw_rate": n / raw, "ratio": ours / raw,
                               "searched_rows": calls["rows"], "missing": missing, "tuning": tuning,
                               "short_share": stage.short_share, "range_first": stage.range_first,
                               "rerank": stage.rerank,
                               **({"refine_s": refined, "refine_rate": n / refined, "ratio_refine": ours / refined}
                                  if refine is not None else {})}))


def real_row(db: Path, i: int, args: argparse.Namespace) -> dict[str, Any]:
    """knn-sample on a DB with real (MiniLM) embeddings, in its own measured process: the knn
    stage's tuned search against raw faiss on the same index and queries, with the DB's size,
    index and recall. Every query of the DB's first --knn-queries train chunks (all: 0)."""
    from chunk_store.manifest import load_manifest

    out = args.work / f"knn-real-{i}.json"
    wall, cpu, peak, _, _, _ = run_measured(py(Path(__file__).resolve(), "knn-sample", "--db", db,
                                            "--queries", max(args.knn_queries, 0), "--k", args.k,
                                            "--threads", args.threads, "--out", out,
                                            "--target-recall", args.target_recall,
                                            "--tune-sample", args.tune_sample, "--repeat", args.real_repeat))
    stages = load_manifest(db)["stages"]
    return {"db": f"{db.parent.name}/{db.name}", "wall": wall, "cpu": cpu, "peak_mb": peak,
            "chunks": int((stages.get("index", {}).get("stats") or {}).get("ntotal") or 0),
            "embedder": (stages.get("embed", {}).get("stats") or {}).get("embedder")
                        or (stages.get("embed", {}).get("params") or {}).get("model"),
            "index": index_stats(db), **json.loads(out.read_text())}


def real_table(real: list[dict[str, Any]], k: int) -> str:
    """The real-text rows: what the synthetic rows above cannot show (real near-duplicates,
    which force the exclusion re-searches, and real recall against exact search)."""
    if not real:
        return ""
    out = ["### Real text: the knn stage on MiniLM-embedded databases", "",
           f"| DB | indexed chunks | index | tuned search | recall@{k} vs exact (same exclusions) | queries | "
           "ours chunks/s | raw faiss chunks/s | ours / raw time | rows searched a query |",
           "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in real:
        t = r.get("tuning") or {}
        out.append(f"| {r['db']} | {r['chunks']:,} | {r['index'].get('index_key')} | `{t.get('param')}` | "
                   f"{t.get('recall')} | {r['queries'] // r['repeat']:,} x{r['repeat']} | {r['ours_rate']:,.0f} | "
                   f"{r['raw_rate']:,.0f} | {r['ratio']:.2f}x | {r['searched_rows'] / r['queries']:.2f} |")
    return "\n".join(out) + "\n"


def real_only(args: argparse.Namespace, started: str, load0: float, argv: Sequence[str] | None) -> int:
    """--real-only: the real-text rows alone, in section bench_scale_real (the synthetic rows'
    section is left as its own run wrote it)."""
    if not args.real_db:
        raise SystemExit("--real-only needs at least one --real-db DB")
    real = [real_row(db, i, args) for i, db in enumerate(args.real_db)]
    text = real_table(real, args.k)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"real": real}, default=str, indent=1))
    if not args.no_write:
        cmd = "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
        for path, name in [(args.work, "WORK"), *((db, f"WORK/{db.parent.name}/{db.name}") for db in args.real_db)]:
            cmd = cmd.replace(str(path), name)  # the docs name no machine's paths
        if args.json:
            cmd = cmd.replace(f" --json {args.json}", "")
        write_section("bench_scale_real", (
            f"{text.replace('### Real text: ', '## Database at scale on real text: ', 1)}\nCommand: `{cmd.strip()}`  \n"
            f"Machine: {machine('cpu')}; load average {load0:.1f} at the start  \nDate: {started}\n"))
    return 0


def refine_index(stage: Any, emb: list[np.ndarray], budget: float = 8 * 2 ** 30) -> Any:
    """faiss's own re-rank on the same index and parameters (IndexRefine over a flat float32
    copy of every vector, k_factor = our factor): the raw-faiss reference for a re-ranked
    search, where the copy fits ``budget`` bytes (None where not: 16M chunks need 24 GB)."""
    import faiss

    from index_builder.embed.stage import read_rows

    n, dim = stage.ntotal, emb[0].shape[1]
    if n * dim * 4 > budget:
        return None
    flat = faiss.IndexFlatL2(dim)
    for a in range(0, n, 262144):
        flat.add(read_rows(emb, a, min(a + 262144, n)))
    refine = faiss.IndexRefine(stage.index, flat)
    refine.k_factor = float(stage.rerank)
    return RefineSearch(refine, flat)


class RefineSearch:
    """faiss's IndexRefine and the flat copy it points to (kept alive here: the wrapper does
    not own it, and faiss's Python classes take no extra attributes)."""

    def __init__(self, index: Any, flat: Any) -> None:
        self.index, self.flat = index, flat

    def search(self, q: np.ndarray, c: int) -> Any:
        return self.index.search(q, c)


# ----------------------------------------------------------------------------- one size


def run_size(n: int, args: argparse.Namespace, base: dict[str, Any]) -> dict[str, Any]:
    from chunk_store.manifest import load_manifest

    copies = max(1, math.ceil(n / base["chunks"]))
    db = args.work / f"db-{n}"
    corpus = tile_corpus(base["files"], args.work / f"corpus-{copies}", copies)
    cache = args.work / f"row-{n}.json"  # a re-run keeps the stages already measured
    row: dict[str, Any] = json.loads(cache.read_text()) if cache.exists() else {}
    row.update({"n_target": n, "copies": copies})
    if not (db / "manifest.json").exists() or not load_manifest(db)["stages"].get("chunk", {}).get("finished"):
        wall, cpu, peak, _, _, anon = run_measured(chunk_cmd(db, corpus, args, base["tokenizer"]))
        row["chunk"] = {"wall": wall, "cpu": cpu, "peak_mb": peak, "anon_mb": anon}
        cache.write_text(json.dumps(row))
    m = load_manifest(db)
    row["n"] = int(m["counts"]["train"]["chunks"])
    row["text_mb"] = sum(f.stat().st_size for f in base["files"]) * copies / 2 ** 20
    cache.write_text(json.dumps(row))
    if STAGES.index(args.until) < STAGES.index("embed"):
        return row
    row["embed_synthetic_s"] = row.get("embed_synthetic_s") or write_embeddings(db, args.dim, seed=0)
    if STAGES.index(args.until) < STAGES.index("index"):
        return row
    if not load_manifest(db)["stages"].get("index", {}).get("finished"):
        cmd = py("-m", "index_builder", "index", "--db", db, "--max-index-memory", args.max_index_memory,
                 "--current-memory", args.current_memory, "--threads", args.threads, "--device", "cpu",
                 "--recall-sample", args.recall_sample, "--hnsw-max", args.hnsw_max)
        wall, cpu, peak, _, _, anon = run_measured(cmd)
        row["index"] = {"wall": wall, "cpu": cpu, "peak_mb": peak, "anon_mb": anon}
        cache.write_text(json.dumps(row))
    row["index_stats"] = index_stats(db)
    if args.until != "knn":
        return row
    if args.knn_queries >= 0 and "knn" not in row:  # (delete row-N.json to redo)
        out = args.work / f"knn-{n}.json"
        cmd = py(Path(__file__).resolve(), "knn-sample", "--db", db, "--queries", args.knn_queries, "--k", args.k,
                 "--threads", args.threads, "--target-recall", args.target_recall, "--out", out,
                 "--tune-sample", args.tune_sample)
        wall, cpu, peak, _, _, anon = run_measured(cmd)
        row["knn"] = {"wall": wall, "cpu": cpu, "peak_mb": peak, "anon_mb": anon, **json.loads(out.read_text())}
        cache.write_text(json.dumps(row))
    if n in args.knn_stage and "knn_stage" not in row:
        cmd = py("-m", "index_builder", "knn", "--db", db, "--k", args.k, "--threads", args.threads,
                 "--device", "cpu", "--target-recall", args.target_recall, "--tune-sample", args.tune_sample)
        wall, cpu, peak, _, _, anon = run_measured(cmd)
        stats = load_manifest(db)["stages"]["knn"]["stats"]
        row["knn_stage"] = {"wall": wall, "cpu": cpu, "peak_mb": peak, "anon_mb": anon,
                            **{k: stats.get(k) for k in ("search_params", "recall", "rerank", "seconds")}}
        cache.write_text(json.dumps(row))
    return row


def index_stats(db: Path) -> dict[str, Any]:
    from chunk_store.manifest import load_manifest

    stats = load_manifest(db)["stages"].get("index", {}).get("stats") or {}
    return {k: stats.get(k) for k in ("index_key", "plan", "build", "recall", "size_bytes", "build_seconds",
                                      "rerank")}


def base_corpus(args: argparse.Namespace) -> dict[str, Any]:
    """The real corpus, chunked once (one copy): chunks per copy and the tokenizer."""
    from chunk_store.layout import DBLayout
    from chunk_store.manifest import load_manifest

    files = corpus_files(args.corpus, args.glob, args.corpus_mb)
    db = args.work / "db-base"
    if not (db / "manifest.json").exists() or not load_manifest(db)["stages"].get("chunk", {}).get("finished"):
        corpus = tile_corpus(files, args.work / "corpus-1", 1)
        subprocess.run(chunk_cmd(db, corpus, args, None), check=True, stdout=subprocess.DEVNULL)
    m = load_manifest(db)
    return {"files": files, "chunks": int(m["counts"]["train"]["chunks"]), "tokenizer": DBLayout(db).tokenizer}


# ----------------------------------------------------------------------------- the report


def exponent(rows: list[dict[str, Any]], stage: str, key: str = "cpu") -> float | None:
    pts = [(r["n"], r[stage][key]) for r in rows if stage in r and r[stage].get(key)]
    if len(pts) < 2 or pts[0][0] == pts[-1][0]:
        return None
    (n0, t0), (n1, t1) = pts[0], pts[-1]
    return math.log(t1 / t0) / math.log(n1 / n0)


def knn_cpu_per_query(r: dict[str, Any]) -> float:
    """knn CPU seconds a query: the sample process's CPU minus its setup share (wall-weighted)."""
    k = r["knn"]
    search_share = k["ours_s"] / max(k["wall"], 1e-9)
    return k["cpu"] * search_share / k["queries"]


def projection(rows: list[dict[str, Any]], machines: Sequence[int] = (1, 64, 1024)) -> list[str]:
    """Each stage from the largest size that measured it (exponent 1 where one size did)."""
    n1t = TOKENS_1T // 64
    lines = ["| stage | N measured | CPU s at N | exponent | CPU s at 15.6B chunks | " +
             " | ".join(f"days on {m} machine{'s' if m > 1 else ''}" for m in machines) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(machines)]
    for stage in ("chunk", "index", "knn"):
        have = [r for r in rows if stage in r]
        if not have:
            continue
        last = have[-1]
        if stage == "knn":
            cpu_n = knn_cpu_per_query(last) * last["n"]
            e = 1.0 + (exponent([{"n": r["n"], "knn": {"cpu": knn_cpu_per_query(r)}} for r in have], "knn") or 0.0)
        else:
            cpu_n = last[stage]["cpu"]
            e = exponent(have, stage) or 1.0
        total = cpu_n * (n1t / last["n"]) ** e
        days = " | ".join(f"{total / os.cpu_count() / m / 86400:,.1f}" for m in machines)
        lines.append(f"| {stage} | {last['n']:,} | {cpu_n:,.0f} | {e:.2f} | {total:,.3g} | {days} |")
    return lines


def mem(c: dict[str, Any]) -> str:
    """Peak RSS, and the private (anonymous) part where measured: the rest is mapped files."""
    return f"{c['peak_mb']:,.0f}" + (f" ({c['anon_mb']:,.0f})" if c.get("anon_mb") else "")


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| N train chunks | text MB | stage | wall s | CPU s | chunks/s (wall) | peak RSS MB "
           "(private) | detail |",
           "|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        n = r["n"]
        if "chunk" in r:
            c = r["chunk"]
            out.append(f"| {n:,} | {r['text_mb']:,.0f} | chunk | {c['wall']:.0f} | {c['cpu']:.0f} | "
                       f"{n / c['wall']:,.0f} | {mem(c)} | {r['copies']} copies of the corpus |")
        s = r.get("index_stats") or {}
        if "index" in r and s:
            c = r["index"]
            build = s.get("build") or {}
            phases = ", ".join(f"{k.removesuffix('_seconds')} {v:.0f}s" for k, v in build.items()
                               if k.endswith("_seconds"))
            out.append(f"| {n:,} | | index | {c['wall']:.0f} | {c['cpu']:.0f} | {n / c['wall']:,.0f} | "
                       f"{mem(c)} | `{s['index_key']}` ({s['size_bytes'] / 2 ** 20:,.0f} MB; "
                       f"{phases or 'autofaiss'}); recall@2 {s['recall'].get('recall@2')}"
                       + (f" re-ranked x{s['rerank']} (the codes alone: {s['recall'].get('raw_recall@2')})"
                          if (s.get("rerank") or 1) > 1 else "") + " |")
        if "knn_stage" in r:
            k = r["knn_stage"]
            rec = (k.get("recall") or {})
            out.append(f"| {n:,} | | knn stage (every chunk) | {k['wall']:.0f} | {k['cpu']:.0f} | "
                       f"{n / k['wall']:,.0f} | {mem(k)} | `retro-build-index knn`: `{k.get('search_params')}`"
                       f" recall@2 {rec.get('recall@2')}, re-rank x{k.get('rerank')} |")
        if "knn" not in r:
            continue
        k = r["knn"]
        t = k.get("tuning") or {}
        out.append(f"| {n:,} | | knn ({k['queries']:,} queries) | {k['wall']:.0f} | {k['cpu']:.0f} | "
                   f"{k['ours_rate']:,.0f} | {mem(k)} | raw faiss {k['raw_rate']:,.0f}/s: "
                   f"ours {k['ratio']:.2f}x its time; "
                   + (f"`{t['param']}` recall@{t['k']} {t['recall']} (target {t['target']}); " if t else
                      "exact index, nothing to tune; ")
                   + (f"candidates re-ranked x{k['rerank']} (raw: the index alone); "
                      if (k.get("rerank") or 1) > 1 else "")
                   + f"setup+tuning {k['setup_s']:.0f}s; "
                   f"{k['searched_rows'] / k['queries']:.2f} rows searched a query |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    ks = sub.add_parser("knn-sample")
    ks.add_argument("--db", type=Path, required=True)
    ks.add_argument("--queries", type=int, default=0)
    ks.add_argument("--k", type=int, default=2)
    ks.add_argument("--threads", type=int, default=os.cpu_count())
    ks.add_argument("--target-recall", type=float, default=0.95)
    ks.add_argument("--out", type=Path, required=True)
    ks.add_argument("--tune-sample", type=int, default=1000)
    ks.add_argument("--repeat", type=int, default=1, help="search the queries this many times (small DBs)")
    ap.add_argument("--sizes", default="1M,4M", help="train chunks, e.g. 1M,4M,16M")
    ap.add_argument("--work", type=Path, default=Path("/tmp/retro-scale"))
    ap.add_argument("--corpus", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--glob", default="*.py")
    ap.add_argument("--corpus-mb", type=float, default=64.0, help="the base corpus: its first files up to this")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--max-index-memory", default="2G")
    ap.add_argument("--current-memory", default="8G")
    ap.add_argument("--hnsw-max", type=int, default=1_000_000)
    ap.add_argument("--recall-sample", type=int, default=1000)
    ap.add_argument("--knn-queries", type=int, default=65536,
                    help="train chunks the knn rate is measured on (0: all, -1: skip knn)")
    ap.add_argument("--knn-stage", default="",
                    help="sizes (as --sizes) where the whole knn stage also runs, every train chunk a query")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--tune-sample", type=int, default=1000, help="knn's recall sample (vs exact search)")
    ap.add_argument("--until", default="knn", choices=STAGES,
                    help="run the stages up to this one (embed: build the DBs now, index them later); "
                         "stages already done are skipped")
    ap.add_argument("--real-db", type=Path, action="append", default=[],
                    help="also: knn vs raw faiss on this DB (real embeddings); repeat it for a real-text row a size")
    ap.add_argument("--real-only", action="store_true",
                    help="only the --real-db rows, into their own section (bench_scale_real) beside the synthetic one")
    ap.add_argument("--real-repeat", type=int, default=10, help="--real-db: its queries searched this many times")
    ap.add_argument("--tiny", action="store_true", help="test size: small corpus and vocabulary")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="tabulate the rows earlier runs cached in --work")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    args.knn_stage = {parse_size(s) for s in args.knn_stage.split(",") if s.strip()}
    if args.cmd == "knn-sample":
        knn_sample(args.db, args.queries, args.k, args.threads, args.target_recall, args.out, args.tune_sample,
                   args.repeat)
        return 0
    if args.tiny:
        args.corpus_mb, args.vocab_size, args.seq_len, args.dim = min(args.corpus_mb, 0.3), 400, 256, 32
        args.recall_sample, args.knn_queries = 200, 0
        args.knn_stage = {parse_size(s) for s in args.sizes.split(",")}
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = os.getloadavg()[0]
    if args.real_only:
        return real_only(args, started, load0, argv)
    base = {} if args.report_only else base_corpus(args)
    rows = []
    for n in [parse_size(s) for s in args.sizes.split(",")]:
        cache = args.work / f"row-{n}.json"
        if args.report_only:  # what earlier runs measured, nothing run
            if cache.exists():
                rows.append(json.loads(cache.read_text()))
                if "index" in rows[-1] and not rows[-1].get("index_stats"):
                    rows[-1]["index_stats"] = index_stats(args.work / f"db-{n}")
            continue
        rows.append(run_size(n, args, base))
        print(json.dumps(rows[-1], default=str), flush=True)
    real = [real_row(db, i, args) for i, db in enumerate(args.real_db)]
    tab, proj = table(rows), "\n".join(projection(rows))
    print(tab, proj, sep="\n\n")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "real": real}, default=str, indent=1))
    if not args.no_write:
        cmd = "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
        real_line = real_table(real, args.k)
        write_section("bench_scale", (
            f"## Database at scale: chunk, index and knn stages by N\n\nCommand: `{cmd.strip()}`  \n"
            f"Machine: {machine('cpu')}; load average {load0:.1f} at the start  \nDate: {started}\n\n"
            f"{tab}\n\n{real_line}\n### Projection to 1T tokens (15.6B chunks)\n\n{proj}\n\n{ASSUMPTIONS}\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
