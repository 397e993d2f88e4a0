"""Which candidates a chunk may keep as neighbours, and the search that widens until it has k.

Megatron's rule for train chunks: not the chunk itself, nor any chunk of a document that shares
the chunk's training sequence (sequences cross document boundaries; excluding only the chunk's
own document would let it retrieve a later part of its own training sequence, and the model would
learn to copy its own future); never a chunk of only EOS and padding. Used by the knn stage
(index_builder.knn.stage) and the Retriever's ``exclude_doc_ids``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

MAX_CANDIDATES = 4096  # escalation cap for rows whose candidates are all excluded


def select_neighbours(
    cand_ids: np.ndarray,
    cand_dist: np.ndarray,
    k: int,
    query_ids: np.ndarray | None = None,
    query_docs: np.ndarray | None = None,
    db_docs: np.ndarray | None = None,
    exclude_docs: Sequence[set[int]] | None = None,
    doc_ranges: np.ndarray | None = None,
    content: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep, per row, the first k candidates that are not the query itself nor from an excluded
    document.

    ``cand_*`` are (q, c) sorted by distance, ids -1 for none. ``query_ids``/``query_docs`` enable
    the self / same-document exclusion; ``doc_ranges`` (q, 2) excludes every doc id in
    [lo, hi] per row (train: the documents of the chunk's training sequence); ``exclude_docs``
    adds per-row doc-id sets (the Retriever's option); ``content`` (bool per train chunk,
    ChunkStore.content_mask) drops chunks of only EOS and padding. Returns (ids (q, k) -1 padded,
    distances (q, k) inf padded, short: bool (q,) rows that found fewer than k).
    """
    valid = cand_ids >= 0
    if content is not None:
        valid &= content[np.clip(cand_ids, 0, None)]
    if query_ids is not None:
        valid &= cand_ids != query_ids[:, None]
    if db_docs is not None and (query_docs is not None or exclude_docs is not None or doc_ranges is not None):
        cand_docs = np.asarray(db_docs[np.clip(cand_ids, 0, None).ravel()]).reshape(cand_ids.shape)
        if query_docs is not None:
            valid &= cand_docs != query_docs[:, None]
        if doc_ranges is not None:
            valid &= ~((cand_docs >= doc_ranges[:, :1]) & (cand_docs <= doc_ranges[:, 1:]))
        if exclude_docs is not None:
            for row, docs in enumerate(exclude_docs):
                if docs:
                    valid[row] &= ~np.isin(cand_docs[row], np.fromiter(docs, dtype=np.int64))
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(cand_ids, order, axis=1).astype(np.int64)
    dist_ = np.take_along_axis(cand_dist, order, axis=1).astype(np.float32)
    keep = np.take_along_axis(valid, order, axis=1)
    if ids.shape[1] < k:  # fewer candidates than k at all
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        dist_ = np.pad(dist_, ((0, 0), (0, pad)), constant_values=np.inf)
        keep = np.pad(keep, ((0, 0), (0, pad)), constant_values=False)
    ids[~keep] = -1
    dist_[~keep] = np.inf
    return ids, dist_, ~keep.all(axis=1)


SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def search_with_exclusion(
    search: SearchFn,
    queries: np.ndarray,
    k: int,
    extra: int,
    ntotal: int,
    query_ids: np.ndarray | None = None,
    query_docs: np.ndarray | None = None,
    db_docs: np.ndarray | None = None,
    exclude_docs: Sequence[set[int]] | None = None,
    max_candidates: int = MAX_CANDIDATES,
    doc_ranges: np.ndarray | None = None,
    content: np.ndarray | None = None,
    row_search: Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None = None,
    range_first: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """k + extra candidates, exclusions, then re-search short rows with 4x the candidates.

    ``row_search(queries, row numbers, c)``, where given, searches the rows left short once more
    before widening (the knn stage: a search that skips each row's excluded chunk range,
    index_builder.knn.range_exclusion); with ``range_first`` every row goes through it at once (where
    most rows would come back short from the plain search)."""
    c = min(k + extra, ntotal)
    ranged = row_search is None or range_first
    if row_search is not None and range_first:
        cand_i, cand_d = row_search(queries, np.arange(len(queries)), c)
    else:
        cand_i, cand_d = search(queries, c)
    ids, dists, short = select_neighbours(cand_i, cand_d, k, query_ids, query_docs, db_docs,
                                          exclude_docs, doc_ranges=doc_ranges, content=content)
    while short.any():
        if not ranged:
            ranged = True  # same c, the excluded chunks skipped inside the search
        elif c < min(ntotal, max_candidates):
            c = min(c * 4, ntotal, max_candidates)
        else:
            break
        rows = np.flatnonzero(short)
        cand_i, cand_d = search(queries[rows], c) if row_search is None else row_search(queries[rows], rows, c)
        r_ids, r_d, r_short = select_neighbours(
            cand_i, cand_d, k,
            None if query_ids is None else query_ids[rows],
            None if query_docs is None else query_docs[rows],
            db_docs,
            None if exclude_docs is None else [exclude_docs[r] for r in rows],
            doc_ranges=None if doc_ranges is None else doc_ranges[rows], content=content)
        ids[rows], dists[rows] = r_ids, r_d
        short[rows] = r_short
    return ids, dists


def sequence_doc_ranges(doc_ids: np.ndarray, seq_starts: np.ndarray, chunks_per_seq: int,
                        rows: np.ndarray | None = None) -> np.ndarray:
    """(len(rows), 2) int64: per chunk of ``rows`` (default all), the [lo, hi] doc ids its training
    neighbours must avoid.

    A chunk inside training sequence s (chunks seq_starts[s] .. + chunks_per_seq - 1) gets the
    min and max doc id of that sequence's chunks; doc ids are consecutive along the stream, so
    that range is exactly the sequence's documents. A chunk in no sequence (past the last full
    one) gets its own document only. Vectorised and bounded by len(rows) x chunks_per_seq, so a
    knn shard reads only its own sequences (``seq_starts`` may be a memmap: a binary search a row).
    """
    from index_builder.knn.ranged_reads import sorted_search

    n = len(doc_ids)
    rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    own = np.asarray(doc_ids[rows], dtype=np.int64)
    ranges = np.stack([own, own], axis=1)
    if not hasattr(seq_starts, "shape"):  # a list
        seq_starts = np.asarray(seq_starts, dtype=np.int64)
    if not len(seq_starts) or not len(rows):
        return ranges
    # a binary search a row: only these rows' sequence starts are read (seq_starts may be a DB-wide memmap)
    seq = sorted_search(seq_starts, rows, "right") - 1
    first = np.asarray(seq_starts[np.clip(seq, 0, None)], dtype=np.int64)
    inside = (seq >= 0) & (rows < first + chunks_per_seq) & (first + chunks_per_seq <= n)
    if inside.any():
        members = first[inside][:, None] + np.arange(chunks_per_seq)  # (rows inside, l) chunk ids
        seq_docs = np.asarray(doc_ids[members.ravel()], dtype=np.int64).reshape(members.shape)
        ranges[inside, 0] = seq_docs.min(axis=1)
        ranges[inside, 1] = seq_docs.max(axis=1)
    return ranges


def exclusion_args(is_train: bool, a: int, b: int, docs: np.ndarray, train_docs: np.ndarray,
                   seq_starts: np.ndarray | None = None, chunks_per_seq: int = 1,
                   content: np.ndarray | None = None) -> dict[str, Any]:
    """The exclusion rule of rows [a, b) as select_neighbours / search_with_exclusion arguments:
    train rows avoid themselves and their training sequence's documents; every row, blank chunks."""
    if not is_train:
        return {"content": content}
    rows = np.arange(a, b, dtype=np.int64)  # knn's KnnStage._final_train for arbitrary rows
    ranges = sequence_doc_ranges(docs, np.zeros(0, np.int64) if seq_starts is None else seq_starts,
                                 chunks_per_seq, rows)
    return {"query_ids": rows, "db_docs": train_docs, "doc_ranges": ranges, "content": content}


def search_block(search: SearchFn, queries: np.ndarray, k: int, extra: int, ntotal: int,
                  a: int, b: int, is_train: bool, docs: np.ndarray,
                  train_docs: np.ndarray, seq_starts: np.ndarray | None = None,
                  chunks_per_seq: int = 1, content: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Train rows: no self, nothing from a document of the row's training sequence; no row gets a
    chunk of only EOS and padding."""
    return search_with_exclusion(search, queries, k, extra, ntotal, **exclusion_args(
        is_train, a, b, docs, train_docs, seq_starts, chunks_per_seq, content))
