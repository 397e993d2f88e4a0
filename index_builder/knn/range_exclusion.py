"""Searching a faiss index with a train chunk's excluded chunks skipped inside the search.

Why: on real text a chunk's nearest candidates are its own document's near-duplicates; the
sequence rule excludes them after the search, the row comes back short, and the knn stage
searched again with 4x, 16x, ... the candidates (several searches a query on the synthetic scale
DB, many times raw faiss's time; docs/BENCHMARKS.md). The excluded chunks of a train chunk are one contiguous range of chunk
ids (a sequence's documents are consecutive doc ids, and a document's chunks are consecutive),
shared by every chunk of that training sequence. So the rows that the plain batched search left
short are grouped by range and each group is searched once more with
``IDSelectorNot(IDSelectorRange)``: faiss skips those ids while scanning, and k + extra
candidates suffice (extra only for blank chunks). The plain search first, because a selector
costs: HNSW explores further to fill its list with allowed ids (a multiple of raw faiss's time
on the demo's real text if every row went through it, where few rows are short). The caller still
applies every exclusion afterwards and widens the search for a row still short.

Where most rows come back short (the synthetic scale DB: every chunk's nearest candidates are its
own document's), the plain search is wasted: :func:`prefer_range_first` then sends every row
through the range search at once. An IVF or flat index pays little for the selector (one range
check a scanned code); HNSW pays much more (it walks on past the excluded nodes: far more than
widening the plain search on the demo's real text), so
:func:`selector_pays` keeps HNSW on the widening re-search unless most rows are short (there,
widening took several searches a query: range-first costs less; docs/BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

RANGE_FIRST_SHORT = {"ivf": 0.3, "flat": 0.3, "hnsw": 0.75}  # short-row share past which range-first pays

# (queries (q, d), chunk ranges (q, 2) half-open [a, b), c) -> (ids (q, c), distances (q, c))
RangeSearch = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def doc_starts(doc_ids: np.ndarray) -> np.ndarray:
    """(num_docs + 1,) first chunk id of each doc id (doc ids consecutive along the stream)."""
    ids = np.asarray(doc_ids)
    if not len(ids):
        return np.zeros(1, dtype=np.int64)
    return np.searchsorted(ids, np.arange(int(ids[-1]) + 2), side="left").astype(np.int64)


def chunk_ranges(doc_ranges: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Doc-id ranges [lo, hi] (q, 2) -> chunk-id ranges [a, b) (q, 2) via :func:`doc_starts`."""
    lo = np.clip(doc_ranges[:, 0], 0, len(starts) - 1)
    hi = np.clip(doc_ranges[:, 1] + 1, 0, len(starts) - 1)
    return np.stack([starts[lo], starts[hi]], axis=1)


def search_params(index: Any, sel: Any) -> Any:
    """faiss SearchParameters carrying ``sel`` and the index's current nprobe / efSearch
    (parameters passed to a search replace the index's own, so they are copied over)."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        p = faiss.SearchParametersIVF(sel=sel, nprobe=int(ivf.nprobe))
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            qp = faiss.SearchParametersHNSW()
            qp.efSearch = int(quantizer.hnsw.efSearch)
            p.quantizer_params = qp
            p._keep = qp  # the SWIG object must outlive the search
        return p
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        p = faiss.SearchParametersHNSW(sel=sel)
        p.efSearch = int(inner.hnsw.efSearch)
        return p
    return faiss.SearchParameters(sel=sel)


def supports_selector(index: Any) -> bool:
    """Whether this index type accepts an ID selector in its search (IVF, HNSW, Flat do)."""
    import faiss

    try:
        x = np.zeros((1, index.d), dtype=np.float32)
        sel = faiss.IDSelectorNot(faiss.IDSelectorRange(0, 0))
        index.search(x, 1, params=search_params(index, sel))
        return True
    except (RuntimeError, TypeError, AttributeError):
        return False


def faiss_range_search(index: Any, threads: int = 1) -> RangeSearch:
    """A :data:`RangeSearch` over ``index``: one faiss call per distinct range, ids in a range skipped.

    On a bare IVF index the coarse quantizer runs once over all the rows and each range's rows
    scan their preassigned lists: the quantizer (HNSW over the centroids) costs more in the small
    per-range batches than in one batch, a large share of the search (docs/BENCHMARKS.md). With ``threads`` > 1 the ranges are spread over that many threads, each
    calling faiss single-threaded: many small OpenMP regions on a loaded machine wait at every
    barrier for a descheduled thread (docs/BENCHMARKS.md)."""
    import faiss

    inner_ivf = faiss.downcast_index(index)
    preassign = isinstance(inner_ivf, faiss.IndexIVF)
    pool = _pool(threads) if threads > 1 else None

    def search(q: np.ndarray, ranges: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(q, dtype=np.float32)
        ids = np.full((len(q), c), -1, dtype=np.int64)
        dist = np.full((len(q), c), np.inf, dtype=np.float32)
        uniq, inverse = np.unique(ranges, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
        coarse = inner_ivf.quantizer.search(q, int(inner_ivf.nprobe)) if preassign and len(q) else None

        def one(g: int) -> None:
            rows = order[bounds[g]:bounds[g + 1]]
            a, b = uniq[g]
            sel = faiss.IDSelectorNot(faiss.IDSelectorRange(int(a), int(b)))
            if coarse is None:
                d, i = index.search(q[rows], c, params=search_params(index, sel))
            else:
                d, i = _preassigned(inner_ivf, q[rows], c, coarse[1][rows], coarse[0][rows], sel)
            ids[rows], dist[rows] = i, d

        if pool is None or len(uniq) < 2:
            for g in range(len(uniq)):
                one(g)
        else:
            list(pool.map(one, range(len(uniq))))
        return ids, dist

    return search


def _pool(threads: int) -> Any:
    """Worker threads whose faiss calls run on one OpenMP thread each (an OpenMP setting made
    in a thread is that thread's own); faiss releases the GIL while it searches."""
    from concurrent.futures import ThreadPoolExecutor

    import faiss

    return ThreadPoolExecutor(max_workers=threads, initializer=lambda: faiss.omp_set_num_threads(1))


def _preassigned(ivf: Any, q: np.ndarray, c: int, lists: np.ndarray, coarse_d: np.ndarray,
                 sel: Any) -> tuple[np.ndarray, np.ndarray]:
    """IndexIVF.search_preassigned with a selector (faiss's Python wrapper refuses parameters);
    a fast-scan IVF takes its queries in calls of bounded lookup-table size (fast_scan.LUT_BYTES_PER_CALL)."""
    import faiss

    from index_builder.index.fast_scan import in_slices, queries_per_call

    q, lists, coarse_d = (np.ascontiguousarray(a) for a in (q, lists.astype(np.int64), coarse_d.astype(np.float32)))
    params = faiss.SearchParametersIVF(sel=sel, nprobe=int(ivf.nprobe))

    def call(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        d = np.empty((b - a, c), dtype=np.float32)
        i = np.empty((b - a, c), dtype=np.int64)
        ivf.search_preassigned_c(b - a, faiss.swig_ptr(q[a:b]), c, faiss.swig_ptr(lists[a:b]),
                                 faiss.swig_ptr(coarse_d[a:b]), faiss.swig_ptr(d), faiss.swig_ptr(i), False, params)
        return d, i

    return in_slices(len(q), queries_per_call(ivf), call)


def index_kind(index: Any) -> str:
    """"ivf", "hnsw" or "flat" (anything else: how a selector's cost scales)."""
    import faiss

    try:
        faiss.extract_index_ivf(index)
        return "ivf"
    except RuntimeError:
        return "hnsw" if isinstance(faiss.downcast_index(index), faiss.IndexHNSW) else "flat"


def selector_pays(index: Any) -> bool:
    """Whether re-searching short rows with the range skipped beats widening the plain search."""
    return index_kind(index) != "hnsw" and supports_selector(index)


def prefer_range_first(index: Any, short_fraction: float) -> bool:
    """Whether every row should go through the range search at once: when the share of rows the
    plain search leaves short (measured on a sample) is past :data:`RANGE_FIRST_SHORT` (the
    plain-first cost is 1 + share x the selector's overhead)."""
    return supports_selector(index) and short_fraction > RANGE_FIRST_SHORT[index_kind(index)]
