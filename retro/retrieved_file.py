"""A per-epoch "retrieved tokens" file: each sample's tokens and neighbour tokens, in training order.

Why: on file systems where a random read costs a network round trip (Lustre, Ceph), even sorted
batched reads (retro.neighbour_reads) leave one read per distinct neighbour. This file is written
once per (epoch, rank), in the order that rank's ``ShardedBatchSampler`` gives for that epoch
(seed-determined), so training then reads one micro-batch as one contiguous slice.

    python -m retro.retrieved_file --config configs/small.yaml --db DB --out RUN/retrieved \\
        --epochs 0,1 --world-size 8 [--ranks 0,1]   # prewrite; training writes a missing epoch
                                                    # itself, stalling until it is done

Each record is ``(index, tokens (seq_len+1,), neighbours (l, k, 2m))`` in the DB's token dtype
(a numpy structured .npy), so a reader checks every sample index against the sampler's. A file is
written to a temporary name and renamed when complete (under a lock, so two processes never both
write it): a crash mid-write leaves no file under the final name, and the next writer removes the
stale temporary file and starts over. Batches equal ``RetroDataset``'s, token for token.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from chunk_store.framework.errors import UserError
from retro.dataset import RetroDataset, collate
from retro.distributed import ShardedBatchSampler
from retro.neighbour_reads import READ_MODES

WRITE_BLOCK = 256  # samples read and written at a time (memory stays flat for any epoch)
WRITE_THREADS = 8  # blocks in flight while writing (latency-bound reads overlap)


def record_dtype(ds: RetroDataset) -> np.dtype:
    """One sample's record: its sequence index, tokens and (with retrieval) neighbour tokens."""
    tok = np.dtype(ds.store.chunks.dtype)
    fields: list[tuple[Any, ...]] = [("index", "<i8"), ("tokens", tok, (ds.seq_len + 1,))]
    if ds.retrieval:
        fields.append(("neighbours", tok, (ds.chunks_per_seq, ds.k, 2 * ds.chunk_size)))
    return np.dtype(fields)


def records_fingerprint(ds: RetroDataset) -> str:
    """8 hex digits of what the records come from: the DB's path, its shards' counts, when its
    chunk and knn stages finished (a rebuilt DB or re-run knn gets new files, not stale ones), and
    how neighbour windows are cut (the model's alignment and weak-neighbour threshold)."""
    m = ds.store.manifest
    stages = {name: (m.get("stages", {}).get(name) or {}).get("finished") for name in ("chunk", "knn")}
    key = json.dumps([str(Path(ds.db).resolve()), m.get("counts"), len(m.get("shards") or []), stages,
                      ds.alignment, ds.min_match], sort_keys=True, default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:8]


def epoch_file(directory: str | os.PathLike, ds: RetroDataset, sampler: ShardedBatchSampler, epoch: int) -> Path:
    """The file of one epoch of one rank: its name holds everything that decides its content."""
    return Path(directory) / (f"{ds.split}-{records_fingerprint(ds)}-seed{sampler.seed}-epoch{epoch:05d}"
                              f"-rank{sampler.rank}of{sampler.world_size}-mb{sampler.micro_batch_size}"
                              f"-k{ds.k}-seqs{len(ds)}.npy")


def epoch_order(sampler: ShardedBatchSampler, epoch: int) -> np.ndarray:
    """The sample indices this rank reads in ``epoch``, in order (the trailing partial batch dropped)."""
    n = sampler.batches_per_epoch * sampler.micro_batch_size
    return sampler.epoch_indices(epoch)[:n].numpy().astype(np.int64)


def write_epoch_file(ds: RetroDataset, sampler: ShardedBatchSampler, epoch: int, directory: str | os.PathLike,
                     *, progress: bool = True, threads: int = WRITE_THREADS) -> Path:
    """Write (once) the retrieved-tokens file of ``epoch`` for ``sampler``'s rank; returns its path.
    A file already there is kept; a crashed writer's temporary file is removed and rewritten."""
    path = epoch_file(directory, ds, sampler, epoch)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process writing it: wait, then find it done
        if path.exists():
            return path
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # a crashed writer's (we hold the lock)
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            _write(ds, epoch_order(sampler, epoch), tmp, progress, f"retrieved tokens, epoch {epoch}", threads)
            os.replace(tmp, path)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _write(ds: RetroDataset, order: np.ndarray, tmp: Path, progress: bool, desc: str, threads: int) -> None:
    """Blocks of up to WRITE_BLOCK samples, read and written by ``threads`` threads: on network
    storage most of a block's time is waiting on reads (numpy's copy loops over a memmap run without
    the GIL), so threads overlap the waits."""
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=record_dtype(ds), shape=(len(order),))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(order), desc=desc, unit="seq", leave=False)

    size = max(1, min(WRITE_BLOCK, -(-len(order) // max(1, threads))))  # every thread gets work

    def block(a: int, out: np.ndarray = out) -> int:  # bound now: `out` is deleted below
        batch = ds.get_batch(order[a:a + size])
        rows = out[a:a + size]  # disjoint rows per block: no lock needed
        rows["index"] = order[a:a + size]
        rows["tokens"] = batch["tokens"]
        if ds.retrieval:
            rows["neighbours"] = batch["neighbours"]
        return len(rows)

    if len(order):
        ds.get_batch(order[:1])  # opens the lazily opened stores before the threads share them
    pool = ThreadPoolExecutor(max(1, threads))
    try:
        for future in as_completed([pool.submit(block, a) for a in range(0, len(order), size)]):
            if bar is not None:
                bar.update(future.result())
            else:
                future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after an error no new block starts
    if bar is not None:
        bar.close()
    out.flush()
    del out
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())


class PositionedBatchSampler:
    """``ShardedBatchSampler``'s micro-batches as ``(epoch, slot in the epoch's file, sample index)``
    keys: the file dataset reads a batch by where it lies, and checks which samples it holds."""

    def __init__(self, sampler: ShardedBatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        mbs = self.sampler.micro_batch_size
        for epoch, b, batch in self.sampler.positions():
            yield [(epoch, b * mbs + j, int(i)) for j, i in enumerate(batch)]


class RetrievedFileDataset(torch.utils.data.Dataset):
    """Batches read sequentially from the epochs' retrieved-tokens files (written on first use).

    Pickles to DataLoader workers as the dataset's path and the sampler; each worker memmaps the
    current epoch's file."""

    def __init__(self, ds: RetroDataset, sampler: ShardedBatchSampler, directory: str | os.PathLike,
                 progress: bool = True) -> None:
        self.ds, self.sampler, self.directory, self.progress = ds, sampler, Path(directory), progress
        self._epoch: int | None = None
        self._rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ds)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_epoch": None, "_rows": None}

    def rows(self, epoch: int) -> np.ndarray:
        """The memmapped records of ``epoch`` (the file written first if missing)."""
        if self._epoch != epoch or self._rows is None:
            path = write_epoch_file(self.ds, self.sampler, epoch, self.directory, progress=self.progress)
            rows = np.load(path, mmap_mode="r")
            if rows.dtype != record_dtype(self.ds) or len(rows) != len(epoch_order(self.sampler, epoch)):
                raise UserError(f"{path} does not match this run's data (dtype {rows.dtype}, {len(rows)} "
                                f"records): delete it and it is written again")
            self._epoch, self._rows = epoch, rows
        return self._rows

    def __getitems__(self, keys: list[tuple[int, int, int]]) -> dict[str, torch.Tensor]:
        epoch, first = keys[0][0], keys[0][1]
        if any(e != epoch or s != first + j for j, (e, s, _) in enumerate(keys)):
            raise ValueError("a micro-batch must be consecutive slots of one epoch")
        rows = np.array(self.rows(epoch)[first:first + len(keys)])  # one contiguous read
        if not np.array_equal(rows["index"], [key[2] for key in keys]):
            raise UserError(f"{epoch_file(self.directory, self.ds, self.sampler, epoch)} holds other samples "
                            f"than the sampler's at slot {first}: delete it and it is written again")
        out = {"tokens": torch.from_numpy(rows["tokens"].astype(np.int64))}
        if self.ds.retrieval:
            out["neighbours"] = torch.from_numpy(rows["neighbours"].astype(np.int64))
        return out

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([key]).items()}


def resolve_workers(num_workers: int | None, device: torch.device) -> int:
    """``num_workers: null``: 2 prefetching worker processes on CUDA, none on CPU (where the
    workers would compete with the training step for the same cores)."""
    if num_workers is not None:
        return num_workers
    return 2 if device.type == "cuda" else 0


def train_loader(ds: RetroDataset, sampler: ShardedBatchSampler, *, mode: str, device: torch.device,
                 num_workers: int | None, prefetch_factor: int, persistent_workers: bool, seed: int,
                 directory: str | os.PathLike | None = None) -> torch.utils.data.DataLoader:
    """The training DataLoader of one neighbour-read mode; every mode yields the same batches."""
    if mode not in READ_MODES:
        raise UserError(f"neighbour_reads must be one of {', '.join(READ_MODES)}, not {mode!r}")
    workers = resolve_workers(num_workers, device)
    if mode == "sequential_file":
        if directory is None:
            raise UserError("neighbour_reads=sequential_file needs a directory for the retrieved-tokens files")
        dataset: torch.utils.data.Dataset = RetrievedFileDataset(ds, sampler, directory)
        batches: Any = PositionedBatchSampler(sampler)
    else:
        ds.reads = mode
        dataset, batches = ds, sampler
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
        pin_memory=device.type == "cuda", prefetch_factor=prefetch_factor if workers else None,
        persistent_workers=persistent_workers and workers > 0,
        generator=torch.Generator().manual_seed(seed))  # keeps the global RNG untouched


def main(argv: list[str] | None = None) -> int:
    """Prewrite the retrieved-tokens files of some epochs for every rank of a run's config."""
    from retro.config import RetroConfig
    from retro.train_config import load_config

    p = argparse.ArgumentParser(description="Write per-epoch retrieved-tokens files (neighbour_reads: sequential_file).")
    p.add_argument("--config", required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--out", required=True, help="the files' folder (training uses RUN/retrieved)")
    p.add_argument("--epochs", default="0", help="comma-separated epochs")
    p.add_argument("--world-size", type=int, default=1, help="ranks of the run (one file per rank)")
    p.add_argument("--ranks", help="comma-separated ranks to write (default: all; run several of these "
                   "commands at once to write in parallel: reads on network storage are latency-bound)")
    p.add_argument("--threads", type=int, default=WRITE_THREADS, help="blocks read at once")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    tcfg, mdict = load_config(args.config, args.set)
    mcfg = RetroConfig.from_dict(mdict)
    ds = RetroDataset.for_model(args.db, "train", mcfg,
                                retrieval=tcfg.retrieval_dropout < 1.0 and bool(mcfg.resolved_cca_layers))
    for epoch in (int(e) for e in args.epochs.split(",")):
        for rank in ([int(r) for r in args.ranks.split(",")] if args.ranks else range(args.world_size)):
            sampler = ShardedBatchSampler(len(ds), tcfg.micro_batch_size, rank, args.world_size, seed=tcfg.seed)
            print(write_epoch_file(ds, sampler, epoch, args.out, threads=args.threads), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
