"""Batched reads of a training batch: every row a batch needs, read once per shard, in file order.

Why: a batch's neighbours are random chunk ids spread over the whole database. Read as they come
(``RetroDataset`` with ``reads="random"``) each neighbour, its continuation and the two doc ids
that decide whether the continuation belongs to the same document are separate random reads. On
a local NVMe that costs nothing; on network storage (Lustre, Ceph) each costs a round trip. Here
a batch first gathers every row id it needs (the sequences' own chunks, their neighbour ids, the
neighbours *and* their continuations), then reads each array once per shard as numpy fancy
indexing over the memmap with the *sorted unique* ids (a neighbour and its continuation are
adjacent rows: one read), and scatters the rows back. The batch equals the random path's,
token for token (tests/retro/test_neighbour_reads.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from einops import rearrange

from chunk_store.sharded_array import ShardedArray

READ_MODES = ("random", "batched", "sequential_file")


def shard_parts(arr: Any) -> tuple[list[Any], np.ndarray, list[int]]:
    """(parts, row offsets (parts + 1,), values added per part) of a ShardedArray or one plain array."""
    if isinstance(arr, ShardedArray):
        return arr.parts, arr.offsets, arr.add or [0] * len(arr.parts)
    return [arr], np.array([0, arr.shape[0]], dtype=np.int64), [0]


def take_unique(arr: Any, uniq: np.ndarray) -> np.ndarray:
    """``arr[uniq]`` for sorted unique row ids: one fancy-index read per shard (rows in file order)."""
    parts, offsets, add = shard_parts(arr)
    dtype = np.result_type(parts[0].dtype, np.int64) if any(add) else parts[0].dtype
    out = np.empty((uniq.size, *parts[0].shape[1:]), dtype=dtype)
    bounds = np.searchsorted(uniq, offsets)  # sorted ids: each shard's ids are one contiguous range
    for p, part in enumerate(parts):
        lo, hi = int(bounds[p]), int(bounds[p + 1])
        if lo < hi:
            rows = np.asarray(part[uniq[lo:hi] - offsets[p]])
            out[lo:hi] = rows.astype(dtype, copy=False) + add[p] if add[p] else rows
    return out


def take_sorted(arr: Any, ids: np.ndarray) -> np.ndarray:
    """``arr[ids]`` (any shape, any order, repeats allowed) read as sorted unique ids, scattered back."""
    ids = np.asarray(ids, dtype=np.int64)
    uniq, inverse = np.unique(ids.reshape(-1), return_inverse=True)
    if uniq.size and (uniq[0] < 0 or uniq[-1] >= arr.shape[0]):
        raise IndexError(f"row id out of range for {arr.shape[0]} rows")
    rows = take_unique(arr, uniq)
    return rows[inverse.reshape(-1)].reshape(*ids.shape, *rows.shape[1:])


def check_neighbour_ids(flat: np.ndarray, n: int) -> None:
    """Refuse a neighbour id outside the train split of ``n`` chunks (-1, none, is allowed)."""
    if flat.size and (flat.max() >= n or flat.min() < -1):
        bad = flat[(flat >= n) | (flat < -1)][0]
        raise IndexError(f"neighbour id {bad} out of range for the train split of {n} chunks")


def neighbour_tokens(train: Any, nbr_ids: np.ndarray, pad_id: int) -> np.ndarray:
    """Train chunk ids (..., k), -1 for none -> (..., k, 2 * chunk_size) int64 tokens: the chunk and
    its continuation (the next chunk when in the same document, else pad); as
    ``ChunkStore.neighbour_tokens``, but chunks and doc ids each read once per shard in sorted order."""
    ids = np.asarray(nbr_ids, dtype=np.int64)
    flat = ids.reshape(-1)
    n, m = int(train.num_chunks), int(train.chunk_size)
    check_neighbour_ids(flat, n)
    out = np.full((flat.size, 2, m), pad_id, dtype=np.int64)
    valid = np.flatnonzero(flat >= 0)
    if valid.size:
        first = flat[valid]
        nxt = first + 1
        inside = nxt < n
        # one sorted pass over the rows of both the neighbours and their continuations
        uniq = np.unique(np.concatenate([first, nxt[inside]]))
        rows, docs = take_unique(train.chunks, uniq), take_unique(train.doc_ids, uniq)
        at = np.searchsorted(uniq, first)
        out[valid, 0] = rows[at]
        at_next = np.full(first.shape, -1, dtype=np.int64)
        at_next[inside] = np.searchsorted(uniq, nxt[inside])
        same = inside.copy()
        same[inside] = docs[at_next[inside]] == docs[at[inside]]
        out[valid[same], 1] = rows[at_next[same]]
    return rearrange(out, "x two m -> x (two m)").reshape(*ids.shape, 2 * m)
