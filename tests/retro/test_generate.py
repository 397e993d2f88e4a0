"""Generation: cached sampling equals a naive full-forward loop, retrieval happens once per
completed chunk with that chunk's tokens, sampling filters are exact, and the CLI runs end to end
on a real (tiny) database."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from retro import RETRO, RetroConfig
from retro.generate import RetrieverNeighbours, filter_logits, generate, main, sample_next

M, K, V, PAD = 4, 2, 41, 3
HYP = settings(max_examples=15, deadline=None, derandomize=True)


def make_model(**over) -> RETRO:
    cfg = dict(vocab_size=V, pad_id=PAD, dim=32, depth=3, heads=2, dim_head=16, cca_layers=[2, 3],
               enc_dim=32, enc_depth=1, enc_heads=2, enc_dim_head=16, chunk_size=M, num_neighbours=K)
    cfg.update(over)
    torch.manual_seed(0)
    return RETRO(RetroConfig(**cfg)).double().eval()


class FakeNeighbours:
    """Deterministic neighbours from a chunk's tokens; records every call."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def __call__(self, chunk: list[int]) -> np.ndarray:
        self.calls.append(list(chunk))
        base = (np.arange(K * 2 * M).reshape(K, 2 * M) * 7 + sum(chunk)) % V
        base[1, M:] = PAD  # the second neighbour's document ended: no continuation
        return base


def naive_greedy(model: RETRO, prompt: list[int], steps: int, fn) -> list[int]:
    """The reference: a full forward over the whole sequence at every step."""
    tokens = list(prompt)
    for _ in range(steps):
        t = torch.tensor([tokens])
        nbrs = None
        if fn is not None:
            chunks = [fn(tokens[u * M:(u + 1) * M]) for u in range(len(tokens) // M)]
            nbrs = torch.tensor(np.array(chunks, dtype=np.int64).reshape(1, len(chunks), K, 2 * M))
        with torch.no_grad():
            tokens.append(int(model(t, nbrs)[0, -1].argmax()))
    return tokens


@pytest.mark.parametrize("retrieval", [True, False])
@pytest.mark.parametrize("prompt_len", [1, 3, 4, 9])
def test_greedy_generation_equals_naive_full_forward(retrieval, prompt_len):
    model = make_model()
    prompt = [(5 * i + 1) % V for i in range(prompt_len)]
    steps = 3 * M + 1
    result = generate(model, prompt, max_new_tokens=steps, temperature=0.0,
                      neighbour_fn=FakeNeighbours() if retrieval else None)
    assert result.tokens == naive_greedy(model, prompt, steps, FakeNeighbours() if retrieval else None)
    assert result.new_tokens == result.tokens[prompt_len:] and result.stop_reason == "length"


def test_neighbours_fetched_once_per_completed_chunk_with_its_tokens():
    model = make_model()
    fn = FakeNeighbours()
    result = generate(model, [1, 2, 5], max_new_tokens=4 * M + 2, temperature=0.0, neighbour_fn=fn)
    toks = result.tokens
    # every chunk whose last token was fed to the model (all but the last sampled token)
    assert len(fn.calls) == (len(toks) - 1) // M
    assert fn.calls == [toks[u * M:(u + 1) * M] for u in range(len(fn.calls))]
    assert len(result.neighbours) == len(fn.calls)
    assert all(n.shape == (K, 2 * M) for n in result.neighbours)


def test_stops_at_eos_and_includes_it():
    model = make_model()
    greedy = generate(model, [1, 2], max_new_tokens=10, temperature=0.0).tokens
    eos = greedy[4]
    first = greedy.index(eos, 2)
    result = generate(model, [1, 2], max_new_tokens=10, temperature=0.0, eos_id=eos)
    assert result.stop_reason == "eos"
    assert result.tokens == greedy[: first + 1]


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = make_model()
    a = generate(model, [3, 4], max_new_tokens=9, temperature=1.0, seed=7, neighbour_fn=FakeNeighbours())
    b = generate(model, [3, 4], max_new_tokens=9, temperature=1.0, seed=7, neighbour_fn=FakeNeighbours())
    assert a.tokens == b.tokens
    g = generate(model, [3, 4], max_new_tokens=9, temperature=0.0)
    t1 = generate(model, [3, 4], max_new_tokens=9, temperature=1.3, top_k=1, seed=1)
    assert g.tokens == t1.tokens


def test_bad_inputs_are_refused():
    model = make_model()
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], max_new_tokens=3)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [V], max_new_tokens=3)
    with pytest.raises(ValueError, match="neighbour function must return"):
        generate(model, [1] * M, max_new_tokens=2, neighbour_fn=lambda c: np.zeros((K, M), dtype=np.int64))
    assert not model.training


# ----------------------------------------------------------------------------- sampling filters


@HYP
@given(seed=st.integers(0, 10**6), vocab=st.integers(2, 60), top_k=st.integers(1, 70))
def test_top_k_keeps_exactly_the_k_largest(seed, vocab, top_k):
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(seed))
    kept = torch.isfinite(filter_logits(logits, top_k=top_k))
    assert (kept.sum(-1) == min(top_k, vocab)).all()
    order = logits.argsort(dim=-1, descending=True)
    assert kept.gather(-1, order[:, : min(top_k, vocab)]).all()


@HYP
@given(seed=st.integers(0, 10**6), vocab=st.integers(2, 60), top_p=st.floats(0.01, 0.99))
def test_top_p_keeps_the_smallest_set_reaching_p(seed, vocab, top_p):
    logits = 3 * torch.randn(2, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    kept = torch.isfinite(filter_logits(logits, top_p=top_p))
    probs = logits.softmax(-1)
    for row in range(2):
        mass = probs[row][kept[row]].sum()
        assert mass >= top_p - 1e-12
        # dropping the least likely kept token would fall below top_p (minimality)
        smallest = probs[row][kept[row]].min()
        assert mass - smallest < top_p + 1e-12
        # every kept token is at least as likely as every dropped one
        if (~kept[row]).any():
            assert probs[row][kept[row]].min() >= probs[row][~kept[row]].max()


def test_samples_stay_inside_the_filtered_set():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    allowed = torch.isfinite(filter_logits(logits / 1.5, top_k=5, top_p=0.8))  # temperature first
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        s = sample_next(logits, temperature=1.5, top_k=5, top_p=0.8, generator=g)
        assert allowed[torch.arange(4), s].all()


# ----------------------------------------------------------------------------- with a real DB


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    from tests.fixtures import shared_db

    return shared_db(tmp_path_factory)


def test_retriever_neighbours_reads_chunk_and_continuation(tiny_db):
    from index_builder import Retriever

    retriever = Retriever.open(tiny_db, device="cpu")
    store = retriever.store
    fetch = RetrieverNeighbours(retriever, k=3)
    chunk = store.chunks[5].astype(np.int64).tolist()
    out = fetch(chunk)
    hits = retriever.search_text([store.tokenizer.decode(chunk)], k=3)[0]
    ids = np.array([h.chunk_id for h in hits] + [-1] * (3 - len(hits)))
    assert out.shape == (3, 2 * store.chunk_size) and out.dtype == np.int64
    assert np.array_equal(out, store.neighbour_tokens(ids).astype(np.int64))
    assert fetch.log[0]["neighbours"][0]["chunk_id"] == hits[0].chunk_id
    # a chunk with no text (all padding) retrieves nothing: all pad
    empty = fetch([store.tokenizer.pad_id] * store.chunk_size)
    assert (empty == store.tokenizer.pad_id).all()


def test_content_alignment_reads_the_windows_the_dataset_reads(tiny_db):
    """neighbour_alignment=content at generation: the same hits, each window realigned to the
    query chunk exactly as training reads it (retro.neighbour_alignment)."""
    from index_builder import Retriever
    from retro.neighbour_alignment import aligned_neighbour_tokens

    retriever = Retriever.open(tiny_db, device="cpu")
    store = retriever.store
    for min_match in (0.0, 0.3):  # and model.neighbour_min_match drops the same weak neighbours
        fetch = RetrieverNeighbours(retriever, k=3, alignment="content", min_match=min_match)
        for c in (5, 11):
            chunk = store.chunks[c].astype(np.int64)
            out = fetch(chunk.tolist())
            hits = retriever.search_text([store.tokenizer.decode(chunk.tolist())], k=3)[0]
            ids = np.array([[h.chunk_id for h in hits] + [-1] * (3 - len(hits))])
            want = aligned_neighbour_tokens(store.train_store, ids, chunk[None], store.tokenizer.pad_id,
                                            min_match)[0]
            np.testing.assert_array_equal(out, want)


def test_cli_generates_with_retrieval_from_a_saved_run(tiny_db, tmp_path, capsys):
    from chunk_store import ChunkStore
    from retro.checkpoint import save_checkpoint

    store = ChunkStore.open(tiny_db, "train")
    tok = store.tokenizer
    cfg = RetroConfig(vocab_size=tok.vocab_size, pad_id=tok.pad_id, dim=32, depth=2, heads=2,
                      dim_head=16, cca_layers=[2], enc_dim=32, enc_depth=1, enc_heads=2,
                      enc_dim_head=16, chunk_size=store.chunk_size, num_neighbours=2)
    torch.manual_seed(0)
    model = RETRO(cfg)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"seq_len": store.seq_len, "model": cfg.to_dict()}))
    save_checkpoint(run, 1, model, None, {})
    prompt = store.text(0)[:200]
    n_new = 2 * store.chunk_size
    rc = main(["--run", str(run), "--db", str(tiny_db), "--prompt", prompt, "--max-new-tokens",
               str(n_new), "--temperature", "0", "--device", "cpu", "--json"])
    assert rc == 0
    record = json.loads(capsys.readouterr().out)
    assert record["retrieval"]
    n_tokens = len(record["tokens"])
    new = record["tokens"][len(tok.encode(prompt)):]
    # the reason matches what was generated: EOS last and nowhere before, or the full length
    if record["stop_reason"] == "eos":
        assert new[-1] == tok.eos_id and tok.eos_id not in new[:-1] and len(new) <= n_new
    else:
        assert record["stop_reason"] == "length" and len(new) == n_new and tok.eos_id not in new
    assert len(record["chunks"]) == (n_tokens - 1) // store.chunk_size
    assert all(len(c["neighbours"]) <= 2 for c in record["chunks"])
    # overlapped retrieval (--stale-tokens): the same record shape, queries from the stale window
    assert main(["--run", str(run), "--db", str(tiny_db), "--prompt", prompt, "--max-new-tokens", str(n_new),
                 "--temperature", "0", "--device", "cpu", "--json", "--stale-tokens", "3"]) == 0
    stale = json.loads(capsys.readouterr().out)
    assert len(stale["chunks"]) >= (len(stale["tokens"]) - 1) // store.chunk_size
    m = store.chunk_size
    assert stale["chunks"][1]["query"] == tok.decode(stale["tokens"][2 * m - 3 - m:2 * m - 3])
    # a model whose chunk size disagrees with the DB is refused with a one-line error
    bad = cfg.to_dict() | {"chunk_size": store.chunk_size * 2}
    (run / "config.yaml").write_text(yaml.safe_dump({"model": bad}))
    assert main(["--run", str(run), "--db", str(tiny_db), "--prompt", "x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"chunk_size={store.chunk_size} but the config has model.chunk_size={store.chunk_size * 2}" in err
