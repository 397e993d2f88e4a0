"""A compressed index's candidates re-ranked by their true distance, read from the stored embeddings.

Why: past what SQ8 codes fit in ``--max-index-memory`` the key chooser takes PQ codes (16M chunks
at 2G: PQ96, four dimensions a byte), and PQ distances cannot order a chunk's near-duplicates:
the raw index's recall@2 at 16M train chunks fell far below the target (docs/BENCHMARKS.md). The float16
embeddings are on disk anyway (the embed stage's output), so the search asks the index for
``factor`` times the candidates and keeps the nearest by true distance. faiss's IndexRefineFlat
does the same but holds every vector in RAM as float32 (24 GB at 16M chunks); here the rows are
read from the memory-mapped shards, ``factor x c`` rows a query, through the page cache, and the
mapped pages are let go after each knn shard (:func:`release_pages`) so the process's RSS does
not grow with the embedding matrix.

The distances returned are then true squared L2 distances, not the codes' approximations.
"""

from __future__ import annotations

import mmap
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from index_builder.knn.exclusion import SearchFn
from index_builder.knn.range_exclusion import RangeSearch

LOSSY_FACTOR = 4  # candidates a final one, where the codes are lossier than SQ8
FOUR_BIT_FACTOR = 16  # 4-bit PQ (fast scan): x8 needed twice the nprobe on real text (docs/BENCHMARKS.md)
BLOCK = 64  # query rows re-ranked at a time: the gathered block stays in cache



def code_bytes(index: Any) -> int:
    """Bytes a vector's code takes in ``index`` (flat float32: 4 x d)."""
    import faiss

    try:
        return int(faiss.extract_index_ivf(index).code_size)
    except RuntimeError:
        pass
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    return int(getattr(inner, "code_size", 4 * index.d))


def default_factor(index: Any) -> int:
    """:data:`FOUR_BIT_FACTOR` for 4-bit PQ codes (the key chooser's fast-scan codes: 16
    dimensions a byte), :data:`LOSSY_FACTOR` where the codes take under a byte a dimension (PQ,
    OPQ + PQ, SQ4), else 1 (SQ8, SQfp16, flat: their own distances rank well enough, as the
    recall check shows)."""
    from index_builder.index.fast_scan import is_four_bit_pq

    if is_four_bit_pq(index):
        return FOUR_BIT_FACTOR
    return LOSSY_FACTOR if code_bytes(index) < index.d else 1


def take_rows(shards: Sequence[np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` (any order, repeats allowed) of the concatenated shards, in their stored
    dtype, each read alone through the mapping (random rows: a block read would fetch thousands
    of rows for each)."""
    ids = np.asarray(ids, dtype=np.int64)
    offsets = np.cumsum([0] + [a.shape[0] for a in shards])
    if len(ids) and (ids.min() < 0 or ids.max() >= offsets[-1]):
        raise IndexError(f"row ids outside the {offsets[-1]} rows stored")
    if len(shards) == 1:  # the usual case: no split by shard
        return np.asarray(shards[0][ids])
    out = np.empty((len(ids), shards[0].shape[1]), dtype=shards[0].dtype)
    shard = np.searchsorted(offsets, ids, side="right") - 1
    for s in np.unique(shard):
        rows = shard == s
        out[rows] = shards[s][ids[rows] - offsets[s]]
    return out


def pick_rows(shards: Sequence[np.ndarray], ids: np.ndarray) -> np.ndarray:
    """:func:`take_rows` as float32, widened by torch: numpy's float16 -> float32 cast has no
    SIMD path and cost more than the whole index search."""
    import torch

    out = take_rows(shards, ids)
    return out if out.dtype == np.float32 else torch.from_numpy(out).float().numpy()


def release_pages(shards: Sequence[np.ndarray]) -> None:
    """Drop the mapped pages of memory-mapped shards from this process (they stay in the page
    cache): without it every row ever read counts in the RSS until the shards are closed."""
    for arr in shards:
        base = getattr(arr, "base", None)
        if isinstance(base, mmap.mmap) and hasattr(base, "madvise"):
            try:
                base.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass


def rerank(queries: np.ndarray, cand_ids: np.ndarray, c: int, read: Callable[[np.ndarray], np.ndarray],
           block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """The ``c`` candidates of each row nearest by true distance: (ids (q, c), squared L2 (q, c)),
    -1 / inf where a row has fewer. Rows go ``block`` at a time (the gathered vectors of a
    16,384-row shard at 48 candidates would be 1.2 GB of float32; 64 rows: 4.7 MB)."""
    with _one_torch_thread():
        parts = [_rerank_block(queries[a:a + block], cand_ids[a:a + block], c, read)
                 for a in range(0, len(queries), block)] or [_rerank_block(queries, cand_ids, c, read)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """The re-rank's small torch ops on one thread: on a busy machine each multi-threaded op
    waits at its barrier for a descheduled thread (several times slower; docs/BENCHMARKS.md)."""
    import torch

    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _rerank_block(queries: np.ndarray, cand_ids: np.ndarray, c: int,
                  read: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    true = true_distances(queries, cand_ids, read)
    order = np.argsort(true, axis=1, kind="stable")[:, :c]
    ids = np.take_along_axis(cand_ids, order, axis=1)
    dist = np.take_along_axis(true, order, axis=1)
    if ids.shape[1] < c:  # fewer candidates than asked for
        ids = np.pad(ids, ((0, 0), (0, c - ids.shape[1])), constant_values=-1)
        dist = np.pad(dist, ((0, 0), (0, c - dist.shape[1])), constant_values=np.inf)
    ids[~np.isfinite(dist)] = -1
    return ids, dist


def true_distances(queries: np.ndarray, ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Squared L2 between each query (q, d) and the stored vectors of its ids (q, c); inf where
    id < 0. ``read(ids)`` -> a new array of their vectors, one a flat id, any dtype (the
    embedding memmaps: :func:`take_rows`). In torch, in place on the one gathered (q, c, d)
    block: no sort of the ids, no second gather; numpy's broadcast subtract-square-sum and its
    float16 cast each cost several times the index search they re-rank, and a unique-id pass
    costs more than it saves (docs/BENCHMARKS.md)."""
    import torch

    flat = ids.reshape(-1)
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    if not len(flat):
        return np.full(ids.shape, np.inf, dtype=np.float32)
    rows = torch.from_numpy(np.asarray(read(np.clip(flat, 0, None))))
    rows = rows if rows.dtype == torch.float32 else rows.float()
    d = rows.view(*ids.shape, q.shape[1]).sub_(q[:, None, :]).pow_(2).sum(-1).numpy()
    d[ids < 0] = np.inf
    return d


def reranked(search: SearchFn, factor: int, read: Callable[[np.ndarray], np.ndarray], ntotal: int) -> SearchFn:
    """``search`` asked for ``factor`` x the candidates, re-ranked by true distance."""
    def run(q: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        ids, _ = search(q, min(c * factor, ntotal))
        return rerank(q, ids, c, read)
    return run


def reranked_ranges(search: RangeSearch, factor: int, read: Callable[[np.ndarray], np.ndarray],
                    ntotal: int) -> RangeSearch:
    """The same for a search that skips each row's excluded chunk range (range_exclusion)."""
    def run(q: np.ndarray, ranges: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        ids, _ = search(q, ranges, min(c * factor, ntotal))
        return rerank(q, ids, c, read)
    return run
