"""One neighbour lookup end to end (embed the text + search + fetch texts): our Retriever vs
RETRO-pytorch's query path, on a database of >= 100k chunks, side by side in one process.

    .venv/bin/python benchmarks/bench_retriever.py              # CPU (default here)
    python benchmarks/bench_retriever.py --device cuda          # BERT on the GPU, index on CPU

The database is real where the lookup touches it: the whole Python standard library (minus
site-packages) chunked by `retro-build-index chunk` (~160k chunks of 64 tokens), its real texts
and continuations, the real MiniLM embedder, an index built by the real `index` stage with its
default settings. Only the bulk of the *database* embeddings is synthesised, to avoid ~20 min
of CPU embedding: 4096 real chunk embeddings are computed with MiniLM and every chunk's vector
is one of them plus Gaussian noise (a clustered, realistic distribution; the index and its
search cost do not depend on which vectors they hold beyond that). The embed-stage record is
written with the real embedder's id, so `Retriever.open` loads and verifies the real model.

Queries are real text chunks (the val split's decoded chunks, never in the index).
The peer: RETRO-pytorch 0.3.9's path (`retrieval.tokenize` -> `bert_embed` -> `faiss search`),
its MODEL/TOKENIZER globals pointed at the same local MiniLM (it would otherwise download
bert-base-cased), the same faiss index and the same text fetch.

Appends/replaces the `bench_retriever` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chunk_store import ChunkStore  # noqa: E402
from chunk_store.manifest import load_manifest, now_iso, record_stage, versions  # noqa: E402
from chunk_store.framework.atomic import atomic_save_npy
from chunk_store.layout import DBLayout  # noqa: E402
from index_builder.embed.stage import shard_ranges  # noqa: E402
from index_builder.embed.embedder import POOLING, Embedder, EmbedderConfig  # noqa: E402
from report import machine, write_section  # noqa: E402  (benchmarks/report.py)

SECTION = "bench_retriever"
SHARD = 16384


def build_db(db: Path, device: str, sample: int, noise: float) -> None:
    """chunk (real) -> synthesised embed record -> index (real stage, default settings)."""
    cli = [sys.executable, "-m", "index_builder"]
    stdlib = sysconfig.get_paths()["stdlib"]
    if not (db / "manifest.json").exists() or "chunk" not in load_manifest(db)["stages"] or \
            not load_manifest(db)["stages"]["chunk"].get("finished"):
        subprocess.run([*cli, "chunk", "--input", stdlib, "--out", str(db), "--glob", "*.py",
                        "--exclude", "site-packages/*", "--vocab-size", "4096", "--chunk-size", "64",
                        "--seq-len", "512", "--val-fraction", "0.01", "--workers", "2"], check=True)
    m = load_manifest(db)
    if not m["stages"].get("embed", {}).get("finished"):
        emb = Embedder(EmbedderConfig(device=device))
        rng = np.random.default_rng(0)
        params = {"embedder": emb.name, "embedder_path": str(emb.name_or_path), "embedder_id": emb.id,
                  "dim": emb.dim, "max_length": emb.max_length, "pooling": POOLING,
                  "shard_size": SHARD, "storage_dtype": "float16", "chunk_size": m["chunk_size"],
                  "synthesised_for_benchmark": True}
        started = now_iso()
        for split in ("train", "val"):
            store = ChunkStore.open(db, split)
            n = store.num_chunks
            ids = np.sort(rng.choice(n, size=min(sample, n), replace=False))
            print(f"embedding {len(ids)} real {split} chunks with MiniLM for the synthetic bulk...")
            real = emb.embed([store.text(int(i)) for i in ids])
            scale = noise * real.std(axis=0, keepdims=True)
            for s, (a, b) in enumerate(shard_ranges(n, SHARD)):
                base = real[rng.integers(0, len(real), b - a)]
                vec = base + rng.standard_normal(base.shape).astype(np.float32) * scale
                inside = (ids >= a) & (ids < b)  # the sampled chunks keep their real embedding
                vec[ids[inside] - a] = real[inside]
                atomic_save_npy(DBLayout(db).embedding_shard(split, s), vec.astype(np.float16))
        record_stage(db, "embed", params=params, started=started, finished=now_iso(),
                     stats={"chunks": sum(m["counts"][s]["chunks"] for s in ("train", "val")),
                            "synthesised": True}, versions_=versions("torch", "transformers"))
    if not load_manifest(db)["stages"].get("index", {}).get("finished"):
        subprocess.run([*cli, "index", "--db", str(db)], check=True)


def percentiles(ms: Sequence[float]) -> tuple[float, float, float, float]:
    a = np.asarray(ms)
    return float(np.percentile(a, 50)), float(np.percentile(a, 90)), float(np.percentile(a, 99)), float(a.mean())


def run_queries(fn: Callable[[str], object], queries: Sequence[str], warmup: int = 5) -> list[float]:
    for q in queries[:warmup]:
        fn(q)
    out = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def retro_pytorch_lookup(retriever, k: int) -> Callable[[str], object]:
    """RETRO-pytorch's query path with its model/tokenizer globals set to the local MiniLM."""
    import retro_pytorch.retrieval as rp

    class _Tokenizer:
        """transformers 5 dropped batch_encode_plus, which RETRO-pytorch calls: same call, new name."""

        def __init__(self, tok):
            self.tok = tok

        def batch_encode_plus(self, texts, **kwargs):
            return self.tok(list(texts), **kwargs)

    rp.TOKENIZER = _Tokenizer(retriever.embedder.tokenizer)
    from transformers import AutoModel

    from index_builder.embed.embedder import quiet_transformers

    with quiet_transformers():
        rp.MODEL = AutoModel.from_pretrained(retriever.embedder.name_or_path).eval()
    if torch.cuda.is_available():
        rp.MODEL = rp.MODEL.cuda()
    store = retriever.store

    def lookup(text: str) -> list[tuple[str, str]]:
        emb = rp.bert_embed(rp.tokenize([text]))
        _, ids = retriever.index.search(emb.cpu().numpy(), k)
        conts = store.continuation_ids(ids[0])
        return [(store.text(int(i)), store.text(int(c)) if c >= 0 else "") for i, c in zip(ids[0], conts)]

    return lookup






def main(argv: Sequence[str] | None = None) -> None:
    from index_builder import Retriever

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default="/tmp/retro-bench-retriever-db", help="built once, then reused")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--sample", type=int, default=4096, help="real embeddings behind the synthetic bulk")
    ap.add_argument("--noise", type=float, default=0.5, help="noise std, relative to the per-dim std")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    db = Path(args.db)
    if args.rebuild and db.exists():
        shutil.rmtree(db)
    build_db(db, device, args.sample, args.noise)

    val = ChunkStore.open(db, "val")
    rng = np.random.default_rng(1)
    cand = [val.text(int(i)) for i in rng.permutation(val.num_chunks)[: 4 * args.queries]]
    queries = [t for t in cand if t.strip()][: args.queries]
    rows = []
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        r = Retriever.open(db, device=device, threads=threads)
        ours = run_queries(lambda q: r.search_text([q], k=args.k), queries)
        peer = run_queries(retro_pytorch_lookup(r, args.k), queries)
        rows.append((threads, "ours: Retriever.search_text", percentiles(ours)))
        rows.append((threads, "RETRO-pytorch query path", percentiles(peer)))
        embed_only = run_queries(lambda q: r.embed([q]), queries[:50])
        emb = r.embed(queries[:50])
        search_only = run_queries(lambda i: r.search_embeddings(emb[int(i):int(i) + 1], k=args.k),
                                  [str(i) for i in range(50)])
        rows.append((threads, "  ours, embedding only", percentiles(embed_only)))
        rows.append((threads, "  ours, index search only", percentiles(search_only)))
    m = load_manifest(db)
    istats = m["stages"]["index"]["stats"]
    n = m["counts"]["train"]["chunks"]
    lines = ["| threads | path | p50 ms | p90 ms | p99 ms | mean ms |", "|---|---|---|---|---|---|"]
    for threads, name, (p50, p90, p99, mean) in rows:
        lines.append(f"| {threads} | {name} | {p50:.2f} | {p90:.2f} | {p99:.2f} | {mean:.2f} |")
    tab = "\n".join(lines)
    print(tab)
    cmd = "python benchmarks/bench_retriever.py" + (" --device cuda" if device == "cuda" else "")
    text = (f"## Neighbour lookup: `Retriever.search_text` vs RETRO-pytorch's query path\n\n"
            f"Command: `{cmd}`  \nMachine: {machine(device)}  \n"
            f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
            f"DB: {n} train chunks (stdlib *.py, chunk 64, real texts); index `{istats['index_key']}` "
            f"({istats.get('index_param')}) from the default `index` stage, recall "
            f"{json.dumps(istats['recall'])}. Embeddings of the bulk synthesised around "
            f"{args.sample} real MiniLM embeddings (see the script's docstring); the query path is "
            f"all real: MiniLM embedding of the query text, faiss search, text and continuation "
            f"fetch. {len(queries)} single-text queries (val chunks), k={args.k}, after 5 warm-up "
            f"queries. BERT on {device}.\n\n{tab}\n")
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
