"""Exact k-nearest-neighbour search with torch: tiles of the database against blocks of queries.

Why its own module: the knn stage (``--exact``, the default on CUDA without faiss-gpu) and the
index stage (recall measured against exact search) both need it, and neither should import the
other. Memory is bounded by one (query_block x tile_rows) distance block; the same code runs on
CPU and CUDA.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch


def read_block(arr: np.ndarray, a: int, b: int) -> np.ndarray:
    """Rows [a, b) as float32. From a memmap, read through the file rather than the mapping:
    mapped pages count in the process's RSS until unmapped, and a pass over every shard (exact
    search, the IVF build) would hold the whole embedding matrix by its end."""
    # only a whole mapped file (np.load's memmap: its base is the mmap); a slice keeps its
    # parent's filename and offset, so it is indexed instead
    if isinstance(arr, np.memmap) and isinstance(arr.base, mmap.mmap) and arr.flags.c_contiguous:
        row_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:]))
        block = np.fromfile(arr.filename, dtype=arr.dtype, count=(b - a) * arr.shape[1],
                            offset=int(arr.offset) + a * row_bytes)
        return block.reshape(b - a, arr.shape[1]).astype(np.float32)
    return np.asarray(arr[a:b], dtype=np.float32)


@dataclass(frozen=True)
class ExactSearchConfig:
    """Tile sizes bound memory: a (query_block x tile_rows) fp32 distance block at a time."""

    device: str = "cpu"
    tile_rows: int = 65536
    query_block: int = 4096


def exact_search(
    queries: np.ndarray,
    database: Sequence[np.ndarray] | np.ndarray,
    k: int,
    cfg: ExactSearchConfig = ExactSearchConfig(),
    exclude: np.ndarray | None = None,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared-L2 k-NN of ``queries`` (q, d) in ``database`` (a list of (n_i, d) shards).

    Loops over tiles of the database (each read once, e.g. from float16 memmaps, and moved to
    ``cfg.device``) and, inside, over blocks of queries, keeping a running top-k per query.
    Returns (ids int64 (q, k), distances float32 (q, k)); -1 / inf where the database is smaller
    than k. Same code on CPU and CUDA; fp32 arithmetic (TF32 off) for exactness.

    ``exclude`` (q, 2): per query a half-open range [a, b) of database rows it must not return
    (knn's training-sequence rule), ``valid`` (n,) bool: rows any query may return (content
    chunks). Both are applied inside the pass, so the exact final neighbours take one pass over
    the embeddings, not one per widening of the candidates.
    """
    import torch

    shards = [database] if isinstance(database, np.ndarray) else list(database)
    device = torch.device(cfg.device)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    nq = q.shape[0]
    best_d = torch.full((nq, k), float("inf"), device=device)
    best_i = torch.full((nq, k), -1, dtype=torch.long, device=device)
    if nq == 0 or k == 0:
        return best_i.cpu().numpy(), best_d.cpu().numpy()
    qt = torch.from_numpy(q).to(device)
    q_norm = (qt * qt).sum(dim=1)
    ex = None if exclude is None else torch.as_tensor(np.asarray(exclude, dtype=np.int64)).to(device)
    offset = 0
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            for shard in shards:
                for t0 in range(0, shard.shape[0], cfg.tile_rows):
                    # a private fp32 copy read through the file (memmaps are read-only; RSS bounded)
                    tile_np = read_block(shard, t0, min(t0 + cfg.tile_rows, shard.shape[0]))
                    tile = torch.from_numpy(tile_np).to(device)
                    t_norm = (tile * tile).sum(dim=1)
                    kk = min(k, tile.shape[0])
                    lo = offset + t0
                    bad = None if valid is None else torch.from_numpy(
                        ~np.asarray(valid[lo:lo + tile.shape[0]], dtype=bool)).to(device)
                    for b0 in range(0, nq, cfg.query_block):
                        b1 = min(b0 + cfg.query_block, nq)
                        d = (q_norm[b0:b1, None] + t_norm[None, :]
                             - 2.0 * (qt[b0:b1] @ tile.T)).clamp_(min=0.0)
                        if bad is not None:
                            d[:, bad] = float("inf")
                        if ex is not None:
                            _mask_ranges(d, ex[b0:b1] - lo)
                        td, ti = torch.topk(d, kk, dim=1, largest=False, sorted=True)
                        cat_d = torch.cat([best_d[b0:b1], td], dim=1)
                        cat_i = torch.cat([best_i[b0:b1], ti + offset + t0], dim=1)
                        # stable merge: ties keep the lower chunk id (earlier shard/tile first)
                        order = torch.argsort(cat_d, dim=1, stable=True)[:, :k]
                        best_d[b0:b1] = torch.gather(cat_d, 1, order)
                        best_i[b0:b1] = torch.gather(cat_i, 1, order)
                offset += shard.shape[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    best_i[torch.isinf(best_d)] = -1  # masked or missing: no neighbour
    return best_i.cpu().numpy(), best_d.cpu().numpy()


def _mask_ranges(d: torch.Tensor, ranges: torch.Tensor) -> None:
    """Set d[r, a_r:b_r] to inf in place, ``ranges`` (rows, 2) relative to the tile's first
    column; only the rows whose range meets the tile are touched (ranges are short)."""
    import torch

    hit = torch.nonzero((ranges[:, 1] > 0) & (ranges[:, 0] < d.shape[1])).flatten()
    if not len(hit):
        return
    cols = torch.arange(d.shape[1], device=d.device)
    sub = d[hit]
    r = ranges[hit]
    sub.masked_fill_((cols[None, :] >= r[:, :1]) & (cols[None, :] < r[:, 1:]), float("inf"))
    d[hit] = sub
