"""Retriever: a chunk's own text finds it (real MiniLM, real corpus), the query path is the DB's
embedding function, doc exclusion, padding when k exceeds what is left, refused mismatches."""

from __future__ import annotations

import numpy as np
import pytest

from chunk_store.manifest import DBError
from index_builder import Neighbour, Retriever
from index_builder.embed.stage import open_embeddings, read_rows
from tests.fixtures import make_tiny_bert, shared_db, shared_minilm_db


@pytest.fixture(scope="module")
def minilm_db(tmp_path_factory):
    return shared_minilm_db(tmp_path_factory)


@pytest.fixture(scope="module")
def retriever(minilm_db):
    return Retriever.open(minilm_db, device="cpu")


def _distinct_chunks(store, n=12):
    texts = [store.text(i) for i in range(store.num_chunks)]
    counts = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    ids = [i for i, t in enumerate(texts) if counts[t] == 1 and len(t.strip()) > 40]
    rng = np.random.default_rng(0)
    return sorted(rng.choice(ids, size=min(n, len(ids)), replace=False).tolist())


def test_own_text_returns_own_chunk(retriever):
    store = retriever.store
    ids = _distinct_chunks(store)
    results = retriever.search_text([store.text(i) for i in ids], k=2)
    assert len(results) == len(ids)
    hits = 0
    for cid, row in zip(ids, results):
        assert len(row) == 2 and all(isinstance(n, Neighbour) for n in row)
        assert row[0].distance <= row[1].distance
        hits += row[0].chunk_id == cid
        top = row[0]
        assert top.doc_id == int(store.doc_ids[top.chunk_id]) and top.text == store.text(top.chunk_id)
        nxt = top.chunk_id + 1
        same = nxt < store.num_chunks and store.doc_ids[nxt] == store.doc_ids[top.chunk_id]
        assert top.continuation == (store.text(nxt) if same else "")
    assert hits >= len(ids) - 1  # re-tokenisation of decoded text may differ on rare whitespace


def test_query_embedding_is_the_database_function(retriever, minilm_db):
    """Embedding a chunk's text at query time gives its stored (float16) embedding."""
    store = retriever.store
    ids = _distinct_chunks(store, 6)
    q = retriever.embed([store.text(i) for i in ids])
    shards = open_embeddings(minilm_db, "train")
    stored = np.stack([read_rows(shards, i, i + 1)[0] for i in ids])
    cos = (q * stored).sum(1) / np.linalg.norm(q, axis=1) / np.linalg.norm(stored, axis=1)
    assert (cos > 0.999).all(), cos


def test_exclude_doc_ids_and_search_embeddings(retriever):
    store = retriever.store
    cid = _distinct_chunks(store, 1)[0]
    own_doc = int(store.doc_ids[cid])
    row = retriever.search_text(store.text(cid), k=5, exclude_doc_ids=[own_doc])[0]
    assert len(row) == 5 and all(n.doc_id != own_doc for n in row)
    # per-query exclusion sets
    rows = retriever.search_text([store.text(cid)] * 2, k=3, exclude_doc_ids=[[own_doc], []])
    assert all(n.doc_id != own_doc for n in rows[0]) and rows[1][0].chunk_id == cid
    emb = retriever.embed([store.text(cid)])
    ids, dist = retriever.search_embeddings(emb, k=3)
    assert ids.shape == dist.shape == (1, 3) and ids.dtype == np.int64 and ids[0, 0] == cid
    with pytest.raises(ValueError, match="shape"):
        retriever.search_embeddings(np.zeros((1, 7)), k=2)
    with pytest.raises(ValueError, match="k must be"):
        retriever.search_embeddings(emb, k=0)
    toks = retriever.neighbour_tokens([store.text(cid)], k=2)
    assert toks.shape == (1, 2, 2 * store.chunk_size)


def test_k_larger_than_what_is_left_pads(tmp_path_factory):
    db = shared_db(tmp_path_factory)
    r = Retriever.open(db)
    n = r.num_chunks
    docs = np.asarray(r.store.doc_ids)
    keep = int(docs[0])
    everything_else = sorted(set(docs.tolist()) - {keep})
    ids, dist = r.search_embeddings(np.zeros((1, r.dim)), k=n + 3)
    assert ids.shape == (1, n + 3) and (ids[0, n:] == -1).all() and np.isinf(dist[0, n:]).all()
    row = r.search_text("anything", k=10_000, exclude_doc_ids=everything_else)[0]
    assert {x.doc_id for x in row} == {keep} and len(row) == int((docs == keep).sum())


def test_wrong_embedder_is_refused(tmp_path, tmp_path_factory):
    other = make_tiny_bert(tmp_path / "other", hidden=32, seed=1)
    with pytest.raises(DBError, match="is not the one that embedded"):
        Retriever.open(shared_db(tmp_path_factory), embedder=str(other))
