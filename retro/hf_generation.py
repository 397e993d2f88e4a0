"""Generation state for ``RetroForCausalLM`` under transformers' ``GenerationMixin``: batched,
left-padded, KV-cached, retrieving at each row's own chunk boundaries.

``RetroGenerationCache`` is a ``DynamicCache`` (the decoder's keys and values, one ``update``
per layer; a RETRO-fitted HF decoder uses it as its own ``past_key_values``) that also keeps,
per row, the tokens fed so far, the first CCA layer's hidden states, the neighbours fetched for
each completed chunk and their encoding (once per chunk). A row's positions are its own: rotary
positions count its real (unmasked) tokens and its chunk boundaries fall every ``chunk_size``
real tokens, so each row of a left-padded batch generates exactly as it would alone.

Retrieval can overlap decoding (PipeRAG, ``stale_tokens`` > 0): a chunk's fetch is issued on a
background thread as soon as its stale query (``stale_query``) is fed and awaited at the boundary;
0 keeps RETRO's exact query, fetched in line. The rows present at one step share one fetch (one
batched ``Retriever.search_text``). Rows can be reordered (beam search), selected and repeated:
each row's retrieval state moves with it.

Portable on purpose (torch, numpy, einops, transformers and this package's model code only): an
export ships it as remote code, loaded without ``import retro``.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from transformers import DynamicCache

from retro.model import apply_rotary

# chunk tokens (chunk_size,) -> neighbour tokens (k, 2 * chunk_size), pad_id where missing
NeighbourFn = Callable[[Sequence[int]], Any]


def stale_query(tokens: Sequence[int], chunk: int, chunk_size: int, stale_tokens: int) -> list[int]:
    """The query that fetches ``chunk``'s neighbours (PipeRAG's stale window): the last
    ``chunk_size`` real tokens ending ``stale_tokens`` before the chunk's boundary, so the fetch can
    start that many tokens early. The chunk itself (RETRO's exact query) when ``stale_tokens`` is 0
    or the window would be empty (an early chunk with ``stale_tokens >= chunk_size``)."""
    end = (chunk + 1) * chunk_size - stale_tokens
    if stale_tokens <= 0 or end <= 0:
        return [int(t) for t in tokens[chunk * chunk_size:(chunk + 1) * chunk_size]]
    return [int(t) for t in tokens[max(0, end - chunk_size):end]]


def query_ready(chunk: int, chunk_size: int, stale_tokens: int) -> int:
    """How many real tokens a row must have for ``stale_query(.., chunk, ..)`` to be known."""
    end = (chunk + 1) * chunk_size - stale_tokens
    return end if stale_tokens > 0 and end > 0 else (chunk + 1) * chunk_size


def retriever_fetch(retriever: Any, k: int, queries: Sequence[Sequence[int]], alignment: str = "chunk",
                    min_match: float = 0.0) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Neighbour tokens (k, 2m) per query from an ``index_builder.Retriever``, with ONE
    ``search_text`` for all of them (one embedding batch, one index search: a batch's rows share a
    boundary), and a log entry per query. A query with no text (padding) retrieves nothing."""
    store = retriever.store
    pad = store.tokenizer.pad_id  # never text (a finished row's padding, or past the vocabulary)
    texts = [store.tokenizer.decode([int(t) for t in q if int(t) != pad]) for q in queries]
    asked = [i for i, text in enumerate(texts) if text.strip()]
    ids = np.full((len(texts), k), -1, dtype=np.int64)
    hits: list[list[Any]] = [[] for _ in texts]
    if asked:
        for i, row in zip(asked, retriever.search_text([texts[i] for i in asked], k=k)):
            hits[i] = list(row[:k])
            ids[i, :len(hits[i])] = [h.chunk_id for h in hits[i]]
    log = [{"query": text, "neighbours": [{"chunk_id": int(h.chunk_id), "doc_id": int(h.doc_id),
                                           "distance": float(h.distance), "text": h.text} for h in row]}
           for text, row in zip(texts, hits)]
    if alignment == "content":  # each window moved to line up with its query (retro.neighbour_alignment)
        m = int(store.chunk_size)
        q = np.full((len(queries), m), pad, dtype=np.int64)
        for i, row in enumerate(queries):
            row = [int(t) for t in row][:m]
            q[i, :len(row)] = row
        return list(retriever.aligned_neighbour_tokens(ids, q, min_match)), log
    return list(store.neighbour_tokens(ids).astype(np.int64)), log


class RetrieverNeighbours:
    """A ``NeighbourFn`` over an ``index_builder.Retriever``: decode the chunk to text, search it
    (the database's own embedding function), and read each hit's chunk + continuation tokens from
    the train ChunkStore. ``log`` keeps what was retrieved, for display."""

    def __init__(self, retriever: Any, k: int, alignment: str = "chunk", min_match: float = 0.0) -> None:
        self.retriever = retriever
        self.store = retriever.store
        self.k, self.alignment, self.min_match = k, alignment, min_match
        self.log: list[dict[str, Any]] = []

    def __call__(self, chunk_tokens: Sequence[int]) -> np.ndarray:
        (out,), log = retriever_fetch(self.retriever, self.k, [chunk_tokens], self.alignment, self.min_match)
        self.log.extend(log)
        return out


class NeighbourSource:
    """Fetches neighbours for a generating batch: over a ``Retriever`` (``search_text`` and
    ``store``; one batched search per boundary), or a plain function ``chunk tokens -> (k, 2m)
    ids`` called once per query.

    ``stale_tokens`` > 0 overlaps retrieval with decoding (PipeRAG): a chunk's neighbours are
    fetched on a background thread from ``stale_query`` as soon as it is known, ``stale_tokens``
    tokens before the boundary, and awaited at the boundary. 0 (the default) is RETRO's exact
    query, fetched in line at the boundary. The thread lives only inside ``running()``."""

    def __init__(self, retriever: Any, k: int, cfg: Any, stale_tokens: int = 0) -> None:
        if isinstance(retriever, NeighbourSource):
            retriever = retriever.retriever
        if int(stale_tokens) < 0:
            raise ValueError(f"stale_tokens must be >= 0, got {stale_tokens}")
        self.retriever, self.k, self.stale_tokens = retriever, k, int(stale_tokens)
        self.alignment = getattr(cfg, "neighbour_alignment", "chunk")
        self.min_match = float(getattr(cfg, "neighbour_min_match", 0.0))
        self.pool: ThreadPoolExecutor | None = None
        self.log: list[dict[str, Any]] = []
        if hasattr(retriever, "search_text"):
            store = retriever.store
            for name, db, ours in (("chunk_size", store.chunk_size, cfg.chunk_size),
                                   ("tokenizer.vocab_size", store.tokenizer.vocab_size, cfg.vocab_size),
                                   ("tokenizer.pad_id", store.tokenizer.pad_id, cfg.pad_id)):
                if int(db) != int(ours):
                    raise ValueError(f"the retriever's database has {name}={db}, the model {ours}")
        elif not callable(retriever):
            raise TypeError("retriever: an index_builder.Retriever or a function chunk tokens -> (k, 2m) ids")

    def fetch(self, queries: Sequence[Sequence[int]]) -> tuple[list[np.ndarray], list[dict[str, Any] | None]]:
        """Neighbour tokens per query (in order) and what was retrieved for each (a Retriever's
        query text and hits; None from a plain function); may run on the background thread."""
        if hasattr(self.retriever, "search_text"):
            out, log = retriever_fetch(self.retriever, self.k, queries, self.alignment, self.min_match)
            self.log.extend(log)
            return out, list(log)
        return [np.asarray(self.retriever(list(q))) for q in queries], [None] * len(queries)

    def submit(self, queries: Sequence[Sequence[int]]) -> "Future[tuple[list[np.ndarray], list[dict[str, Any] | None]]]":
        """A future of ``fetch(queries)``: on the background thread inside ``running()`` with a
        stale window, else computed now (exact mode: the same calls, in the same order, as before)."""
        if self.pool is not None and self.stale_tokens > 0:
            return self.pool.submit(self.fetch, [list(q) for q in queries])
        done: Future[tuple[list[np.ndarray], list[dict[str, Any] | None]]] = Future()
        done.set_result(self.fetch(queries))
        return done

    @contextmanager
    def running(self) -> Iterator["NeighbourSource"]:
        """One fetch thread for a ``generate`` call (one: fetches stay in issue order, and a
        Retriever serialises searches anyway); shut down on exit, queued fetches cancelled, so no
        thread outlives the call. A fetch's exception is raised at its boundary, in the caller."""
        if self.stale_tokens == 0 or self.pool is not None:
            yield self
            return
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retro-fetch")
        try:
            yield self
        finally:
            pool, self.pool = self.pool, None
            pool.shutdown(wait=True, cancel_futures=True)


class _Growing:
    """A (b, n, ...) tensor appended to along n with doubling capacity: amortised O(1) per
    decoding step, where ``torch.cat`` copies everything so far at every step."""

    def __init__(self) -> None:
        self.buf: Tensor | None = None
        self.n = 0

    def append(self, x: Tensor) -> None:
        t = x.shape[1]
        if self.buf is None or self.n + t > self.buf.shape[1]:
            cap = max(2 * (self.n + t), 64)
            buf = x.new_empty((x.shape[0], cap, *x.shape[2:]))
            if self.buf is not None:
                buf[:, :self.n] = self.buf[:, :self.n]
            self.buf = buf
        self.buf[:, self.n:self.n + t] = x
        self.n += t

    @property
    def value(self) -> Tensor | None:
        return None if self.buf is None else self.buf[:, :self.n]

    def select(self, rows: Tensor) -> None:
        if self.buf is not None:
            self.buf = self.buf.index_select(0, rows.to(self.buf.device))


class RetroGenerationCache(DynamicCache):
    """Keys/values (``DynamicCache``) + the retrieval state of every row (see the module doc).

    Rows can be reordered, selected and repeated (beam search, contrastive search): the retrieval
    state moves with its row, so each beam keeps the neighbours of its own tokens."""

    def __init__(self, chunk_size: int, pad_id: int, num_neighbours: int,
                 source: NeighbourSource | None = None) -> None:
        super().__init__()
        self.retro_m, self.retro_pad, self.retro_k = chunk_size, pad_id, num_neighbours
        self.retro_source = source                 # None: no retrieval
        self.retro_stale = source.stale_tokens if source is not None else 0
        self.retro_seen = 0                        # padded length fed so far
        self._tokens, self._hidden = _Growing(), _Growing()
        self.retro_mask: Tensor | None = None      # (b, seen) True = a real token
        self.retro_positions: Tensor | None = None  # (b, t) of the call in progress
        self.retro_neighbours: list[list[Tensor]] = []  # per row, per completed chunk (k, 2m)
        self.retro_encoded: list[list[Tensor]] = []     # per row, per chunk (k*r, e)
        self.retro_encoded_mask: list[list[Tensor]] = []
        self.retro_issued: list[int] = []          # per row, chunks whose fetch is issued
        self.retro_pending: list[dict[int, tuple[Future, int]]] = []  # per row: chunk -> (job, index)
        # per row, per completed chunk: what a Retriever returned for it (query text and hits;
        # None from a plain function); moves with its row like the neighbours
        self.retro_logs: list[list[dict[str, Any] | None]] = []
        self.retro_wait_s = 0.0                    # decoding's time in fetches (in line) or waiting for them
        # each row's latest encoded chunk, stacked ((b, k*r, e), (b, k*r)): what a decoding step attends
        # to, read without a per-row loop (a row with none yet holds zeros, masked out by ``valid``)
        self._current: tuple[Tensor, Tensor] | None = None
        self._current_kv: dict[tuple[int, torch.dtype], tuple[Tensor, Tensor, Tensor | None]] = {}  # per CCA layer

    @property
    def retrieval(self) -> bool:
        return self.retro_source is not None

    @property
    def retro_tokens(self) -> Tensor | None:
        """(b, seen) every token fed so far."""
        return self._tokens.value

    @property
    def retro_hidden(self) -> Tensor | None:
        """(b, seen, dim) the first CCA layer's input so far."""
        return self._hidden.value

    # ------------------------------------------------------------------ per call

    def begin(self, tokens: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Record the new ``tokens`` (b, t); return their per-row positions (b, t). Issues the
        fetch of every chunk whose query these tokens complete, and waits for the neighbours of
        every chunk they complete (the decoder encodes them)."""
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
        self._tokens.append(tokens)
        self.retro_mask = mask
        self.retro_positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, self.retro_seen:]
        if self.retrieval:
            start = time.perf_counter()
            self._fetch()
            self.retro_wait_s += time.perf_counter() - start
        return self.retro_positions

    def end(self, t: int) -> None:
        self.retro_seen += t

    def _real(self, row: int, x: Tensor) -> Tensor:
        return x[row][self.retro_mask[row]]

    def _fetch(self) -> None:
        """Issue (one batched job for all rows) the fetches whose query is known, then collect
        the neighbours of every completed chunk, waiting only if its fetch is still running."""
        m, s, source, tokens = self.retro_m, self.retro_stale, self.retro_source, self.retro_tokens
        assert source is not None and tokens is not None and self.retro_mask is not None
        b = tokens.shape[0]
        if not self.retro_neighbours:
            self.retro_neighbours = [[] for _ in range(b)]
            self.retro_encoded = [[] for _ in range(b)]
            self.retro_encoded_mask = [[] for _ in range(b)]
            self.retro_issued = [0] * b
            self.retro_pending = [{} for _ in range(b)]
            self.retro_logs = [[] for _ in range(b)]
        lengths = self.retro_mask.sum(-1).tolist()
        queries: list[list[int]] = []
        keys: list[tuple[int, int]] = []
        for i, n in enumerate(lengths):
            if query_ready(self.retro_issued[i], m, s) > n:
                continue
            real = self._real(i, tokens).tolist()
            while query_ready(self.retro_issued[i], m, s) <= n:
                queries.append(stale_query(real, self.retro_issued[i], m, s))
                keys.append((i, self.retro_issued[i]))
                self.retro_issued[i] += 1
        if queries:
            job = source.submit(queries)
            for j, (i, c) in enumerate(keys):
                self.retro_pending[i][c] = (job, j)
        device = tokens.device
        for i, n in enumerate(lengths):
            done = self.retro_neighbours[i]
            while len(done) < n // m:
                job, j = self.retro_pending[i].pop(len(done))
                arrays, logs = job.result()
                arr = np.asarray(arrays[j]).astype(np.int64)
                self.retro_logs[i].append(logs[j])
                if arr.ndim != 2 or arr.shape[1] != 2 * m or arr.shape[0] != self.retro_k:
                    raise ValueError(f"neighbour function must return shape ({self.retro_k}, {2 * m}), "
                                     f"got {tuple(arr.shape)}")
                done.append(torch.as_tensor(arr, device=device))

    # ------------------------------------------------------------------ rows (beams)

    def _take_rows(self, rows: Tensor) -> None:
        """Row j becomes old row ``rows[j]``: its tokens, hidden states, neighbours, encodings
        and pending fetches (a future is shared, its result read-only)."""
        idx = rows.tolist()
        self._tokens.select(rows)
        self._hidden.select(rows)
        if self.retro_mask is not None:
            self.retro_mask = self.retro_mask.index_select(0, rows.to(self.retro_mask.device))
        for name in ("retro_neighbours", "retro_encoded", "retro_encoded_mask", "retro_logs"):
            old = getattr(self, name)
            if old:
                setattr(self, name, [list(old[i]) for i in idx])
        self._current_kv.clear()
        if self._current is not None:
            self._current = tuple(c.index_select(0, rows.to(c.device)) for c in self._current)  # type: ignore[assignment]
        if self.retro_issued:
            self.retro_issued = [self.retro_issued[i] for i in idx]
            self.retro_pending = [dict(self.retro_pending[i]) for i in idx]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._take_rows(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self._take_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        b = self._tokens.buf.shape[0] if self._tokens.buf is not None else len(self.retro_issued)
        self._take_rows(torch.arange(b).repeat_interleave(repeats))

    # ------------------------------------------------------------------ inside the decoder

    def cross_attend(self, x: Tensor, cca: nn.Module, norm: nn.Module, first: bool,
                     encode: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
                     dtype: torch.dtype | None = None) -> Tensor:
        """x (b, t, dim) -> x + CCA(norm x) at each row's own positions. At the first CCA layer,
        x is kept (the encoder's context) and every newly completed chunk is encoded, once."""
        dtype = dtype or x.dtype
        m, (b, t, _) = self.retro_m, x.shape
        if first:
            self._hidden.append(x)
            self._encode_new(encode)
        pos = self.retro_positions
        new_mask = self.retro_mask[:, self.retro_seen:]
        if t == 1:  # a decoding step: each real token past chunk 0 attends to its row's latest chunk
            valid = (pos[:, 0] >= m - 1) & new_mask[:, 0]
            if self._current is None or not bool(valid.any()):
                return x
            offset = (pos[:, 0] - (m - 1)) % m
            q = cca.queries(norm(x.to(dtype)), rearrange(offset, "b -> b 1 1"))
            key = (id(cca), q.dtype)
            if key not in self._current_kv:  # once per chunk and layer, not once per token
                self._current_kv[key] = cca.context_kv(*self._current, q.dtype)
            attended = cca.attn.attend(q, self._current_kv[key])
            return x + attended.to(x.dtype) * rearrange(valid, "b -> b 1 1").to(x.dtype)
        out = torch.zeros_like(x)
        xn = norm(x.to(dtype))
        for i in range(b):
            n = int(new_mask[i].sum())
            if n == 0 or not self.retro_encoded[i]:
                continue
            enc = torch.stack(self.retro_encoded[i])[None]
            emask = torch.stack(self.retro_encoded_mask[i])[None]
            out[i:i + 1, t - n:] = cca.forward_positions(xn[i:i + 1, t - n:], int(pos[i, t - n]), enc,
                                                         emask).to(x.dtype)
        return x + out

    def _encode_new(self, encode: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> None:
        m = self.retro_m
        pairs = [(i, u) for i in range(len(self.retro_neighbours))
                 for u in range(len(self.retro_encoded[i]), len(self.retro_neighbours[i]))]
        if not pairs:
            return
        nbrs = torch.stack([self.retro_neighbours[i][u] for i, u in pairs])[None]
        hidden = torch.cat([self._real(i, self.retro_hidden)[u * m:(u + 1) * m] for i, u in pairs])[None]
        enc, emask = encode(nbrs, hidden)
        self._current_kv.clear()
        if self._current is None:
            b = len(self.retro_neighbours)
            self._current = (enc.new_zeros((b, *enc.shape[2:])), emask.new_zeros((b, *emask.shape[2:])))
        for j, (i, _) in enumerate(pairs):
            self.retro_encoded[i].append(enc[0, j])
            self.retro_encoded_mask[i].append(emask[0, j])
            self._current[0][i], self._current[1][i] = enc[0, j], emask[0, j]  # pairs run in chunk order


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
