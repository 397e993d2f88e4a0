"""The Retriever at scale: start-up by N, and lookups under concurrent load with and without
the old global lock (issue 24).

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/bench_retriever_scale.py --sizes 1M,16M
    python benchmarks/bench_retriever_scale.py --sizes 3000 --tiny      # the test's size

For each size N (train chunks):
- the database: bench_scale's builders, imported (the real chunk stage on hard-linked copies of
  the standard library, synthetic clustered float16 embeddings written as the embed stage
  would); its embed record then names the real MiniLM (384 dimensions, like the synthetic
  vectors), so ``Retriever.open`` loads and verifies a real query embedder;
- the index: cheap, not the index stage's choice: ``IVF{nlist},{code}`` trained on a sample and
  filled block by block (SQ8 by default; PQ codes make the Retriever re-rank from the embeddings,
  as the knn stage does), ``--nprobe`` recorded as its search parameter;
- start-up: ``Retriever.open`` in a fresh process, twice (the second with the files in the page
  cache): seconds and the process's RSS (and its private part, RssAnon) after it; then what
  the old start-up added on top, timed in the same process: ``np.asarray(store.doc_ids)`` and
  ``store.content_mask()`` (a scan of every chunk);
- lookups: ``search_embeddings`` (the index search, the blank-chunk filter, the re-rank; not
  BERT) of single val-chunk embeddings, k=2, from 1, 4 and 16 threads at once, each thread
  timing its own calls: p50 / p99 latency and queries/s (all threads), with the index behind one
  lock (the old behaviour: ``--lock`` wraps the index in LockedIndex) and without. faiss runs
  one OpenMP thread a search (``threads=1``): the parallelism is the callers'.

Prints a markdown table; ``--json`` keeps the rows, ``--md FILE`` writes the section there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_scale  # noqa: E402  (its synthetic-DB builders)
from report import machine, write_section  # noqa: E402

SECTION = "bench_retriever_scale"


# ----------------------------------------------------------------------------- the database


def name_minilm(db: Path) -> None:
    """Record the real MiniLM as the database's embedder (the synthetic vectors have its 384
    dimensions), so the Retriever opens as on a real database."""
    from chunk_store.manifest import load_manifest, record_stage
    from index_builder.embed.embedder import POOLING, Embedder, EmbedderConfig

    m = load_manifest(db)
    rec = m["stages"]["embed"]
    if rec["params"].get("pooling") == POOLING:
        return
    emb = Embedder(EmbedderConfig(device="cpu"))
    if emb.dim != rec["params"]["dim"]:
        raise SystemExit(f"MiniLM has {emb.dim} dimensions, the synthetic embeddings {rec['params']['dim']}")
    params = {**rec["params"], "embedder": emb.name, "embedder_path": str(emb.name_or_path), "embedder_id": emb.id,
              "max_length": emb.max_length, "pooling": POOLING, "synthetic_vectors": True}
    record_stage(db, "embed", params=params, started=rec["started"], finished=rec["finished"],
                 stats=rec.get("stats"), versions_=rec.get("versions"), manifest=m)


def build_index(db: Path, nlist: int, code: str, nprobe: int, sample: int, block: int = 262144) -> dict[str, Any]:
    """``IVF{nlist},{code}`` over the train embeddings, trained on a sample: written atomically
    with its search parameter, the index stage recorded. Skipped when already built so."""
    import faiss
    from tqdm import tqdm

    from chunk_store.layout import DBLayout
    from chunk_store.manifest import load_manifest, now_iso, record_stage
    from index_builder.embed.stage import open_embeddings, read_rows

    key = f"IVF{nlist},{code}"
    rec = load_manifest(db)["stages"].get("index") or {}
    if rec.get("finished") and (rec.get("stats") or {}).get("index_key") == key:
        return rec["stats"]
    t0, started = time.time(), now_iso()
    shards = open_embeddings(db, "train")
    n = sum(s.shape[0] for s in shards)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    from index_builder.knn.rerank import pick_rows

    index = faiss.index_factory(shards[0].shape[1], key)
    index.train(pick_rows(shards, rows))
    for a in tqdm(range(0, n, block), desc=f"add {key}", unit="block"):
        index.add(read_rows(shards, a, min(a + block, n)))
    paths = DBLayout(db)
    paths.index.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.index.with_name(paths.index.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, paths.index)
    tmp = paths.index_infos.with_name(paths.index_infos.name + ".tmp")
    tmp.write_text(json.dumps({"index_key": key, "index_param": f"nprobe={nprobe}"}))
    os.replace(tmp, paths.index_infos)
    stats = {"index_key": key, "index_param": f"nprobe={nprobe}", "size_bytes": paths.index.stat().st_size,
             "build_seconds": time.time() - t0, "synthetic_bench": True}
    record_stage(db, "index", params={"index_key": key}, started=started, finished=now_iso(), stats=stats)
    return stats


def build_db(n: int, args: argparse.Namespace, base: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    row = bench_scale.run_size(n, args, base)  # chunk + synthetic embeddings (until="embed")
    db = args.work / f"db-{n}"
    name_minilm(db)
    row["index_stats"] = build_index(db, args.nlist, args.code, args.nprobe, args.train_sample)
    return db, row


# ----------------------------------------------------------------------------- measurements (subprocesses)


def rss_mb() -> dict[str, float]:
    """This process's VmRSS and its private part (RssAnon), MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            out[key] = int(val.split()[0]) / 1024
    return out


def measure_open(db: Path, old: bool) -> dict[str, Any]:
    """Retriever.open's seconds and RSS in this (fresh) process; with ``old``, then the old
    start-up's extra work (whole doc ids + the content scan) timed after it."""
    import importlib

    # imports are not start-up (paid once a process, whatever N): transformers imports BERT's
    # modules lazily, seconds on a busy machine, so they are imported here first
    for module in ("faiss", "torch", "transformers", "transformers.models.bert.modeling_bert"):
        importlib.import_module(module)

    from index_builder import Retriever
    from index_builder.embed.embedder import Embedder

    base = rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    r = Retriever.open(db, threads=1)
    out: dict[str, Any] = {"open_s": time.perf_counter() - t0, "open_cpu_s": time.process_time() - c0,
                           "rss": rss_mb(), "rss_before": base,
                           "n": r.num_chunks, "rerank": r.rerank}
    t0 = time.perf_counter()
    Embedder(r.embedder.cfg)  # its share of open: loading BERT (the same whatever N)
    out["embedder_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    r.search_embeddings(np.zeros((1, r.dim), dtype=np.float32), k=2)
    out["first_search_ms"] = (time.perf_counter() - t0) * 1000
    if old:
        t0 = time.perf_counter()
        docs = np.asarray(r.store.doc_ids)
        content = r.store.content_mask()
        out["old_extra_s"] = time.perf_counter() - t0
        out["old_rss"] = rss_mb()
        out["blank_chunks"] = int((~content).sum())
        out["old_arrays_mb"] = (docs.nbytes + content.nbytes) / 2 ** 20
    return out


class LockedIndex:
    """The index behind one lock: the Retriever's old ``_index_search`` (one search at a time)."""

    def __init__(self, index: Any) -> None:
        self.index, self.ntotal, self.d = index, index.ntotal, index.d
        self.lock = threading.Lock()

    def search(self, q: np.ndarray, k: int) -> Any:
        with self.lock:
            return self.index.search(q, k)


def measure_load(db: Path, threads: Sequence[int], queries: int, k: int) -> list[dict[str, Any]]:
    """search_embeddings from T threads at once, locked and not: per-call latency and queries/s."""
    from index_builder import Retriever
    from index_builder.embed.stage import open_embeddings
    from index_builder.knn.rerank import pick_rows

    r = Retriever.open(db, threads=1)
    from chunk_store.framework.errors import UserError

    try:
        val = open_embeddings(db, "val")  # chunks not in the index
    except UserError:  # no val split (tiny): train's
        val = open_embeddings(db, "train")
    q = pick_rows(val, np.arange(queries) % sum(s.shape[0] for s in val))
    free = r.index
    for i in range(min(50, queries)):  # warm-up: the lists and rows the first queries touch
        r.search_embeddings(q[i:i + 1], k)
    rows = []
    for t in threads:
        for locked in (True, False):
            r.index = LockedIndex(free) if locked else free
            lat: list[list[float]] = [[] for _ in range(t)]

            def worker(w: int) -> None:
                for i in range(w, queries, t):
                    t0 = time.perf_counter()
                    r.search_embeddings(q[i:i + 1], k)
                    lat[w].append((time.perf_counter() - t0) * 1000)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(t) as pool:
                list(pool.map(worker, range(t)))
            wall = time.perf_counter() - t0
            ms = np.concatenate([np.asarray(x) for x in lat])
            rows.append({"threads": t, "lock": locked, "p50_ms": float(np.percentile(ms, 50)),
                         "p99_ms": float(np.percentile(ms, 99)), "qps": queries / wall, "queries": queries})
    r.index = free
    return rows


def serve_start(db: Path, patience_s: float = 600.0) -> dict[str, Any]:
    """retro-serve from spawn to its first 200 on /healthz (imports included), then stopped."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "index_builder.server", "--db", str(db), "--port", str(port),
                             "--threads", "1", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - t0 < patience_s and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    health = json.loads(r.read())
                ready = time.perf_counter() - t0
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
                return {"serve_ready_s": ready, "serve_cpu_s": cpu, "chunks": health["chunks"]}
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"retro-serve did not answer /healthz (exit code {proc.poll()})")
    finally:
        proc.terminate()
        proc.wait()


def sub(args: list[Any]) -> Any:
    """This script's subcommand in a fresh process: its JSON answer."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *map(str, args)], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the report


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| N train chunks | index | open wall s (first, again) (CPU s again; of which loading BERT, wall) | RSS MB after open (private) | "
           "old start-up's extra: s, RSS MB (private) | first search ms | retro-serve to /healthz s (imports included) |",
           "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        a, b = r["open"]
        old = b.get("old_extra_s")
        out.append(f"| {r['n']:,} | `{r['index_stats']['index_key']}` ({r['index_stats']['size_bytes'] / 2 ** 20:,.0f} MB)"
                   f"{', re-rank x' + str(a['rerank']) if a['rerank'] > 1 else ''} | {a['open_s']:.2f}, {b['open_s']:.2f} ({b['open_cpu_s']:.2f} CPU s; BERT {b['embedder_s']:.2f}) | "
                   f"{b['rss']['VmRSS']:,.0f} ({b['rss']['RssAnon']:,.0f}) | "
                   + (f"+{old:.2f} s, {b['old_rss']['VmRSS']:,.0f} ({b['old_rss']['RssAnon']:,.0f})" if old is not None
                      else "") + f" | {b['first_search_ms']:.1f} | {r['serve']['serve_ready_s']:.1f} ({r['serve']['serve_cpu_s']:.1f} CPU s) |")
    out += ["", "| N train chunks | threads | lock | p50 ms | p99 ms | queries/s |", "|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        for x in r.get("load") or []:
            out.append(f"| {r['n']:,} | {x['threads']} | {'one global lock (old)' if x['lock'] else 'none (new)'} | "
                       f"{x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {x['qps']:,.0f} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub_p = ap.add_subparsers(dest="cmd")
    o = sub_p.add_parser("open")
    o.add_argument("--db", type=Path, required=True)
    o.add_argument("--old", action="store_true")
    ld = sub_p.add_parser("load")
    ld.add_argument("--db", type=Path, required=True)
    ld.add_argument("--threads", default="1,4,16")
    ld.add_argument("--queries", type=int, default=2000)
    ld.add_argument("--k", type=int, default=2)
    ap.add_argument("--sizes", default="1M,16M", help="train chunks, e.g. 1M,4M,16M")
    ap.add_argument("--load-sizes", default=None, help="sizes measured under load (default: all)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/retro-retriever-scale"))
    ap.add_argument("--corpus", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--glob", default="*.py")
    ap.add_argument("--corpus-mb", type=float, default=64.0)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--build-threads", type=int, default=os.cpu_count(), help="the chunk stage's workers")
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--code", default="SQ8", help="the IVF's codes: SQ8, PQ32, ... (PQ: re-ranked)")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--train-sample", type=int, default=65536)
    ap.add_argument("--threads", default="1,4,16", help="concurrent callers")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="test size: small corpus, few queries")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None, help="write the section into this markdown file")
    args = ap.parse_args(argv)
    if args.cmd == "open":
        print(json.dumps(measure_open(args.db, args.old)))
        return 0
    if args.cmd == "load":
        print(json.dumps(measure_load(args.db, [int(t) for t in args.threads.split(",")], args.queries, args.k)))
        return 0
    if args.tiny:
        args.corpus_mb, args.vocab_size, args.seq_len = min(args.corpus_mb, 0.3), 400, 256
        args.nlist, args.train_sample, args.queries = 16, 2000, min(args.queries, 64)
    # what bench_scale's builders read from their own arguments
    args.dim, args.until = 384, "embed"
    scale_args = argparse.Namespace(**{**vars(args), "threads": args.build_threads})
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    base = bench_scale.base_corpus(scale_args)
    sizes = [bench_scale.parse_size(s) for s in args.sizes.split(",")]
    load_sizes = sizes if args.load_sizes is None else [bench_scale.parse_size(s) for s in args.load_sizes.split(",")]
    rows = []
    for n in sizes:
        db, built = build_db(n, scale_args, base)
        row = {"n_target": n, "n": built["n"], "index_stats": built["index_stats"],
               "open": [sub(["open", "--db", db]), sub(["open", "--db", db, "--old"])], "serve": serve_start(db)}
        if n in load_sizes:
            row["load"] = sub(["load", "--db", db, "--threads", args.threads, "--queries", args.queries, "--k", args.k])
        rows.append(row)
        print(json.dumps(row), flush=True)
    tab = table(rows)
    print(tab)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.md:
        cmd = "python benchmarks/bench_retriever_scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_section(SECTION, f"## Retriever at scale: start-up and concurrent lookups\n\nCommand: `{cmd.strip()}`  \n"
                               f"Machine: {machine('cpu')}  \nDate: {started}\n\n{tab}\n", path=args.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
