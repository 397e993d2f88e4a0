"""embed: frozen-BERT embeddings of every chunk (train and val), float16 .npy shards.

The embedding function is :class:`index_builder.embed.embedder.Embedder` (the same for the database
and for queries). The stage cuts each split into shards of ``--shard-size`` chunks, the unit of
work of the stage routine (chunk_store.framework.stage): ``DB/<split>/embeddings/<index>.npy`` (float16,
chunk order) written atomically, so a re-run redoes only the missing ones, and ``torchrun``
ranks share the shards between them. BERT tokenisation runs in a worker process, overlapped with
the model.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from chunk_store.framework.errors import UserError
from chunk_store.layout import SPLITS, DBLayout
from chunk_store.framework.atomic import atomic_save_npy
from chunk_store.framework.runtime import resolve_device
from chunk_store.framework.stage import RunInfo, Stage, Unit, config_from_args, positive, run_stage
from index_builder.embed.embedder import POOLING, Embedder, EmbedderConfig, load_bert_tokenizer, tokenize

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 16384
# texts per forward pass when --batch-size is not given. CPU: small batches keep a MiniLM layer's
# activations in cache (batch 32 beat batch 128 on an AVX2 EPYC; docs/BENCHMARKS.md,
# "Chunk embedding on a CPU without native bf16"); CUDA: large batches fill the GPU
DEFAULT_BATCH = {"cpu": 32, "cuda": 1024}
# the parameters that change the embeddings; a resumed or later stage must agree on all of them
# (compute dtype, batch size, device type and compilation change the float16 bytes too: a resume
# that mixed them would give shards of mixed precision, so they are refused like the rest)
RESULT_KEYS = ("embedder_id", "dim", "max_length", "pooling", "shard_size", "compute_dtype", "batch_size",
               "device_type", "compile", "batching")


# ----------------------------------------------------------------------------- shards


def shard_ranges(num_chunks: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) chunk ranges of ``shard_size`` rows: the unit of work of embed and knn."""
    return [(s, min(s + shard_size, num_chunks)) for s in range(0, num_chunks, shard_size)]


def shard_ok(path: Path, rows: int, dim: int) -> bool:
    """A shard counts as done only if its header says exactly (rows, dim) float16."""
    return npy_header_ok(path, (rows, dim), np.float16)


def npy_header_ok(path: Path, shape: tuple[int, ...], dtype: Any = None) -> bool:
    """``path`` is a readable .npy of exactly this shape (and dtype, if given)."""
    if not path.exists():
        return False
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:
        return False
    return arr.shape == shape and (dtype is None or arr.dtype == dtype)


def open_embeddings(db: str | os.PathLike, split: str) -> list[np.ndarray]:
    """The memory-mapped float16 shards of one split, in chunk order."""
    folder = DBLayout(db).embeddings_dir(split)
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise UserError(f"no embeddings in {folder}: run `retro-build-index embed --db {db}` first")
    return [np.load(f, mmap_mode="r", allow_pickle=False) for f in files]


def read_rows(shards: Sequence[np.ndarray], start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the concatenated shards as float32, without loading the rest."""
    parts, offset = [], 0
    for arr in shards:
        n = arr.shape[0]
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            parts.append(np.asarray(arr[lo - offset:hi - offset], dtype=np.float32))
        offset += n
        if offset >= stop:
            break
    if not parts:
        return np.zeros((0, shards[0].shape[1] if shards else 0), dtype=np.float32)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]



# --------------------------------------------------------------- tokenisation in a worker

_W: dict[str, Any] = {}


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent died (kill -9, OOM) exits instead of lingering as an orphan."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _worker_init(db: str, embedder: str, parent: int | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if parent is not None:
        # Ctrl-C reaches the whole process group: the parent reports it in one line and shuts the
        # pool down; a worker that also raised KeyboardInterrupt would print its own traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _exit_with_parent(parent)
    from chunk_store import ChunkStore

    _W["db"] = db
    _W["stores"] = {}
    _W["tokenizer"] = load_bert_tokenizer(embedder)
    _W["ChunkStore"] = ChunkStore


def _prepare(split: str, start: int, stop: int, max_length: int) -> tuple[list[list[int]], int]:
    """Worker: chunk token ids -> text (the store's tokenizer) -> BERT ids."""
    stores = _W["stores"]
    if split not in stores:
        stores[split] = _W["ChunkStore"].open(_W["db"], split)
    store = stores[split]
    rows = np.asarray(store.chunks[start:stop]).astype(np.int64)
    texts = [store.tokenizer.decode(r.tolist()) for r in rows]
    return tokenize(_W["tokenizer"], texts, max_length)


class _InlinePool:
    """The same interface as a process pool, in this process (workers=0, tests, debugging)."""

    def submit(self, fn: Any, *args: Any) -> cf.Future:
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # delivered when .result() is called, like a real pool
            fut.set_exception(e)
        return fut

    def shutdown(self, cancel_futures: bool = False) -> None:
        pass


# ----------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class EmbedConfig:
    """The embed stage's options (the CLI's defaults come from here)."""

    embedder: str = ""  # local HF BERT folder or hub name; "" = the offline all-MiniLM-L6-v2
    batch_size: int | None = None  # texts per forward pass; None = the DB's (resume), else DEFAULT_BATCH
    device: str = "auto"
    max_length: int | None = None  # BERT tokens per chunk incl. [CLS]/[SEP]; None = model max
    shard_size: int = DEFAULT_SHARD_SIZE
    tokenize_workers: int = 1  # BERT tokenisation processes overlapped with the model; 0 = inline
    dtype: str | None = None  # fp32 | bf16 | None (bf16 where native)
    compile: bool | None = None  # torch.compile the encoder; None = on with CUDA


def num_chunks(db: Path, manifest: dict[str, Any], split: str) -> int:
    """Chunks in ``split`` (from the manifest's counts; the array's header for older DBs)."""
    counts = manifest.get("counts", {}).get(split)
    if counts and "chunks" in counts:
        return int(counts["chunks"])
    path = DBLayout(db).chunks(split)
    return int(np.load(path, mmap_mode="r").shape[0]) if path.exists() else 0


def default_batch_size(manifest: dict[str, Any], device_type: str) -> int:
    """The batch a resume or re-run without --batch-size uses: the one the DB's embeddings were
    made with on this device type (a changed default must not refuse an older DB), else the default."""
    recorded = manifest.get("stages", {}).get("embed", {}).get("params", {})
    if recorded.get("device_type") == device_type and recorded.get("batch_size"):
        return int(recorded["batch_size"])
    return DEFAULT_BATCH.get(device_type, DEFAULT_BATCH["cpu"])


class EmbedStage(Stage[EmbedConfig]):
    """Chunks -> float16 embedding shards; one unit a shard of ``shard_size`` chunks."""

    name = "embed"
    packages = ("torch", "transformers")
    result_keys = RESULT_KEYS + ("chunk_size",)
    progress_unit = "chunk"
    advances_bar = True  # batch by batch inside compute: a shard takes a while

    def params(self, manifest: dict[str, Any]) -> dict[str, Any]:
        import torch

        cfg = self.cfg
        positive(cfg.shard_size, "--shard-size")
        device = str(resolve_device(cfg.device))
        self.batch_size = cfg.batch_size if cfg.batch_size is not None else default_batch_size(
            manifest, device.split(":")[0])
        positive(self.batch_size, "--batch-size")
        torch.manual_seed(0)
        self.embedder = Embedder(EmbedderConfig(
            name_or_path=cfg.embedder, device=device, dtype=cfg.dtype, max_length=cfg.max_length,
            batch_size=self.batch_size,
            compile=bool(cfg.compile if cfg.compile is not None else device.startswith("cuda"))))
        e = self.embedder
        self.truncated = self.empty = self.chunks_now = 0
        return {"embedder": e.name, "embedder_path": str(e.name_or_path), "embedder_id": e.id,
                "dim": e.dim, "max_length": e.max_length, "pooling": POOLING,
                "shard_size": cfg.shard_size, "storage_dtype": "float16",
                "compute_dtype": e.dtype, "batch_size": self.batch_size, "device_type": e.device.type,
                "compile": e.cfg.compile, "batching": e.batching, "chunk_size": manifest.get("chunk_size")}

    def check(self, recorded: dict[str, Any], params: dict[str, Any], manifest: dict[str, Any]) -> None:
        rp = recorded.get("params", {})
        if rp.get("embedder_id") not in (None, params["embedder_id"]):
            raise UserError(
                f"embed: embedder differs: the database was embedded with {rp.get('embedder')!r} "
                f"(id {rp.get('embedder_id')}), this run asks for {params['embedder']!r} "
                f"(id {params['embedder_id']}) (use a new --db, or the same --embedder)")
        super().check(recorded, params, manifest)

    def complete(self, manifest: dict[str, Any]) -> bool:
        return all(self.unit_done(u) for u in self.units(manifest))

    def outputs(self, manifest: dict[str, Any]) -> list[Path]:
        return [self.paths.embedding_shard(split, i) for split, i, _, _ in (u.payload for u in self.units(manifest))]

    def skip_message(self, stats: dict[str, Any]) -> str:
        return f"embed: already done ({stats.get('chunks', '?')} chunks)"

    def temp_folders(self) -> list[tuple[Path, tuple[str, ...]]]:
        return [(self.paths.embeddings_dir(s), ("",)) for s in SPLITS]

    def units(self, manifest: dict[str, Any]) -> list[Unit]:
        out: list[Unit] = []
        for split in SPLITS:
            for i, (a, b) in enumerate(shard_ranges(num_chunks(self.db, manifest, split),
                                                    self.cfg.shard_size)):
                out.append(Unit(len(out), b - a, (split, i, a, b)))
        return out

    def unit_done(self, unit: Unit) -> bool:
        split, i, a, b = unit.payload
        return shard_ok(self.paths.embedding_shard(split, i), b - a, self.embedder.dim)

    def setup(self) -> None:
        workers = self.cfg.tokenize_workers
        if workers > 0:
            self.pool: Any = cf.ProcessPoolExecutor(
                max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                initargs=(str(self.db), self.embedder.name_or_path, os.getpid()))
        else:
            _worker_init(str(self.db), self.embedder.name_or_path)
            self.pool = _InlinePool()

    def close(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    def compute(self, unit: Unit, prepared: tuple[list[list[int]], int] | None = None) -> None:
        split, i, a, b = unit.payload
        ids, truncated = prepared if prepared is not None else \
            _prepare(split, a, b, self.embedder.max_length)
        self.truncated += truncated
        self.empty += sum(1 for x in ids if len(x) <= 2)
        emb = self.embedder.embed_ids(ids, self.batch_size, progress=self.bar)
        atomic_save_npy(self.paths.embedding_shard(split, i), emb.astype(np.float16))
        self.chunks_now += b - a

    def run_units(self, todo: list[Unit], done: Callable[[Unit], None]) -> None:
        """BERT tokenisation of the next shards (in the pool) overlaps the model on this one."""
        prefetch = max(2, self.cfg.tokenize_workers + 1)
        futures: list[tuple[Unit, cf.Future]] = []
        queue = iter(todo)

        def fill() -> None:
            while len(futures) < prefetch:
                unit = next(queue, None)
                if unit is None:
                    return
                split, _, a, b = unit.payload
                futures.append((unit, self.pool.submit(_prepare, split, a, b, self.embedder.max_length)))

        fill()
        while futures:
            unit, fut = futures.pop(0)
            fill()
            self.compute(unit, fut.result())
            done(unit)

    def finalize(self, manifest: dict[str, Any], run: RunInfo) -> dict[str, Any]:
        if self.truncated:
            log.warning("embed: %d chunks were longer than %d BERT tokens and were truncated",
                        self.truncated, self.embedder.max_length)
        if not self.complete(manifest):
            raise UserError("embed: some shards are missing after every rank finished; re-run embed")
        return {
            "chunks": sum(num_chunks(self.db, manifest, s) for s in SPLITS),
            "per_split": {s: num_chunks(self.db, manifest, s) for s in SPLITS},
            "shards_written": run.units_done,
            "shards_reused": run.units_reused,
            "chunks_embedded_now": self.chunks_now,
            "truncated": self.truncated,
            "empty": self.empty,
            "seconds": round(run.seconds, 2),
            "chunks_per_s": round(self.chunks_now / run.seconds, 1) if run.seconds > 0 else None,
            "device": str(self.embedder.device),
            "compute_dtype": self.embedder.dtype,
            "world_size": run.world_size,
        }

    def report(self, stats: dict[str, Any], run: RunInfo) -> str:
        rate = round(self.chunks_now / run.seconds, 1) if run.seconds > 0 else None
        return (f"embed: {self.chunks_now} chunks embedded in {run.seconds:.1f}s "
                f"({rate} chunks/s), {run.units_reused} shards reused")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """embed's own options (--device and --shard-size are shared: index_builder.cli)."""
    d = EmbedConfig
    g = parser.add_argument_group("embed")
    g.add_argument("--embedder", default=d.embedder,
                   help="local Hugging Face BERT folder or hub name (default: offline all-MiniLM-L6-v2)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="texts per forward pass (default: the DB's own when resuming, else "
                        f"{DEFAULT_BATCH['cpu']} on CPU, {DEFAULT_BATCH['cuda']} on CUDA)")
    g.add_argument("--max-length", type=int, default=d.max_length,
                   help="BERT tokens per chunk incl. [CLS]/[SEP] (default: the model maximum)")
    g.add_argument("--tokenize-workers", type=int, default=d.tokenize_workers,
                   help="BERT tokenisation worker processes overlapped with the model (0 = inline)")
    g.add_argument("--dtype", default=d.dtype, choices=["fp32", "bf16"],
                   help="BERT compute dtype (default bf16 autocast on CUDA and bf16-capable CPUs)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d.compile,
                   help="torch.compile the BERT encoder (default: on with CUDA, off on CPU)")


SHARED_OPTIONS = ("device", "shard_size")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The CLI entry: ``retro-build-index embed``."""
    return run_stage(EmbedStage(args.db, config_from_args(EmbedConfig, args)))
