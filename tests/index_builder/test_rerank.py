"""Re-ranking a compressed index's candidates by true distance (index_builder.knn.rerank): the rule
that turns it on, the re-rank against brute force, the row reads, and the knn stage on a PQ
index reaching a recall target that the codes' own order cannot."""

from __future__ import annotations

import shutil

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunk_store.manifest import load_manifest
from chunk_store.neighbour_shards import load_neighbours
from index_builder.embed.stage import open_embeddings
from index_builder.knn.rerank import (FOUR_BIT_FACTOR, LOSSY_FACTOR, code_bytes, default_factor, pick_rows,
                                  release_pages, rerank, reranked, take_rows)
from tests.fixtures import clustered_db, float16_shards, run_cli


@pytest.mark.parametrize("key,factor", [("Flat", 1), ("HNSW16", 1), ("IVF8,SQ8", 1), ("IVF8_HNSW32,SQ8", 1),
                                        ("IVF8,SQfp16", 1), ("IVF8,PQ8x8np", LOSSY_FACTOR), ("PQ4", LOSSY_FACTOR),
                                        ("OPQ4_32,IVF8_HNSW32,PQ4x8np", LOSSY_FACTOR), ("IVF8,SQ4", LOSSY_FACTOR),
                                        ("OPQ4_32,IVF8_HNSW32,PQ4x4np", FOUR_BIT_FACTOR),
                                        ("IVF8,PQ8x4fs", FOUR_BIT_FACTOR)])
def test_default_factor_by_bytes_a_dimension(key, factor):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    index = faiss.index_factory(32, key)
    index.train(x)
    assert default_factor(index) == factor
    assert (code_bytes(index) < 32) == (factor > 1)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10 ** 6), q=st.integers(1, 40), n=st.integers(1, 60), c=st.integers(1, 8),
       cands=st.integers(1, 20), block=st.sampled_from([1, 3, 512]))
def test_rerank_keeps_the_truly_nearest_candidates(seed, q, n, c, cands, block):
    """Against brute force: per row, the c candidates of least true distance, sorted, -1 / inf
    for missing candidates; rows in blocks give the same result."""
    rng = np.random.default_rng(seed)
    db = rng.standard_normal((n, 5)).astype(np.float32)
    queries = rng.standard_normal((q, 5)).astype(np.float32)
    ids = rng.integers(-1, n, size=(q, cands))
    got_i, got_d = rerank(queries, ids, c, lambda u: db[u], block=block)
    assert got_i.shape == got_d.shape == (q, c)
    for r in range(q):
        valid = ids[r][ids[r] >= 0]
        true = np.sort(((db[valid] - queries[r]) ** 2).sum(-1))[:c]
        np.testing.assert_allclose(got_d[r][:len(true)], true, rtol=1e-5, atol=1e-6)
        assert np.isinf(got_d[r][len(true):]).all() and (got_i[r][len(true):] == -1).all()
        kept = got_i[r][:len(true)]
        np.testing.assert_allclose(((db[kept] - queries[r]) ** 2).sum(-1), got_d[r][:len(true)], rtol=1e-5,
                                   atol=1e-6)


def test_reranked_search_asks_for_factor_times_the_candidates():
    asked = []

    def search(q, c):
        asked.append(c)
        return np.tile(np.arange(c)[::-1], (len(q), 1)), np.zeros((len(q), c), np.float32)

    db = np.arange(10, dtype=np.float32)[:, None]  # row i at distance i^2 from the query 0
    ids, d = reranked(search, 4, lambda u: db[u], ntotal=10)(np.zeros((2, 1), np.float32), 2)
    assert asked == [8] and ids.tolist() == [[0, 1], [0, 1]] and d.tolist() == [[0, 1], [0, 1]]
    reranked(search, 4, lambda u: db[u], ntotal=10)(np.zeros((1, 1), np.float32), 3)
    assert asked[-1] == 10  # never past the index's size


def test_pick_rows_across_shards_and_release_pages(tmp_path):
    rng = np.random.default_rng(2)
    shards, whole = float16_shards(tmp_path, (300, 1, 500), 6, seed=2)
    for ids in (np.array([0]), np.array([299, 300, 301]), np.sort(rng.choice(801, 200, replace=False)),
                np.arange(801), rng.integers(0, 801, 500), np.array([800, 0, 300, 300, 299])):
        assert np.array_equal(pick_rows(shards, ids), whole[ids])  # any order, repeats
        assert np.array_equal(take_rows(shards, ids), whole[ids].astype(np.float16))
        assert np.array_equal(take_rows(shards[:1], ids[ids < 300]), whole[ids[ids < 300]].astype(np.float16))
    release_pages(shards)  # pages dropped from the process, the data still there
    assert np.array_equal(pick_rows(shards, np.array([5, 800])), whole[[5, 800]])
    for bad in ([801], [-1]):
        with pytest.raises(IndexError):
            pick_rows(shards, np.array(bad))
        with pytest.raises(IndexError):
            take_rows(shards[:1], np.array(bad) % 1000)


def test_knn_on_pq_codes_reaches_the_target_by_reranking(tmp_path):
    """A memory budget that leaves PQ codes (4-bit fast-scan codes, 2 bytes for 32 dims: the
    chooser's past its HNSW range): the index stage reports the
    recall the knn stage will see (re-ranked) beside the raw codes'; knn re-ranks by default
    and reaches recall@2 0.95 of its final neighbours, and its distances are the true ones;
    the same DB with --rerank 1 stays far below at every nprobe (the codes cannot order a
    document's near-duplicates)."""
    db = clustered_db(tmp_path / "db")
    assert run_cli(["index", "--db", db, "--hnsw-max", 0, "--max-index-memory", "60K",
                    "--recall-sample", 200, "--threads", 2]) == 0
    stats = load_manifest(db)["stages"]["index"]["stats"]
    assert "PQ4x4" in stats["index_key"] and stats["rerank"] == FOUR_BIT_FACTOR
    assert stats["recall"]["recall@2"] >= 0.95 > stats["recall"]["raw_recall@2"]
    codes_only = tmp_path / "codes_only"
    shutil.copytree(db, codes_only)
    assert run_cli(["knn", "--db", db, "--k", 2, "--device", "cpu", "--threads", 2]) == 0
    knn = load_manifest(db)["stages"]["knn"]["stats"]
    assert knn["rerank"] == FOUR_BIT_FACTOR and knn["recall"]["reached"] and knn["recall"]["recall@2"] >= 0.95
    assert knn["search"]["method"].endswith("(fast scan)")
    emb = np.concatenate(open_embeddings(db, "train")).astype(np.float32)
    ids, dist = load_neighbours(db, "train")
    true = np.where(ids >= 0, ((emb[np.clip(ids, 0, None)] - emb[:, None, :]) ** 2).sum(-1), np.inf)
    np.testing.assert_allclose(dist, true, rtol=1e-4, atol=1e-5)
    assert run_cli(["knn", "--db", codes_only, "--k", 2, "--device", "cpu", "--threads", 2, "--rerank", 1]) == 0
    plain = load_manifest(codes_only)["stages"]["knn"]["stats"]
    assert plain["rerank"] == 1 and not plain["recall"]["reached"]
    assert max(r for _, r in plain["tuning"]) < knn["recall"]["recall@2"] - 0.2
    # a re-run asking for another factor (or k) is refused, not mixed into the built neighbours;
    # --refresh recomputes every row with it
    assert run_cli(["knn", "--db", db, "--k", 2, "--device", "cpu", "--rerank", 2]) != 0
    assert run_cli(["knn", "--db", db, "--k", 3, "--device", "cpu", "--rerank", 2, "--refresh"]) == 0
    redone = load_manifest(db)["stages"]["knn"]
    assert redone["params"]["rerank"] == 2 and redone["stats"]["rerank"] == 2
    assert load_neighbours(db, "train")[0].shape == (len(emb), 3)


def test_retriever_reranks_pq_codes_as_knn_does(tmp_path, tmp_path_factory):
    """The lookup API on a PQ index: re-ranked by default (true, sorted distances, nearer than
    the codes' own order), the codes' order with rerank=1."""
    from index_builder import Retriever
    from tests.fixtures import shared_db

    db = tmp_path / "db"
    shutil.copytree(shared_db(tmp_path_factory), db)
    assert run_cli(["index", "--db", db, "--rebuild", "--hnsw-max", 0, "--max-index-memory", "1K",
                    "--recall-sample", 100]) == 0
    assert "PQ" in load_manifest(db)["stages"]["index"]["stats"]["index_key"]
    emb = np.concatenate(open_embeddings(db, "train")).astype(np.float32)
    q = emb[::7][:60]
    r = Retriever.open(db)
    assert r.rerank == LOSSY_FACTOR
    ids, dist = r.search_embeddings(q, k=3)
    true = ((emb[ids] - q[:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(dist, true, rtol=1e-4, atol=1e-5)
    assert (np.diff(dist, axis=1) >= 0).all()
    # no lock around the index: re-ranked searches from 8 threads at once (one thread letting the
    # mapped rows go while another reads them) give the serial results
    from concurrent.futures import ThreadPoolExecutor

    rows = [q[i:i + 1] for i in range(len(q))]
    serial = [r.search_embeddings(x, k=3) for x in rows]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda x: r.search_embeddings(x, k=3), rows))
    for (s_ids, s_d), (p_ids_, p_d) in zip(serial, parallel):
        np.testing.assert_array_equal(s_ids, p_ids_)
        np.testing.assert_array_equal(s_d, p_d)
    plain = Retriever.open(db, rerank=1)
    assert plain.rerank == 1
    p_ids, _ = plain.search_embeddings(q, k=3)
    p_true = ((emb[p_ids] - q[:, None, :]) ** 2).sum(-1)
    assert true.sum() <= p_true.sum() + 1e-5
    with pytest.raises(ValueError, match="rerank"):
        Retriever.open(db, rerank=0)


def test_retriever_searches_four_bit_codes_by_fast_scan(tmp_path, tmp_path_factory):
    """The key chooser's 4-bit codes (past --hnsw-max): the Retriever searches their fast-scan
    copy (index_builder.index.fast_scan), re-ranks 16x the candidates, and returns true, sorted
    distances."""
    import faiss

    from index_builder import Retriever
    from tests.fixtures import shared_db

    db = tmp_path / "db"
    shutil.copytree(shared_db(tmp_path_factory), db)
    assert run_cli(["index", "--db", db, "--rebuild", "--hnsw-max", 0, "--recall-sample", 100]) == 0
    assert "x4np" in load_manifest(db)["stages"]["index"]["stats"]["index_key"]
    emb = np.concatenate(open_embeddings(db, "train")).astype(np.float32)
    q = emb[::7][:60]
    r = Retriever.open(db)
    assert r.rerank == FOUR_BIT_FACTOR
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(r.index)), faiss.IndexIVFPQFastScan)
    ids, dist = r.search_embeddings(q, k=3)
    true = ((emb[ids] - q[:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(dist, true, rtol=1e-4, atol=1e-5)
    assert (np.diff(dist, axis=1) >= 0).all()


def _rss_file_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:")) / 1024


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux /proc")
def test_release_pages_lets_the_mapped_rows_go(tmp_path):
    """Rows read through the mapping count in the RSS until released (the knn stage releases
    after each shard, so its RSS does not grow with the embedding matrix)."""
    np.save(tmp_path / "e.npy", np.ones((64 * 1024, 512), dtype=np.float16))  # 64 MB
    shards = [np.load(tmp_path / "e.npy", mmap_mode="r")]
    before = _rss_file_mb()
    pick_rows(shards, np.arange(0, 64 * 1024, 2))  # touches every page
    assert _rss_file_mb() - before > 48
    release_pages(shards)
    assert _rss_file_mb() - before < 8


def test_load_index_drops_the_pq_table_and_searches_the_same(tmp_path):
    """faiss rebuilds an IVF-PQ's precomputed table on load (nlist x M x 256 floats: 805 MB at
    16M chunks); load_index frees it, and the search returns the same neighbours."""
    from chunk_store.layout import DBLayout
    from index_builder.index.stage import load_index

    rng = np.random.default_rng(0)
    x = rng.standard_normal((5000, 32)).astype(np.float32)
    index = faiss.index_factory(32, "IVF32,PQ8x8np")
    index.train(x)
    index.add(x)
    path = DBLayout(tmp_path).index
    path.parent.mkdir(parents=True)
    faiss.write_index(index, str(path))
    plain = faiss.read_index(str(path))
    assert faiss.downcast_index(faiss.extract_index_ivf(plain)).precomputed_table.size() > 0  # what faiss does
    loaded = load_index(tmp_path)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(loaded))
    assert ivf.precomputed_table.size() == 0 and ivf.use_precomputed_table == -1
    for i in (plain, loaded):
        faiss.extract_index_ivf(i).nprobe = 8
    assert np.array_equal(plain.search(x[:200], 5)[1], loaded.search(x[:200], 5)[1])
