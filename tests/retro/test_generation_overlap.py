"""Retrieval overlapped with decoding (PipeRAG's stale query window) and beam search with retrieval.

With ``stale_tokens`` > 0, chunk c's neighbours are fetched on a background thread from the
chunk_size tokens ending ``stale_tokens`` before its boundary, issued as soon as those tokens are
fed; output then equals exact mode whenever the neighbours do not depend on the query, a left-padded
batch equals its rows run alone, no thread outlives ``generate`` and a fetch's exception reaches the
caller. Beam search reorders each row's retrieval state with its beam: it equals a reference beam
search that recomputes every beam's neighbours from its own tokens with a full forward."""

from __future__ import annotations

import threading
import time
from typing import Sequence

import numpy as np
import pytest
import torch

from retro.hf_generation import stale_query
from tests.fixtures.retro_hf import K, M, FakeNeighbours, left_pad, tiny_retro_hf

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [2, 9], [12, 13, 14, 15], [20]]
NEW = 3 * M + 2


def _fetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("retro-fetch")]


class Constant:
    """The same neighbours whatever the query (so a stale query cannot change the output)."""

    def __init__(self, pad_id: int) -> None:
        self.inner = FakeNeighbours(pad_id)
        self.calls: list[list[int]] = []

    def __call__(self, chunk: Sequence[int]) -> np.ndarray:
        self.calls.append(list(chunk))
        return self.inner([1, 2, 3, 4])


def test_stale_query_is_the_window_ending_stale_tokens_before_the_boundary() -> None:
    toks = list(range(100, 120))
    assert stale_query(toks, 2, 4, 0) == toks[8:12]           # exact: the chunk itself
    assert stale_query(toks, 2, 4, 3) == toks[5:9]            # 4 tokens ending 3 before token 12
    assert stale_query(toks, 0, 4, 3) == toks[0:1]            # what exists of the window
    assert stale_query(toks, 0, 4, 6) == toks[0:4]            # empty window: the chunk itself
    assert stale_query(toks, 2, 4, 9) == toks[0:3]


@pytest.mark.parametrize("stale", [2, 5])
def test_fetch_is_issued_before_the_boundary_with_the_stale_query(stale: int) -> None:
    """At every step, as soon as the fed tokens complete chunk c's stale window, a fetch for c
    with exactly that window has been issued (on the fetch thread), before c's boundary."""
    model = tiny_retro_hf("native")
    fn = FakeNeighbours(3)
    prompt = PROMPTS[1]
    fed: list[int] = []
    seen_at_call: list[tuple[int, int]] = []  # (fed tokens, fetches recorded) per step
    # fetches go out in chunk order: chunk u once its own and every earlier chunk's query is known
    # (with stale >= M chunk 0's window is empty and it waits for its exact query, at its boundary)
    ready = [(u + 1) * M - stale if (u + 1) * M - stale > 0 else (u + 1) * M for u in range(10)]
    ready = [max(ready[:u + 1]) for u in range(10)]

    def after_begin(module, args, out) -> None:  # the first decoder layer runs after the cache's begin()
        fed.append(args[0].shape[1])
        n = sum(fed)
        want = sum(1 for r in ready if r <= n)
        deadline = time.monotonic() + 5.0
        while len(fn.calls) < want and time.monotonic() < deadline:
            time.sleep(0.001)
        seen_at_call.append((n, len(fn.calls)))

    hook = model.retro.layers[0].attn_norm.register_forward_hook(after_begin)
    try:
        out = model.generate(torch.tensor([prompt]), retriever=fn, max_new_tokens=NEW, stale_tokens=stale)[0]
    finally:
        hook.remove()
    toks = out.tolist()
    for u, call in enumerate(fn.calls):
        end = (u + 1) * M - stale
        assert call == (toks[max(0, end - M):end] if end > 0 else toks[u * M:(u + 1) * M]), f"chunk {u}"
    issued = dict(seen_at_call)
    for u in (1, 2):  # issued as soon as its window is fed, before its boundary, not earlier
        assert ready[u] < (u + 1) * M and issued[ready[u]] >= u + 1 and issued[ready[u] - 1] <= u, f"chunk {u}"
    assert len(fn.calls) >= (len(toks) - 1) // M


@pytest.mark.parametrize("family", ["native", "llama"])
def test_overlap_equals_exact_when_neighbours_do_not_depend_on_the_query(family: str) -> None:
    pad = 3 if family == "native" else 40
    model = tiny_retro_hf(family, pad_id=pad)
    ids, mask = left_pad(PROMPTS, pad)
    exact = model.generate(ids, attention_mask=mask, retriever=Constant(pad), max_new_tokens=NEW)
    for stale in (1, M - 1, M + 2):
        over = model.generate(ids, attention_mask=mask, retriever=Constant(pad), max_new_tokens=NEW,
                              stale_tokens=stale)
        assert torch.equal(over, exact), f"stale {stale}"
    # ... and a query-dependent source does see the difference (else the above proves nothing)
    exact_q = model.generate(ids, attention_mask=mask, retriever=FakeNeighbours(pad), max_new_tokens=NEW)
    stale_q = model.generate(ids, attention_mask=mask, retriever=FakeNeighbours(pad), max_new_tokens=NEW,
                             stale_tokens=2)
    assert not torch.equal(exact_q, stale_q)


def test_exact_mode_is_stale_tokens_zero_and_fetches_each_chunk_in_line() -> None:
    model = tiny_retro_hf("native")
    fn0, fn = FakeNeighbours(3), FakeNeighbours(3)
    ids = torch.tensor([PROMPTS[0]])
    a = model.generate(ids, retriever=fn0, max_new_tokens=NEW)
    b = model.generate(ids, retriever=fn, max_new_tokens=NEW, stale_tokens=0)
    assert torch.equal(a, b) and fn.calls == fn0.calls
    toks = a[0].tolist()
    assert fn.calls == [toks[u * M:(u + 1) * M] for u in range((len(toks) - 1) // M)]
    with pytest.raises(ValueError, match="stale_tokens"):
        model.generate(ids, retriever=fn, max_new_tokens=2, stale_tokens=-1)


@pytest.mark.parametrize("family", ["native", "gpt2"])
def test_overlapped_left_padded_batch_equals_rows_alone(family: str) -> None:
    pad = 3 if family == "native" else 40
    model = tiny_retro_hf(family, pad_id=pad)
    ids, mask = left_pad(PROMPTS, pad)
    batch = model.generate(ids, attention_mask=mask, retriever=FakeNeighbours(pad), max_new_tokens=NEW,
                           stale_tokens=3)
    for i, p in enumerate(PROMPTS):
        alone = model.generate(torch.tensor([p]), retriever=FakeNeighbours(pad), max_new_tokens=NEW,
                               stale_tokens=3)
        assert batch[i, ids.shape[1]:].tolist() == alone[0, len(p):].tolist(), f"row {i}"


def test_no_fetch_thread_outlives_generate_and_fetch_errors_propagate() -> None:
    model = tiny_retro_hf("native")
    ids = torch.tensor([PROMPTS[0]])
    before = _fetch_threads()
    model.generate(ids, retriever=FakeNeighbours(3), max_new_tokens=NEW, stale_tokens=2)
    assert _fetch_threads() == before == []

    class Boom(FakeNeighbours):
        def __call__(self, chunk: Sequence[int]) -> np.ndarray:
            if len(self.calls) == 2:
                raise RuntimeError("the retriever is down")
            return super().__call__(chunk)

    fn = Boom(3)
    with pytest.raises(RuntimeError, match="the retriever is down"):
        model.generate(ids, retriever=fn, max_new_tokens=NEW, stale_tokens=2)
    assert _fetch_threads() == [] and len(fn.calls) == 2
    # a fetch returning the wrong shape is still refused with the same message as in exact mode
    with pytest.raises(ValueError, match="neighbour function must return shape"):
        model.generate(ids, retriever=lambda c: np.zeros((K + 1, 2 * M), dtype=np.int64), max_new_tokens=NEW,
                       stale_tokens=2)
    assert _fetch_threads() == []


# ----------------------------------------------------------------------------- beam search


def reference_beams(model, prompt: list[int], fn, beams: int, steps: int, stale: int = 0) -> list[list[int]]:
    """Beam search by hand: every beam scored by a full forward with neighbours recomputed from
    its own tokens; the beams ranked by total log-probability (no EOS, equal lengths)."""
    live = [(0.0, list(prompt))]
    for _ in range(steps):
        cands = []
        for score, toks in live:
            n = len(toks)
            nbrs = [np.asarray(fn(stale_query(toks, u, M, stale))) for u in range(n // M if fn else 0)]
            nb = torch.tensor(np.array(nbrs, dtype=np.int64).reshape(1, n // M, K, 2 * M)) if nbrs else None
            with torch.no_grad():
                logp = model.retro(torch.tensor([toks]), nb)[0, -1].double().log_softmax(-1)
            top = logp.topk(beams)
            cands += [(score + float(v), toks + [int(t)]) for v, t in zip(top.values, top.indices)]
        live = sorted(cands, key=lambda c: -c[0])[:beams]
    return [toks for _, toks in live]


@pytest.mark.parametrize("stale", [0, 2])
def test_beam_search_keeps_each_beams_own_neighbours(stale: int) -> None:
    model = tiny_retro_hf("native")
    prompt, beams, steps = PROMPTS[2], 3, 3 * M + 1
    out = model.generate(torch.tensor([prompt]), retriever=FakeNeighbours(3), max_new_tokens=steps,
                         num_beams=beams, num_return_sequences=beams, do_sample=False, stale_tokens=stale,
                         length_penalty=0.0, early_stopping=True)
    want = reference_beams(model, prompt, FakeNeighbours(3), beams, steps, stale)
    assert out.tolist() == want
    # the beams differ in a chunk whose neighbours they read (so reading another's would show)
    assert len({tuple(r[:(len(r) - 1) // M * M]) for r in want}) > 1


def test_beam_search_with_constant_neighbours_and_without_retriever() -> None:
    model = tiny_retro_hf("native")
    prompt, beams, steps = PROMPTS[0], 3, 2 * M + 3
    kw = dict(max_new_tokens=steps, num_beams=beams, num_return_sequences=beams, do_sample=False,
              length_penalty=0.0)
    const = model.generate(torch.tensor([prompt]), retriever=Constant(3), **kw)
    assert const.tolist() == reference_beams(model, prompt, Constant(3), beams, steps)
    assert model.generate(torch.tensor([prompt]), **kw).tolist() == reference_beams(model, prompt, None, beams,
                                                                                    steps)
    # a RETRO-fit without retriever: its base decoder's own beam search
    fit = tiny_retro_hf("gpt2", pad_id=40)
    ids, mask = left_pad(PROMPTS[:2], 40)
    base = fit.retro.decoder.generate(ids, attention_mask=mask, pad_token_id=40, **kw)
    assert torch.equal(fit.generate(ids, attention_mask=mask, **kw), base)


def test_beam_search_in_a_left_padded_batch_equals_rows_alone() -> None:
    model = tiny_retro_hf("native")
    kw = dict(max_new_tokens=2 * M + 1, num_beams=2, do_sample=False, length_penalty=0.0, stale_tokens=1)
    ids, mask = left_pad(PROMPTS, 3)
    batch = model.generate(ids, attention_mask=mask, retriever=FakeNeighbours(3), **kw)
    for i, p in enumerate(PROMPTS):
        alone = model.generate(torch.tensor([p]), retriever=FakeNeighbours(3), **kw)
        assert batch[i, ids.shape[1]:].tolist() == alone[0, len(p):].tolist(), f"row {i}"


@pytest.mark.parametrize("stale", [0, 3, M + 1])
def test_own_sampler_overlaps_the_same_way(stale: int) -> None:
    """retro.generate.generate (the CLI's sampler) with stale_tokens equals the HF path and fetches
    exactly the stale queries; no thread is left behind."""
    from retro.generate import generate as own_sampler

    model = tiny_retro_hf("native")
    for p in PROMPTS[:3]:
        fn_own, fn_hf = FakeNeighbours(3), FakeNeighbours(3)
        own = own_sampler(model.retro, p, max_new_tokens=NEW, neighbour_fn=fn_own, temperature=0.0,
                          stale_tokens=stale)
        hf = model.generate(torch.tensor([p]), retriever=fn_hf, max_new_tokens=NEW, stale_tokens=stale)
        assert own.tokens == hf[0].tolist()
        used = (len(own.tokens) - 1) // M
        assert fn_own.calls[:used] == [stale_query(own.tokens, u, M, stale) for u in range(used)]
        assert _fetch_threads() == []


def test_the_cache_counts_the_time_decoding_spends_on_fetches() -> None:
    """``retro_wait_s``: what the benchmark reports; a fetch in line counts whole."""
    model = tiny_retro_hf("native")

    class Slow(FakeNeighbours):
        def __call__(self, chunk: Sequence[int]) -> np.ndarray:
            time.sleep(0.02)
            return super().__call__(chunk)

    fn = Slow(3)
    out = model.generate(torch.tensor([PROMPTS[0]]), retriever=fn, max_new_tokens=NEW, return_dict_in_generate=True)
    assert out.past_key_values.retro_wait_s >= 0.02 * len(fn.calls) > 0
    plain = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=NEW, return_dict_in_generate=True)
    assert plain.past_key_values.retro_wait_s == 0.0


def test_rows_repeat_and_select_with_their_retrieval_state() -> None:
    """batch_repeat_interleave / batch_select_indices (contrastive search, assisted decoding): the
    keys/values and every row's tokens, neighbours and encodings move together."""
    from retro.hf_generation import RetroGenerationCache

    model = tiny_retro_hf("native")
    ids, mask = left_pad(PROMPTS[:2], 3)
    out = model.generate(ids, attention_mask=mask, retriever=FakeNeighbours(3), max_new_tokens=2 * M,
                         return_dict_in_generate=True, stale_tokens=1)
    cache: RetroGenerationCache = out.past_key_values
    tokens, nbrs = cache.retro_tokens.clone(), [list(r) for r in cache.retro_neighbours]
    enc, rmask, issued = [list(r) for r in cache.retro_encoded], cache.retro_mask.clone(), list(cache.retro_issued)
    keys = cache.layers[0].keys.clone()
    assert nbrs[0] and nbrs[1] and not torch.equal(nbrs[0][0], nbrs[1][0])
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache.retro_tokens, tokens.repeat_interleave(2, 0))
    assert torch.equal(cache.layers[0].keys, keys.repeat_interleave(2, 0))
    assert [len(r) for r in cache.retro_neighbours] == [len(nbrs[0])] * 2 + [len(nbrs[1])] * 2
    cache.batch_select_indices(torch.tensor([3, 0]))
    assert torch.equal(cache.retro_tokens, tokens[[1, 0]]) and torch.equal(cache.retro_mask, rmask[[1, 0]])
    assert torch.equal(cache.layers[0].keys, keys[[1, 0]])
    for j, i in enumerate((1, 0)):
        assert all(torch.equal(a, b) for a, b in zip(cache.retro_neighbours[j], nbrs[i], strict=True))
        assert all(torch.equal(a, b) for a, b in zip(cache.retro_encoded[j], enc[i], strict=True))
        assert cache.retro_issued[j] == issued[i]
