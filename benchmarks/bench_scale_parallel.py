"""Issue 24, "Measured": the index built by R ranks vs 1, `add` + `knn --refresh` vs a full rebuild,
and the 1T-token projection redone with these paths.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_scale_parallel.py --work WORK --threads 2 \\
        --ranks 1,2 --size 16M --add-to 4M --added 1M          # the docs/BENCHMARKS.md sections
    python benchmarks/bench_scale_parallel.py --work WORK --report-only   # tabulate what WORK holds
    python benchmarks/bench_scale_parallel.py --tiny --work WORK --no-write   # the test's size

The databases are bench_scale's (its helpers, imported): the real chunk stage on tiled copies of
a real corpus, synthetic clustered embeddings (BERT is not run), `WORK/db-N` chunked and embedded
once and hard-linked into each run's own copy (the stages replace files by rename, never write
into one, so a copy's writes leave the source as it was).

- ``--ranks 1,2`` (at ``--size``): per rank count, `retro-build-index index` (1 rank: the plain
  command; R > 1: under `torchrun --standalone --nproc_per_node R`, ``--threads`` divided over the
  ranks; rank 0 trains the IVF, every rank fills its part(s): index_builder/index/parts.py;
  ``--merge-parts auto`` passed where the CLI has it), then knn: on the first ``--knn-queries``
  train chunks (bench_scale's knn-sample: the knn stage's code, one process), or with
  ``--knn-stage`` the whole `retro-build-index knn` under the same ranks. Per run: wall, CPU
  seconds of the process tree, peak private memory (RssAnon) per rank, parts, recall@2 of the
  final neighbours against exact search (same exclusions) on a sample.
- ``--add-to N --added M``: a base DB of N train chunks indexed and knn'd, then the growth path
  on a copy (`add` of ~M chunks' documents, their synthetic embeddings appended, `index` = a new
  part, `knn --refresh incremental`), each step timed with the bytes it wrote, against a full
  rebuild of the same grown DB on another copy (`index --rebuild`, `knn --refresh full`: every
  row); recall@2 of both paths' final neighbours against exact search on one sample.
- the projection to 1T tokens (15.6B chunks of 64) per machine count and device: the CPU rows
  from this run's figures (exponents between the add base's size and --size where both were
  measured, else bench_scale's documented ones, labelled), the GPU rows from published faiss
  figures (anchors, cited in the table's notes).

Every step's figures are cached in ``WORK/scale-parallel.json``: a re-run skips what is there
(delete a key to redo it), ``--report-only`` tabulates it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_scale  # noqa: E402
from bench_chunk import run_measured  # noqa: E402
from bench_knn_refresh import append_embeddings  # noqa: E402
from report import machine, write_section  # noqa: E402

CHUNKS_1T = 10 ** 12 // 64
SECTIONS = ("bench_scale_parallel_ranks", "bench_scale_parallel_add", "bench_scale_parallel_projection")
RECALL_SEED = 7  # the final-recall sample: not the knn stage's tuning sample (seed 0)
# bench_scale's growth exponents (docs/BENCHMARKS.md, section bench_scale, 2026-12-02: 1M -> 16M),
# used where this run did not measure two sizes
DOCUMENTED_EXPONENTS = {"index": 1.27, "knn_query": 0.67}
NLIST_1T = 2 ** 18  # the lists 15.6B vectors want (bench_scale's assumption)
DIM_1T = 384

# GPU anchors: published faiss figures, scaled by the stated factors (not measured here)
ANCHOR_KNN_GRAPH = {  # Johnson, Douze, Jegou: a k-NN graph over Deep1B (1e9 vectors, 96-d) < 12 h
    "vectors": 10 ** 9, "dim": 96, "gpus": 4, "hours": 12.0,
    "source": "https://arxiv.org/abs/1702.08734 (Billion-scale similarity search with GPUs: "
              "Deep1B k-NN graph in < 12 h on 4 Maxwell Titan X)"}
ANCHOR_KMEANS = {  # faiss wiki: k-means, 1M x 256-d to 20k centroids, 25 iterations = 128T multiply-adds
    "macs": 1.28e14, "seconds": 55.0,
    "source": "https://github.com/facebookresearch/faiss/wiki/Low-level-benchmarks (k-means 1M x 256-d, "
              "20k centroids, 25 iterations: 55 s on one P100, float32)"}
ANCHOR_1G = ("https://github.com/facebookresearch/faiss/wiki/Indexing-1G-vectors (Deep1B "
             "OPQ32,IVF262144,PQ32 on 8 Titan X: 0.232 ms a query, R@1 0.671)")
GPUS_PER_MACHINE = 8
KMEANS_ITERS = 10  # index_builder.index.ivf_build.KMEANS_ITERS
TRAIN_PER_LIST = 64  # IndexConfig.train_per_centroid


# ----------------------------------------------------------------------------- the cache


class Cache:
    """WORK/scale-parallel.json: every finished step's figures, written atomically after each."""

    def __init__(self, work: Path) -> None:
        self.path = work / "scale-parallel.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> Any:
        from chunk_store.framework.atomic import atomic_write_json

        self.data[key] = value
        atomic_write_json(self.path, self.data)
        return value

    def step(self, key: str, fn: Callable[[], Any]) -> Any:
        """``fn()``'s figures, run once: a re-run after a crash redoes only the unfinished steps.
        Each step says when it starts and ends (a full-size run takes hours; the stages' own
        progress bars go to their captured stderr)."""
        if key in self.data:
            return self.data[key]
        t0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {key} ...", file=sys.stderr, flush=True)
        value = self.put(key, fn())
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        return value


# ----------------------------------------------------------------------------- databases and commands


def link_copy(src: Path, dst: Path, fresh: bool = False) -> Path:
    """``dst``: ``src`` with every file hard-linked (copied where links fail), made under a temporary
    name and renamed in whole. ``fresh``: without the index, the neighbours and the manifest's index
    and knn records (a DB to index from scratch)."""
    from chunk_store.framework.atomic import atomic_write_json
    from chunk_store.layout import INDEX_DIR, KNN_SHARDS_DIR, MANIFEST

    if dst.exists():
        return dst
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    skip = {INDEX_DIR, KNN_SHARDS_DIR, "neighbours", "neighbours.npy", "neighbour_distances.npy"} if fresh else set()

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, tmp, copy_function=link, ignore=lambda _, names: [n for n in names if n in skip])
    if fresh:
        manifest = json.loads((tmp / MANIFEST).read_text())
        for stage in ("index", "knn"):
            manifest.get("stages", {}).pop(stage, None)
        atomic_write_json(tmp / MANIFEST, manifest)
    os.replace(tmp, dst)
    return dst


def inodes(db: Path) -> set[tuple[int, int]]:
    return {(s.st_dev, s.st_ino) for s in (p.stat() for p in db.rglob("*") if p.is_file())}


def bytes_new(db: Path, before: set[tuple[int, int]]) -> int:
    """Bytes of the files under ``db`` that are not among ``before``'s inodes: what a step wrote
    (a file rewritten by rename is a new inode; the hard-linked, untouched ones are not)."""
    total = 0
    for p in db.rglob("*"):
        if p.is_file():
            s = p.stat()
            if (s.st_dev, s.st_ino) not in before:
                total += s.st_size
    return total


def has_index_option(flag: str) -> bool:
    """Whether `retro-build-index index` takes ``flag`` (e.g. --merge-parts, another branch's)."""
    from index_builder.index.stage import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return flag in p.format_help().split()


def under_ranks(ranks: int, argv: Sequence[Any]) -> list[str]:
    """`python -m index_builder ARGV`, under torchrun where ``ranks`` > 1."""
    if ranks <= 1:
        return bench_scale.py("-m", "index_builder", *argv)
    return bench_scale.py("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", ranks,
                          "-m", "index_builder", *argv)


def measured(cmd: list[str], threads: int, db: Path | None = None) -> dict[str, Any]:
    """Wall, CPU s of the tree, peak RSS and private memory (tree, and per rank), bytes written."""
    before = inodes(db) if db is not None else set()
    per_rank: dict[str, float] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    wall, cpu, peak, _, _, anon = run_measured(cmd, env=env, rank_anon_mb=per_rank)
    if "0" not in per_rank and "launcher" in per_rank:  # one process, no torchrun: it is rank 0
        per_rank["0"] = per_rank.pop("launcher")
    out = {"wall": wall, "cpu": cpu, "peak_mb": peak, "anon_mb": anon,
           "rank_anon_mb": {r: round(v, 1) for r, v in sorted(per_rank.items())}}
    if db is not None:
        out["bytes_written"] = bytes_new(db, before)
    return out


def index_argv(db: Path, args: argparse.Namespace, threads: int, *extra: Any) -> list[Any]:
    merge = ["--merge-parts", "auto"] if has_index_option("--merge-parts") else []
    return ["index", "--db", db, "--max-index-memory", args.max_index_memory, "--current-memory",
            args.current_memory, "--threads", threads, "--device", "cpu", "--recall-sample", args.recall_sample,
            "--hnsw-max", args.hnsw_max, *merge, *extra]


def knn_argv(db: Path, args: argparse.Namespace, threads: int, *extra: Any) -> list[Any]:
    return ["knn", "--db", db, "--k", args.k, "--threads", threads, "--device", "cpu",
            "--target-recall", args.target_recall, "--tune-sample", args.tune_sample, *extra]


def index_figures(db: Path) -> dict[str, Any]:
    """What the index stage recorded: key, parts, the merge (where the CLI merges), phases, recall."""
    from chunk_store.manifest import load_manifest

    stats = load_manifest(db)["stages"]["index"].get("stats") or {}
    return {**bench_scale.index_stats(db), "parts": stats.get("parts"), "merge": stats.get("merge"),
            "ntotal": stats.get("ntotal")}


def final_recall(db: Path, k: int, sample: int, seed: int = RECALL_SEED) -> float:
    """recall@k of the neighbours the knn stage wrote for a sample of train rows against exact
    search with the same exclusions (the knn stage's own recall rule: index_builder.knn.tuning)."""
    from chunk_store.neighbour_shards import open_neighbours
    from index_builder.index.exact_search import ExactSearchConfig, exact_search
    from index_builder.knn.exclusion import sequence_doc_ranges
    from index_builder.knn.ranged_reads import chunk_ranges_of
    from index_builder.knn.rerank import pick_rows, take_rows, true_distances
    from index_builder.knn.stage import KnnConfig, KnnStage
    from index_builder.knn.tuning import neighbour_recall

    stage = KnnStage(db, KnnConfig(k=k, exact=True, device="cpu", target_recall=0, tune_sample=sample))
    stage.params(stage.open_manifest())
    stage.setup()
    rows = np.sort(stage._sample_rows(seed))
    emb = stage.emb["train"]
    queries = pick_rows(emb, rows)
    ranges = sequence_doc_ranges(stage.train_docs, stage.train_seq_starts, stage.chunks_per_seq, rows)
    _, exact_d = exact_search(queries, emb, k, ExactSearchConfig(device="cpu"),
                              exclude=chunk_ranges_of(ranges, stage.train_docs), valid=stage.content)
    got = np.asarray(open_neighbours(db, "train")[0][rows])
    return round(neighbour_recall(true_distances(queries, got, lambda u: take_rows(emb, u)), exact_d), 4)


def scale_args(args: argparse.Namespace) -> argparse.Namespace:
    """bench_scale's options for its chunk + synthetic-embeddings steps (run_size up to embed)."""
    return argparse.Namespace(**{**vars(args), "until": "embed", "knn_queries": -1, "knn_stage": set()})


def embedded_db(n: int, args: argparse.Namespace, base: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """WORK/db-N chunked and embedded by bench_scale (its row: the chunk stage's figures)."""
    row = bench_scale.run_size(n, scale_args(args), base)
    return args.work / f"db-{n}", row


# ----------------------------------------------------------------------------- (a) ranks


def run_ranks(n: int, ranks: int, args: argparse.Namespace, base: dict[str, Any], cache: Cache) -> dict[str, Any]:
    """The index (and knn) of the DB of ``n`` chunks built by ``ranks`` ranks, on its own copy."""
    src, row = embedded_db(n, args, base)
    key = f"ranks-{n}-{ranks}"
    db = link_copy(src, args.work / f"db-{n}-r{ranks}", fresh=True)
    threads = max(1, args.threads // ranks)
    cache.step(key + "/index", lambda: {**measured(under_ranks(ranks, index_argv(db, args, threads)), threads),
                                        **index_figures(db), "threads_per_rank": threads})

    def knn_stage() -> dict[str, Any]:
        from chunk_store.manifest import load_manifest

        figures = measured(under_ranks(ranks, knn_argv(db, args, threads)), threads)
        stats = load_manifest(db)["stages"]["knn"]["stats"]
        return {**figures, "mode": "stage", "queries": int(row["n"]), "search_params": stats.get("search_params"),
                "final_recall": final_recall(db, args.k, args.recall_sample)}

    def knn_sample() -> dict[str, Any]:
        """bench_scale's knn-sample (one process): its recall is the knn stage's own measure of
        the final neighbours on its tuning sample against exact search."""
        out_json = args.work / f"knn-sample-{n}-r{ranks}.json"
        cmd = bench_scale.py(Path(bench_scale.__file__).resolve(), "knn-sample", "--db", db, "--queries",
                             args.knn_queries, "--k", args.k, "--threads", args.threads, "--target-recall",
                             args.target_recall, "--out", out_json, "--tune-sample", args.tune_sample)
        figures = measured(cmd, args.threads)
        sample = json.loads(out_json.read_text())
        tuning = sample.get("tuning") or {}
        return {**figures, **sample, "mode": "sample",
                "final_recall": tuning.get("recall", 1.0)}  # no tuning: an exact index

    knn = cache.step(key + "/knn", knn_stage if args.knn_stage else knn_sample)
    return {"n": int(row["n"]), "ranks": ranks, "threads_per_rank": threads, "index": cache.get(key + "/index"),
            "knn": knn}


# ----------------------------------------------------------------------------- (b) add + refresh vs rebuild


def added_corpus(n_added: int, args: argparse.Namespace, base: dict[str, Any]) -> Path:
    """Tiled copies of the base corpus under their own folder (new paths, new documents: the
    add stage keeps them with --keep-duplicates), ~``n_added`` train chunks."""
    copies = max(1, math.ceil(n_added / base["chunks"]))
    return bench_scale.tile_corpus(base["files"], args.work / f"corpus-add-{copies}", copies)


def run_add(n_base: int, n_added: int, args: argparse.Namespace, base: dict[str, Any], cache: Cache) -> dict[str, Any]:
    """The growth path and the full rebuild, each step cached (see the module)."""
    src, row = embedded_db(n_base, args, base)
    key, folder = f"add-{n_base}-{n_added}", args.work / f"add-{n_base}-{n_added}"
    folder.mkdir(exist_ok=True)
    threads = args.threads

    def step(name: str, db: Path, argv: Sequence[Any]) -> dict[str, Any]:
        return cache.step(f"{key}/{name}", lambda: measured(bench_scale.py("-m", "index_builder", *argv), threads, db))

    base_db = link_copy(src, folder / "base", fresh=True)
    step("base index", base_db, index_argv(base_db, args, threads))
    step("base knn", base_db, knn_argv(base_db, args, threads))
    grown = link_copy(base_db, folder / "grown")
    step("add", grown, ["add", "--db", grown, "--input", added_corpus(n_added, args, base), "--glob", args.glob,
                        "--keep-duplicates", "--workers", threads])

    def embeddings() -> dict[str, Any]:
        before, t0 = inodes(grown), time.time()
        append_embeddings(grown, seed=0, dim=args.dim)
        return {"wall": time.time() - t0, "bytes_written": bytes_new(grown, before), "synthetic": True}

    cache.step(f"{key}/embeddings", embeddings)
    full = link_copy(grown, folder / "full")  # the grown DB before its index knows the new chunks
    step("index add", grown, index_argv(grown, args, threads))
    # the forward merge on a copy (every old row searches the added chunks), beside the refresh
    # that --refresh chooses (the reverse pass, where the index is an IVF: index_builder.knn.reverse_refresh)
    forward = link_copy(grown, folder / "forward")
    step("knn refresh", grown, knn_argv(grown, args, threads, "--refresh", "incremental"))
    step("knn refresh forward", forward, knn_argv(forward, args, threads, "--refresh", "incremental",
                                                  "--reverse-depth", 0))
    step("index rebuild", full, index_argv(full, args, threads, "--rebuild"))
    step("knn full", full, knn_argv(full, args, threads, "--refresh", "full"))
    recall = cache.step(f"{key}/recall", lambda: {
        "incremental": final_recall(grown, args.k, args.recall_sample),
        "forward": final_recall(forward, args.k, args.recall_sample),
        "full": final_recall(full, args.k, args.recall_sample)})
    from chunk_store.manifest import load_manifest

    grown_n = int(load_manifest(grown)["counts"]["train"]["chunks"])
    return {"n_base": int(row["n"]), "n_added": grown_n - int(row["n"]),
            "steps": {s: cache.get(f"{key}/{s}") for s in ADD_STEPS + FULL_STEPS + BASE_STEPS + FORWARD_STEPS},
            "added_search": {name: knn_refresh_how(db) for name, db in (("knn refresh", grown),
                                                                        ("knn refresh forward", forward))},
            "index_base": index_figures(base_db), "index_grown": index_figures(grown),
            "index_full": index_figures(full), "recall": recall}


def knn_refresh_how(db: Path) -> str | None:
    """How the refresh found the added chunks (stages.knn.stats.refresh.added_search)."""
    from chunk_store.manifest import load_manifest

    return load_manifest(db)["stages"].get("knn", {}).get("stats", {}).get("refresh", {}).get("added_search")


BASE_STEPS = ("base index", "base knn")
FORWARD_STEPS = ("knn refresh forward",)
ADD_STEPS = ("add", "embeddings", "index add", "knn refresh")
FULL_STEPS = ("index rebuild", "knn full")
# like for like: both paths start from the same grown chunks and embeddings
COMPARED = ({"index add", "knn refresh"}, set(FULL_STEPS))


# ----------------------------------------------------------------------------- (c) the projection


@dataclass(frozen=True)
class ProjectionInputs:
    """The measured figures the projection grows to 15.6B chunks (CPU seconds unless named)."""

    n: int  # train chunks where the figures below were measured
    index_cpu: float  # the whole index stage, one rank
    train_cpu: float  # its share training the IVF (rank 0 alone: sample, k-means, codec)
    nlist: int  # the lists of the index measured (k-means costs grow as nlist^2)
    index_exponent: float  # log-log slope of the index stage's CPU between two sizes
    knn_cpu_query: float  # knn CPU a query at n
    knn_query_exponent: float  # its log-log slope
    cores: int  # of one CPU machine
    merge_wall: float = 0.0  # the on-disk merge of the parts (serial), at n
    add_ratio: float | None = None  # CPU of index add + refresh / CPU of the full rebuild (index + knn)
    add_share: float = 0.25  # the added chunks over the base's, where add_ratio was measured
    exponents_from: str = "measured"


def projection(p: ProjectionInputs, machines: Sequence[int] = (1, 64, 1024)) -> list[dict[str, Any]]:
    """Rows {stage, device, source, total (CPU or GPU seconds), days (one a machine count)}.

    A serial row (k-means on rank 0, the merge) takes its time on any machine count; the others
    divide over ``cores`` (CPU) or GPUS_PER_MACHINE (GPU) x M machines."""
    grow = CHUNKS_1T / p.n
    rows: list[dict[str, Any]] = []

    def add(stage: str, device: str, source: str, total: float, per_machine: float, serial: bool) -> None:
        days = [total / per_machine / (1 if serial else m) / 86400 for m in machines]
        rows.append({"stage": stage, "device": device, "source": source, "total": total, "days": days})

    kmeans = p.train_cpu * (NLIST_1T / p.nlist) ** 2
    fill = (p.index_cpu - p.train_cpu) * grow ** p.index_exponent
    knn = p.knn_cpu_query * grow ** p.knn_query_exponent * CHUNKS_1T
    add("index: train the IVF (rank 0)", "CPU", f"measured at {p.n:,}; x (2^18 lists / {p.nlist})^2",
        kmeans, p.cores, True)
    add("index: fill the parts", "CPU", f"measured at {p.n:,}; exponent {p.index_exponent:.2f} "
        f"({p.exponents_from})", fill, p.cores, False)
    if p.merge_wall:
        add("index: merge the parts on disk", "CPU", f"measured at {p.n:,}; linear in N (bytes copied)",
            p.merge_wall * grow, 1, True)
    add("knn: every chunk", "CPU", f"measured at {p.n:,}; CPU a query x N, exponent "
        f"{1 + p.knn_query_exponent:.2f} ({p.exponents_from})", knn, p.cores, False)
    if p.add_ratio is not None:
        add(f"add {p.add_share:.0%} + knn --refresh", "CPU", f"measured ratio {p.add_ratio:.2f} x the full rebuild above",
            p.add_ratio * (kmeans + fill + knn), p.cores, False)
    rate = ANCHOR_KMEANS["macs"] / ANCHOR_KMEANS["seconds"]  # multiply-adds a GPU-second
    g_kmeans = TRAIN_PER_LIST * NLIST_1T * NLIST_1T * DIM_1T * KMEANS_ITERS / rate
    g_fill = CHUNKS_1T * NLIST_1T * DIM_1T / rate
    a = ANCHOR_KNN_GRAPH
    g_knn = a["hours"] * 3600 * a["gpus"] * (CHUNKS_1T / a["vectors"]) ** (1 + p.knn_query_exponent) * DIM_1T / a["dim"]
    add("index: train the IVF (one GPU)", "GPU", "anchor [k-means]: its multiply-adds a second", g_kmeans, 1, True)
    add("index: fill the parts (brute-force assignment)", "GPU", "anchor [k-means]: its multiply-adds a second",
        g_fill, GPUS_PER_MACHINE, False)
    add("knn: every chunk", "GPU", f"anchor [k-NN graph] x (N/1e9)^{1 + p.knn_query_exponent:.2f} "
        f"x {DIM_1T}/{a['dim']} dims", g_knn, GPUS_PER_MACHINE, False)
    if p.add_ratio is not None:
        add(f"add {p.add_share:.0%} + knn --refresh", "GPU", f"measured ratio {p.add_ratio:.2f} x the GPU rebuild above",
            p.add_ratio * (g_kmeans + g_fill + g_knn), GPUS_PER_MACHINE, False)
    return rows


def projection_table(rows: Sequence[dict[str, Any]], machines: Sequence[int] = (1, 64, 1024)) -> str:
    head = " | ".join(f"days on {m} machine{'s' if m > 1 else ''}" for m in machines)
    out = [f"| stage | device | source | CPU or GPU seconds at 15.6B chunks | {head} |",
           "|---|---|---|---:|" + "---:|" * len(machines)]
    for r in rows:
        days = " | ".join(f"{d:,.2f}" if d < 10 else f"{d:,.0f}" for d in r["days"])
        out.append(f"| {r['stage']} | {r['device']} | {r['source']} | {r['total']:,.3g} | {days} |")
    return "\n".join(out)


def merge_seconds(merge: Any) -> float:
    """Seconds of the on-disk merge of the parts (the index stage's stats["merge"], recorded where
    `index --merge-parts` merged): its "seconds", else the sum of its *_seconds; 0 where none."""
    if not isinstance(merge, dict):
        return 0.0
    if isinstance(merge.get("seconds"), (int, float)):
        return float(merge["seconds"])
    return float(sum(v for k, v in merge.items() if k.endswith("_seconds") and isinstance(v, (int, float))))


def nlist_of(key: str | None) -> int:
    import re

    m = re.search(r"IVF(\d+)", key or "")
    return int(m.group(1)) if m else 1


def add_ratio(steps: dict[str, Any]) -> float | None:
    """CPU of the growth path's index add + refresh over the full rebuild's index + knn."""
    inc, full = COMPARED
    if not all(steps.get(s) for s in inc | full):
        return None
    return sum(steps[s]["cpu"] for s in inc) / sum(steps[s]["cpu"] for s in full)


def slope(a: tuple[float, float], b: tuple[float, float]) -> float | None:
    """log-log slope between (n, y) points; None where the sizes are equal or a figure is missing."""
    if not (a[0] and b[0] and a[1] and b[1]) or a[0] == b[0]:
        return None
    return math.log(b[1] / a[1]) / math.log(b[0] / a[0])


def knn_cpu_query(knn: dict[str, Any]) -> float:
    """knn CPU a query: the whole stage's CPU over its queries, or bench_scale's sample rule."""
    if knn.get("mode") == "stage":
        return knn["cpu"] / knn["queries"]
    return bench_scale.knn_cpu_per_query({"knn": knn})


def projection_inputs(ranks: Sequence[dict[str, Any]], add: dict[str, Any] | None, cores: int) -> ProjectionInputs | None:
    """From the 1-rank run (or the add base where there is none): two sizes give the exponents."""
    one = next((r for r in ranks if r["ranks"] == 1), None)
    points: list[tuple[int, dict[str, Any], dict[str, Any]]] = []  # (n, index, knn) by size
    if add is not None:
        s = add["steps"]
        if s.get("base index") and s.get("base knn"):
            points.append((add["n_base"], {**s["base index"], **add.get("index_base", {})},
                           {**s["base knn"], "mode": "stage", "queries": add["n_base"]}))
    if one is not None:
        points.append((one["n"], one["index"], one["knn"]))
    if not points:
        return None
    points.sort(key=lambda t: t[0])
    n, index, knn = points[-1]
    e_index = e_query = None
    if len(points) > 1:
        (n0, i0, k0) = points[0]
        e_index = slope((n0, i0["cpu"]), (n, index["cpu"]))
        e_query = slope((n0, knn_cpu_query(k0)), (n, knn_cpu_query(knn)))
    measured_both = e_index is not None and e_query is not None
    build = index.get("build") or {}
    train_wall = sum(build.get(f"{p}_seconds") or 0.0 for p in ("sample", "kmeans", "codec"))
    threads = (one or {}).get("threads_per_rank") or cores
    merge_wall = max([merge_seconds(r["index"].get("merge")) for r in ranks if r["n"] == n] + [0.0])
    ratio = add_ratio(add["steps"]) if add is not None else None
    share = add["n_added"] / add["n_base"] if add is not None and add["n_base"] else 0.25
    return ProjectionInputs(
        n=n, index_cpu=index["cpu"], train_cpu=min(train_wall * threads, index["cpu"]),
        nlist=nlist_of(index.get("index_key")),
        index_exponent=e_index if measured_both else DOCUMENTED_EXPONENTS["index"],
        knn_cpu_query=knn_cpu_query(knn),
        knn_query_exponent=e_query if measured_both else DOCUMENTED_EXPONENTS["knn_query"],
        cores=cores, merge_wall=merge_wall, add_ratio=ratio, add_share=share,
        exponents_from=(f"measured {points[0][0]:,} -> {n:,}" if measured_both
                        else "bench_scale's, docs/BENCHMARKS.md 2026-12-02"))


# ----------------------------------------------------------------------------- the report


def per_rank(figures: dict[str, Any]) -> str:
    """Peak private memory (MB) of each rank, torchrun's launcher apart."""
    ranks = figures.get("rank_anon_mb") or {}
    out = ", ".join(f"r{r} {mb:,.0f}" for r, mb in ranks.items() if r != "launcher")
    return out + (f" (launcher {ranks['launcher']:,.0f})" if "launcher" in ranks else "")


def ranks_table(rows: Sequence[dict[str, Any]]) -> str:
    out = ["| N train chunks | ranks x threads | index key | parts (merge) | index wall s | index CPU s | "
           "index private MB a rank | index recall@2 | knn | knn wall s | knn CPU s | knn private MB a rank | "
           "final neighbours recall@2 vs exact |",
           "|---:|---|---|---|---:|---:|---|---:|---|---:|---:|---|---:|"]
    for r in rows:
        i, k = r["index"], r["knn"]
        merge = i.get("merge")
        merged = "" if not isinstance(merge, dict) else (
            f" (not merged: {merge['skipped']})" if "skipped" in merge else
            f" ({len(merge.get('parts') or [])} merged in {merge_seconds(merge):.0f} s)")
        knn = f"whole stage ({k['queries']:,} queries)" if k["mode"] == "stage" else \
            f"sample ({k['queries']:,} queries, one process)"
        out.append(f"| {r['n']:,} | {r['ranks']} x {r['threads_per_rank']} | `{i.get('index_key')}` | "
                   f"{i.get('parts') or 1}{merged} | {i['wall']:.0f} | {i['cpu']:.0f} | {per_rank(i)} | "
                   f"{(i.get('recall') or {}).get('recall@2')} | {knn} | {k['wall']:.0f} | {k['cpu']:.0f} | "
                   f"{per_rank(k)} | {k['final_recall']} |")
    return "\n".join(out)


def add_table(a: dict[str, Any]) -> str:
    out = ["| path | step | wall s | CPU s | peak RSS MB (private) | bytes written |", "|---|---|---:|---:|---:|---:|"]
    groups = (("base (before the add)", BASE_STEPS), ("add + refresh", ADD_STEPS),
              ("the forward merge instead (--reverse-depth 0)", FORWARD_STEPS), ("full rebuild", FULL_STEPS))
    for path, steps in groups:
        for s in steps:
            f = a["steps"].get(s)
            if not f:
                continue
            cpu = f"{f['cpu']:.0f}" if "cpu" in f else "-"
            mem = bench_scale.mem(f) if "peak_mb" in f else "-"
            out.append(f"| {path} | {s}{' (synthetic)' if f.get('synthetic') else ''} | {f['wall']:.0f} | {cpu} | "
                       f"{mem} | {f.get('bytes_written', 0):,} |")
    inc, full = COMPARED
    total = lambda names, key: sum(a["steps"][s][key] for s in names if a["steps"].get(s))  # noqa: E731
    ratio = add_ratio(a["steps"])
    lines = [f"{a['n_base']:,} train chunks + {a['n_added']:,} added. Index add + refresh: "
             f"{total(inc, 'wall'):.0f} s wall, {total(inc, 'cpu'):.0f} CPU s, "
             f"{total(inc, 'bytes_written'):,} bytes written; full rebuild (index + knn every row): "
             f"{total(full, 'wall'):.0f} s wall, {total(full, 'cpu'):.0f} CPU s, "
             f"{total(full, 'bytes_written'):,} bytes written"
             + (f"; CPU ratio {ratio:.2f}" if ratio is not None else "") + ".",
             f"recall@2 of the final neighbours vs exact search (same exclusions, one sample): add + refresh "
             f"{a['recall']['incremental']}"
             + (f" (added chunks found by: {a['added_search']['knn refresh']}; the forward merge "
                f"{a['recall']['forward']})" if a.get("added_search") and "forward" in a["recall"] else "")
             + f", full rebuild {a['recall']['full']}. Index after the add: "
             f"`{a['index_grown'].get('index_key')}`, {a['index_grown'].get('parts')} parts; rebuilt: "
             f"`{a['index_full'].get('index_key')}`, {a['index_full'].get('parts')} parts."]
    return "\n".join(out) + "\n\n" + "\n\n".join(lines)


PROJECTION_NOTES = f"""CPU rows: this run's CPU seconds at its largest measured size, grown to 15.6B chunks by
the exponent shown, divided over the cores of a machine like this one and M machines (the parts
are filled by every rank with no communication; knn shards query ranges). Training the IVF stays
on rank 0: its k-means grows as lists^2 (64 vectors a list, 2^18 lists at 15.6B). The merge of
the parts into one file (where measured) is a serial copy of every code. GPU rows are anchors,
not measured here: a machine = {GPUS_PER_MACHINE} GPUs of the anchors' generation (Maxwell Titan X / P100;
an H100 is several times faster, not credited):
[k-NN graph] {ANCHOR_KNN_GRAPH['source']};
[k-means] {ANCHOR_KMEANS['source']};
for scale, {ANCHOR_1G}.
Not included: BERT embedding (bench_scale's section: 3.6 H100-days), storage, and the larger
nprobe that 2^18 lists need for the same recall."""


def load_results(args: argparse.Namespace, cache: Cache) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """--report-only: the rows earlier runs cached (the figures the run functions return)."""
    ranks = []
    for r in args.ranks:
        key = f"ranks-{args.size}-{r}"
        if cache.get(key + "/index") and cache.get(key + "/knn"):
            db = args.work / f"db-{args.size}-r{r}"
            index = cache.get(key + "/index")
            ranks.append({"n": int(index.get("ntotal") or args.size), "ranks": r,
                          "threads_per_rank": index.get("threads_per_rank") or max(1, args.threads // r), "index": index,
                          "knn": cache.get(key + "/knn"), "db": str(db)})
    add = cache.get(f"add-{args.add_to}-{args.added}/result") if args.add_to else None
    return ranks, add


def sections(ranks: Sequence[dict[str, Any]], add: dict[str, Any] | None, cores: int,
             header: str) -> dict[str, str]:
    """The three sections' texts (those with figures)."""
    out = {}
    if ranks:
        out[SECTIONS[0]] = (f"## Index by R ranks as parts vs one rank (issue 24)\n\n{header}\n\n{ranks_table(ranks)}\n\n"
                            "Private memory is RssAnon (the rest of a rank's RSS is the memory-mapped embeddings and "
                            "parts); CPU s is the whole process tree's (torchrun's launcher included).")
    if add:
        out[SECTIONS[1]] = f"## add + knn --refresh vs a full rebuild (issue 24)\n\n{header}\n\n{add_table(add)}"
    inputs = projection_inputs(ranks, add, cores)
    if inputs is not None:
        out[SECTIONS[2]] = (f"## Projection to 1T tokens with the parts and add paths (issue 24)\n\n{header}\n\n"
                            f"Inputs: `{json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(inputs).items()})}`\n\n"
                            f"{projection_table(projection(inputs))}\n\n{PROJECTION_NOTES}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/retro-scale-parallel"))
    ap.add_argument("--ranks", default="1,2", help="rank counts the index (and knn) run under; '' to skip")
    ap.add_argument("--size", default="16M", help="train chunks of the DB the ranks build")
    ap.add_argument("--add-to", default="4M", help="train chunks of the DB that grows ('' to skip)")
    ap.add_argument("--added", default="1M", help="train chunks added to it")
    ap.add_argument("--knn-queries", type=int, default=65536, help="knn after each ranks build: on this many queries")
    ap.add_argument("--knn-stage", action="store_true", help="knn after each ranks build: the whole stage, every "
                                                             "train chunk a query, under the same ranks")
    ap.add_argument("--corpus", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--glob", default="*.py")
    ap.add_argument("--corpus-mb", type=float, default=64.0)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all (divided over ranks)")
    ap.add_argument("--max-index-memory", default="2G")
    ap.add_argument("--current-memory", default="8G")
    ap.add_argument("--hnsw-max", type=int, default=1_000_000)
    ap.add_argument("--recall-sample", type=int, default=1000, help="rows of every recall sample")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--tune-sample", type=int, default=1000)
    ap.add_argument("--tiny", action="store_true", help="test size: a small corpus, 32 dims, every chunk a knn query")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--docs", type=Path, default=None, help="the markdown file to write (default docs/BENCHMARKS.md)")
    ap.add_argument("--report-only", action="store_true", help="tabulate what --work holds; run nothing")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    args.ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    args.size = bench_scale.parse_size(args.size)
    args.add_to = bench_scale.parse_size(args.add_to) if args.add_to else 0
    args.added = bench_scale.parse_size(args.added)
    if args.tiny:
        args.corpus_mb, args.vocab_size, args.seq_len, args.dim = min(args.corpus_mb, 0.3), 400, 256, 32
        args.recall_sample, args.tune_sample, args.knn_stage = 200, 200, True
    args.work.mkdir(parents=True, exist_ok=True)
    cache = Cache(args.work)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = os.getloadavg()[0]
    if args.report_only:
        ranks, add = load_results(args, cache)
    else:
        base = bench_scale.base_corpus(args)
        ranks = [run_ranks(args.size, r, args, base, cache) for r in args.ranks]
        add = None
        if args.add_to:
            add = cache.put(f"add-{args.add_to}-{args.added}/result",
                            run_add(args.add_to, args.added, args, base, cache))
    cmd = "python benchmarks/bench_scale_parallel.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for path, name in ((args.json, "OUT.json"), (args.docs, "DOCS.md"), (args.work, "WORK"),
                       (sysconfig.get_paths()["stdlib"], "STDLIB")):
        cmd = cmd.replace(str(path), name) if path else cmd  # the docs name no machine's paths
    header = (f"Command: `{cmd.strip()}`  \nMachine: {machine('cpu')}; load average {load0:.1f} at the start  \n"
              f"Date: {started}")
    texts = sections(ranks, add, os.cpu_count() or 1, header)
    print("\n\n".join(texts.values()))
    if args.json:
        args.json.write_text(json.dumps({"ranks": ranks, "add": add, "sections": texts}, default=str, indent=1))
    if not args.no_write:
        for name, text in texts.items():
            write_section(name, text, **({"path": args.docs} if args.docs else {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
