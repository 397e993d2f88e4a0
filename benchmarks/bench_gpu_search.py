"""knn's searches on one device: the torch IVF search vs faiss's IVF search vs the exact pass.

    OMP_NUM_THREADS=1 python benchmarks/bench_gpu_search.py --device cpu   # 200k x 384, CPU
    python benchmarks/bench_gpu_search.py --device cuda                    # the same on a GPU

Why: on CUDA without faiss-gpu the knn stage used to run the exact pass (every query against
every chunk); it now runs the torch IVF search over the index's own lists past a size bound
(index_builder.knn.search_choice). This measures what each costs a query at one size, and the
recall@k each reaches against the exact pass.

The database is what the embed stage stores: float16 rows on the host, clustered synthetic
vectors (``--clusters`` Gaussian centres, so the IVF's lists mean something); the queries are
database rows, as knn's are. The IVF index is ``IVF{nlist},Flat`` trained by faiss on a sample
(64 rows a list) and filled with every row: with the same nprobe the torch search scans the same
lists as faiss and finds the same neighbours (tests/index_builder/test_torch_ivf_search.py).
faiss's search runs on the CPU (faiss-cpu; on faiss-gpu a GPU row is added); ours and the exact
pass on ``--device``. One timed call each after a warm-up; rates are queries/s; recall@k is the
share of the exact pass's k nearest found (ties count, index_builder.knn.tuning).
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
from index_builder.index.stage import faiss_gpu_available  # noqa: E402
from index_builder.index.torch_ivf_search import TorchIVFConfig, TorchIVFSearch  # noqa: E402
from index_builder.knn.tuning import neighbour_recall  # noqa: E402
from report import machine  # noqa: E402  (benchmarks/report.py)


@dataclass
class Row:
    impl: str
    nprobe: int | None
    queries: int
    seconds: float
    recall: float

    @property
    def rate(self) -> float:
        return self.queries / self.seconds


def make_data(n: int, dim: int, clusters: int, nq: int, spread: float = 1.0,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float16 clustered rows (unit-variance centres, ``spread`` the noise's standard
    deviation), as stored; (nq, dim) float32 queries: rows of them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    db = np.empty((n, dim), dtype=np.float16)
    for a in range(0, n, 65536):  # in blocks: the float32 draft of 1M x 384 would be 1.5 GB
        b = min(n, a + 65536)
        db[a:b] = centres[rng.integers(0, clusters, b - a)] + spread * rng.standard_normal((b - a, dim), dtype=np.float32)
    q = db[np.sort(rng.choice(n, nq, replace=False))].astype(np.float32)
    return db, q


def build_ivf_flat(db: np.ndarray, nlist: int, seed: int = 0):
    """IVF{nlist},Flat: faiss's k-means on 64 rows a list, then every row added."""
    import faiss

    rng = np.random.default_rng(seed)
    sample = db[np.sort(rng.choice(len(db), min(len(db), 64 * nlist), replace=False))].astype(np.float32)
    index = faiss.index_factory(db.shape[1], f"IVF{nlist},Flat")
    index.train(sample)
    for a in range(0, len(db), 65536):
        index.add(db[a:a + 65536].astype(np.float32))
    return index


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def run(args: argparse.Namespace) -> list[Row]:
    import faiss

    device = torch.device(args.device)
    db, q = make_data(args.n, args.dim, args.clusters, args.queries, args.spread)
    t0 = time.perf_counter()
    index = build_ivf_flat(db, args.nlist)
    print(f"index IVF{args.nlist},Flat built in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    k, shards = args.k, [db]
    cfg = ExactSearchConfig(device=str(device))
    exact_search(q[:64], shards, k, cfg)  # warm-up
    secs, (_, exact_d) = timed(lambda: exact_search(q, shards, k, cfg), device)
    rows = [Row(f"exact_search ({device.type}, fp32)", None, len(q), secs, 1.0)]
    torch_ivf = TorchIVFSearch(index, shards, TorchIVFConfig(device=str(device), dtype=args.dtype))
    gpu_index = None
    if device.type == "cuda" and faiss_gpu_available():
        res = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
    for nprobe in args.nprobe:
        index.nprobe = nprobe
        index.search(q[:64], k)
        secs, (d, _) = timed(lambda: index.search(q, k), torch.device("cpu"))
        rows.append(Row("faiss IVF search (CPU)", nprobe, len(q), secs, neighbour_recall(d, exact_d)))
        if gpu_index is not None:
            faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", nprobe)
            gpu_index.search(q[:64], k)
            secs, (d, _) = timed(lambda: gpu_index.search(q, k), device)
            rows.append(Row("faiss-gpu IVF search", nprobe, len(q), secs, neighbour_recall(d, exact_d)))
        torch_ivf.search(q[:64], k)  # warm-up (and the resident block's upload)
        secs, (_, d) = timed(lambda: torch_ivf.search(q, k), device)
        rows.append(Row(f"torch IVF search ({device.type}, {torch_ivf.cfg.compute_dtype()} GEMM)", nprobe,
                        len(q), secs, neighbour_recall(d, exact_d)))
    return rows


def table(rows: Sequence[Row]) -> str:
    lines = ["| search | nprobe | queries | seconds | queries/s | recall@k vs exact |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.impl} | {'-' if r.nprobe is None else r.nprobe} | {r.queries} | {r.seconds:.3f} | "
                     f"{r.rate:,.0f} | {r.recall:.4f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--n", type=int, default=200_000, help="database rows")
    ap.add_argument("--dim", type=int, default=384, help="embedding width (MiniLM: 384)")
    ap.add_argument("--clusters", type=int, default=100, help="Gaussian centres of the synthetic rows")
    ap.add_argument("--spread", type=float, default=3.0, help="the rows' noise around their centre (std)")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--nlist", type=int, default=1024, help="IVF lists (the index chooser: ~2 sqrt N)")
    ap.add_argument("--nprobe", type=lambda s: [int(x) for x in s.split(",")], default=[4, 16, 64],
                    help="comma-separated nprobe values")
    ap.add_argument("--k", type=int, default=12, help="candidates a query (knn: k + extra)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                    help="the torch IVF search's GEMM dtype (default: fp16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = run(args)
    print(f"Machine: {machine(args.device)}; torch threads {torch.get_num_threads()}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r), "rate": r.rate} for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
