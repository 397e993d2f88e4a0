"""The RETRO model (Borgeaud et al. 2022, section 2 and Algorithm 1).

A pre-norm decoder (RMSNorm, rotary self-attention, GELU MLP) in which some layers add chunked
cross-attention (CCA) to the encoded neighbours of the previous chunk. The neighbour encoder is a
small bidirectional transformer over each neighbour's 2 x chunk_size tokens that cross-attends to
the decoder's hidden states of the chunk the neighbour was retrieved for; it runs once, at the
first CCA layer, and its output feeds every CCA layer. Token embeddings are shared.

Shapes (einops names): b batch, n tokens, l chunks, m chunk_size, k neighbours, r = 2m tokens per
neighbour, h heads, d head dim.

Causality of CCA: neighbours of chunk u are retrieved with chunk u's own tokens, so the hidden
states are shifted left by m - 1: the query block of chunk u is positions u*m + m - 1 ...
u*m + 2m - 2 (the last token of chunk u and the first m - 1 tokens of chunk u + 1). Positions
before the end of chunk 0 get a zero residual. All attention goes through
``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange, repeat
from torch import Tensor, nn

from retro.config import RetroConfig
from retro.layers import MLP, RMSNorm, Rotary, apply_rotary

# --------------------------------------------------------------------------- building blocks


@dataclass
class LayerCache:
    """Preallocated keys/values of one decoder self-attention layer (generation)."""

    keys: Tensor    # (b, h, max_len, d)
    values: Tensor  # (b, h, max_len, d)


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions; causal in the decoder, bidirectional with
    a key-padding mask in the encoder."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal, self.dropout_p = heads, causal, dropout
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        key_mask: Tensor | None = None,
        cache: LayerCache | None = None,
        start: int = 0,
    ) -> Tensor:
        q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn_mask, is_causal = None, self.causal
        if key_mask is not None:
            attn_mask = rearrange(key_mask, "b j -> b 1 1 j")
        if cache is not None:
            n = x.shape[1]
            cache.keys[:, :, start:start + n] = k.to(cache.keys.dtype)
            cache.values[:, :, start:start + n] = v.to(cache.values.dtype)
            k = cache.keys[:, :, :start + n].to(q.dtype)
            v = cache.values[:, :, :start + n].to(q.dtype)
            if start > 0:  # queries are the last n of start + n keys: bottom-right causal mask
                is_causal = False
                if n > 1:
                    i = torch.arange(start, start + n, device=x.device)
                    j = torch.arange(start + n, device=x.device)
                    attn_mask = j[None, :] <= i[:, None]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        return self.resid_dropout(self.to_out(rearrange(out, "b h n d -> b n (h d)")))


class CrossAttention(nn.Module):
    """Queries from x, keys/values from a context of another width. Optionally rotary on both
    sides (relative positions inside CCA), a key mask, and a learned null key/value that every
    query may attend to, so a query whose whole context is padding still gets a defined output."""

    def __init__(self, dim: int, context_dim: int, heads: int, dim_head: int, dropout: float,
                 null_kv: bool, zero_null_value: bool = False) -> None:
        super().__init__()
        self.heads, self.dropout_p = heads, dropout
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        # the null key, then its value unless that is fixed at zero (RetroConfig.cca_null_value)
        self.null_kv = nn.Parameter(torch.zeros(1 if zero_null_value else 2, heads, dim_head)) if null_kv else None
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor, key_mask: Tensor | None = None,
                q_rotary: tuple[Tensor, Tensor] | None = None, k_rotary: tuple[Tensor, Tensor] | None = None
                ) -> Tensor:
        q = self.queries(x, q_rotary)
        return self.attend(q, self.context_kv(context, key_mask, k_rotary, q.dtype))

    def queries(self, x: Tensor, q_rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x (b, n, dim) -> q (b, h, n, d), rotary applied."""
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        return q if q_rotary is None else apply_rotary(q, *q_rotary)

    def context_kv(self, context: Tensor, key_mask: Tensor | None = None,
                   k_rotary: tuple[Tensor, Tensor] | None = None, dtype: torch.dtype | None = None
                   ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(k, v, attention mask) of a context, null key/value first: split from ``forward`` so
        generation can reuse them (a decoding step re-reads the same chunk's neighbours m times)."""
        k, v = rearrange(self.to_kv(context), "b j (two h d) -> two b h j d", two=2, h=self.heads)
        if k_rotary is not None:
            k = apply_rotary(k, *k_rotary)
        attn_mask = None if key_mask is None else rearrange(key_mask, "b j -> b 1 1 j")
        if self.null_kv is not None:
            batch = k.shape[0]
            nulls = [repeat(t, "h d -> b h 1 d", b=batch).to(dtype or k.dtype) for t in self.null_kv]
            null_k, null_v = nulls if len(nulls) == 2 else (nulls[0], torch.zeros_like(nulls[0]))
            k, v = torch.cat((null_k, k), dim=2), torch.cat((null_v, v), dim=2)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (1, 0), value=True)
        return k, v, attn_mask

    def attend(self, q: Tensor, kv: tuple[Tensor, Tensor, Tensor | None]) -> Tensor:
        """q (b, h, n, d) over ``context_kv``'s keys/values -> (b, n, dim)."""
        k, v, attn_mask = kv
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return self.resid_dropout(self.to_out(rearrange(out, "b h n d -> b n (h d)")))


class ChunkedCrossAttention(nn.Module):
    """CCA: the query block of chunk u (shifted by m - 1) attends to chunk u's encoded neighbours."""

    def __init__(self, cfg: RetroConfig, rotary: Rotary) -> None:
        super().__init__()
        self.chunk_size = cfg.chunk_size
        self.rotary = rotary
        self.attn = CrossAttention(cfg.dim, cfg.enc_dim, cfg.heads, cfg.dim_head, cfg.dropout, null_kv=True,
                                   zero_null_value=cfg.cca_null_value == "zero")

    def _attend(self, q_in: Tensor, enc: Tensor, enc_mask: Tensor, q_offset: Tensor) -> Tensor:
        """q_in ((b l), t, dim) queries at in-block offsets q_offset (t,); enc ((b l), k*r, e).

        Relative positions: neighbour token j has position j mod r; the query at in-block offset
        t has position m - 1 + t, so the last token of the chunk lines up with the last token of
        the retrieved chunk and the following queries with its continuation.
        """
        m = self.chunk_size
        r = 2 * m
        k_pos = torch.arange(enc.shape[1], device=enc.device) % r
        q_cos, q_sin = self.rotary(q_offset + (m - 1))
        k_cos, k_sin = self.rotary(k_pos)
        return self.attn(q_in, enc, enc_mask, (q_cos, q_sin), (k_cos, k_sin))

    def queries(self, q_in: Tensor, q_offset: Tensor) -> Tensor:
        """``_attend``'s queries alone: q_in ((b l), t, dim) at in-block offsets -> (b, h, t, d)."""
        return self.attn.queries(q_in, self.rotary(q_offset + (self.chunk_size - 1)))

    def context_kv(self, enc: Tensor, enc_mask: Tensor, dtype: torch.dtype | None = None
                   ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``_attend``'s keys/values alone, for one chunk's encoded neighbours enc ((b l), k*r, e):
        computed once per chunk in generation, where ``_attend`` would redo them every token."""
        k_pos = torch.arange(enc.shape[1], device=enc.device) % (2 * self.chunk_size)
        return self.attn.context_kv(enc, enc_mask, self.rotary(k_pos), dtype)

    def forward(self, x: Tensor, enc: Tensor, enc_mask: Tensor) -> Tensor:
        """x (b, n, dim); enc (b, l, k*r, e) with l = n // m; enc_mask (b, l, k*r) -> (b, n, dim)."""
        m = self.chunk_size
        b, n, _ = x.shape
        num_chunks = enc.shape[1]
        if num_chunks == 0:
            return torch.zeros_like(x)
        shifted = x[:, m - 1: m - 1 + num_chunks * m]                  # at most l * m positions
        valid = shifted.shape[1]
        shifted = F.pad(shifted, (0, 0, 0, num_chunks * m - valid))
        q_in = rearrange(shifted, "b (l m) e -> (b l) m e", m=m)
        out = self._attend(
            q_in,
            rearrange(enc, "b l j e -> (b l) j e"),
            rearrange(enc_mask, "b l j -> (b l) j"),
            torch.arange(m, device=x.device),
        )
        out = rearrange(out, "(b l) m e -> b (l m) e", b=b)[:, :valid]
        return F.pad(out, (0, 0, m - 1, n - (m - 1) - valid))

    def forward_positions(self, x: Tensor, start: int, enc: Tensor, enc_mask: Tensor) -> Tensor:
        """The same result for positions start .. start + t - 1 only (generation with a cache).

        x (b, t, dim); enc (b, L, k*r, e) holds at least every chunk completed by start + t.
        """
        m = self.chunk_size
        b, t, _ = x.shape
        out = torch.zeros_like(x)
        pos = start
        while pos < start + t:
            if pos < m - 1:                                # before the end of chunk 0: nothing
                pos = m - 1
                continue
            u, offset = divmod(pos - (m - 1), m)
            stop = min(start + t, pos + (m - offset))      # end of chunk u's query block
            sl = slice(pos - start, stop - start)
            out[:, sl] = self._attend(
                x[:, sl], enc[:, u], enc_mask[:, u], torch.arange(offset, offset + stop - pos, device=x.device)
            )
            pos = stop
        return out


class DecoderBlock(nn.Module):
    """Pre-norm: x += attn(norm x); [x += cca(norm x, E)]; x += mlp(norm x). The three residual
    steps are separate methods because the encoder runs between the first two (Algorithm 1)."""

    def __init__(self, cfg: RetroConfig, rotary: Rotary, has_cca: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = SelfAttention(cfg.dim, cfg.heads, cfg.dim_head, cfg.dropout, causal=True)
        self.has_cca = has_cca
        if has_cca:
            self.cca_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.cca = ChunkedCrossAttention(cfg, rotary)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg.dim, cfg.mlp_hidden, cfg.dropout)

    def attention(self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | None = None,
                  start: int = 0) -> Tensor:
        return x + self.attn(self.attn_norm(x), cos, sin, cache=cache, start=start)

    def chunked_cross_attention(self, x: Tensor, enc: Tensor, enc_mask: Tensor) -> Tensor:
        return x + self.cca(self.cca_norm(x), enc, enc_mask)

    def feed_forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.mlp_norm(x))

    def cca_feed_forward(self, x: Tensor, enc: Tensor | None, enc_mask: Tensor | None) -> Tensor:
        """CCA (when given encoded neighbours), then the MLP."""
        return self.feed_forward(x if enc is None else self.chunked_cross_attention(x, enc, enc_mask))

    def step(self, x: Tensor, cos: Tensor, sin: Tensor, enc: Tensor | None, enc_mask: Tensor | None) -> Tensor:
        """The whole block (not ``forward``: FSDP2 would then shard the block, not its parts)."""
        return self.cca_feed_forward(self.attention(x, cos, sin), enc, enc_mask)


class EncoderLayer(nn.Module):
    """Bidirectional self-attention over a neighbour, cross-attention to its chunk's decoder
    states, MLP; all pre-norm."""

    def __init__(self, cfg: RetroConfig) -> None:
        super().__init__()
        e = cfg.enc_dim
        self.attn_norm = RMSNorm(e, cfg.norm_eps)
        self.attn = SelfAttention(e, cfg.enc_heads, cfg.enc_dim_head, cfg.dropout, causal=False)
        self.cross_norm = RMSNorm(e, cfg.norm_eps)
        self.context_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.cross = CrossAttention(e, cfg.dim, cfg.enc_heads, cfg.enc_dim_head, cfg.dropout, null_kv=False)
        self.mlp_norm = RMSNorm(e, cfg.norm_eps)
        self.mlp = MLP(e, cfg.enc_mlp_hidden, cfg.dropout)

    def forward(self, x: Tensor, key_mask: Tensor, context: Tensor, cos: Tensor, sin: Tensor,
                k: int) -> Tensor:
        """x ((b l k), r, e); key_mask ((b l k), r); context ((b l), m, dim)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, key_mask=key_mask)
        # the k neighbours of a chunk share its context: fold k into the query length instead of
        # repeating the context k times (cross-attention treats every query independently)
        xq = rearrange(x, "(bl k) r e -> bl (k r) e", k=k)
        xq = xq + self.cross(self.cross_norm(xq), self.context_norm(context))
        x = rearrange(xq, "bl (k r) e -> (bl k) r e", k=k)
        return x + self.mlp(self.mlp_norm(x))


class Encoder(nn.Module):
    def __init__(self, cfg: RetroConfig) -> None:
        super().__init__()
        self.rotary = Rotary(cfg.enc_dim_head, cfg.rope_base)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_depth))
        self.norm = RMSNorm(cfg.enc_dim, cfg.norm_eps)

    def forward(self, nbr: Tensor, nbr_mask: Tensor, hidden: Tensor) -> Tensor:
        """nbr (b, l, k, r, e) embedded neighbours; nbr_mask (b, l, k, r) True = real token;
        hidden (b, l, m, dim) decoder states of each chunk -> (b, l, k*r, e)."""
        b, l, k, r, _ = nbr.shape
        x = rearrange(nbr, "b l k r e -> (b l k) r e")
        key_mask = rearrange(nbr_mask, "b l k r -> (b l k) r")
        # an all-padding neighbour attends to all its (pad) tokens instead of to nothing (NaN);
        # its output is masked out in CCA anyway
        key_mask = key_mask | ~key_mask.any(dim=-1, keepdim=True)
        context = rearrange(hidden, "b l m d -> (b l) m d")
        cos, sin = self.rotary(torch.arange(r, device=nbr.device))
        for layer in self.layers:
            x = layer(x, key_mask, context, cos, sin, k)
        return rearrange(self.norm(x), "(b l k) r e -> b l (k r) e", b=b, l=l)


# --------------------------------------------------------------------------- the model


@dataclass
class RetroCache:
    """Generation state: decoder KV cache, the first CCA layer's hidden states (the encoder's
    context once a chunk completes) and the encoded neighbours of every completed chunk."""

    layers: list[LayerCache]
    hidden: Tensor                 # (b, max_len, dim)
    max_len: int
    length: int = 0
    encoded: list[Tensor] = field(default_factory=list)       # each (b, k*r, e), one per chunk
    encoded_mask: list[Tensor] = field(default_factory=list)  # each (b, k*r)
    retrieval: bool | None = None  # fixed by the first call: with or without neighbours


def _called(fn, *args):
    return fn(*args)


def _checkpointed(fn, *args):
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


def init_weights(named_modules: Iterable[tuple[str, nn.Module]], std: float, n_resid: int) -> None:
    """The one init rule (RETRO; RetroFit's retrieval part): Normal(0, std), RMSNorm ones, and each
    residual branch's output projection scaled by 1/sqrt(n_resid) (GPT-2's rule: the residual
    stream's variance does not grow with depth). The modules' order is the RNG draws' order."""
    for name, module in named_modules:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            scale = 1.0 / math.sqrt(n_resid) if name.endswith(("to_out", "fc_out")) else 1.0
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, CrossAttention) and module.null_kv is not None:
            nn.init.normal_(module.null_kv, mean=0.0, std=std)


class RETRO(nn.Module):
    """``RETRO(cfg)(tokens (b, n), neighbours (b, n // m, k, 2m) | None) -> logits (b, n, vocab)``."""

    # recompute each decoder block's and the encoder's activations in backward (train.py sets it)
    activation_checkpointing: bool = False

    def __init__(self, cfg: RetroConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.cca_layers = cfg.resolved_cca_layers
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rotary = Rotary(cfg.dim_head, cfg.rope_base)
        self.layers = nn.ModuleList(
            DecoderBlock(cfg, self.rotary, has_cca=(i + 1) in self.cca_layers) for i in range(cfg.depth)
        )
        self.first_cca = (self.cca_layers[0] - 1) if self.cca_layers else None  # 0-based
        retrieves = bool(self.cca_layers)  # cca_layers: [] is the decoder-only baseline: no encoder
        self.enc_in = nn.Linear(cfg.dim, cfg.enc_dim, bias=False) if retrieves and cfg.enc_dim != cfg.dim else nn.Identity()
        self.encoder = Encoder(cfg) if retrieves else None
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.to_logits = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.to_logits.weight = self.token_emb.weight
        self.reset_parameters()

    # ------------------------------------------------------------------ init

    def reset_parameters(self, modules: Iterable[tuple[str, nn.Module]] | None = None) -> None:
        """``init_weights`` over every module (or the (name, module) pairs given: a meta-device
        build's materialisation, retro.materialize); residual branches: 2 per layer + the CCAs."""
        init_weights(self.named_modules() if modules is None else modules, self.cfg.init_std,
                     2 * self.cfg.depth + len(self.cca_layers))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ helpers

    def _check_inputs(self, tokens: Tensor, neighbours: Tensor | None, total_len: int) -> None:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, seq), got shape {tuple(tokens.shape)}")
        if neighbours is None:
            return
        m = self.cfg.chunk_size
        if neighbours.ndim != 4 or neighbours.shape[0] != tokens.shape[0] or neighbours.shape[-1] != 2 * m:
            raise ValueError(
                f"neighbours must be (batch={tokens.shape[0]}, chunks, k, 2*chunk_size={2 * m}), "
                f"got shape {tuple(neighbours.shape)}"
            )
        if neighbours.shape[1] < total_len // m:
            raise ValueError(
                f"neighbours cover {neighbours.shape[1]} chunks, the sequence of {total_len} tokens "
                f"has {total_len // m} complete chunks of {m}"
            )

    def _encode(self, neighbours: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """neighbours (b, l, k, r) token ids; hidden (b, l*m, dim) -> enc (b, l, k*r, e), mask."""
        mask = neighbours != self.cfg.pad_id
        nbr = self.enc_in(self.token_emb(neighbours))
        hidden = rearrange(hidden, "b (l m) d -> b l m d", m=self.cfg.chunk_size)
        enc = self.encoder(nbr, mask, hidden)
        return enc, rearrange(mask, "b l k r -> b l (k r)")

    # ------------------------------------------------------------------ training / scoring

    def forward(self, tokens: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """tokens (b, n) long; neighbours (b, n // m, k, 2m) long or None -> logits (b, n, vocab).

        Neighbour entries equal to pad_id are masked; a chunk whose neighbours are all padding
        attends only to the learned null key/value. neighbours=None skips every CCA block and the
        encoder: the same weights as a plain decoder, the baseline of every retrieval comparison.
        """
        n = tokens.shape[-1]
        self._check_inputs(tokens, neighbours, n)
        m = self.cfg.chunk_size
        num_chunks = n // m
        if neighbours is not None:
            neighbours = neighbours[:, :num_chunks]
        x = self.token_emb(tokens)
        cos, sin = self.rotary(torch.arange(n, device=tokens.device))
        run = _checkpointed if self.activation_checkpointing and torch.is_grad_enabled() else _called
        enc = enc_mask = None
        for layer in self.layers:
            retrieve = layer.has_cca and neighbours is not None and num_chunks > 0  # else: zero residual
            if retrieve and enc is None:  # the first CCA block: the encoder reads its attention's output
                x = run(layer.attention, x, cos, sin)
                enc, enc_mask = run(self._encode, neighbours, x[:, : num_chunks * m])
                x = run(layer.cca_feed_forward, x, enc, enc_mask)
            else:
                x = run(layer.step, x, cos, sin, enc if retrieve else None, enc_mask)
        return self.to_logits(self.norm(x))

    # ------------------------------------------------------------------ generation

    def new_cache(self, batch: int, max_len: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> RetroCache:
        """An empty generation cache for ``batch`` sequences of at most ``max_len`` tokens."""
        param = self.token_emb.weight
        device = param.device if device is None else torch.device(device)
        dtype = param.dtype if dtype is None else dtype
        shape = (batch, self.cfg.heads, max_len, self.cfg.dim_head)
        layers = [LayerCache(torch.zeros(shape, device=device, dtype=dtype),
                             torch.zeros(shape, device=device, dtype=dtype)) for _ in self.layers]
        hidden = torch.zeros(batch, max_len, self.cfg.dim, device=device, dtype=dtype)
        return RetroCache(layers=layers, hidden=hidden, max_len=max_len)

    @torch.no_grad()
    def forward_incremental(self, tokens: Tensor, cache: RetroCache,
                            neighbours: Tensor | None = None) -> Tensor:
        """Logits for ``tokens`` (b, t) following the ``cache.length`` tokens already seen.

        ``neighbours`` (b, L, k, 2m) are the neighbours of the whole sequence so far (L at least
        the number of chunks complete after these tokens); chunks not yet encoded are encoded
        here, once, from their cached first-CCA-layer hidden states. The result equals the
        matching slice of ``forward`` over the whole sequence.
        """
        b, t = tokens.shape
        start = cache.length
        total = start + t
        if total > cache.max_len:
            raise ValueError(f"cache holds {cache.max_len} tokens, asked for {total}")
        self._check_inputs(tokens, neighbours, total)
        retrieval = neighbours is not None
        if cache.retrieval is None:
            cache.retrieval = retrieval
        elif cache.retrieval != retrieval:
            raise ValueError("pass neighbours on every forward_incremental call of a cache, or never")
        m = self.cfg.chunk_size
        x = self.token_emb(tokens)
        cos, sin = self.rotary(torch.arange(start, total, device=tokens.device))
        enc = enc_mask = None
        for i, layer in enumerate(self.layers):
            x = layer.attention(x, cos, sin, cache=cache.layers[i], start=start)
            if layer.has_cca and retrieval:
                if i == self.first_cca:
                    cache.hidden[:, start:total] = x.to(cache.hidden.dtype)
                    done = len(cache.encoded)
                    complete = total // m
                    if complete > done:
                        new_enc, new_mask = self._encode(
                            neighbours[:, done:complete],
                            cache.hidden[:, done * m: complete * m].to(x.dtype),
                        )
                        cache.encoded.extend(new_enc.unbind(dim=1))
                        cache.encoded_mask.extend(new_mask.unbind(dim=1))
                    if cache.encoded:
                        enc = torch.stack(cache.encoded, dim=1)
                        enc_mask = torch.stack(cache.encoded_mask, dim=1)
                if enc is not None:
                    x = x + layer.cca.forward_positions(layer.cca_norm(x), start, enc, enc_mask)
            x = layer.feed_forward(x)
        cache.length = total
        return self.to_logits(self.norm(x))
