"""RetroDataset: training sequences with their precomputed neighbours, as vectorised memmap reads.

Sample i is sequence ``seq_starts[i]``: ``seq_len + 1`` tokens (inputs and shifted targets) and,
for each of its ``seq_len / chunk_size`` chunks u, the chunk's k precomputed neighbours, each
followed by its continuation: ``(seq_len / chunk_size, k, 2 * chunk_size)``, pad_id where a
neighbour is missing. Slot u holds chunk u's neighbours: the model's causal chunked
cross-attention relies on that alignment.

Everything is numpy fancy indexing over the DB's memmaps, a whole batch at once
(``__getitems__``, which ``torch.utils.data.DataLoader`` calls with a batch's indices), so
there is no per-token Python. ``reads="batched"`` (the default) reads each array once per shard in
sorted row order (retro.neighbour_reads: fewer, more sequential reads for network storage);
``reads="random"`` is the original path, rows read in the order the batch asks for them. Both give
the same batch. The memmaps are (re)opened lazily in each process, so the dataset
pickles to DataLoader workers as a path, not as a copy of the arrays.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from einops import rearrange

from chunk_store import ChunkStore
from chunk_store.framework.errors import UserError
from retro.config import NEIGHBOUR_ALIGNMENTS, RetroConfig
from retro.neighbour_alignment import aligned_neighbour_tokens
from retro.neighbour_reads import neighbour_tokens, take_sorted

BLOCK_ROWS = 1 << 16  # rows compared at a time between two databases' arrays



def _take_in_order(arr: Any, ids: np.ndarray) -> np.ndarray:
    """``arr[ids]`` read as the batch asks (the ``random`` read mode)."""
    return np.asarray(arr[ids])


class RetroDataset(torch.utils.data.Dataset):
    """``RetroDataset(store_or_db, split)[i] -> {"tokens": (seq_len+1,), "neighbours": (l, k, 2m)}``.

    ``store`` is an open ChunkStore (its db and split are used) or a DB path. ``k`` defaults to
    every precomputed neighbour; ``retrieval=False`` yields tokens only (decoder-only training
    or evaluation on a DB without neighbours). ``alignment`` is the model's
    ``neighbour_alignment`` (retro.neighbour_alignment); ``content`` reads its windows batched;
    ``min_match`` is the model's ``neighbour_min_match`` (weak neighbours dropped).
    """

    def __init__(self, store: ChunkStore | str | os.PathLike, split: str | None = None, *,
                 k: int | None = None, retrieval: bool = True, reads: str = "batched",
                 alignment: str = "chunk", min_match: float = 0.0) -> None:
        if isinstance(store, (str, os.PathLike)):
            if split is None:
                raise UserError("RetroDataset(db_path, split): the split is required with a path")
            store = ChunkStore.open(store, split)
        elif split is not None and split != store.split:
            raise UserError(f"RetroDataset: store is the {store.split!r} split, asked for {split!r}")
        if reads not in ("random", "batched"):
            raise UserError(f"RetroDataset: reads must be 'random' or 'batched', not {reads!r}")
        if alignment not in NEIGHBOUR_ALIGNMENTS:
            raise UserError(f"RetroDataset: alignment must be one of {NEIGHBOUR_ALIGNMENTS}, not {alignment!r}")
        if min_match and alignment != "content":
            raise UserError("RetroDataset: min_match needs alignment 'content'")
        self.reads, self.alignment, self.min_match = reads, alignment, float(min_match)
        self.db = Path(store.db)
        self.split = store.split
        self.retrieval = retrieval
        self.chunk_size = int(store.chunk_size)
        self.seq_len = int(store.seq_len)
        if self.seq_len % self.chunk_size:
            raise UserError(f"{self.db}: seq_len={self.seq_len} is not a multiple of chunk_size={self.chunk_size}")
        self.chunks_per_seq = self.seq_len // self.chunk_size
        self.pad_id = int(store.tokenizer.pad_id)
        self.num_chunks = int(store.num_chunks)
        self._len = int(len(store.seq_starts))
        self.k = 0
        if retrieval:
            nbrs = _neighbours_or_error(store)
            have = int(nbrs.shape[1])
            self.k = have if k is None else int(k)
            if not 0 < self.k <= have:
                raise UserError(f"{self.db}: {self.split} has {have} neighbours per chunk, asked for k={self.k}")
        self._store: ChunkStore | None = store
        self._pid = os.getpid()

    # --------------------------------------------------------------- process-local store

    @property
    def store(self) -> ChunkStore:
        """The ChunkStore of this process (re-opened after a fork/spawn into a worker)."""
        if self._store is None or self._pid != os.getpid():
            self._store = ChunkStore.open(self.db, self.split)
            self._pid = os.getpid()
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = None  # workers reopen the memmaps instead of receiving copies
        return state

    # --------------------------------------------------------------- reads

    def __len__(self) -> int:
        return self._len

    @classmethod
    def for_model(cls, store: ChunkStore | str | os.PathLike, split: str | None, cfg: RetroConfig, *,
                  k: int | None = None, retrieval: bool = True, reads: str = "batched") -> RetroDataset:
        """The split as ``cfg``'s model reads it: its neighbours per chunk (``k`` at most), its
        alignment and weak-neighbour rule. Every caller that scores or trains a model builds its
        dataset here, so none can read neighbours the model was not trained on."""
        return cls(store, split, k=k or cfg.num_neighbours, retrieval=retrieval, reads=reads,
                   alignment=cfg.neighbour_alignment, min_match=cfg.neighbour_min_match)

    def chunk_ids(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """(b, chunks_per_seq + 1) chunk ids of each sequence and the chunk after it (-1 past the end)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < -self._len or idx.max() >= self._len):
            raise IndexError(f"sequence index out of range for {self._len} sequences")
        idx = idx % max(self._len, 1)
        starts = np.asarray(self.store.seq_starts[idx], dtype=np.int64)
        ids = starts[:, None] + np.arange(self.chunks_per_seq + 1, dtype=np.int64)
        return np.where(ids < self.num_chunks, ids, -1)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Vectorised read of many samples: tokens (b, seq_len+1) int64, neighbours (b, l, k, 2m) int64.

        The read mode picks only how rows are read: ``batched`` as sorted unique ids once per
        shard (retro.neighbour_reads), ``random`` in the order the batch asks for them."""
        store = self.store
        batched = self.reads == "batched"
        take = take_sorted if batched else _take_in_order
        ids = self.chunk_ids(indices)
        valid = ids >= 0
        # (b, l+1, m) chunk tokens; rows past the end of the split are padding
        toks = take(store.chunks, np.where(valid, ids, 0)).astype(np.int64)
        toks[~valid] = self.pad_id
        tokens = rearrange(toks, "b c m -> b (c m)")[:, : self.seq_len + 1]
        out = {"tokens": np.ascontiguousarray(tokens)}
        if self.retrieval:
            own = ids[:, : self.chunks_per_seq]
            nbr_ids = take(store.neighbours, np.where(own >= 0, own, 0))[..., : self.k].astype(np.int64)
            nbr_ids[own < 0] = -1
            if self.alignment == "content":  # each window moved to line up with its own chunk
                out["neighbours"] = aligned_neighbour_tokens(store.train_store, nbr_ids,
                                                             toks[:, : self.chunks_per_seq], self.pad_id,
                                                             self.min_match)
            elif batched:
                out["neighbours"] = neighbour_tokens(store.train_store, nbr_ids, self.pad_id)
            else:
                out["neighbours"] = np.asarray(store.neighbour_tokens(nbr_ids), dtype=np.int64)
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.get_batch([index])
        return {k: torch.from_numpy(v[0]) for k, v in batch.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch in one vectorised read (DataLoader calls this when it exists)."""
        return {k: torch.from_numpy(v) for k, v in self.get_batch(indices).items()}


def collate(batch: Any) -> dict[str, torch.Tensor]:
    """DataLoader collate_fn: ``__getitems__`` already returns the batch; per-item lists are stacked."""
    if isinstance(batch, dict):
        return batch
    return torch.utils.data.default_collate(batch)


def _neighbours_or_error(store: ChunkStore) -> np.ndarray:
    try:
        nbrs = store.neighbours
    except UserError:
        raise
    except Exception as e:  # a store that raises its own error type until knn ran
        raise UserError(f"{store.db}: the {store.split} split has no neighbours ({e}): "
                        f"run `retro-build-index knn --db {store.db}`") from None
    if nbrs is None:
        raise UserError(f"{store.db}: the {store.split} split has no neighbours: "
                        f"run `retro-build-index knn --db {store.db}`")
    return nbrs


def check_compatible(store: ChunkStore, model_cfg: RetroConfig, seq_len: int | None = None) -> None:
    """The one model-vs-database check (train.py, retro.evaluate, retro.generate): refuse, before
    any compute, a DB whose chunk size, vocabulary or pad id (and, for training, sequence length)
    disagrees with the model config, naming both values and the setting to change."""
    pairs = [
        ("chunk_size", int(store.chunk_size), int(model_cfg.chunk_size), "model.chunk_size"),
        ("tokenizer.vocab_size", int(store.tokenizer.vocab_size), int(model_cfg.vocab_size), "model.vocab_size"),
        ("tokenizer.pad_id", int(store.tokenizer.pad_id), int(model_cfg.pad_id), "model.pad_id"),
    ]
    if seq_len is not None:
        pairs.append(("seq_len", int(store.seq_len), int(seq_len), "seq_len"))
    for db_key, db_val, cfg_val, cfg_key in pairs:
        if db_val != cfg_val:
            raise UserError(f"the database {store.db} has {db_key}={db_val} but the config has "
                            f"{cfg_key}={cfg_val}: use a matching config (--set {cfg_key}={db_val}) or database")


def check_same_split(store: ChunkStore, trained_db: str | os.PathLike) -> None:
    """Scoring a run against a database other than the one it trained with (the paper trains
    with 600B tokens and evaluates with 1.75T) compares like with like only when tokenizer, chunk
    size and the split's sequences are the same: refuse, naming what differs, unless they are
    (the split's chunks, document ids and sequence starts equal, byte for byte)."""
    trained = ChunkStore.open(trained_db, store.split)
    ours, theirs = store.manifest.get("tokenizer", {}), trained.manifest.get("tokenizer", {})
    if ours.get("sha256") != theirs.get("sha256"):
        raise UserError(f"{store.db} has another tokenizer than {trained.db}, the database the run trained with "
                        f"(sha256 {str(ours.get('sha256'))[:12]} vs {str(theirs.get('sha256'))[:12]})")
    if store.chunk_size != trained.chunk_size:
        raise UserError(f"{store.db} has chunk_size {store.chunk_size}, the run's database {trained.db} "
                        f"{trained.chunk_size}")
    for name in ("seq_starts", "doc_ids", "chunks"):
        a, b = getattr(store, name), getattr(trained, name)
        if len(a) != len(b) or any(not np.array_equal(a[i:i + BLOCK_ROWS], b[i:i + BLOCK_ROWS])
                                   for i in range(0, len(a), BLOCK_ROWS)):
            raise UserError(f"the {store.split} split of {store.db} is not the one of {trained.db}, the database "
                            f"the run trained with ({name} differ): build both from the same {store.split} "
                            f"documents (add more data with `retro-build-index add --retrieval-only`)")
