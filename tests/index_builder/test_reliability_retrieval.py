"""Chunks of only EOS and padding are never a neighbour, in knn and in the Retriever (issue 12)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from chunk_store import ChunkStore
from tests.fixtures import shared_db
from index_builder import Retriever
from index_builder.embed.stage import open_embeddings, read_rows
from index_builder.knn.stage import select_neighbours


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(1, 30), st.integers(0, 2**32 - 1))
def test_select_neighbours_never_keeps_a_chunk_without_content(q, c, n, seed):
    rng = np.random.default_rng(seed)
    cand = np.stack([rng.permutation(n)[: min(c, n)] for _ in range(q)])
    dist = np.sort(rng.random(cand.shape).astype(np.float32), axis=1)
    content = rng.random(n) < 0.6
    ids, d, short = select_neighbours(cand, dist, 3, content=content)
    kept = ids[ids >= 0]
    assert content[kept].all()
    for row, want in zip(ids, cand):  # the first 3 candidates with content, in order
        expect = [x for x in want if content[x]][:3]
        assert [x for x in row if x >= 0] == expect


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return shared_db(tmp_path_factory)


def test_knn_and_the_retriever_skip_eos_and_padding_chunks(db):
    store = ChunkStore.open(db, "train")
    content = store.content_mask()
    empty = np.flatnonzero(~content)
    assert len(empty), "the fixture corpus has documents ending on a chunk boundary"
    nb = np.asarray(store.neighbours)
    assert content[nb[nb >= 0]].all()
    retriever = Retriever.open(db)
    queries = read_rows(open_embeddings(db, "train"), int(empty[0]), int(empty[0]) + 1)
    ids, dists = retriever.search_embeddings(queries, k=4)
    assert (ids >= 0).all() and content[ids].all()
    for hits in retriever.search_text([" ", "\n\n", store.text(int(empty[0])) or " "], k=3):
        assert hits and all(content[h.chunk_id] and h.text.strip() for h in hits)
