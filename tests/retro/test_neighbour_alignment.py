"""model.neighbour_alignment=content: each neighbour's window moved within its document to line up
with the chunk that retrieved it. Reference tests against a loop over every offset, properties
(a planted copy is found wherever it sits, the window never leaves its document, an unrelated
neighbour keeps its stored window), and the dataset and training paths end to end; with
model.neighbour_min_match, exactly the windows that match their query by less than the share are
dropped."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from chunk_store import ChunkStore
from chunk_store.framework.errors import UserError
from retro.config import RetroConfig
from retro.dataset import RetroDataset
from retro.neighbour_alignment import aligned_neighbour_tokens, best_offsets, document_windows, match_scores
from retro.neighbour_reads import neighbour_tokens
from tests.fixtures.train_db import K, tiny_db

PAD = 0


def fake_train(doc_lengths: list[int], m: int, vocab: int, seed: int) -> SimpleNamespace:
    """A train split of random tokens (1..vocab-1): documents of the given chunk counts."""
    rng = np.random.default_rng(seed)
    n = sum(doc_lengths)
    return SimpleNamespace(chunks=rng.integers(1, vocab, size=(n, m)), chunk_size=m, num_chunks=n,
                           doc_ids=np.repeat(np.arange(len(doc_lengths)), doc_lengths))


def reference_offset(window: np.ndarray, query: np.ndarray) -> int:
    """The best offset by a plain loop: weighted matches, then o = 0, then the smaller |o|."""
    m = len(query)
    best = None
    for o in range(-(m - 1), m):
        score = sum(t + 1 for t in range(m) if query[t] != PAD and window[m + o + t] == query[t])
        key = (score, -abs(o))
        if best is None or key > best[0]:
            best = (key, o)
    return best[1]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.sampled_from([3, 8, 1000]))
def test_best_offsets_equal_the_loop(seed, vocab):
    rng = np.random.default_rng(seed)
    m = 8
    windows = rng.integers(0, vocab, size=(12, 4 * m))
    queries = rng.integers(0, vocab, size=(12, m))
    got = best_offsets(windows, queries, PAD)
    assert got.tolist() == [reference_offset(w, q) for w, q in zip(windows, queries)]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), data=st.data())
def test_a_copy_is_found_wherever_it_sits_in_the_document(seed, data):
    m = 16
    train = fake_train([6, 9], m, vocab=5000, seed=seed)
    stream = train.chunks.reshape(-1)
    j = data.draw(st.integers(7, 13))                  # inside the second document (chunks 6..14)
    o = data.draw(st.integers(-(m - 1), m - 1))
    lo, hi = 6 * m, 15 * m
    start = j * m + o
    query = stream[start:start + m].copy()
    got = aligned_neighbour_tokens(train, np.array([[j]]), query[None], PAD)[0, 0]
    want = np.full(2 * m, PAD)
    a, b = max(start, lo), min(start + 2 * m, hi)
    want[a - start:b - start] = stream[a:b]
    np.testing.assert_array_equal(got, want)


def test_windows_never_leave_the_neighbour_s_document():
    m = 4
    train = fake_train([1, 3, 1], m, vocab=50, seed=1)
    windows = document_windows(train, np.array([1, 3, 4, -1]), PAD).reshape(4, 4, m)
    pad = np.full((1, m), PAD)
    c = train.chunks                                   # documents: chunk 0 | chunks 1-3 | chunk 4
    np.testing.assert_array_equal(windows[0], np.concatenate([pad, c[1:4]]))
    np.testing.assert_array_equal(windows[1], np.concatenate([c[2:4], pad, pad]))
    np.testing.assert_array_equal(windows[2], np.concatenate([pad, c[4:5], pad, pad]))
    assert (windows[3] == PAD).all()


def test_an_unrelated_neighbour_keeps_its_stored_window_and_none_stays_pad():
    m = 8
    train = fake_train([5, 5], m, vocab=100, seed=2)
    ids = np.array([[1, 7], [-1, 3]])
    queries = np.full((2, m), 200)                       # tokens no chunk holds: no offset matches
    np.testing.assert_array_equal(aligned_neighbour_tokens(train, ids, queries, PAD),
                                  neighbour_tokens(train, ids, PAD))
    assert (aligned_neighbour_tokens(train, ids, queries, PAD)[1, 0] == PAD).all()


def test_bad_input_is_named():
    train = fake_train([3], 4, vocab=10, seed=0)
    with pytest.raises(IndexError, match="out of range"):
        aligned_neighbour_tokens(train, np.array([[3]]), np.zeros((1, 4), int), PAD)
    with pytest.raises(ValueError, match="do not match"):
        aligned_neighbour_tokens(train, np.array([[0]]), np.zeros((1, 3), int), PAD)
    with pytest.raises(UserError, match="neighbour_alignment"):
        RetroConfig(neighbour_alignment="tokens")


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), min_match=st.floats(0.0, 1.0), vocab=st.sampled_from([3, 8, 1000]))
def test_min_match_drops_exactly_the_windows_below_it(seed, min_match, vocab):
    m = 8
    train = fake_train([4, 7, 3], m, vocab=vocab, seed=seed)
    rng = np.random.default_rng(seed)
    ids = rng.integers(-1, train.num_chunks, size=(5, 3))
    queries = rng.integers(0, vocab, size=(5, m))
    queries[0] = train.chunks[ids[0, 0]] if ids[0, 0] >= 0 else queries[0]  # one exact copy
    kept = aligned_neighbour_tokens(train, ids, queries, PAD)
    got = aligned_neighbour_tokens(train, ids, queries, PAD, min_match)
    score = match_scores(kept[..., :m], queries[:, None, :], PAD)            # (5, 3)
    weak = score < min_match * m * (m + 1) / 2
    np.testing.assert_array_equal(got[~weak], kept[~weak])
    assert (got[weak] == PAD).all()
    if ids[0, 0] >= 0 and (queries[0] != PAD).all():
        assert not weak[0, 0]                              # a copy matches fully: never dropped
    np.testing.assert_array_equal(aligned_neighbour_tokens(train, ids, queries, PAD, 0.0), kept)


def test_min_match_needs_content_alignment_and_a_share():
    assert RetroConfig(neighbour_alignment="content", neighbour_min_match=0.5).neighbour_min_match == 0.5
    with pytest.raises(UserError, match="needs model.neighbour_alignment: content"):
        RetroConfig(neighbour_min_match=0.5)
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(UserError, match="neighbour_min_match must be in"):
            RetroConfig(neighbour_alignment="content", neighbour_min_match=bad)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return tiny_db(tmp_path_factory.mktemp("align"))


@pytest.mark.parametrize("split", ["train", "val"])
def test_dataset_windows_are_slices_of_the_neighbour_s_document_at_least_as_close(db, split):
    """Through RetroDataset: every window is 2m consecutive tokens of its neighbour's document
    (pad past it), and matches its chunk at least as well as the stored window."""
    store = ChunkStore.open(db, split)
    train = ChunkStore.open(db, "train")
    stored = RetroDataset(store, split, k=K)
    aligned = RetroDataset(store, split, k=K, alignment="content")
    idx = list(range(len(stored)))
    a, s = aligned.get_batch(idx), stored.get_batch(idx)
    np.testing.assert_array_equal(a["tokens"], s["tokens"])
    m, pad = store.chunk_size, store.pad_id
    l = store.seq_len // m
    queries = s["tokens"][:, : l * m].reshape(len(idx), l, m)
    ids = np.asarray(store.neighbours[:])
    moved = 0
    for i, start in enumerate(store.seq_starts[:].tolist()):
        for u in range(l):
            for j in range(K):
                n = int(ids[start + u, j])
                win = document_windows(train, np.array([n]), pad)[0]
                q = queries[i, u]
                o = best_offsets(win[None], q[None], pad)[0]
                np.testing.assert_array_equal(a["neighbours"][i, u, j], win[m + o: 3 * m + o])
                score = [int(((win[m + x: 2 * m + x] == q) & (q != pad)) @ np.arange(1, m + 1))
                         for x in (o, 0)]
                assert score[0] >= score[1]
                moved += o != 0
    assert moved  # the tiny DB's near-duplicate texts do move some windows
    # min_match: each window is the aligned one or, where it matches by less, all pad
    strict = RetroDataset(store, split, k=K, alignment="content", min_match=0.4).get_batch(idx)["neighbours"]
    score = match_scores(a["neighbours"][..., :m], queries[:, :, None, :], pad)
    weak = score < 0.4 * m * (m + 1) / 2
    assert weak.any() and (~weak).any()
    np.testing.assert_array_equal(strict[~weak], a["neighbours"][~weak])
    assert (strict[weak] == pad).all()
    with pytest.raises(UserError, match="min_match needs alignment"):
        RetroDataset(store, split, k=K, min_match=0.4)


def test_a_run_trained_with_content_alignment_evaluates_with_it(db, tmp_path, capsys):
    """train.py with model.neighbour_alignment=content records it in the run; retro.evaluate
    reads the run's setting and scores the same windows (its own neighbours are not the stored ones)."""
    import json
    import sys

    import yaml

    from retro import evaluate
    from tests.fixtures.train_db import REPO, TRAIN_KEYS, write_train_config

    sys.path.insert(0, str(REPO))
    import train  # the script at the repository root

    config = write_train_config(tmp_path / "cfg.yaml", TRAIN_KEYS)
    run = tmp_path / "run"
    train.train(train.parse_args(["--config", str(config), "--db", str(db), "--out", str(run),
                                  "--set", "model.neighbour_alignment=content",
                                  "--set", "model.neighbour_min_match=0.2"]))
    model_cfg = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert model_cfg["neighbour_alignment"] == "content" and model_cfg["neighbour_min_match"] == 0.2
    capsys.readouterr()
    assert evaluate.main(["--run", str(run), "--db", str(db), "--split", "val", "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["bits_per_byte"] > 0 and got["bits_per_byte_no_retrieval"] > 0
