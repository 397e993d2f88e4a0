"""Training loader on simulated network storage: samples/s of each neighbour_reads mode.

    python benchmarks/bench_loader.py [--db DB] [--latency-ms 0,2] [--workers 0,4]

Why: on Lustre or Ceph a random read costs a round trip (about 1 ms), so a loader that reads
each neighbour as a separate small read can starve a GPU that a local NVMe would keep fed. This
benchmark times the training DataLoader (train.py's sampler, micro-batch and collate) in each
mode of ``neighbour_reads`` -- random (the original per-row reads), batched (retro.neighbour_reads:
sorted unique rows, one pass per shard) and sequential_file (retro.retrieved_file: the epoch's
retrieved tokens, one contiguous read per micro-batch) -- under simulated network storage:

* a cold page cache: ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every file of the DB (and the
  retrieved-tokens file) before each measured row, then fresh memmaps (``fincore`` confirms);
* a per-read latency: every array the loader reads is wrapped so that each *read* sleeps
  ``--latency-ms``; a read is a run of rows, in the order asked, each starting in the page the
  previous one ended in or the next (at most 1 MiB): what one synchronous request would fetch.

Without ``--db`` it builds a synthetic DB at configs/small.yaml's data shape (chunk 64, seq 2048,
k 2, micro-batch 8): ``--shards`` shards of ``--chunks-per-shard`` random-token chunks (the
retrieval DB, read at random) and a training set of ``--train-seqs`` sequences among them,
neighbours uniform over all chunks (5% missing). "Needed" is what one H100 consumes at
configs/small.yaml (bench_dataset's anchor: 40% MFU, FLOPs from RetroConfig.flops_per_token).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from chunk_store import ChunkStore  # noqa: E402
from chunk_store.framework.atomic import atomic_save_npy, atomic_write_json  # noqa: E402
from chunk_store.neighbour_shards import write_neighbours  # noqa: E402
from chunk_store.layout import DBLayout  # noqa: E402
from chunk_store.manifest import load_manifest, now_iso, record_stage  # noqa: E402
from chunk_store.sharded_array import ShardedArray  # noqa: E402
from retro.dataset import RetroDataset, collate  # noqa: E402
from retro.distributed import ShardedBatchSampler  # noqa: E402
from retro.retrieved_file import PositionedBatchSampler, RetrievedFileDataset, write_epoch_file  # noqa: E402
from report import machine, write_section  # noqa: E402  (benchmarks/report.py)

SECTION = "bench_loader"
PAGE = 4096
MAX_READ = 1 << 20
READS = [0]  # this process's simulated reads (each DataLoader worker has its own)
READS_LOCK = threading.Lock()  # the file writer reads from several threads


# ----------------------------------------------------------------------------- simulated storage


def count_reads(starts: np.ndarray, ends: np.ndarray) -> int:
    """Reads for byte ranges fetched in this order: a new read unless a range starts in the page
    the previous one ended in or the next; a run longer than MAX_READ counts one read per MiB."""
    if starts.size == 0:
        return 0
    lo, hi = starts // PAGE, (ends - 1) // PAGE
    new = np.ones(starts.size, dtype=bool)
    new[1:] = ~((lo[1:] >= lo[:-1]) & (lo[1:] <= hi[:-1] + 1))
    first = np.flatnonzero(new)
    pages = np.maximum.reduceat(hi, first) - lo[first] + 1  # within a run pages only go forward
    return int(np.ceil(pages * PAGE / MAX_READ).sum())


class SlowArray:
    """A memmapped array whose reads sleep ``latency`` each (network storage), counted in READS."""

    def __init__(self, arr: np.ndarray, latency: float) -> None:
        self.arr, self.latency = arr, latency
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, arr.ndim
        self.row_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
        self.offset = int(getattr(arr, "offset", 0))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        head = key[0] if isinstance(key, tuple) else key
        if isinstance(head, slice) and head.step in (None, 1):  # one byte range
            start, stop, _ = head.indices(self.shape[0])
            starts = np.array([self.offset + start * self.row_bytes], dtype=np.int64)
            n = count_reads(starts, starts + max(stop - start, 0) * self.row_bytes) if stop > start else 0
        else:
            rows = np.arange(*head.indices(self.shape[0])) if isinstance(head, slice) else np.asarray(head)
            rows = rows.astype(np.int64).reshape(-1) % max(self.shape[0], 1)
            starts = self.offset + rows * self.row_bytes
            n = count_reads(starts, starts + self.row_bytes)
        with READS_LOCK:
            READS[0] += n
        if self.latency and n:
            time.sleep(self.latency * n)
        return np.asarray(self.arr[key])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.arr, dtype=dtype)


def slow(arr: Any, latency: float) -> Any:
    if isinstance(arr, ShardedArray):
        arr.parts = [SlowArray(p, latency) for p in arr.parts]
        return arr
    return SlowArray(arr, latency)


def slow_store(store: ChunkStore, latency: float) -> None:
    """Wrap every array a batch reads (chunks, doc ids, sequence starts, neighbour ids), once."""
    for s in {id(store): store, id(store.train_store): store.train_store}.values():
        if getattr(s, "_slow", False):
            continue
        s.chunks, s.doc_ids, s.seq_starts = (slow(a, latency) for a in (s.chunks, s.doc_ids, s.seq_starts))
        s._load_neighbours()
        s._neighbours = slow(s._neighbours, latency)
        s._slow = True


class SlowDataset(RetroDataset):
    """RetroDataset over slow storage; each batch also carries its read count ("reads")."""

    latency: float = 0.0

    @property
    def store(self) -> ChunkStore:
        s = RetroDataset.store.fget(self)  # type: ignore[attr-defined]
        slow_store(s, self.latency)
        return s

    def get_batch(self, indices: Any) -> dict[str, np.ndarray]:
        before = READS[0]
        out = super().get_batch(indices)
        out["reads"] = np.array([READS[0] - before])
        return out


class SlowFileDataset(RetrievedFileDataset):
    """The retrieved-tokens file over slow storage (the file read through SlowArray)."""

    latency: float = 0.0

    def rows(self, epoch: int) -> Any:
        rows = super().rows(epoch)
        return rows if isinstance(rows, SlowArray) else SlowArray(rows, self.latency)

    def __getitems__(self, keys: list) -> dict[str, torch.Tensor]:
        before = READS[0]
        out = super().__getitems__(keys)
        out["reads"] = torch.tensor([READS[0] - before])
        return out


def drop_cache(paths: list[Path]) -> int:
    """posix_fadvise(DONTNEED) on each file; returns the pages still cached (fincore; -1 without it).
    Pages mapped by a live memmap stay cached: the previous row's datasets are collected first."""
    gc.collect()  # a train ChunkStore refers to itself (its train_store): freed only by the collector
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if not shutil.which("fincore"):
        return -1
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
                         capture_output=True, text=True)
    return sum(int(x) for x in out.stdout.split() if x.isdigit()) // PAGE if out.returncode == 0 else -1


# ----------------------------------------------------------------------------- a synthetic DB


def synthetic_db(out: Path, *, shards: int, chunks_per_shard: int, train_seqs: int, chunk_size: int = 64,
                 seq_len: int = 2048, k: int = 2, seed: int = 0) -> Path:
    """A real chunk DB (its tokenizer and manifest) whose shards are replaced by random ones:
    ``chunks_per_shard`` random-token chunks each, documents of 1-100 chunks, the first
    ``train_seqs / shards`` sequences of each shard as the training set, random neighbours."""
    l = seq_len // chunk_size
    if train_seqs // shards * l + 1 > chunks_per_shard:
        raise SystemExit("--train-seqs: more sequences than chunks")
    stdlib = Path(__import__("sysconfig").get_paths()["stdlib"])
    subprocess.run([sys.executable, "-m", "index_builder", "chunk", "--out", str(out), "--glob", "*.py",
                    "--input", str(stdlib / "json"), "--vocab-size", "512", "--chunk-size", str(chunk_size),
                    "--seq-len", str(seq_len), "--val-fraction", "0.2", "--workers", "1"],
                   check=True, cwd=ROOT, capture_output=True, text=True)
    rng = np.random.default_rng(seed)
    manifest = load_manifest(out)
    records, totals = [], {s: {"docs": 0, "chunks": 0, "tokens": 0, "seqs": 0} for s in ("train", "val")}
    sizes = {"train": chunks_per_shard, "val": 2 * l + 1}
    seqs = {"train": train_seqs // shards, "val": 1}
    for i in range(shards):
        layout, counts = DBLayout(out).shard(i), {}
        for split in ("train", "val"):
            n = sizes[split]
            lengths = rng.integers(1, 101, size=n)
            doc_ids = np.repeat(np.arange(n), lengths)[:n].astype(np.int64)
            layout.chunks(split).parent.mkdir(parents=True, exist_ok=True)
            atomic_save_npy(layout.chunks(split), rng.integers(4, 512, size=(n, chunk_size)).astype(np.uint16))
            atomic_save_npy(layout.doc_ids(split), doc_ids)
            atomic_save_npy(layout.seq_starts(split), (np.arange(seqs[split]) * l).astype(np.int64))
            layout.documents(split).write_text("".join(json.dumps({"source": "synthetic"}) + "\n"
                                                       for _ in range(int(doc_ids[-1]) + 1)))
            counts[split] = {"docs": int(doc_ids[-1]) + 1, "chunks": n, "tokens": n * chunk_size, "seqs": seqs[split]}
            for key in totals[split]:
                totals[split][key] += counts[split][key]
        records.append({"dir": f"shards/{i:06d}", "by": "chunk", "counts": counts})
    manifest.update(shards=records, counts=totals, token_dtype="uint16")
    atomic_write_json(out / "manifest.json", manifest)
    n_train = totals["train"]["chunks"]
    for split in ("train", "val"):
        ids = rng.integers(0, n_train, size=(totals[split]["chunks"], k))
        ids[rng.random(ids.shape) < 0.05] = -1
        write_neighbours(out, split, ids.astype(np.int64), np.where(ids >= 0, 0.0, np.inf).astype(np.float32),
                         shard_rows=chunks_per_shard)
    t = now_iso()
    record_stage(out, "knn", params={"k": k, "synthetic": True}, started=t, finished=t, manifest=load_manifest(out))
    return out


# ----------------------------------------------------------------------------- timing


def loader_for(db: Path, mode: str, workers: int, latency: float, mb: int, directory: Path,
               k: int) -> torch.utils.data.DataLoader:
    """train.py's DataLoader (retro.retrieved_file.train_loader's arguments) over slow storage."""
    ds = SlowDataset(db, "train", k=k, reads="random" if mode == "random" else "batched")
    ds.latency = latency
    sampler = ShardedBatchSampler(len(ds), mb, 0, 1, seed=0)
    if mode == "sequential_file":
        dataset: Any = SlowFileDataset(ds, sampler, directory, progress=False)
        dataset.latency = latency
        batches: Any = PositionedBatchSampler(sampler)
    else:
        dataset, batches = ds, sampler
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                                       prefetch_factor=2 if workers else None, persistent_workers=workers > 0)


def time_loader(loader: torch.utils.data.DataLoader, batches: int, seconds: float) -> tuple[float, float, int]:
    """(samples/s, reads per batch, samples) from the iterator's creation (workers' start
    included) over ``batches`` batches or ``seconds``."""
    t0, n, reads, count = time.perf_counter(), 0, 0, 0
    for i, batch in enumerate(loader):
        n += len(batch["tokens"])
        reads += int(batch["reads"].sum())
        count += 1
        if i + 1 >= batches or time.perf_counter() - t0 > seconds:
            break
    return n / (time.perf_counter() - t0), reads / max(count, 1), n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", help="a database with neighbours (default: build a synthetic one)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--chunks-per-shard", type=int, default=1 << 19)
    ap.add_argument("--train-seqs", type=int, default=256)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=8, help="configs/small.yaml's micro_batch_size")
    ap.add_argument("--latency-ms", default="0,2", help="per-read latencies to simulate")
    ap.add_argument("--workers", default="0,4", help="DataLoader worker counts")
    ap.add_argument("--modes", default="random,batched,sequential_file")
    ap.add_argument("--write-threads", default="1,8", help="threads of the retrieved-tokens file's writer")
    ap.add_argument("--batches", type=int, default=12, help="batches timed per row (at most)")
    ap.add_argument("--seconds", type=float, default=30.0, help="time limit per row")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # workers that mostly sleep
    from bench_dataset import needed_samples_per_s

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        db = Path(args.db) if args.db else synthetic_db(work / "db", shards=args.shards,
                                                        chunks_per_shard=args.chunks_per_shard,
                                                        train_seqs=args.train_seqs, k=args.k)
        store = ChunkStore.open(db, "train")
        files = sorted(p for p in db.rglob("*.npy"))
        db_bytes = sum(p.stat().st_size for p in files)
        print(f"DB {db}: {store.num_chunks:,} train chunks in {len(store.shards)} shard(s), {store.num_seqs} "
              f"sequences of {store.seq_len}, {db_bytes / 2**20:,.0f} MiB of arrays "
              f"({time.perf_counter() - t0:.0f} s to build)", flush=True)
        latencies = [float(x) / 1e3 for x in args.latency_ms.split(",")]
        modes, workers = args.modes.split(","), [int(w) for w in args.workers.split(",")]
        write_threads = [int(t) for t in args.write_threads.split(",")]
        rows, writes = [], []
        for latency in latencies:
            directory = work / f"retrieved-{latency}"
            for threads in (write_threads if "sequential_file" in modes else []):  # once per epoch and rank
                ds = SlowDataset(db, "train", k=args.k)
                ds.latency = latency
                sampler = ShardedBatchSampler(len(ds), args.micro_batch, 0, 1, seed=0)
                shutil.rmtree(directory, ignore_errors=True)
                drop_cache(files)
                t = time.perf_counter()
                READS[0] = 0
                path = write_epoch_file(ds, sampler, 0, directory, progress=False, threads=threads)
                n = sampler.batches_per_epoch * args.micro_batch
                writes.append((latency, threads, n / (time.perf_counter() - t), READS[0], path.stat().st_size))
                print(f"write latency={latency * 1e3:g} ms threads={threads}: {writes[-1][2]:.1f} samples/s, "
                      f"{READS[0]} reads, {path.stat().st_size / 2**20:.1f} MiB", flush=True)
                del ds
            for mode in modes:
                for w in workers:
                    cached = drop_cache(files + sorted(directory.glob("*.npy")))
                    loader = loader_for(db, mode, w, latency, args.micro_batch, directory, args.k)
                    rate, reads, n = time_loader(loader, args.batches, args.seconds)
                    del loader
                    rows.append((mode, latency, w, rate, reads, n, cached))
                    print(f"{mode:16s} latency={latency * 1e3:g} ms workers={w}: {rate:9.1f} samples/s, "
                          f"{reads:7.1f} reads/batch ({n} samples; {cached} pages cached at start)", flush=True)
    need = needed_samples_per_s()  # configs/small.yaml, seq 2048, one H100 at 40% MFU
    need_tok = need * 2048
    cmd = "python benchmarks/bench_loader.py" + (" --db DB" if args.db else "") + \
        "".join(f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                if k not in ("db", "no_write") and v != ap.get_default(k))
    lines = [
        "## Training loader on simulated network storage: neighbour_reads modes",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {machine()}  ",
        f"Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"DB: {'synthetic, ' if not args.db else ''}{store.num_chunks:,} train chunks of {store.chunk_size} tokens in "
        f"{len(store.shards)} shards ({db_bytes / 2**20:,.0f} MiB of arrays), {store.num_seqs} training sequences "
        f"of {store.seq_len} tokens, k={args.k}, micro-batch {args.micro_batch} (configs/small.yaml's data shape), "
        f"shuffled. Storage: page cache dropped (posix_fadvise DONTNEED) before each row; each read sleeps the "
        f"latency (a read: one run of rows in the order asked, within or next to the previous page, <= 1 MiB). "
        f"Rows time the DataLoader from its creation (worker start included). Needed: configs/small.yaml at "
        f"seq 2048 on one H100 at 40% MFU consumes {need:.1f} samples/s (= {need_tok:,.0f} tokens/s).",
        "",
        "| neighbour_reads | latency per read | workers | samples/s | tokens/s | reads per batch | x needed (small, H100) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, latency, w, rate, reads, n, cached in rows:
        tok = rate * store.seq_len
        lines.append(f"| {mode} | {latency * 1e3:g} ms | {w} | {rate:,.1f} | {tok:,.0f} | {reads:,.1f} | "
                     f"{tok / need_tok:,.2f} |")
    if writes:
        lines += ["", "Writing the epoch's retrieved-tokens file (once per epoch and rank, batched reads of "
                  "blocks of up to 256 sequences split over the threads, cold cache): " + "; ".join(
                      f"{lat * 1e3:g} ms, {threads} thread(s): {rate:,.1f} samples/s ({reads:,} reads)"
                      for lat, threads, rate, reads, size in writes) + f"; {writes[0][4] / 2**20:,.1f} MiB."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
