"""The DB-wide tables knn's exclusion rule needs, read per query range or candidate batch.

Why: a knn rank searches one range of query rows, but its rule looks up DB-wide tables: the doc
id of every candidate, whether a candidate is blank (only EOS and padding), the training
sequence of each query and the chunk range of its documents. Loaded whole (``np.asarray`` of
the doc ids, the content mask, a table of every document's first chunk) each rank held
O(database) arrays in RAM, however few rows it searched. Here every lookup reads only what it
is asked for from the memmapped split (chunk_store.store.ChunkStore arrays): candidates by fancy
indexing, a row's sequence start and a document's chunk bounds by binary search (O(log n) pages).
"""

from __future__ import annotations

from typing import Any

import numpy as np

BLOCK_ROWS = 1 << 16  # rows of chunk tokens read at a time for a slice of the content lookup


def sorted_search(arr: Any, values: Any, side: str = "left") -> np.ndarray:
    """``np.searchsorted`` on a sorted memmap or chunk_store.sharded_array.ShardedArray, reading
    O(log n) rows (never the whole array)."""
    values = np.asarray(values, dtype=np.int64)
    if hasattr(arr, "searchsorted"):
        return np.asarray(arr.searchsorted(values, side=side), dtype=np.int64)
    return np.searchsorted(np.asarray(arr), values, side=side).astype(np.int64)  # a plain list (tests)


def chunk_ranges_of(doc_ranges: np.ndarray, doc_ids: Any) -> np.ndarray:
    """Doc-id ranges [lo, hi] (q, 2) -> chunk-id ranges [a, b) (q, 2): the chunks of those
    documents (doc ids are sorted along the split), by binary search of the doc ids."""
    doc_ranges = np.asarray(doc_ranges, dtype=np.int64)
    if not len(doc_ranges):
        return np.zeros((0, 2), dtype=np.int64)
    return np.stack([sorted_search(doc_ids, doc_ranges[:, 0], "left"),
                     sorted_search(doc_ids, doc_ranges[:, 1], "right")], axis=1)


class ContentLookup:
    """Whether each train chunk asked for holds visible text (ChunkStore.content_mask's rule),
    computed from those chunks' tokens at each lookup: indexes like the (num_chunks,) bool mask
    it stands for (an int, a slice, an integer array of any shape) without ever building it."""

    def __init__(self, chunks: Any, blank_ids: np.ndarray) -> None:
        self.chunks = chunks
        self.blank = np.asarray(blank_ids, dtype=bool)
        self.shape = (int(chunks.shape[0]),)
        self.dtype = np.dtype(bool)
        self.ndim = 1

    @classmethod
    def of(cls, store: Any) -> "ContentLookup":
        """The lookup of a chunk_store.store.ChunkStore split."""
        return cls(store.chunks, store.tokenizer.blank_ids())

    def __len__(self) -> int:
        return self.shape[0]

    def _visible(self, tokens: np.ndarray) -> np.ndarray:
        rows = np.clip(np.asarray(tokens).astype(np.int64), 0, len(self.blank) - 1)
        return ~self.blank[rows].all(axis=-1)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                return self[np.arange(start, stop, step, dtype=np.int64)]
            out = np.empty(max(stop - start, 0), dtype=bool)
            for a in range(start, stop, BLOCK_ROWS):  # blocks: memory flat in the slice
                b = min(a + BLOCK_ROWS, stop)
                out[a - start:b - start] = self._visible(self.chunks[a:b])
            return out
        if isinstance(key, (int, np.integer)):
            return bool(self._visible(self.chunks[int(key)]))
        key = np.asarray(key)
        if key.dtype == bool:
            key = np.flatnonzero(key)
        # each distinct chunk read once, in row order (a batch's candidates repeat: neighbours of
        # neighbouring chunks overlap), then spread back to the key's shape
        rows, where = np.unique(key.reshape(-1).astype(np.int64), return_inverse=True)
        return self._visible(self.chunks[rows])[where.reshape(-1)].reshape(key.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError("ContentLookup is read per batch of chunks; index it, do not materialise it")
