"""Exact k-nearest-neighbour search with torch: tiles of the database against blocks of queries.

Why its own module: the knn stage (``--exact``, the default on CUDA without faiss-gpu) and the
index stage (recall measured against exact search) both need it, and neither should import the
other. Memory is bounded by one (query_block x tile_rows) distance block; the same code runs on
CPU and CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


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
) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared-L2 k-NN of ``queries`` (q, d) in ``database`` (a list of (n_i, d) shards).

    Loops over tiles of the database (each read once, e.g. from float16 memmaps, and moved to
    ``cfg.device``) and, inside, over blocks of queries, keeping a running top-k per query.
    Returns (ids int64 (q, k), distances float32 (q, k)); -1 / inf where the database is smaller
    than k. Same code on CPU and CUDA; fp32 arithmetic (TF32 off) for exactness.
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
    offset = 0
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            for shard in shards:
                for t0 in range(0, shard.shape[0], cfg.tile_rows):
                    # a private copy (memmaps are read-only), moved in its stored dtype, then fp32
                    tile_np = np.array(shard[t0:t0 + cfg.tile_rows], copy=True)
                    tile = torch.from_numpy(tile_np).to(device).float()
                    t_norm = (tile * tile).sum(dim=1)
                    kk = min(k, tile.shape[0])
                    for b0 in range(0, nq, cfg.query_block):
                        b1 = min(b0 + cfg.query_block, nq)
                        d = (q_norm[b0:b1, None] + t_norm[None, :]
                             - 2.0 * (qt[b0:b1] @ tile.T)).clamp_(min=0.0)
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
    return best_i.cpu().numpy(), best_d.cpu().numpy()
