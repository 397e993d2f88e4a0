"""The search of the added train chunks only (knn --refresh, incremental): exact, or an IVF over them.

Why its own module: an old row needs the k nearest allowed chunks among those added since it was
searched, and nothing else. Two ways, the one that scans fewer vectors a query is taken:

- exact: torch top-k over the added chunks' stored embeddings (index_builder.index.exact_search):
  M vectors a query for M added chunks; the answer is exact;
- IVF: where the grown index is an IVF (what the key chooser builds past its HNSW limit), an empty
  copy of it (the same trained quantizer, codec and transforms: :func:`ivf_over_added`) takes the
  added vectors alone; searched with the grown index's nprobe (the recall-tuned one), a query
  scans about nprobe / nlist of the M added codes, and gets exactly the candidates that the grown
  index itself returns among the added ids (same lists, same codes; tested), re-ranked by true
  distance where the stage re-ranks. 4-bit PQ codes are searched through a fast-scan copy, as the
  stage searches the grown index (index_builder.index.fast_scan).

The IVF is taken where it scans fewer and its nprobe lists hold at least twice the candidates a
query asks for (else the short rows' widened searches cost more than the exact scan).
So a query costs min(M, nprobe x M / nlist) plus the quantizer, where a full refresh costs
nprobe x N / nlist plus the quantizer for every row: linear in the added data, not the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from index_builder.knn.exclusion import SearchFn
from index_builder.knn.incremental import sort_candidates

ADD_BLOCK = 65536  # added vectors read and added to the IVF at a time


def slice_rows(shards: Sequence[np.ndarray], start: int, stop: int) -> list[np.ndarray]:
    """Rows [start, stop) of the concatenated shards as a list of views (nothing read)."""
    out, offset = [], 0
    for arr in shards:
        lo, hi = max(start - offset, 0), min(stop - offset, arr.shape[0])
        if lo < hi:
            out.append(arr[lo:hi])
        offset += arr.shape[0]
    return out


def ivf_over_added(index: Any, shards: Sequence[np.ndarray], start: int, stop: int) -> Any | None:
    """A copy of ``index``'s trained IVF holding only rows [start, stop) of ``shards`` (ids from
    0), searched with its nprobe / quantizer efSearch; None when ``index`` is no IVF.

    The copy is made with the inverted lists swapped out for empty ones, so the N codes of the
    grown index are not copied (faiss's clone would copy them, then reset)."""
    import faiss

    from index_builder.index.exact_search import read_block

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
    own, lists = ivf.own_invlists, ivf.invlists
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.own_invlists = False  # replace_invlists deletes the lists it replaces when it owns them
    ivf.replace_invlists(empty, False)
    try:
        sub = faiss.clone_index(index)
    finally:
        ivf.replace_invlists(lists, own)
    sub.reset()
    for part in slice_rows(shards, start, stop):
        for a in range(0, part.shape[0], ADD_BLOCK):
            sub.add(np.ascontiguousarray(read_block(part, a, min(a + ADD_BLOCK, part.shape[0]))))
    # 4-bit PQ codes: searched through faiss's fast scan, as knn searches the grown index
    # (index_builder.index.fast_scan; the same lists and codes, re-ranked by true distance anyway)
    from index_builder.index.fast_scan import fast_scan_view

    return fast_scan_view(sub) or sub


@dataclass
class AddedChunks:
    """Searches of train chunks [start, ntotal) only, with global ids; counts the vectors scanned."""

    shards: Sequence[np.ndarray]  # the train embeddings, every shard
    ntotal: int
    device: str = "cpu"
    index: Any = None  # the grown faiss index (None: --exact, exact search only)
    rerank: int = 1  # the stage's re-rank factor for index candidates
    want: int = 12  # candidates a query asks for first (the stage's k + extra)
    vectors_scanned: int = 0  # (query, added chunk) distances computed; IVF: nprobe / nlist of them
    how: str = ""  # "exact" or "ivf nprobe=P/nlist=L": what the last search() chose
    _ivf: dict[int, Any] = field(default_factory=dict)

    def search(self, start: int) -> SearchFn:
        """The search of chunks [start, ntotal), the cheaper of exact and IVF (module doc)."""
        ivf = self._scan_share()
        # the IVF only where its lists hold enough added chunks: with a few added chunks spread
        # over many lists a query finds fewer than it asks for, and the exclusion search widens
        # it again and again (5x the CPU of the exact scan at 1,230 added over 1,024 lists)
        if ivf is not None and ivf[0] < ivf[1] and (self.ntotal - start) * ivf[0] >= 2 * self.want * ivf[1]:
            return self._ivf_search(start, *ivf)
        return self._exact_search(start)

    def _scan_share(self) -> tuple[int, int] | None:
        """(nprobe, nlist) of the grown index, None where it is no IVF."""
        if self.index is None:
            return None
        import faiss

        try:
            ivf = faiss.extract_index_ivf(self.index)
        except RuntimeError:
            return None
        return int(ivf.nprobe), int(ivf.nlist)

    def _exact_search(self, start: int) -> SearchFn:
        from index_builder.index.exact_search import ExactSearchConfig, exact_search

        part, m = slice_rows(self.shards, start, self.ntotal), self.ntotal - start
        self.how = "exact"

        def run(q: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
            self.vectors_scanned += len(q) * m
            ids, d = exact_search(q, part, c, ExactSearchConfig(device=self.device))
            # torch.topk orders equal distances arbitrarily: the lower id first, before the
            # caller keeps k (a duplicate chunk must not push out its lower-id twin)
            return sort_candidates(np.where(ids >= 0, ids + start, -1), d)
        return run

    def _ivf_search(self, start: int, nprobe: int, nlist: int) -> SearchFn:
        from index_builder.knn.rerank import reranked, take_rows

        if start not in self._ivf:
            self._ivf[start] = ivf_over_added(self.index, self.shards, start, self.ntotal)
        sub, m = self._ivf[start], self.ntotal - start
        self.how = f"ivf nprobe={nprobe}/nlist={nlist}"

        def run(q: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
            self.vectors_scanned += len(q) * -(-m * nprobe // nlist)
            d, ids = sub.search(np.ascontiguousarray(q, dtype=np.float32), min(c, m))
            return sort_candidates(np.where(ids >= 0, ids + start, -1), d)

        if self.rerank > 1:
            return reranked(run, self.rerank, lambda ids: take_rows(self.shards, ids), m)
        return run
