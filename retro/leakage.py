"""Leakage analysis (Borgeaud et al. 2022, section 4.4, Figure 6): how much of a retrieval gain is
copying.

Each evaluated chunk C_c (the target tokens c*m .. (c+1)*m - 1 of a sequence) is predicted by CCA
over the neighbours of the chunk before it, Ret(C_{c-1}), each a chunk plus its continuation. Its
overlap is the longest run of consecutive tokens C_c shares with any of those neighbours, as a
fraction of the chunk size m (pad never matches; the first chunk, which sees no neighbours, has
overlap 0). Losses and bytes are summed per chunk, then over the chunks whose overlap is at most
alpha, for RETRO, the same weights without retrieval and a trained baseline: the paper's curve.
Why chunk by chunk: a gain that vanishes at low overlap is the model copying near-duplicates of
the evaluation text out of the database, not generalising from retrieval.

Everything is summed (nats, token and byte counts), so shards of any size and ranks combine
exactly (:meth:`LeakageSums.all_reduced`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from einops import rearrange

from retro.distributed import all_reduce_sum
from retro.metrics import bits_per_byte

ALPHAS = (0.125, 0.25, 0.5, 0.75, 1.0)  # the paper's Figure 6 thresholds (8 of 64 tokens .. all)
VARIANTS = ("retrieval", "no_retrieval", "baseline")


def longest_shared_run(chunks: np.ndarray, neighbours: np.ndarray, pad_id: int) -> np.ndarray:
    """(N, m) chunks, (N, k, r) neighbours -> (N,) longest run of consecutive tokens a chunk shares
    with any of its neighbours (longest common substring; pad matches nothing).

    The dynamic programme runs over the chunk's m positions, vectorised over every chunk,
    neighbour and neighbour position: run[i, j] = run[i-1, j-1] + 1 where the tokens match.
    """
    chunks = np.asarray(chunks)
    neighbours = np.asarray(neighbours)
    n, m = chunks.shape
    best = np.zeros(n, dtype=np.int64)
    if n == 0 or neighbours.shape[1] == 0:
        return best
    prev = np.zeros(neighbours.shape, dtype=np.int64)  # (N, k, r): run ending at (i-1, j)
    valid_nbr = neighbours != pad_id
    for i in range(m):
        tok = chunks[:, i][:, None, None]
        match = (neighbours == tok) & valid_nbr & (tok != pad_id)
        run = np.zeros_like(prev)
        run[..., 1:] = prev[..., :-1] + 1
        run[..., 0] = 1
        run = np.where(match, run, 0)
        best = np.maximum(best, run.max(axis=(1, 2)))
        prev = run
    return best


def chunk_overlaps(tokens: np.ndarray, neighbours: np.ndarray | None, chunk_size: int,
                   pad_id: int) -> np.ndarray:
    """(b, n + 1) tokens, (b, l, k, 2m) neighbours -> (b, l + 1) overlap in [0, 1] of each target
    chunk with the neighbours it is predicted from (chunk c with Ret(C_{c-1}); chunk 0: 0)."""
    chunks = padded_chunks(np.asarray(tokens), chunk_size, pad_id)
    chunks[:, 0, 0] = pad_id  # token 0 is never a target
    return _runs_with_neighbours(chunks, neighbours, target=True, pad_id=pad_id)


def query_overlaps(tokens: np.ndarray, neighbours: np.ndarray | None, chunk_size: int,
                   pad_id: int) -> np.ndarray:
    """(b, n + 1) tokens, (b, l, k, 2m) neighbours -> (b, l + 1): for target chunk c, the longest run
    the query chunk C_{c-1} (whose neighbours predict C_c) shares with those neighbours, as a
    fraction of m (chunk 0: 0). High query and low target overlap: a near-duplicate that diverges."""
    return _runs_with_neighbours(padded_chunks(np.asarray(tokens), chunk_size, pad_id), neighbours,
                                 target=False, pad_id=pad_id)


def _runs_with_neighbours(chunks: np.ndarray, neighbours: np.ndarray | None, *, target: bool,
                          pad_id: int) -> np.ndarray:
    """chunks (b, l + 1, m) -> (b, l + 1): Ret(C_{c-1})'s longest shared run with chunk c (target)
    or with chunk c - 1 (its query), over m, stored at c."""
    b, l1, m = chunks.shape
    out = np.zeros((b, l1), dtype=np.float64)
    if neighbours is None:
        return out
    nbrs = np.asarray(neighbours)
    l_ = min(nbrs.shape[1], l1 - 1)
    compared = chunks[:, 1:l_ + 1] if target else chunks[:, :l_]
    runs = longest_shared_run(rearrange(compared, "b l m -> (b l) m"),
                              rearrange(nbrs[:, :l_], "b l k r -> (b l) k r"), pad_id)
    out[:, 1:l_ + 1] = rearrange(runs, "(b l) -> b l", b=b) / m
    return out


def padded_chunks(tokens: np.ndarray, m: int, pad_id: int) -> np.ndarray:
    """(b, n + 1) tokens -> (b, l + 1, m), a new array: chunk c holds tokens c*m .. (c+1)*m - 1,
    pad-filled past the end."""
    b, total = tokens.shape
    l1 = -(-total // m)
    padded = np.full((b, l1 * m), pad_id, dtype=tokens.dtype)
    padded[:, :total] = tokens
    return rearrange(padded, "b (l m) -> b l m", m=m)


def per_chunk(token_values: torch.Tensor | np.ndarray, chunk_size: int) -> np.ndarray:
    """(b, n) values per target position (target p is token p + 1) -> (b, l + 1) sums per chunk."""
    vals = token_values.detach().double().cpu().numpy() if isinstance(token_values, torch.Tensor) \
        else np.asarray(token_values, dtype=np.float64)
    b, n = vals.shape
    l1 = -(-(n + 1) // chunk_size)
    shifted = np.zeros((b, l1 * chunk_size))
    shifted[:, 1:n + 1] = vals
    return rearrange(shifted, "b (l m) -> b l m", m=chunk_size).sum(-1)


def chunk_bytes(tokenizer: Any, targets: np.ndarray, chunk_size: int, pad_id: int) -> np.ndarray:
    """(b, n) target tokens -> (b, l + 1) UTF-8 bytes per chunk, as differences of decoded prefixes,
    so a row's chunks add up to exactly the bytes of the row decoded whole (metrics.target_bytes)."""
    targets = np.asarray(targets)
    b, n = targets.shape
    l1 = -(-(n + 1) // chunk_size)
    out = np.zeros((b, l1), dtype=np.int64)
    for r in range(b):
        prev = 0
        for c in range(l1):
            end = min((c + 1) * chunk_size - 1, n)  # targets of chunks 0..c: positions < end
            ids = [int(t) for t in targets[r, :end] if t != pad_id]
            size = len(tokenizer.decode(ids).encode("utf-8")) if ids else 0
            out[r, c] = size - prev
            prev = size
    return out


@dataclass
class LeakageSums:
    """Per alpha: summed nats of each variant, non-pad target tokens and bytes, over the chunks
    with overlap <= alpha."""

    alphas: tuple[float, ...] = ALPHAS
    sums: np.ndarray = field(default_factory=lambda: np.zeros((len(ALPHAS), len(VARIANTS) + 2)))

    def add(self, overlap: np.ndarray, losses: dict[str, np.ndarray], tokens: np.ndarray,
            nbytes: np.ndarray) -> None:
        """One batch: (b, l + 1) overlaps, per-chunk losses by variant, token and byte counts."""
        for a, alpha in enumerate(self.alphas):
            keep = overlap <= alpha + 1e-9
            for v, name in enumerate(VARIANTS):
                if name in losses:
                    self.sums[a, v] += float(losses[name][keep].sum())
            self.sums[a, -2] += float(tokens[keep].sum())
            self.sums[a, -1] += float(nbytes[keep].sum())

    def all_reduced(self, device: torch.device) -> LeakageSums:
        flat = all_reduce_sum(self.sums.ravel().tolist(), device)
        return LeakageSums(self.alphas, np.asarray(flat).reshape(self.sums.shape))

    def report(self, variants: tuple[str, ...]) -> list[dict[str, Any]]:
        """One record per alpha: bits per byte of each scored variant, gains, token/byte counts."""
        rows = []
        for a, alpha in enumerate(self.alphas):
            nbytes = int(self.sums[a, -1])
            row: dict[str, Any] = {"alpha": alpha, "tokens": int(self.sums[a, -2]), "bytes": nbytes}
            for v, name in enumerate(VARIANTS):
                if name in variants:
                    row[f"bits_per_byte_{name}"] = bits_per_byte(self.sums[a, v], nbytes)
            if "no_retrieval" in variants and "retrieval" in variants:
                row["gain_over_no_retrieval"] = row["bits_per_byte_no_retrieval"] - row["bits_per_byte_retrieval"]
            if "baseline" in variants and "retrieval" in variants:
                row["gain_over_baseline"] = row["bits_per_byte_baseline"] - row["bits_per_byte_retrieval"]
            rows.append(row)
        return rows
