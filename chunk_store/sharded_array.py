"""Many memmapped shard arrays read as one array with global row ids.

Why: a database is a set of immutable shards (chunk_store.shards), and every reader (the
dataset, knn, the Retriever) indexes chunks by one global id. ``ShardedArray`` answers the
indexing those readers use (an int, a slice, an integer array of any shape) by routing each row
to its shard, so nothing is copied or concatenated: opening costs the same for 1 shard or 10,000.
Each shard may add a constant to its values (global doc ids and sequence starts are a shard's
local ids plus the rows of the shards before it).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class ShardedArray:
    """Rows of ``parts`` (arrays of equal trailing shape and dtype) in order, ``add[i]`` added to
    part i's values. Reading returns plain numpy arrays."""

    def __init__(self, parts: Sequence[np.ndarray], add: Sequence[int] | None = None) -> None:
        if not parts:
            raise ValueError("a ShardedArray needs at least one part")
        self.parts = list(parts)
        self.add = [int(a) for a in add] if add is not None else None
        self.offsets = np.concatenate([[0], np.cumsum([p.shape[0] for p in self.parts])]).astype(np.int64)
        first = self.parts[0]
        self.dtype = np.result_type(first.dtype, np.int64) if self.add and any(self.add) else first.dtype
        self.shape = (int(self.offsets[-1]), *first.shape[1:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _part(self, i: int, rows: Any) -> np.ndarray:
        out = np.asarray(self.parts[i][rows])
        if self.add and self.add[i]:
            out = out.astype(self.dtype) + self.add[i]
        return out.astype(self.dtype, copy=False)

    def __getitem__(self, key: Any) -> Any:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"index {int(key)} is out of bounds for axis 0 with size {self.shape[0]}")
            p = int(np.searchsorted(self.offsets, i, side="right")) - 1
            row = self._part(p, i - int(self.offsets[p]))
            return row[rest] if rest else row
        lead = 1  # result axes the row key makes (an integer array of any shape: its ndim)
        if isinstance(key, slice):
            out = self._slice(*key.indices(self.shape[0]))
        else:
            key = np.asarray(key)
            lead = max(key.ndim, 1) if key.dtype != bool else 1
            out = self._take(key)
        return out[(*(slice(None),) * lead, *rest)] if rest else out

    def _slice(self, start: int, stop: int, step: int) -> np.ndarray:
        if step != 1:
            return self._take(np.arange(start, stop, step, dtype=np.int64))
        pieces = []
        for p in range(len(self.parts)):
            lo, hi = max(start, int(self.offsets[p])), min(stop, int(self.offsets[p + 1]))
            if lo < hi:
                pieces.append(self._part(p, slice(lo - int(self.offsets[p]), hi - int(self.offsets[p]))))
        if not pieces:
            return np.zeros((0, *self.shape[1:]), dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _take(self, idx: np.ndarray) -> np.ndarray:
        if idx.dtype == bool:
            return self._take(np.flatnonzero(idx))
        if not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"arrays used as indices must be of integer type, not {idx.dtype}")
        flat = idx.reshape(-1).astype(np.int64)
        flat = np.where(flat < 0, flat + self.shape[0], flat)
        if flat.size and (flat.min() < 0 or flat.max() >= self.shape[0]):
            raise IndexError(f"index out of bounds for axis 0 with size {self.shape[0]}")
        out = np.empty((flat.size, *self.shape[1:]), dtype=self.dtype)
        which = np.searchsorted(self.offsets, flat, side="right") - 1
        for p in np.unique(which):
            sel = which == p
            out[sel] = self._part(int(p), flat[sel] - self.offsets[p])
        return out.reshape(*idx.shape, *self.shape[1:])

    def searchsorted(self, values: Any, side: str = "left") -> np.ndarray:
        """``np.searchsorted`` of a 1-D array sorted across its parts (doc ids, sequence starts):
        per part a binary search of its memmap (O(log n) rows read, nothing materialised); the
        global position is the sum of the parts' positions."""
        values = np.asarray(values)
        out = np.zeros(values.shape, dtype=np.int64)
        for i, part in enumerate(self.parts):
            shift = self.add[i] if self.add else 0
            out += np.searchsorted(part, values - shift if shift else values, side=side)  # type: ignore[call-overload]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The whole array, materialised (a reader that needs every row at once)."""
        out = self._slice(0, self.shape[0], 1)
        return out.astype(dtype) if dtype is not None else out

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, parts={len(self.parts)})"


def concat(parts: Sequence[np.ndarray], add: Sequence[int] | None = None) -> np.ndarray | ShardedArray:
    """One part with nothing added: the part itself (a plain memmap); else a ShardedArray."""
    if len(parts) == 1 and not (add and add[0]):
        return parts[0]
    return ShardedArray(parts, add)
