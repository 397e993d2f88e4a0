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
