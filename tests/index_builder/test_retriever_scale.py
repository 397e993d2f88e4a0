"""Retriever at scale (issue 24): open reads no per-chunk array, a query reads only its own rows
and answers exactly as the old full-array code did; searches run in parallel (no global lock) and
give the serial results; ``threads`` reaches the threads that search."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from index_builder import Retriever
from index_builder.knn.exclusion import search_with_exclusion
from index_builder.retriever import DEFAULT_EXTRA, _per_query_sets
from tests.fixtures import shared_db


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return shared_db(tmp_path_factory)


@pytest.fixture(scope="module")
def retriever(db):
    return Retriever.open(db)


class GuardedArray:
    """A chunk-store array that counts the rows read and refuses a whole-array read (what the old
    start-up did: ``np.asarray(store.doc_ids)``, the content mask's block scan)."""

    def __init__(self, arr: np.ndarray, reads: list[int]) -> None:
        self.arr, self.reads = arr, reads
        self.shape, self.ndim, self.dtype = arr.shape, arr.ndim, arr.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> Any:
        n = self.shape[0]
        if isinstance(key, slice):
            rows = len(range(*key.indices(n)))
            if n > 1 and rows >= n:
                raise AssertionError(f"a read of every row ({rows}) of a chunk-store array")
        elif isinstance(key, (int, np.integer)):
            rows = 1
        else:
            rows = int(np.asarray(key).size)
        self.reads.append(rows)
        return np.asarray(self.arr[key])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise AssertionError("the whole chunk-store array materialised")


def old_search(r: Retriever, docs: np.ndarray, content: np.ndarray, emb: np.ndarray, k: int,
               exclude: Any) -> tuple[np.ndarray, np.ndarray]:
    """The Retriever's search as it was before issue 24: whole doc-id and content arrays."""
    excl = _per_query_sets(exclude, emb.shape[0])
    if excl is None and content.all():
        ids, dists = r._search(emb, min(k, r.num_chunks))
        if ids.shape[1] < k:
            ids = np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1)
            dists = np.pad(dists, ((0, 0), (0, k - dists.shape[1])), constant_values=np.inf)
        dists[ids < 0] = np.inf
        return ids, dists
    return search_with_exclusion(r._search, emb, k, DEFAULT_EXTRA, r.num_chunks, db_docs=docs,
                                 exclude_docs=excl, content=content)


def random_queries(r: Retriever, n: int, seed: int) -> list[tuple[np.ndarray, int, Any]]:
    """(embeddings (1-3, dim), k, exclude_doc_ids): stored chunks' own embeddings plus noise, so
    queries land next to near-duplicates and their documents, and some exclusions bite."""
    from index_builder.embed.stage import open_embeddings, read_rows

    rng = np.random.default_rng(seed)
    shards = open_embeddings(r.db, "train")
    docs = np.asarray(r.store.doc_ids[np.arange(r.num_chunks)])
    out = []
    for _ in range(n):
        rows = rng.integers(0, r.num_chunks, size=int(rng.integers(1, 4)))
        emb = np.stack([read_rows(shards, int(i), int(i) + 1)[0] for i in rows]).astype(np.float32)
        emb += rng.normal(0, 0.05, emb.shape).astype(np.float32)
        kind = rng.integers(0, 3)
        exclude = None if kind == 0 else (
            [int(docs[rows[0]])] if kind == 1 else [[int(docs[i])] for i in rows])
        out.append((emb, int(rng.integers(1, 7)), exclude))
    return out


def test_open_reads_no_per_chunk_array_and_answers_as_before(db, retriever, monkeypatch):
    ref = retriever  # the reference: the old code's whole arrays beside the same index
    docs, content = np.asarray(ref.store.doc_ids), ref.store.content_mask()
    queries = random_queries(ref, 40, seed=0)
    expected = [old_search(ref, docs, content, e, k, x) for e, k, x in queries]

    import chunk_store.store as store_module

    reads: list[int] = []
    real_open = store_module.open_npy
    monkeypatch.setattr(store_module, "open_npy", lambda path: GuardedArray(real_open(path), reads))
    r = Retriever.open(db)
    assert isinstance(r.store.chunks, GuardedArray) and isinstance(r.store.doc_ids, GuardedArray)
    # at most a row a shard (ChunkStore reads each shard's last doc id): none a chunk
    assert sum(reads) <= len(r.store.shards), f"open read {sum(reads)} rows of the chunk arrays"
    for (emb, k, exclude), (ids_old, d_old) in zip(queries, expected):
        reads.clear()
        ids, dists = r.search_embeddings(emb, k, exclude_doc_ids=exclude)
        np.testing.assert_array_equal(ids, ids_old)
        np.testing.assert_array_equal(dists, d_old)
        # each query reads its candidates' rows (k + extra a row, more where it re-searches)
        assert 0 < sum(reads) <= 2 * emb.shape[0] * min(4096, r.num_chunks)
    row = r.neighbours_of(ids[0], dists[0])  # texts and doc ids of the returned chunks only
    assert [n.doc_id for n in row] == [int(docs[i]) for i in ids[0] if i >= 0]


def test_content_of_is_the_content_mask_at_those_ids(retriever):
    store = retriever.store
    mask = store.content_mask()
    rng = np.random.default_rng(1)
    for shape in [(0,), (5,), (3, 4), (2, 1, 7)]:
        ids = rng.integers(0, store.num_chunks, size=shape)
        np.testing.assert_array_equal(store.content_of(ids), mask[ids])
        np.testing.assert_array_equal(store.content_lookup()[ids], mask[ids])


def test_concurrent_queries_get_the_serial_results(retriever):
    """A property over random queries (k, exclusions, batch sizes): 8 threads at once give, per
    query, exactly what the same query gives alone; texts too (the embedder's own lock)."""
    queries = random_queries(retriever, 64, seed=2)
    serial = [retriever.search_embeddings(e, k, exclude_doc_ids=x) for e, k, x in queries]
    texts = [retriever.store.text(i) for i in range(0, retriever.num_chunks, max(1, retriever.num_chunks // 16))]
    serial_texts = [retriever.search_text(t, k=3) for t in texts]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(retriever.search_embeddings, e, k, exclude_doc_ids=x) for e, k, x in queries]
        text_futures = [pool.submit(retriever.search_text, t, 3) for t in texts]
        parallel = [f.result() for f in futures]
        parallel_texts = [f.result() for f in text_futures]
    for (ids, d), (pids, pd) in zip(serial, parallel):
        np.testing.assert_array_equal(ids, pids)
        np.testing.assert_array_equal(d, pd)
    assert parallel_texts == serial_texts


class MeetingIndex:
    """The index with a meeting point: the first search waits inside ``search`` until a second one
    has entered it too. Under a global lock the second can never enter and the first gives up."""

    def __init__(self, index: Any, patience_s: float = 60.0) -> None:
        self.index, self.patience_s = index, patience_s
        self.ntotal, self.d = index.ntotal, index.d
        self.entered = 0
        self.count_lock = threading.Lock()
        self.both_inside = threading.Event()

    def search(self, q: np.ndarray, k: int) -> Any:
        with self.count_lock:
            self.entered += 1
            first = self.entered == 1
        if first:
            if not self.both_inside.wait(self.patience_s):  # a deadlock guard, not a timing
                raise AssertionError("the second search never started while the first was inside")
        else:
            self.both_inside.set()
        return self.index.search(q, k)


def test_two_searches_overlap(db):
    r = Retriever.open(db)
    r.index = MeetingIndex(r.index)
    emb = np.random.default_rng(3).standard_normal((2, r.dim)).astype(np.float32)
    with ThreadPoolExecutor(2) as pool:
        results = [f.result() for f in [pool.submit(r.search_embeddings, emb[i:i + 1], 2) for i in range(2)]]
    assert r.index.entered >= 2 and all(ids.shape == (1, 2) for ids, _ in results)


def test_threads_reach_every_search_thread(db):
    """OpenMP's thread count is per thread: ``threads`` set in open must also hold in the threads
    retro-serve answers requests on (faiss's setting in the opening thread does not carry)."""
    import faiss
    import torch

    torch_before, faiss_before = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        r = Retriever.open(db, threads=3)
        seen: list[int] = []

        def search_then_look() -> None:
            r.search_embeddings(np.zeros((1, r.dim), dtype=np.float32), k=1)
            seen.append(faiss.omp_get_max_threads())

        t = threading.Thread(target=search_then_look)
        t.start()
        t.join()
        assert seen == [3]
    finally:
        torch.set_num_threads(torch_before)
        faiss.omp_set_num_threads(faiss_before)
