"""Nearest-centroid assignment in bfloat16, for CPUs with native bf16 dot products.

Why: adding N vectors to an IVF index, and every k-means iteration, compares each vector with
every centroid: a GEMM of N x nlist x dim. faiss does it in fp32 (~60 GFLOP/s on the 2-core
EPYC of docs/BENCHMARKS.md); torch's bf16 GEMM reaches ~200 GFLOP/s there (AVX512_BF16). The
score of centroid c is x.c - |c|^2 / 2 (one GEMM, the second term an extra column), its argmax
the nearest centroid up to bf16 rounding: a vector within rounding distance of two centroids may
go to the second nearest, which the search still probes (the HNSW quantizer this stage first
assigned with was approximate too). Used where the embedder would pick bf16 on the CPU
(index_builder.embed.embedder.default_dtype); not for --deterministic builds (faiss's fp32 there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def augment(x: np.ndarray | torch.Tensor, last: float | None = None) -> torch.Tensor:
    """(n, d) -> (n, d + 1) torch bf16: the rows with a last column of ``last`` (queries: 1) or,
    for centroids (``last`` None), -|c|^2 / 2 computed in fp32 before rounding."""
    import torch

    t = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)) if isinstance(x, np.ndarray) else x.float()
    col = (-(t * t).sum(1, keepdim=True) / 2) if last is None else torch.full((t.shape[0], 1), last)
    return torch.cat([t, col], 1).to(torch.bfloat16)


class Bf16Assigner:
    """``search(x, 1)`` -> (None, (n, 1) int64 nearest centroid): faiss's interface, so the IVF
    build takes it in place of a flat index over the centroids."""

    def __init__(self, centroids: np.ndarray, block: int = 4096) -> None:
        self.cent_t = augment(centroids).T.contiguous()  # (d + 1, nlist)
        self.block = block

    def assign(self, x: np.ndarray) -> np.ndarray:
        import torch

        n, d = x.shape
        out = np.empty(n, dtype=np.int64)
        buf = torch.empty((min(self.block, max(n, 1)), d + 1), dtype=torch.bfloat16)
        buf[:, d] = 1.0
        with torch.inference_mode():
            for a in range(0, n, self.block):
                m = min(self.block, n - a)
                buf[:m, :d] = torch.from_numpy(np.ascontiguousarray(x[a:a + m], dtype=np.float32))
                out[a:a + m] = (buf[:m] @ self.cent_t).argmax(1).numpy()
        return out

    def search(self, x: np.ndarray, k: int = 1) -> tuple[None, np.ndarray]:
        if k != 1:
            raise ValueError("Bf16Assigner finds the nearest centroid only (k=1)")
        return None, self.assign(x)[:, None]
