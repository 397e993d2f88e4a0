"""Generation state for ``RetroForCausalLM`` under transformers' ``GenerationMixin``: batched,
left-padded, KV-cached, retrieving at each row's own chunk boundaries.

``RetroGenerationCache`` is a ``DynamicCache`` (the decoder's keys and values, one ``update``
per layer; a RETRO-fitted HF decoder uses it as its own ``past_key_values``) that also keeps,
per row, the tokens fed so far, the first CCA layer's hidden states, the neighbours fetched for
each completed chunk and their encoding (once per chunk). A row's positions are its own: rotary
positions count its real (unmasked) tokens and its chunk boundaries fall every ``chunk_size``
real tokens, so each row of a left-padded batch generates exactly as it would alone.

Portable on purpose (torch, numpy, einops, transformers and this package's model code only): an
export ships it as remote code, loaded without ``import retro``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from transformers import DynamicCache

from retro.model import apply_rotary

# chunk tokens (chunk_size,) -> neighbour tokens (k, 2 * chunk_size), pad_id where missing
NeighbourFn = Callable[[Sequence[int]], Any]


class RetrieverNeighbours:
    """A ``NeighbourFn`` over an ``index_builder.Retriever``: decode the chunk to text, search it
    (the database's own embedding function), and read each hit's chunk + continuation tokens from
    the train ChunkStore. ``log`` keeps what was retrieved, for display."""

    def __init__(self, retriever: Any, k: int) -> None:
        self.retriever = retriever
        self.store = retriever.store
        self.k = k
        self.log: list[dict[str, Any]] = []

    def __call__(self, chunk_tokens: Sequence[int]) -> np.ndarray:
        pad = self.store.tokenizer.pad_id  # never text (a finished row's padding, or past the vocabulary)
        text = self.store.tokenizer.decode([int(t) for t in chunk_tokens if int(t) != pad])
        ids = np.full(self.k, -1, dtype=np.int64)
        hits = self.retriever.search_text([text], k=self.k)[0] if text.strip() else []
        for j, hit in enumerate(hits[: self.k]):
            ids[j] = hit.chunk_id
        self.log.append({
            "query": text,
            "neighbours": [{"chunk_id": int(h.chunk_id), "doc_id": int(h.doc_id),
                            "distance": float(h.distance), "text": h.text} for h in hits[: self.k]],
        })
        return self.store.neighbour_tokens(ids).astype(np.int64)


class NeighbourSource:
    """Makes one ``NeighbourFn`` per generated row: over a ``Retriever`` (``search_text`` and
    ``store``), or a plain function ``chunk tokens -> (k, 2m) ids`` shared by every row."""

    def __init__(self, retriever: Any, k: int, cfg: Any) -> None:
        if isinstance(retriever, NeighbourSource):
            retriever = retriever.retriever
        self.retriever, self.k = retriever, k
        if hasattr(retriever, "search_text"):
            store = retriever.store
            for name, db, ours in (("chunk_size", store.chunk_size, cfg.chunk_size),
                                   ("tokenizer.vocab_size", store.tokenizer.vocab_size, cfg.vocab_size),
                                   ("tokenizer.pad_id", store.tokenizer.pad_id, cfg.pad_id)):
                if int(db) != int(ours):
                    raise ValueError(f"the retriever's database has {name}={db}, the model {ours}")
        elif not callable(retriever):
            raise TypeError("retriever: an index_builder.Retriever or a function chunk tokens -> (k, 2m) ids")

    def row(self) -> NeighbourFn:
        if hasattr(self.retriever, "search_text"):
            return RetrieverNeighbours(self.retriever, self.k)
        return self.retriever


class RetroGenerationCache(DynamicCache):
    """Keys/values (``DynamicCache``) + the retrieval state of every row (see the module doc)."""

    def __init__(self, chunk_size: int, pad_id: int, num_neighbours: int,
                 fns: list[NeighbourFn] | None = None) -> None:
        super().__init__()
        self.retro_m, self.retro_pad, self.retro_k = chunk_size, pad_id, num_neighbours
        self.retro_fns = fns                       # one per row; None: no retrieval
        self.retro_seen = 0                        # padded length fed so far
        self.retro_tokens: Tensor | None = None    # (b, seen)
        self.retro_mask: Tensor | None = None      # (b, seen) True = a real token
        self.retro_positions: Tensor | None = None  # (b, t) of the call in progress
        self.retro_hidden: Tensor | None = None    # (b, seen, dim) the first CCA layer's input
        self.retro_neighbours: list[list[Tensor]] = []  # per row, per completed chunk (k, 2m)
        self.retro_encoded: list[list[Tensor]] = []     # per row, per chunk (k*r, e)
        self.retro_encoded_mask: list[list[Tensor]] = []

    @property
    def retrieval(self) -> bool:
        return self.retro_fns is not None

    # ------------------------------------------------------------------ per call

    def begin(self, tokens: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Record the new ``tokens`` (b, t); return their per-row positions (b, t). Fetches the
        neighbours of every chunk these tokens complete (the decoder encodes them)."""
        b, t = tokens.shape
        total = self.retro_seen + t
        if attention_mask is None:
            mask = torch.ones(b, total, dtype=torch.bool, device=tokens.device)
        else:
            mask = attention_mask.to(device=tokens.device, dtype=torch.bool)
            if mask.shape != (b, total):
                raise ValueError(f"attention_mask must be (batch, {total}) (every token so far), "
                                 f"got {tuple(mask.shape)}")
        new = mask[:, self.retro_seen:]
        if bool((new[:, 1:].long() < new[:, :-1].long()).any()):
            raise ValueError("padding must be on the left (tokenizer.padding_side = 'left')")
        self.retro_tokens = tokens if self.retro_tokens is None else torch.cat([self.retro_tokens, tokens], 1)
        self.retro_mask = mask
        self.retro_positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, self.retro_seen:]
        if self.retrieval:
            self._fetch()
        return self.retro_positions

    def end(self, t: int) -> None:
        self.retro_seen += t

    def _real(self, row: int, x: Tensor) -> Tensor:
        return x[row][self.retro_mask[row]]

    def _fetch(self) -> None:
        m, fns = self.retro_m, self.retro_fns
        assert fns is not None and self.retro_tokens is not None
        if not self.retro_neighbours:
            b = len(fns)
            self.retro_neighbours = [[] for _ in range(b)]
            self.retro_encoded = [[] for _ in range(b)]
            self.retro_encoded_mask = [[] for _ in range(b)]
        device = self.retro_tokens.device
        for i, fn in enumerate(fns):
            real = self._real(i, self.retro_tokens).tolist()
            done = self.retro_neighbours[i]
            while len(done) < len(real) // m:
                chunk = real[len(done) * m:(len(done) + 1) * m]
                arr = np.asarray(fn(chunk)).astype(np.int64)
                if arr.ndim != 2 or arr.shape[1] != 2 * m or arr.shape[0] != self.retro_k:
                    raise ValueError(f"neighbour function must return shape ({self.retro_k}, {2 * m}), "
                                     f"got {tuple(arr.shape)}")
                done.append(torch.as_tensor(arr, device=device))

    # ------------------------------------------------------------------ inside the decoder

    def cross_attend(self, x: Tensor, cca: nn.Module, norm: nn.Module, first: bool,
                     encode: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
                     dtype: torch.dtype | None = None) -> Tensor:
        """x (b, t, dim) -> x + CCA(norm x) at each row's own positions. At the first CCA layer,
        x is kept (the encoder's context) and every newly completed chunk is encoded, once."""
        dtype = dtype or x.dtype
        m, (b, t, _) = self.retro_m, x.shape
        if first:
            self.retro_hidden = x if self.retro_hidden is None else torch.cat([self.retro_hidden, x], 1)
            self._encode_new(encode)
        pos = self.retro_positions
        new_mask = self.retro_mask[:, self.retro_seen:]
        out = torch.zeros_like(x)
        xn = norm(x.to(dtype))
        if t == 1:
            valid = (pos[:, 0] >= m - 1) & new_mask[:, 0]
            if not bool(valid.any()):
                return x
            u, offset = ((pos[:, 0] - (m - 1)).clamp(min=0)).div(m, rounding_mode="floor"), (pos[:, 0] - (m - 1)) % m
            enc = torch.stack([self.retro_encoded[i][int(u[i])] if valid[i] else self._blank(0)
                               for i in range(b)])
            emask = torch.stack([self.retro_encoded_mask[i][int(u[i])] if valid[i] else self._blank(1)
                                 for i in range(b)])
            attended = cca._attend(xn, enc, emask, offset.view(b, 1, 1))
            out = attended.to(x.dtype) * valid.view(b, 1, 1).to(x.dtype)
            return x + out
        for i in range(b):
            n = int(new_mask[i].sum())
            if n == 0 or not self.retro_encoded[i]:
                continue
            enc = torch.stack(self.retro_encoded[i])[None]
            emask = torch.stack(self.retro_encoded_mask[i])[None]
            out[i:i + 1, t - n:] = cca.forward_positions(xn[i:i + 1, t - n:], int(pos[i, t - n]), enc,
                                                         emask).to(x.dtype)
        return x + out

    def _blank(self, which: int) -> Tensor:
        for row in (self.retro_encoded if which == 0 else self.retro_encoded_mask):
            if row:
                return torch.zeros_like(row[0])
        raise AssertionError("no chunk is encoded yet")  # pragma: no cover (valid rows have one)

    def _encode_new(self, encode: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> None:
        m = self.retro_m
        pairs = [(i, u) for i in range(len(self.retro_neighbours))
                 for u in range(len(self.retro_encoded[i]), len(self.retro_neighbours[i]))]
        if not pairs:
            return
        nbrs = torch.stack([self.retro_neighbours[i][u] for i, u in pairs])[None]
        hidden = torch.cat([self._real(i, self.retro_hidden)[u * m:(u + 1) * m] for i, u in pairs])[None]
        enc, emask = encode(nbrs, hidden)
        for j, (i, _) in enumerate(pairs):
            self.retro_encoded[i].append(enc[0, j])
            self.retro_encoded_mask[i].append(emask[0, j])


def native_forward(model: nn.Module, tokens: Tensor, cache: RetroGenerationCache, positions: Tensor) -> Tensor:
    """``RETRO`` over new ``tokens`` (b, t) at ``positions`` (b, t) with the cache's keys/values
    and padding mask -> logits (b, t, vocab): ``RETRO.forward_incremental`` for a padded batch."""
    b, t = tokens.shape
    seen = cache.retro_seen
    total = seen + t
    x = model.token_emb(tokens)
    cos, sin = (c[:, None] for c in model.rotary(positions))  # (b, 1, t, d)
    q_idx = torch.arange(seen, total, device=tokens.device)
    k_idx = torch.arange(total, device=tokens.device)
    causal = k_idx[None, :] <= q_idx[:, None]
    own = k_idx[None, :] == q_idx[:, None]  # a padding query sees itself: no all-masked row (NaN)
    attn_mask = (cache.retro_mask[:, None, None, :] | own) & causal
    for li, layer in enumerate(model.layers):
        attn = layer.attn
        q, k, v = rearrange(attn.to_qkv(layer.attn_norm(x)), "b n (three h d) -> three b h n d", three=3, h=attn.heads)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = cache.update(k, v, li)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + attn.to_out(rearrange(out, "b h n d -> b n (h d)"))
        if layer.has_cca and cache.retrieval:
            x = cache.cross_attend(x, layer.cca, layer.cca_norm, li == model.first_cca, model._encode)
        x = layer.feed_forward(x)
    return model.to_logits(model.norm(x))


class RowsCall:
    """What ``RetroFit``'s layer hooks run during a generation step: CCA at each row's positions."""

    neighbours = True  # the hooks' "retrieval on" test

    def __init__(self, fit: nn.Module, cache: RetroGenerationCache) -> None:
        self.fit, self.cache = fit, cache

    def apply(self, layer: int, x: Tensor) -> Tensor:
        fit = self.fit
        return self.cache.cross_attend(x, fit.cca[str(layer)], fit.cca_norm[str(layer)], layer - 1 == fit.first_cca,
                                       fit._encode, fit._retrieval_dtype())


def fit_forward(fit: nn.Module, tokens: Tensor, cache: RetroGenerationCache, positions: Tensor) -> Tensor:
    """``RetroFit`` over new ``tokens``: the HF decoder with its mask, positions and this cache."""
    fit._call = RowsCall(fit, cache) if cache.retrieval else None
    try:
        out = fit.decoder(input_ids=fit._safe_ids(tokens), attention_mask=cache.retro_mask.long(),
                          position_ids=positions, past_key_values=cache, use_cache=True)
    finally:
        fit._call = None
    return out.logits


def generation_step(model: nn.Module, tokens: Tensor, attention_mask: Tensor | None,
                    cache: RetroGenerationCache) -> Tensor:
    """One forward of generation (prefill or decode) for RETRO or RetroFit -> logits (b, t, vocab)."""
    positions = cache.begin(tokens, attention_mask)
    fn = fit_forward if hasattr(model, "decoder") else native_forward
    try:
        return fn(model, tokens, cache, positions)
    finally:
        cache.end(tokens.shape[1])
