"""RetroDataset vs RETRO-pytorch's RETRODataset: training samples per second, side by side.

    python benchmarks/bench_dataset.py --db demo-db [--device auto|cpu|cuda] [--batch-size 16]

Both read the same database: ours directly (vectorised batch reads of the memmaps through
``__getitems__``), the peer's from the memmaps it expects (int32 chunks with one extra token
each, int32 neighbours and sequence starts), written once from the same DB before timing.
Each row times a DataLoader over the same shuffled sequence indices, with 0 and 2 worker
processes, moving every batch to the device (pinned memory on CUDA), as in training.

"Needed" is the rate at which a training step consumes samples for configs/small.yaml at
seq_len 2048 on an H100 at 40% MFU (FLOPs from RetroConfig.flops_per_token): data must be
delivered at least that fast per GPU so that it never starves one.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chunk_store import ChunkStore  # noqa: E402
from chunk_store.framework.runtime import resolve_device  # noqa: E402
from retro.config import RetroConfig  # noqa: E402
from retro.dataset import RetroDataset, collate  # noqa: E402
from report import machine, write_section  # noqa: E402  (benchmarks/report.py)

SECTION = "bench_dataset"
H100_BF16 = 989e12


def peer_memmaps(store: ChunkStore, k: int, out: Path) -> dict:
    """Our DB -> the files RETRO-pytorch's RETRODataset reads (chunk + next chunk's first token)."""
    m, l = store.chunk_size, store.seq_len // store.chunk_size
    n = store.num_chunks
    chunks = np.zeros((n + l, m + 1), dtype=np.int32)
    chunks[:n, :m] = store.chunks
    chunks[: n - 1, m] = store.chunks[1:, 0]
    knn = np.full((n + l, k), -1, dtype=np.int32)
    knn[:n] = store.neighbours[:, :k]
    seqs = np.asarray(store.seq_starts, dtype=np.int32)
    paths = {}
    for name, arr in (("chunks", chunks), ("knn", knn), ("seqs", seqs)):
        paths[name] = out / f"{name}.dat"
        mm = np.memmap(paths[name], dtype=np.int32, mode="w+", shape=arr.shape)
        mm[:] = arr
        mm.flush()
        del mm
    return paths


def make_peer(store: ChunkStore, k: int, paths: dict):
    from retro_pytorch.data import RETRODataset

    return RETRODataset(num_chunks=store.num_chunks, chunk_size=store.chunk_size, seq_len=store.seq_len,
                        num_sequences=store.num_seqs, num_neighbors=k, chunk_memmap_path=paths["chunks"],
                        chunk_nn_memmap_path=paths["knn"], seq_memmap_path=paths["seqs"],
                        eos_id=store.tokenizer.eos_id, pad_id=store.pad_id)


def time_loader(loader, device: torch.device, max_batches: int, seconds: float) -> tuple[float, int]:
    """Samples/s over up to max_batches (or ``seconds``), after one warm-up batch (worker start)."""
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(it):
        tensors = list(batch.values()) if isinstance(batch, dict) else list(batch)
        for t in tensors:
            t.to(device, non_blocking=True)
        n += len(tensors[0])
        if i + 1 >= max_batches or time.perf_counter() - t0 > seconds:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), n


def needed_samples_per_s(seq_len: int = 2048, mfu: float = 0.4) -> float:
    cfg = RetroConfig.from_yaml(ROOT / "configs" / "small.yaml")
    return H100_BF16 * mfu / (cfg.flops_per_token(seq_len) * seq_len)






def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default="demo-db", help="a database with neighbours (make demo builds demo-db)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--batches", type=int, default=200, help="batches timed per row (at most)")
    ap.add_argument("--seconds", type=float, default=10.0, help="time limit per row")
    ap.add_argument("--workers", default="0,2", help="DataLoader worker counts to time")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = ap.parse_args()
    device = resolve_device(args.device)
    store = ChunkStore.open(args.db, "train")
    ours = RetroDataset(store, "train", k=args.k)
    order = torch.randperm(len(ours), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [order[i:i + args.batch_size] for i in range(0, len(order) - args.batch_size + 1, args.batch_size)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        peer = make_peer(store, args.k, peer_memmaps(store, args.k, Path(tmp)))
        # same sample, same neighbours: the peer drops tokens after a document's EOS (it forbids
        # several documents per sequence), so only the neighbour *chunks* are compared
        a, b = ours[order[0]], peer[order[0]]
        m = store.chunk_size
        same = np.array_equal(a["neighbours"][..., : m - 1].numpy(), b[1][..., : m - 1].numpy())
        for workers in [int(w) for w in args.workers.split(",")]:
            common = dict(num_workers=workers, pin_memory=device.type == "cuda",
                          prefetch_factor=4 if workers else None, persistent_workers=False)
            ours_loader = torch.utils.data.DataLoader(ours, batch_sampler=batches, collate_fn=collate, **common)
            peer_loader = torch.utils.data.DataLoader(peer, batch_sampler=batches, **common)
            for name, loader in (("ours: RetroDataset (batched memmap reads)", ours_loader),
                                 ("peer: retro_pytorch RETRODataset (per item)", peer_loader)):
                rate, n = time_loader(loader, device, args.batches, args.seconds)
                rows.append((name, workers, rate, rate * store.seq_len, n))
                print(f"{name:45s} workers={workers}  {rate:10.1f} samples/s  ({n} samples)", flush=True)
    need = needed_samples_per_s()
    lines = [
        "## Training data: RetroDataset vs RETRO-pytorch RETRODataset",
        "",
        f"Command: `python benchmarks/bench_dataset.py --db {args.db} --device {args.device}`  ",
        f"Machine: {machine()}  ",
        f"Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"DB: {store.num_seqs} train sequences of {store.seq_len} tokens (chunk {store.chunk_size}, k={args.k}), "
        f"batch {args.batch_size}, shuffled order, every batch moved to `{device}`. Same neighbour chunks from "
        f"both: {same}. Needed: configs/small.yaml at seq 2048 on one H100 at 40% MFU consumes "
        f"{need:.1f} samples/s (= {need * 2048:,.0f} tokens/s).",
        "",
        "| implementation | DataLoader workers | samples/s | tokens/s | samples timed | x needed (small, H100) |",
        "|---|---|---|---|---|---|",
    ]
    for name, workers, rate, tok, n in rows:
        lines.append(f"| {name} | {workers} | {rate:,.1f} | {tok:,.0f} | {n} | {tok / (need * 2048):,.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
