"""4-bit IVF-PQ codes searched with faiss's SIMD fast scan: the stored index stays a plain IVF-PQ.

Why: on real text (MiniLM embeddings of kernel C, 1.46M chunks) knn's recall target needs nprobe
64 of 2,048 lists, ~45k codes scanned a query; scanning SQ8 codes (384 bytes) made knn run 249
queries/s on one core, where 4-bit PQ codes (dim / 16 bytes after an OPQ rotation) scanned by
``IndexIVFPQFastScan`` and re-ranked by true distance reach the same recall 5x faster
(docs/BENCHMARKS.md, "Index keys on real text").

Why a view built at load time rather than a fast-scan key on disk: faiss 1.13's fast-scan lists
are packed 32 vectors a block, and its ``add_core`` / ``add_sa_codes`` with preassigned lists
corrupt the heap on them (the index build assigns lists itself: index_builder.index.ivf_build),
the parts layout's on-disk lists (index_builder.index.parts) copy ``n x code_size`` bytes a list,
and autofaiss cannot tune a fast-scan key. A plain ``PQ{m}x4`` IVF has none of these problems;
``IndexIVFPQFastScan(ivfpq)`` packs its codes into a fast-scan copy in memory (m / 2 bytes a
vector plus its id: 32 bytes at 384 dims) in about a second a million vectors.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import numpy as np

from index_builder.index.faiss_params import apply_search_params

log = logging.getLogger(__name__)

# The copy lives in RAM, where the stored lists are memory-mapped: past this many bytes (the peak
# of packing: the unpacked and the packed lists, about 2 x (m / 2 + 8) bytes a vector) the stored
# codes are searched as they are, slower but in bounded memory. 16 GiB is ~250M vectors at 384
# dims; RETRO_FAST_SCAN_MAX_GB overrides it (0: never build the copy).
FAST_SCAN_MAX_BYTES = 16 << 30

# faiss 1.13's fast-scan search builds the lookup tables of every query of a call at once when it
# runs on one OpenMP thread (knn --threads 1, and each worker of a threaded search): n x nprobe x
# M2 x 16 bytes of uint8 (4x that in float while they are computed), then packs them with 32-bit
# int offsets (pq4_fast_scan.cpp, pack_LUT_1_q_map): past 2 GiB an offset wraps and the search
# reads out of bounds (a 150k-chunk knn at nprobe 1,024 died of SIGSEGV: 2,731 queries a call
# are enough at 48 sub-quantizers). Its multi-threaded path slices the queries by table size; a
# search of a fast-scan copy here goes through at most this many table bytes a faiss call.
LUT_BYTES_PER_CALL = 64 << 20


def fast_scan_budget() -> int:
    """The copy's byte budget: RETRO_FAST_SCAN_MAX_GB (GiB) where set, else FAST_SCAN_MAX_BYTES."""
    raw = os.environ.get("RETRO_FAST_SCAN_MAX_GB")
    if raw is None:
        return FAST_SCAN_MAX_BYTES
    try:
        return int(float(raw) * (1 << 30))
    except ValueError:
        from chunk_store.framework.errors import UserError

        raise UserError(f"RETRO_FAST_SCAN_MAX_GB must be a number of GiB, not {raw!r}") from None


def fast_scan_bytes(ivfpq: Any) -> int:
    """The peak bytes of building the copy of the 4-bit IVF-PQ ``ivfpq`` (see FAST_SCAN_MAX_BYTES)."""
    return 2 * int(ivfpq.ntotal) * (int(ivfpq.code_size) + 8)


def four_bit_ivfpq(index: Any) -> Any | None:
    """The IndexIVFPQ inside ``index`` (bare or under an OPQ pre-transform) when its codes are
    4-bit, which fast scan can search; else None (SQ8, 8-bit PQ, flat, HNSW, fast scan already)."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):  # not an IVF; not a faiss index (a test's stand-in)
        return None
    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFPQ) and int(ivf.pq.nbits) == 4:
        return ivf
    return None


def index_search(index: Any) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    """``index.search`` as knn's searches take it: (queries, c) -> (int64 ids, float32 distances)."""

    def search(q: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        d, i = index.search(np.ascontiguousarray(q, dtype=np.float32), c)
        return i.astype(np.int64), d.astype(np.float32)
    return search


def is_four_bit_pq(index: Any) -> bool:
    """Whether ``index``'s IVF codes are 4-bit PQ (plain or fast scan): the re-rank needs more
    candidates than for 8-bit codes (index_builder.knn.rerank.default_factor)."""
    import faiss

    if four_bit_ivfpq(index) is not None:
        return True
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except (RuntimeError, TypeError):
        return False
    return isinstance(ivf, faiss.IndexIVFPQFastScan) and int(ivf.pq.nbits) == 4


def fast_scan_view(index: Any, param: str = "", max_bytes: int | None = None) -> Any | None:
    """A fast-scan copy of a 4-bit IVF-PQ ``index`` (its OPQ transform kept in front, copied),
    independent of ``index``; None where ``index`` is anything else. The lists, ids and codes are
    the same, so its candidates are ``index``'s up to fast scan's 8-bit lookup tables (re-ranked by
    true distance anyway). ``param``: search parameters applied to the copy (default: those set on
    ``index`` now; later changes to ``index`` do not reach the copy: apply them to both).

    Memory: the lists are copied once (:func:`in_memory_copy`) and packed once, then the unpacked
    copy is emptied: at most twice the packed lists (m / 2 bytes and an 8-byte id a vector).
    Past ``max_bytes`` (default :func:`fast_scan_budget`) no copy is made (None, one log line):
    the caller searches ``index``'s memory-mapped codes."""
    import faiss

    ivfpq = four_bit_ivfpq(index)
    if ivfpq is None:
        return None
    budget = fast_scan_budget() if max_bytes is None else max_bytes
    need = fast_scan_bytes(ivfpq)
    if need > budget:
        log.warning("fast scan: the in-memory copy of %d vectors would take %.1f GiB, over the %.1f GiB "
                    "budget (RETRO_FAST_SCAN_MAX_GB): searching the stored 4-bit codes as they are "
                    "(slower, in bounded memory)", ivfpq.ntotal, need / (1 << 30), budget / (1 << 30))
        return None
    plain = in_memory_copy(ivfpq)  # faiss's converter crashes on mapped / stacked lists (parts)
    fast = faiss.IndexIVFPQFastScan(plain)  # copies the codes, packed; shares plain's quantizer
    plain.invlists.reset()  # the unpacked codes are not needed any more
    fast.referenced_objects = [plain]  # the quantizer's owner lives as long as the copy
    pre = faiss.downcast_index(index)
    view = fast
    if isinstance(pre, faiss.IndexPreTransform):
        for i in reversed(range(pre.chain.size())):
            vt = _copy_transform(pre.chain.at(i))
            inner = view
            view = faiss.IndexPreTransform(vt, inner)
            view.referenced_objects = [vt, inner]
    apply_search_params(view, param or _current_params(index))
    _bound_searches(view)
    return view


def queries_per_call(ivf: Any, nprobe: int | None = None) -> int | None:
    """How many queries one faiss search of the fast-scan IVF ``ivf`` may take (LUT_BYTES_PER_CALL
    of lookup tables at ``nprobe``, default ivf's own); None where ``ivf`` is no fast-scan IVF."""
    import faiss

    ivf = faiss.downcast_index(ivf)
    if not isinstance(ivf, faiss.IndexIVFFastScan):
        return None
    probes = max(1, min(int(ivf.nprobe if nprobe is None else nprobe), int(ivf.nlist)))
    return max(1, LUT_BYTES_PER_CALL // (probes * int(ivf.M2) * int(ivf.ksub)))


def in_slices(n: int, per: int | None, search: Callable[[int, int], tuple[np.ndarray, np.ndarray]]
              ) -> tuple[np.ndarray, np.ndarray]:
    """``search(start, stop)`` -> (distances, ids) over rows [0, n), ``per`` rows a call at most
    (None: one call), the results stacked."""
    if per is None or n <= per:
        return search(0, n)
    parts = [search(a, min(a + per, n)) for a in range(0, n, per)]
    return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])


_BOUNDED: dict[type, type] = {}


def _bound_searches(view: Any) -> None:
    """Make ``view.search`` (what every caller here uses) split its queries into calls that stay
    within LUT_BYTES_PER_CALL at the nprobe of that search (its params', else the index's now).
    The view becomes an instance of a subclass of its faiss class whose ``search`` does that: a
    method on the class, so nothing holds the view but its callers (an instance attribute would
    close over it in a reference cycle, keeping the copy's memory until a garbage collection)."""
    cls = type(view)
    if cls not in _BOUNDED:
        import faiss

        def search(self: Any, x: np.ndarray, k: int, *, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
            x = np.ascontiguousarray(x, dtype=np.float32)
            per = queries_per_call(faiss.extract_index_ivf(self), getattr(params, "nprobe", None))
            return in_slices(len(x), per, lambda a, b: cls.search(self, x[a:b], k, params=params))

        _BOUNDED[cls] = type(f"LutBounded{cls.__name__}", (cls,), {"search": search, "__module__": __name__})
    view.__class__ = _BOUNDED[cls]


def fast_scan_or_index(index: Any) -> Any:
    """What a search of ``index`` goes through: its fast-scan copy where :func:`fast_scan_view`
    makes one (4-bit PQ codes within the budget), else ``index`` itself."""
    view = fast_scan_view(index)
    return index if view is None else view


def _copy_transform(vt: Any) -> Any:
    """A copy of a faiss VectorTransform (the OPQ rotation), through faiss's own serialisation."""
    import faiss

    writer = faiss.VectorIOWriter()
    faiss.write_VectorTransform(vt, writer)
    reader = faiss.VectorIOReader()
    faiss.copy_array_to_vector(faiss.vector_to_array(writer.data), reader.data)
    return faiss.read_VectorTransform(reader)


def in_memory_copy(ivf: Any) -> Any:
    """A copy of the IVF ``ivf`` whose lists are plain in-memory arrays, whatever ``ivf``'s are
    (a parts index: on-disk lists, memory-mapped, stacked); ``ivf`` is left as it was. Its lists
    are swapped out for empty ones while it is cloned (faiss's clone cannot copy mapped lists),
    then every list's ids and codes are copied, one list at a time."""
    import faiss

    own, lists = ivf.own_invlists, ivf.invlists
    ivf.own_invlists = False  # replace_invlists deletes the lists it replaces when it owns them
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)  # held here: ivf does not own it
    ivf.replace_invlists(empty, False)
    try:
        copy = faiss.clone_index(ivf)  # faiss downcasts it (a downcast proxy would not own it)
    finally:
        ivf.replace_invlists(lists, own)
    target = copy.invlists
    for l in range(ivf.nlist):
        n = lists.list_size(l)
        if not n:
            continue
        ids, codes = lists.get_ids(l), lists.get_codes(l)
        try:
            target.add_entries(l, n, ids, codes)
        finally:
            lists.release_ids(l, ids)
            lists.release_codes(l, codes)
    copy.ntotal = ivf.ntotal
    return copy


def _current_params(index: Any) -> str:
    """``index``'s nprobe (and its HNSW quantizer's efSearch) as a ParameterSpace string."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    out = f"nprobe={int(ivf.nprobe)}"
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        out += f",quantizer_efSearch={int(quantizer.hnsw.efSearch)}"
    return out
