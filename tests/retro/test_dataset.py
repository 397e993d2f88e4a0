"""RetroDataset: slot u holds chunk u's neighbours with their continuations; tokens follow the
chunk stream; vectorised batches equal the per-item reference; worker processes agree."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from chunk_store import ChunkStore, DBError
from retro.dataset import RetroDataset, check_compatible, collate
from tests.fixtures.train_db import CHUNK, K, SEQ, tiny_db


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return tiny_db(tmp_path_factory.mktemp("ds"))


def reference_sample(store: ChunkStore, i: int, k: int,
                     train: ChunkStore | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loop-and-list reference straight from the DB format (docs/DB_FORMAT.md): the ChunkStore's
    chunks, doc_ids and neighbours arrays, none of RetroDataset's or neighbour_tokens' code."""
    train = train if train is not None else ChunkStore.open(store.db, "train")
    m, l = store.chunk_size, store.seq_len // store.chunk_size
    start = int(store.seq_starts[i])
    toks = []
    for c in range(start, start + l + 1):
        toks.extend(store.chunks[c].tolist() if c < store.num_chunks else [store.pad_id] * m)
    nbrs = np.full((l, k, 2 * m), store.pad_id, dtype=np.int64)
    for u in range(l):
        for j in range(k):
            n = int(store.neighbours[start + u, j])
            if n < 0:
                continue
            nbrs[u, j, :m] = train.chunks[n]
            if n + 1 < train.num_chunks and train.doc_ids[n + 1] == train.doc_ids[n]:
                nbrs[u, j, m:] = train.chunks[n + 1]
    return np.array(toks[: store.seq_len + 1]), nbrs


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_slot_u_holds_chunk_u_neighbours_and_continuations(db, data):
    split = data.draw(st.sampled_from(["train", "val"]))
    store = ChunkStore.open(db, split)
    ds = RetroDataset(store, split, k=K)
    idx = data.draw(st.lists(st.integers(0, len(ds) - 1), min_size=1, max_size=6))
    batch = ds.get_batch(idx)
    assert batch["tokens"].shape == (len(idx), SEQ + 1) and batch["tokens"].dtype == np.int64
    assert batch["neighbours"].shape == (len(idx), SEQ // CHUNK, K, 2 * CHUNK)
    for row, i in enumerate(idx):
        toks, nbrs = reference_sample(store, i, K)
        np.testing.assert_array_equal(batch["tokens"][row], toks)
        np.testing.assert_array_equal(batch["neighbours"][row], nbrs)


def test_last_sequence_target_past_the_end_is_pad(db):
    store = ChunkStore.open(db, "train")
    ds = RetroDataset(store, "train")
    last = len(ds) - 1
    end = int(store.seq_starts[last]) + SEQ // CHUNK
    expected = store.pad_id if end >= store.num_chunks else int(store.chunks[end, 0])
    assert ds[last]["tokens"][-1].item() == expected


def test_continuation_of_last_chunk_of_a_document_is_padding(db):
    store = ChunkStore.open(db, "train")
    ds = RetroDataset(store, "train")
    # find a sequence with a neighbour that is the last chunk of its document
    ids = ds.chunk_ids(np.arange(len(ds)))[:, :-1]
    nb = np.asarray(store.neighbours)[ids]  # (n, l, k)
    last_of_doc = np.append(store.doc_ids[1:] != store.doc_ids[:-1], True)
    hit = np.argwhere((nb >= 0) & last_of_doc[np.maximum(nb, 0)])
    assert len(hit), "the tiny DB should have such a neighbour"
    s, u, j = hit[0]
    out = ds[int(s)]["neighbours"][u, j]
    assert (out[CHUNK:] == store.pad_id).all()
    np.testing.assert_array_equal(out[:CHUNK].numpy(), store.chunks[nb[s, u, j]])


def test_dataloader_workers_match_main_process_and_pickle_is_small(db):
    ds = RetroDataset(db, "train", k=1)
    assert len(pickle.dumps(ds)) < 10_000  # a path, not the memmaps
    sampler = [[3, 1, 4], [15, 9, 2], [6, 5, 35]]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=collate)
    for idx, batch in zip(sampler, loader):
        ref = ds.get_batch(idx)
        assert torch.equal(batch["tokens"], torch.from_numpy(ref["tokens"]))
        assert torch.equal(batch["neighbours"], torch.from_numpy(ref["neighbours"]))
        assert batch["neighbours"].shape[2] == 1


def test_default_collate_path_stacks_items(db):
    store = ChunkStore.open(db, "val")
    ds = RetroDataset(store, "val")
    batch = collate([ds[0], ds[1]])
    for row in (0, 1):
        toks, nbrs = reference_sample(store, row, ds.k)
        assert torch.equal(batch["tokens"][row], torch.from_numpy(toks))
        assert torch.equal(batch["neighbours"][row], torch.from_numpy(nbrs))


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_item_matches_the_reference_both_pad_cases_included(db, split):
    """ds[i] (the per-item path) for every sequence equals the reference: slot u holds chunk u's
    neighbours, each followed by its continuation; pad for a missing neighbour (-1) and for the
    continuation of a document's last chunk. Both pad cases occur, so neither goes unchecked."""
    store, train = ChunkStore.open(db, split), ChunkStore.open(db, "train")
    ds = RetroDataset(store, split, k=K)
    missing = cut = 0
    for i in range(len(ds)):
        toks, nbrs = reference_sample(store, i, K, train)
        item = ds[i]
        np.testing.assert_array_equal(item["tokens"].numpy(), toks)
        np.testing.assert_array_equal(item["neighbours"].numpy(), nbrs)
        first, cont = nbrs[..., :CHUNK] == store.pad_id, nbrs[..., CHUNK:] == store.pad_id
        missing += int(first.all(-1).sum())
        cut += int((~first.all(-1) & cont.all(-1)).sum())
    assert missing and cut, (missing, cut)


def test_errors(db, tmp_path):
    with pytest.raises(DBError, match="asked for k=5"):
        RetroDataset(db, "train", k=5)
    with pytest.raises(DBError, match="val"):
        RetroDataset(ChunkStore.open(db, "train"), "val")
    no_knn = tiny_db(tmp_path, neighbours=False)
    with pytest.raises(DBError, match="no neighbours.*retro-build-index knn"):
        RetroDataset(no_knn, "train")
    assert len(RetroDataset(no_knn, "train", retrieval=False)[0]) == 1  # tokens only
    with pytest.raises(IndexError):
        RetroDataset(db, "val").get_batch([10**6])


def test_check_compatible_names_both_values(db):
    from retro.config import RetroConfig

    store = ChunkStore.open(db, "train")
    ok = RetroConfig(vocab_size=store.tokenizer.vocab_size, pad_id=store.pad_id, chunk_size=CHUNK)
    check_compatible(store, ok, SEQ)
    with pytest.raises(DBError, match=f"chunk_size={CHUNK} but the config has model.chunk_size=64"):
        check_compatible(store, RetroConfig(vocab_size=store.tokenizer.vocab_size, pad_id=store.pad_id), SEQ)
    with pytest.raises(DBError, match=f"seq_len={SEQ} but the config has seq_len=128"):
        check_compatible(store, ok, 128)
    with pytest.raises(DBError, match="vocab_size=512 but the config has model.vocab_size=600"):
        check_compatible(store, RetroConfig(vocab_size=600, pad_id=store.pad_id, chunk_size=CHUNK), SEQ)
