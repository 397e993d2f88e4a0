"""The RETRO model's plain building blocks: RMSNorm, rotary position embeddings, the GELU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (bf16 mean-of-squares loses precision), cast back after."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        out = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return out.to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embeddings (GPT-NeoX half-split layout); cos/sin built per call from the
    positions actually used, so any offset (KV cache, CCA's shifted blocks) costs nothing extra."""

    def __init__(self, dim_head: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim_head, self.base = dim_head, base
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device: torch.device | str | None = None) -> Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim_head, 2, dtype=torch.float32, device=device)
                                    / self.dim_head))

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the frequencies in place: a meta-device build leaves them empty."""
        self.inv_freq.copy_(self._inv_freq(self.inv_freq.device))

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (..., n) -> cos, sin (..., n, dim_head) in float32."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., n, d); cos/sin (n, d) in float32, cast to x's dtype (as Llama does under bf16:
    the angles are exact, only the product is rounded; in fp32 nothing changes)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden, bias=False)
        self.fc_out = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc_out(F.gelu(self.fc_in(x), approximate="tanh")))
