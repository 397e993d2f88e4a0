"""Exact k-NN: our tiled `exact_search` vs the naive torch loop, on the same random database.

    python benchmarks/bench_knn.py --device cuda                   # 1M x 384 (MiniLM width)
    python benchmarks/bench_knn.py --device cpu --n 4096 --dim 16  # the CPU smoke size

Why: the knn stage runs `exact_search` on CUDA when faiss-gpu is absent (the usual case), so its
speed decides how long the stage takes. The database is what the embed stage stores: float16
rows on the host (memmap shards); ours moves each tile to the device once per call and keeps a
running top-k, fp32 arithmetic with TF32 off (exact).

Peers, both given the database already resident on the device in fp32 (their upload untimed):
  naive loop     for each query: ((db - q) ** 2).sum(1), topk: what a user writes first;
  blocked        blocks of 1024 queries, |q|^2 + |x|^2 - 2 q.x over the whole resident DB, topk:
                 a strong hand-written reference (needs the DB in device memory; ours does not).
The naive loop runs on a subset of the queries (it is slow); rates are queries/s. Agreement: the
fraction of ours' neighbour ids equal to the naive loop's on that subset (ties may swap ids).

Replaces the `bench_knn_<device>` section of docs/BENCHMARKS.md; `--json PATH` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from index_builder.index.exact_search import ExactSearchConfig, exact_search  # noqa: E402
from report import machine, write_section  # noqa: E402  (benchmarks/report.py)


@dataclass
class Row:
    impl: str
    queries: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.queries / self.seconds


def make_data(n: int, dim: int, nq: int, device: torch.device, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Database (n, dim) float16 on the host, as the embed stage stores it; queries (nq, dim) fp32.
    Drawn on the device (fast at 1M rows), then moved to the host."""
    g = torch.Generator(device=device).manual_seed(seed)
    db = torch.randn(n, dim, generator=g, device=device).half().cpu().numpy()
    q = torch.randn(nq, dim, generator=g, device=device).cpu().numpy()
    return db, q


def naive_loop(db: torch.Tensor, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, dists = [], []
    for row in q:
        d, i = torch.topk(((db - row) ** 2).sum(1), k, largest=False)
        ids.append(i)
        dists.append(d)
    return torch.stack(ids), torch.stack(dists)


def blocked(db: torch.Tensor, q: torch.Tensor, k: int, block: int = 1024) -> torch.Tensor:
    db_norm = (db * db).sum(1)
    out = []
    for b0 in range(0, q.shape[0], block):
        qb = q[b0:b0 + block]
        d = (qb * qb).sum(1, keepdim=True) + db_norm - 2.0 * (qb @ db.T)
        out.append(torch.topk(d, k, dim=1, largest=False).indices)
    return torch.cat(out)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> tuple[list[Row], float]:
    """Time the three implementations (after one warm-up each); return rows and the agreement."""
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # exact, like ours
    db_np, q_np = make_data(args.n, args.dim, args.queries, device)
    cfg = ExactSearchConfig(device=str(device))
    sub = q_np[:args.naive_queries]
    exact_search(q_np[:64], db_np, args.k, cfg)  # warm-up (allocator, kernels)
    rows = [Row("ours: exact_search (fp16 host shards, tiled)", args.queries,
                timed(lambda: exact_search(q_np, db_np, args.k, cfg), device))]
    ours_sub, _ = exact_search(sub, db_np, args.k, cfg)
    db = torch.from_numpy(db_np).to(device).float()
    q = torch.from_numpy(q_np).to(device)
    with torch.inference_mode():
        naive_loop(db, q[:2], args.k)
        naive_ids: list[torch.Tensor] = []
        rows.append(Row("naive torch loop (DB resident, fp32)", len(sub),
                        timed(lambda: naive_ids.append(naive_loop(db, q[:len(sub)], args.k)[0]), device)))
        blocked(db, q[:64], args.k)
        rows.append(Row("blocked matmul + topk (DB resident, fp32)", args.queries,
                        timed(lambda: blocked(db, q, args.k), device)))
    agreement = float((naive_ids[0].cpu().numpy() == ours_sub).mean())
    return rows, agreement


def table(rows: Sequence[Row]) -> str:
    naive = next(r.rate for r in rows if r.impl.startswith("naive"))
    lines = ["| implementation | queries | seconds | queries/s | vs naive loop |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.impl} | {r.queries} | {r.seconds:.3f} | {r.rate:,.0f} | {r.rate / naive:.1f}x |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--n", type=int, default=1_000_000, help="database rows")
    ap.add_argument("--dim", type=int, default=384, help="embedding width (MiniLM: 384)")
    ap.add_argument("--queries", type=int, default=16384)
    ap.add_argument("--naive-queries", type=int, default=256, help="queries the naive loop runs")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--no-write", action="store_true", help="leave docs/BENCHMARKS.md alone")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.naive_queries = min(args.naive_queries, args.queries)
    rows, agreement = run(args)
    tab = table(rows)
    print(tab)
    print(f"agreement with the naive loop (neighbour ids, {args.naive_queries} queries): {agreement:.4f}")
    dev = torch.device(args.device).type
    if args.json:
        args.json.write_text(json.dumps({"rows": [{**asdict(r), "rate": r.rate} for r in rows],
                                         "agreement": agreement}))
    if not args.no_write:
        cmd = "python benchmarks/bench_knn.py " + " ".join(sys.argv[1:] if argv is None else argv)
        text = (f"## Exact k-NN: `exact_search` vs the naive torch loop ({dev})\n\n"
                f"Command: `{cmd.strip()}`  \nMachine: {machine(args.device)}  \n"
                f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
                f"Database {args.n:,} x {args.dim} random float16 rows on the host, {args.queries:,} "
                f"fp32 queries, k={args.k}, TF32 off; one timed call each after a warm-up. The naive "
                f"loop runs {args.naive_queries} of the queries; ours agrees with it on "
                f"{100 * agreement:.2f}% of the neighbour ids.\n\n{tab}\n")
        write_section(f"bench_knn_{dev}", text)
    return 0 if agreement >= 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
