"""A bounded IVF search in torch over the database's own trained faiss IVF index.

Why: on a CUDA machine with the pinned faiss-cpu the knn stage had only two choices: faiss on the
CPU, or an exact pass (every query against every chunk: seconds at 1M chunks on an H100, hours at
100M). This search keeps the IVF's O(queries x nprobe x list size) cost and runs its arithmetic
on the GPU: the coarse centroids and each inverted list's ids are read from the trained faiss
index (so the lists are faiss's own: with the same nprobe, the same candidates as faiss), the
vectors from the float16 embedding shards; queries are assigned to their nprobe nearest
centroids, the (query, list) pairs grouped by list and padded into batched GEMMs (lists of
similar sizes together, so the padding stays small), each pair's top candidates re-scored in fp32
and merged into a running top-c per query. The same code runs (and is tested) on the CPU.

nprobe is read from the faiss index at every call: the knn stage's recall tuner
(index_builder.knn.tuning) sets it on the faiss index, as for the faiss search. The coarse
assignment is exact over the centroids (faiss's HNSW quantizer is approximate: never worse).

Memory: at most ``block_rows`` database rows on the device at a time (list-ordered; kept there
between calls when the whole database fits in one block, by default while it fits in half the
GPU's free memory: ~50M rows of 384-d fp16 on an H100; else gathered again each call, one pass over
the embeddings a call, so callers then pass large query batches), and one padded batch of about
``batch_elems`` distance and vector elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

DTYPES = ("fp32", "fp16", "bf16")
MAX_WASTE = 1.5  # a padded batch computes at most this many times the distances its pairs need
ITEM_QUERIES = 256  # queries of one list a work item: a crowded list's pairs are cut into even pieces


@dataclass(frozen=True)
class TorchIVFConfig:
    """Where and how the search computes; the sizes bound its device memory."""

    device: str = "cpu"
    dtype: str | None = None  # GEMM dtype: None = fp16 on CUDA (fp32 accumulate), fp32 on the CPU
    block_rows: int | None = None  # database rows on the device at once; None: :func:`default_block_rows`
    batch_elems: int = 1 << 26  # elements of one padded batch (distances + gathered vectors)
    query_block: int = 16384  # queries whose candidate buffer (query_block x nprobe x c) is held at once

    def compute_dtype(self) -> str:
        dtype = self.dtype or ("fp16" if self.device.startswith("cuda") else "fp32")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
        return dtype


CPU_BLOCK_ROWS = 1 << 22  # rows a block on the CPU (6 GB of fp32 at 384-d)
GPU_MEMORY_SHARE = 0.5  # of the free GPU memory, for the database block
UPLOAD_ROWS = 1 << 20  # rows gathered on the host and moved to the device at a time


def default_block_rows(device: str, dim: int, row_bytes: int) -> int:
    """Rows a block: on CUDA, as many as fit in :data:`GPU_MEMORY_SHARE` of the free memory at
    ``row_bytes`` a row (the GEMM copy, the stored copy where it differs, norm and id); on the CPU,
    :data:`CPU_BLOCK_ROWS`."""
    import torch

    if not device.startswith("cuda"):
        return CPU_BLOCK_ROWS
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return max(1, int(free * GPU_MEMORY_SHARE) // max(1, row_bytes))


@dataclass(frozen=True)
class IVFLists:
    """The IVF's structure as arrays: centroids (nlist, d') float32 in the quantizer's space,
    ``offsets`` (nlist + 1,) into ``ids`` (ntotal,) int64, the row ids list after list."""

    centroids: np.ndarray
    offsets: np.ndarray
    ids: np.ndarray

    @property
    def nlist(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


def ivf_of(index: Any) -> Any:
    """The IndexIVF inside ``index`` (through a pre-transform), or None (HNSW, Flat)."""
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def read_ivf_lists(index: Any) -> IVFLists:
    """The centroids and every list's ids, read through faiss's API (memory-mapped lists too)."""
    import faiss

    ivf = ivf_of(index)
    if ivf is None:
        raise ValueError("not an IVF index: no lists to search")
    nlist = int(ivf.nlist)
    centroids = np.asarray(ivf.quantizer.reconstruct_n(0, nlist), dtype=np.float32).reshape(nlist, -1)
    invlists = ivf.invlists
    sizes = np.array([invlists.list_size(l) for l in range(nlist)], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    ids = np.empty(int(offsets[-1]), dtype=np.int64)
    for l in np.flatnonzero(sizes):
        ptr = invlists.get_ids(int(l))
        ids[offsets[l]:offsets[l + 1]] = faiss.rev_swig_ptr(ptr, int(sizes[l]))
        invlists.release_ids(int(l), ptr)
    return IVFLists(centroids, offsets, ids)


def pre_transform(index: Any, x: np.ndarray) -> np.ndarray:
    """``x`` through the index's vector transforms (OPQ), where it has any: the space of its
    centroids. The candidates' distances are still computed on the raw vectors."""
    import faiss

    pre = faiss.downcast_index(index)
    if isinstance(pre, faiss.IndexPreTransform):
        for i in range(pre.chain.size()):
            x = faiss.downcast_VectorTransform(pre.chain.at(i)).apply(x)
    return x


def list_blocks(offsets: np.ndarray, block_rows: int) -> list[tuple[int, int]]:
    """Consecutive list ranges [l0, l1) of at most ``block_rows`` rows each (a longer list alone)."""
    blocks, l0, nlist = [], 0, len(offsets) - 1
    while l0 < nlist:
        l1 = max(l0 + 1, int(np.searchsorted(offsets, offsets[l0] + block_rows, side="right")) - 1)
        l1 = min(l1, nlist)
        blocks.append((l0, l1))
        l0 = l1
    return blocks


@dataclass(frozen=True)
class WorkItem:
    """One list's pairs [p0, p1) (positions in the list-sorted pair order) against its rows."""

    list_row0: int  # the list's first row in its block
    rows: int
    p0: int
    p1: int


def plan_groups(sizes: np.ndarray, counts: np.ndarray, row_starts: np.ndarray, pair_starts: np.ndarray,
                dim: int, batch_elems: int, rescore: int = 0, max_waste: float = MAX_WASTE) -> list[list[WorkItem]]:
    """Work items (a list's queries, cut so one item fits ``batch_elems`` and holds at most
    :data:`ITEM_QUERIES`) grouped into padded batches: items sorted by list size then query
    count, a batch growing while its padded distance block (G x M x N) stays within
    ``max_waste`` x the distances it needs and its padded elements within ``batch_elems``
    (G x (M x N + (M + N) x dim + M x min(rescore, N) x dim): distances, gathered queries and
    rows, and the ``rescore`` candidates a pair re-scored in fp32)."""
    def cost(m: int, n: int) -> int:
        return m * n + (m + n) * dim + m * min(rescore, n) * dim

    items: list[WorkItem] = []
    for l in np.flatnonzero((counts > 0) & (sizes > 0)):
        n, m = int(sizes[l]), int(counts[l])
        per = max(1, min(ITEM_QUERIES, (batch_elems - n * dim) // max(1, cost(1, n) - n * dim)))
        for a in range(0, m, per):
            items.append(WorkItem(int(row_starts[l]), n, int(pair_starts[l]) + a, int(pair_starts[l]) + min(m, a + per)))
    items.sort(key=lambda it: (-it.rows, -(it.p1 - it.p0)))
    groups: list[list[WorkItem]] = []
    m_max = n_max = need = 0
    for it in items:
        m, n = it.p1 - it.p0, it.rows
        grown_m, grown_n, g = max(m_max, m), max(n_max, n), len(groups[-1]) + 1 if groups else 1
        if groups and g * cost(grown_m, grown_n) <= batch_elems and g * grown_m * grown_n <= max_waste * (need + m * n):
            groups[-1].append(it)
            m_max, n_max, need = grown_m, grown_n, need + m * n
        else:
            groups.append([it])
            m_max, n_max, need = m, n, m * n
    return groups


class TorchIVFSearch:
    """k-NN of queries in the IVF's lists, computed with torch on ``cfg.device`` (module doc)."""

    def __init__(self, index: Any, shards: Sequence[np.ndarray], cfg: TorchIVFConfig = TorchIVFConfig(),
                 valid: Any = None) -> None:
        """``valid``: which rows any query may return, indexed by row ids (a (n,) bool array, or
        chunk_store.store.ContentLookup, read for each block's rows as the block is loaded: no
        DB-wide mask is built); applied when a search passes ``valid=True``."""
        import torch

        self.index, self.ivf, self.cfg, self.valid = index, ivf_of(index), cfg, valid
        self.lists = read_ivf_lists(index)
        self.shards = list(shards)
        ntotal = sum(int(s.shape[0]) for s in self.shards)
        if len(self.lists.ids) != ntotal:
            raise ValueError(f"the IVF lists hold {len(self.lists.ids)} ids but the embeddings have {ntotal} rows")
        self.device = torch.device(cfg.device)
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.compute_dtype()]
        self.centroids = torch.from_numpy(self.lists.centroids).to(self.device)
        self.c_norm = (self.centroids * self.centroids).sum(1)
        dim = int(self.shards[0].shape[1]) if self.shards else 0
        stored = self.shards[0].dtype.itemsize if self.shards else 4
        gemm = self.dtype.itemsize
        row_bytes = dim * (gemm + (0 if gemm == stored or gemm == 4 else stored)) + 12  # + fp32 norm, int64 id
        self.block_rows = cfg.block_rows or default_block_rows(cfg.device, dim, row_bytes)
        self.blocks = list_blocks(self.lists.offsets, self.block_rows)
        self._resident: tuple[torch.Tensor, ...] | None = None

    @property
    def nprobe(self) -> int:
        """The faiss index's nprobe now (the tuner sets it there), at most nlist."""
        return max(1, min(int(self.ivf.nprobe), self.lists.nlist))

    def _block(self, l0: int, l1: int) -> tuple[torch.Tensor, ...]:
        """Rows of lists [l0, l1) on the device: (vectors in the GEMM dtype, fp32 squared norms,
        global ids, vectors as stored: what the fp32 re-score reads, the rows' validity or None); cached when one block holds
        the whole database."""
        import torch

        from index_builder.knn.rerank import take_rows

        if self._resident is not None:
            return self._resident
        ids = self.lists.ids[self.lists.offsets[l0]:self.lists.offsets[l1]]
        dim, dev = int(self.shards[0].shape[1]), self.device
        stored_dtype = torch.from_numpy(self.shards[0][:0]).dtype
        keep_stored = self.dtype not in (torch.float32, stored_dtype)  # bf16 GEMM: re-score from fp16
        vecs = torch.empty((len(ids), dim), dtype=self.dtype, device=dev)
        stored = torch.empty((len(ids), dim), dtype=stored_dtype, device=dev) if keep_stored else vecs
        norms = torch.empty(len(ids), dtype=torch.float32, device=dev)
        for a in range(0, len(ids), UPLOAD_ROWS):  # host and device copies bounded by a piece
            b = min(len(ids), a + UPLOAD_ROWS)
            piece = torch.from_numpy(np.ascontiguousarray(take_rows(self.shards, ids[a:b]))).to(dev)
            p32 = piece.float()
            vecs[a:b], norms[a:b] = p32.to(self.dtype), (p32 * p32).sum(1)
            if keep_stored:
                stored[a:b] = piece
        ok = None if self.valid is None else torch.as_tensor(np.asarray(self.valid[ids], dtype=bool)).to(dev)
        block = (vecs, norms, torch.from_numpy(ids).to(dev), stored, ok)
        if len(self.blocks) == 1:
            self._resident = block
        return block

    def search(self, queries: np.ndarray, c: int, exclude: np.ndarray | None = None,
               valid: np.ndarray | bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 (q, c), squared L2 float32 (q, c)) of each query's c nearest rows in its
        nprobe nearest lists; -1 / inf where fewer. Ties keep the lower row id.

        ``exclude`` (q, 2): per query a half-open range [a, b) of row ids it must not return,
        ``valid`` (n,) bool: the rows any query may return (as in exact_search), both applied
        before the top-c, so excluded rows do not take candidates' places."""
        import torch

        q = np.ascontiguousarray(queries, dtype=np.float32)
        nq = len(q)
        if nq == 0 or c <= 0:
            return np.full((nq, max(c, 0)), -1, np.int64), np.full((nq, max(c, 0)), np.inf, np.float32)
        nprobe = self.nprobe
        dev = self.device
        with torch.inference_mode():
            probe = self._coarse(q, nprobe)
            qt = torch.from_numpy(q).to(dev)
            q_norm = (qt * qt).sum(1)
            ex = None if exclude is None else torch.as_tensor(np.asarray(exclude, dtype=np.int64)).to(dev)
            if valid is True and self.valid is None:
                raise ValueError("valid=True needs the validity given at construction")
            # valid=True: each block's own rows' validity (read with the block); an array: all rows'
            ok = None if valid is None or valid is True else torch.as_tensor(np.asarray(valid, dtype=bool)).to(dev)
            per_block = valid is True
            best_d = torch.full((nq, c), float("inf"), device=dev)
            best_i = torch.full((nq, c), -1, dtype=torch.long, device=dev)
            qb = max(1, min(self.cfg.query_block, self.cfg.batch_elems // (nprobe * c)))
            for l0, l1 in self.blocks:
                block = self._block(l0, l1)
                for b0 in range(0, nq, qb):
                    b1 = min(nq, b0 + qb)
                    d, i = self._search_lists(l0, l1, block, qt[b0:b1], q_norm[b0:b1], probe[b0:b1], c,
                                              None if ex is None else ex[b0:b1], ok, per_block)
                    best_d[b0:b1], best_i[b0:b1] = _merge(best_d[b0:b1], best_i[b0:b1], d, i, c)
            best_i[torch.isinf(best_d)] = -1
            return best_i.cpu().numpy(), best_d.cpu().numpy()

    def _coarse(self, q: np.ndarray, nprobe: int) -> torch.Tensor:
        """(q, nprobe) the nearest centroids of each query (exact, fp32), in the quantizer's space."""
        import torch

        qa = torch.from_numpy(np.ascontiguousarray(pre_transform(self.index, q), dtype=np.float32)).to(self.device)
        d = self.c_norm[None, :] - 2.0 * (qa @ self.centroids.T)
        return torch.topk(d, nprobe, dim=1, largest=False, sorted=True).indices

    def _search_lists(self, l0: int, l1: int, block: tuple[torch.Tensor, ...],
                      qt: torch.Tensor, q_norm: torch.Tensor, probe: torch.Tensor, c: int,
                      ex: torch.Tensor | None, ok: torch.Tensor | None,
                      per_block: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates (q, nprobe x c) of queries ``qt`` among the lists [l0, l1) they probe; rows
        masked by ``ok`` (indexed by global id) or, with ``per_block``, by the block's own mask."""
        import torch

        vecs, v_norm, gids, stored, block_ok = block
        nq, nprobe = probe.shape
        dev = qt.device
        cand_d = torch.full((nq, nprobe, c), float("inf"), device=dev)
        cand_i = torch.full((nq, nprobe, c), -1, dtype=torch.long, device=dev)
        inside = (probe >= l0) & (probe < l1)
        pair_q, pair_slot = torch.nonzero(inside, as_tuple=True)
        if not len(pair_q):
            return cand_d.flatten(1), cand_i.flatten(1)
        pair_list = probe[pair_q, pair_slot] - l0
        order = torch.argsort(pair_list, stable=True)
        pair_q, pair_slot, pair_list = pair_q[order], pair_slot[order], pair_list[order]
        counts = torch.bincount(pair_list, minlength=l1 - l0).cpu().numpy()
        sizes = self.lists.sizes[l0:l1]
        row_starts = self.lists.offsets[l0:l1] - self.lists.offsets[l0]
        pair_starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        qc = qt.to(self.dtype)
        rescore = 0 if self.dtype == torch.float32 else c
        for group in plan_groups(sizes, counts, row_starts, pair_starts, qt.shape[1], self.cfg.batch_elems, rescore):
            m_max = max(it.p1 - it.p0 for it in group)
            n_max = max(it.rows for it in group)
            meta = torch.tensor([[it.list_row0, it.rows, it.p0, it.p1 - it.p0] for it in group],
                                dtype=torch.long).to(dev)
            cols, slots = torch.arange(n_max, device=dev), torch.arange(m_max, device=dev)
            row_ok = cols[None, :] < meta[:, 1:2]  # (G, N) a real row of the list, not padding
            pair_ok = slots[None, :] < meta[:, 3:4]  # (G, M) a real pair, not padding
            rows = torch.where(row_ok, meta[:, :1] + cols[None, :], 0)
            pairs = torch.where(pair_ok, meta[:, 2:3] + slots[None, :], 0)
            pq = pair_q[pairs]  # (G, M) query of each pair
            v = vecs[rows]  # (G, N, dim)
            dots = torch.bmm(qc[pq], v.transpose(1, 2)).float()  # (G, M, N)
            dist = q_norm[pq][:, :, None] + v_norm[rows][:, None, :] - 2.0 * dots
            g_ids = gids[rows]  # (G, N) global row ids
            bad = ~row_ok[:, None, :] | ~pair_ok[:, :, None]
            if per_block:
                bad = bad | ~block_ok[rows][:, None, :]
            elif ok is not None:
                bad = bad | ~ok[g_ids][:, None, :]
            if ex is not None:
                rng = ex[pq]  # (G, M, 2)
                bad = bad | ((g_ids[:, None, :] >= rng[..., :1]) & (g_ids[:, None, :] < rng[..., 1:]))
            dist.masked_fill_(bad, float("inf"))
            kk = min(c, n_max)
            top_d, top_c = torch.topk(dist, kk, dim=2, largest=False, sorted=False)  # (G, M, kk)
            top_rows = torch.gather(rows[:, None, :].expand(-1, m_max, -1), 2, top_c)
            if self.dtype != torch.float32:  # re-score the kept candidates in fp32
                q32 = qt[pq][:, :, None, :]
                exact = ((stored[top_rows].float() - q32) ** 2).sum(-1)
                top_d = torch.where(torch.isinf(top_d), top_d, exact)
            top_i = torch.where(torch.isinf(top_d), -1, gids[top_rows])
            real = pair_ok.flatten()
            flat_q, flat_s = pq.flatten()[real], pair_slot[pairs].flatten()[real]
            cand_d[flat_q, flat_s, :kk] = top_d.flatten(0, 1)[real]
            cand_i[flat_q, flat_s, :kk] = top_i.flatten(0, 1)[real]
        return cand_d.flatten(1), cand_i.flatten(1)


def _merge(best_d: torch.Tensor, best_i: torch.Tensor, d: torch.Tensor, i: torch.Tensor,
           c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The c nearest of both candidate sets per row, ties by the lower id (-1 / inf last)."""
    import torch

    cat_d, cat_i = torch.cat([best_d, d], dim=1), torch.cat([best_i, i], dim=1)
    key_i = torch.where(cat_i < 0, torch.iinfo(torch.long).max, cat_i)
    by_id = torch.argsort(key_i, dim=1, stable=True)
    cat_d, cat_i = torch.gather(cat_d, 1, by_id), torch.gather(cat_i, 1, by_id)
    order = torch.argsort(cat_d, dim=1, stable=True)[:, :c]
    return torch.gather(cat_d, 1, order), torch.gather(cat_i, 1, order)


__all__ = ["IVFLists", "TorchIVFConfig", "TorchIVFSearch", "ivf_of", "list_blocks", "plan_groups",
           "read_ivf_lists"]
