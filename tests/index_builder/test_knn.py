"""knn: exact torch search == faiss flat search; the exclusion keeps no self / same-document
neighbour; val neighbours point into train; kill -9 and resume gives the same arrays."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunk_store.layout import DBLayout
from chunk_store.manifest import load_manifest
from chunk_store.framework.stage import CRASH_ENV
from chunk_store.neighbour_shards import load_neighbours, write_neighbours
from index_builder.index.exact_search import ExactSearchConfig, exact_search
from index_builder.knn.stage import search_block, search_with_exclusion, select_neighbours, sequence_doc_ranges
from tests.fixtures import build_index_db, run_cli, shared_db, shared_tiny_bert


@settings(max_examples=25, deadline=None)
@given(nq=st.integers(1, 40), sizes=st.lists(st.integers(1, 70), min_size=1, max_size=3),
       d=st.integers(1, 12), k=st.integers(1, 12), tile=st.integers(1, 50),
       qb=st.integers(1, 17), seed=st.integers(0, 2**16))
def test_exact_search_equals_faiss_flat(nq, sizes, d, k, tile, qb, seed):
    rng = np.random.default_rng(seed)
    shards = [rng.standard_normal((n, d)).astype(np.float16) for n in sizes]
    q = rng.standard_normal((nq, d)).astype(np.float32)
    ids, dist = exact_search(q, shards, k, ExactSearchConfig(tile_rows=tile, query_block=qb))
    xb = np.concatenate(shards).astype(np.float32)
    index = faiss.IndexFlatL2(d)
    index.add(xb)
    ref_d, ref_i = index.search(q, k)
    n = xb.shape[0]
    assert ids.shape == dist.shape == (nq, k)
    np.testing.assert_allclose(dist[:, :min(k, n)], ref_d[:, :min(k, n)], rtol=1e-4, atol=1e-4)
    assert (ids[:, n:] == -1).all() and np.isinf(dist[:, n:]).all()
    # ids agree up to ties: every returned id's true distance equals the reported one
    got = ids[:, :min(k, n)]
    true = ((xb[got] - q[:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(true, dist[:, :min(k, n)], rtol=1e-4, atol=1e-4)
    assert all(len(set(r)) == len(r) for r in got.tolist())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 5), extra=st.integers(0, 6),
       n=st.integers(1, 60), ndocs=st.integers(1, 8))
def test_exclusion_matches_a_brute_force_reference(seed, k, extra, n, ndocs):
    rng = np.random.default_rng(seed)
    docs = np.sort(rng.integers(0, ndocs, n))
    xb = rng.standard_normal((n, 4)).astype(np.float32)
    qids = np.arange(n)

    def search(q, c):
        d = ((q[:, None, :] - xb[None]) ** 2).sum(-1)
        order = np.argsort(d, axis=1, kind="stable")[:, :c]
        return order.astype(np.int64), np.take_along_axis(d, order, 1).astype(np.float32)

    ids, dist = search_with_exclusion(search, xb, k, extra, n, query_ids=qids, query_docs=docs,
                                      db_docs=docs)
    full_i, _ = search(xb, n)
    for row in range(n):
        expect = [j for j in full_i[row] if j != row and docs[j] != docs[row]][:k]
        assert ids[row].tolist() == expect + [-1] * (k - len(expect))
        assert np.isinf(dist[row, len(expect):]).all()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 4), extra=st.integers(0, 6),
       doc_lens=st.lists(st.integers(1, 5), min_size=1, max_size=30), cps=st.integers(1, 6),
       offset=st.integers(0, 3))
def test_sequence_exclusion_matches_a_brute_force_reference(seed, k, extra, doc_lens, cps, offset):
    """Sequences cross many short documents: a train chunk's neighbours come from no document
    that has a chunk in its training sequence (per-row Python sets as the reference); chunks in
    no full sequence (before the first start or past the last) avoid their own document only."""
    rng = np.random.default_rng(seed)
    docs = np.repeat(np.arange(len(doc_lens)), doc_lens)
    n = len(docs)
    starts = np.arange(offset, n - cps + 1, cps) if n - offset >= cps else np.zeros(0, np.int64)
    xb = rng.standard_normal((n, 3)).astype(np.float32)

    def search(q, c):
        d = ((q[:, None, :] - xb[None]) ** 2).sum(-1)
        order = np.argsort(d, axis=1, kind="stable")[:, :c]
        return order.astype(np.int64), np.take_along_axis(d, order, 1).astype(np.float32)

    a = int(rng.integers(0, n))
    b = int(rng.integers(a + 1, n + 1))
    ids, dist = search_block(search, xb[a:b], k, extra, n, a, b, True, docs, docs, starts, cps)
    full_i, _ = search(xb[a:b], n)
    for row, chunk in enumerate(range(a, b)):
        banned = {int(docs[chunk])}
        for s in starts.tolist():
            if s <= chunk < s + cps:
                banned = {int(docs[j]) for j in range(s, s + cps)}
        expect = [j for j in full_i[row] if j != chunk and int(docs[j]) not in banned][:k]
        assert ids[row].tolist() == expect + [-1] * (k - len(expect))
        assert np.isinf(dist[row, len(expect):]).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 4), doc_lens=st.lists(st.integers(1, 6), min_size=1, max_size=25),
       cps=st.integers(1, 6), tile=st.integers(1, 40), qb=st.integers(1, 9))
def test_exact_search_with_exclusion_inside_equals_the_pipeline(seed, k, doc_lens, cps, tile, qb):
    """The tuner's exact reference: ranges and blank chunks masked inside one exact pass give the
    neighbours (distances) the knn pipeline keeps from exact search with widening re-searches."""
    from index_builder.knn.range_exclusion import chunk_ranges, doc_starts

    rng = np.random.default_rng(seed)
    docs = np.repeat(np.arange(len(doc_lens)), doc_lens)
    n = len(docs)
    starts = np.arange(0, n - cps + 1, cps)
    xb = rng.standard_normal((n, 3)).astype(np.float32)
    content = rng.random(n) > 0.2
    rows = np.arange(n)
    ranges = sequence_doc_ranges(docs, starts, cps, rows)
    _, got_d = exact_search(xb, [xb[: n // 2], xb[n // 2:]], k, ExactSearchConfig(tile_rows=tile, query_block=qb),
                            exclude=chunk_ranges(ranges, doc_starts(docs)), valid=content)
    _, ref_d = search_with_exclusion(lambda q, c: exact_search(q, [xb], c), xb, k, 2, n, query_ids=rows,
                                     db_docs=docs, doc_ranges=ranges, content=content)
    np.testing.assert_allclose(got_d, ref_d, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 3), extra=st.integers(0, 4),
       doc_lens=st.lists(st.integers(1, 8), min_size=2, max_size=20), cps=st.integers(1, 6),
       range_first=st.booleans(), ivf=st.booleans(), threads=st.sampled_from([1, 3]))
def test_range_search_plain_or_first_equals_a_brute_force_reference(seed, k, extra, doc_lens, cps, range_first, ivf,
                                                                    threads):
    """The knn stage's faiss range search (the excluded chunk range skipped inside faiss), used
    for the rows left short or, range-first, for every row: the same neighbours as the brute
    force reference (a flat index, or an IVF probing every list: no approximation; the IVF's
    rows scan lists preassigned by one quantizer search)."""
    from index_builder.knn.range_exclusion import chunk_ranges, doc_starts, faiss_range_search

    rng = np.random.default_rng(seed)
    docs = np.repeat(np.arange(len(doc_lens)), doc_lens)
    n = len(docs)
    starts = np.arange(0, n - cps + 1, cps)
    xb = rng.standard_normal((n, 4)).astype(np.float32)
    if ivf:
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(4), 4, 2)
        index.cp.min_points_per_centroid = 1
        index.train(np.concatenate([xb, xb + 1]))
        index.nprobe = 2
    else:
        index = faiss.IndexFlatL2(4)
    index.add(xb)
    rows = np.arange(n)
    ranges = sequence_doc_ranges(docs, starts, cps, rows)
    chunk_r = chunk_ranges(ranges, doc_starts(docs))
    ranged = faiss_range_search(index, threads)  # threads: ranges spread over a pool

    def search(q, c):
        d, i = index.search(q, c)
        return i.astype(np.int64), d

    ids, _ = search_with_exclusion(search, xb, k, extra, n, query_ids=rows, db_docs=docs, doc_ranges=ranges,
                                   row_search=lambda q, r, c: ranged(q, chunk_r[r], c), range_first=range_first)
    full = np.argsort(((xb[:, None, :] - xb[None]) ** 2).sum(-1), axis=1, kind="stable")
    for row in rows:
        expect = [j for j in full[row] if not ranges[row, 0] <= docs[j] <= ranges[row, 1]][:k]
        assert ids[row].tolist() == expect + [-1] * (k - len(expect))


def test_sequence_doc_ranges_by_hand():
    docs = np.array([0, 0, 1, 2, 2, 3, 4, 5])
    # sequences of 3 chunks at 0 and 3; chunks 6, 7 are past the last full sequence
    got = sequence_doc_ranges(docs, np.array([0, 3]), 3)
    assert got.tolist() == [[0, 1]] * 3 + [[2, 3]] * 3 + [[4, 4], [5, 5]]
    assert sequence_doc_ranges(docs, np.array([0, 3]), 3, rows=np.array([7, 1])).tolist() == [[5, 5], [0, 1]]


def test_select_neighbours_pads_and_excludes_doc_sets():
    cand = np.array([[5, 1, 7, -1], [2, 3, 4, 6]])
    dist = np.arange(8, dtype=np.float32).reshape(2, 4)
    db_docs = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    ids, d, short = select_neighbours(cand, dist, 3, exclude_docs=[{3}, {1, 2}], db_docs=db_docs)
    assert ids.tolist() == [[5, 1, -1], [6, -1, -1]]
    assert d[0, :2].tolist() == [0, 1] and np.isinf(d[0, 2]) and short.tolist() == [True, True]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return shared_db(tmp_path_factory)


def test_no_neighbour_shares_its_chunks_document_and_val_points_into_train(db):
    train_docs = np.load(DBLayout(db).shard(0).doc_ids("train"))
    nb, nd = load_neighbours(db, "train")
    n = len(train_docs)
    assert nb.shape == (n, 2) and nb.dtype == np.int64 and nd.dtype == np.float32
    valid = nb >= 0
    assert valid.mean() > 0.99
    assert not (nb == np.arange(n)[:, None]).any()
    assert not (train_docs[np.where(valid, nb, 0)] == train_docs[:, None])[valid].any()
    # no neighbour from any document of the chunk's training sequence (Megatron's rule)
    starts = np.load(DBLayout(db).shard(0).seq_starts("train"))
    cps = load_manifest(db)["seq_len"] // load_manifest(db)["chunk_size"]
    for s in starts.tolist():
        seq_docs = set(train_docs[s:s + cps].tolist())
        got = nb[s:s + cps][valid[s:s + cps]]
        assert not seq_docs.intersection(train_docs[got].tolist())
    assert (np.diff(nd, axis=1) >= -1e-5).all()
    vb = load_neighbours(db, "val")[0]
    assert vb.shape[0] == len(np.load(DBLayout(db).shard(0).doc_ids("val")))
    assert ((vb >= 0) & (vb < n)).all()
    m = load_manifest(db)
    assert m["stages"]["knn"]["finished"] and m["stages"]["knn"]["params"]["k"] == 2
    assert not (db / "train" / "knn_shards").exists()
    # the ChunkStore sees them
    from chunk_store import ChunkStore

    np.testing.assert_array_equal(ChunkStore.open(db, "val").neighbours, vb)


def test_exact_path_agrees_with_flat_index_and_kill9_resume(tmp_path, tmp_path_factory):
    """--exact and a Flat faiss index give the same neighbours; a knn run killed after two
    shards and re-run gives byte-identical arrays."""
    bert = shared_tiny_bert(tmp_path_factory)
    db = build_index_db(tmp_path / "db", bert, n_docs=16, shard_size=128, index_key="Flat",
                        stages=("embed", "index"))
    exact_db = tmp_path / "exact"
    shutil.copytree(db, exact_db)
    env = dict(os.environ, **{CRASH_ENV: "knn:2"})
    cmd = [sys.executable, "-m", "index_builder", "knn", "--db", str(db), "--shard-size", "128",
           "--device", "cpu", "--k", "3"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]
    assert len(list((db / "train" / "knn_shards").glob("ids_*.npy"))) == 2
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "2 shards reused" in p.stdout
    # several shards share one pass over the embeddings (as on a GPU)
    assert run_cli(["knn", "--db", exact_db, "--shard-size", 128, "--device", "cpu", "--k", 3,
                    "--exact", "--exact-pass-rows", 400]) == 0
    assert load_manifest(exact_db)["stages"]["knn"]["params"]["method"] == "exact"
    for split in ("train", "val"):
        a_i, a_d = load_neighbours(db, split)
        b_i, b_d = load_neighbours(exact_db, split)
        np.testing.assert_allclose(a_d, b_d, rtol=1e-4, atol=1e-5)
        # identical ids except where distances tie
        differ = a_i != b_i
        assert np.allclose(a_d[differ], b_d[differ], rtol=1e-4, atol=1e-5)
        assert differ.mean() < 0.2
    # resumed run equals an uninterrupted one
    again = tmp_path / "again"
    shutil.copytree(exact_db, again, ignore=shutil.ignore_patterns("neighbour*"))
    m = load_manifest(again)
    m["stages"].pop("knn")
    from chunk_store.manifest import save_manifest

    save_manifest(again, m)
    assert run_cli(["knn", "--db", again, "--shard-size", 128, "--device", "cpu", "--k", 3]) == 0
    for split in ("train", "val"):
        for got, want in zip(load_neighbours(again, split), load_neighbours(db, split)):
            np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, tmp_path_factory):
    """embed and knn under `torchrun --nproc_per_node 2` write the same bytes as one process."""
    from tests.fixtures import build_tiny_db

    bert = shared_tiny_bert(tmp_path_factory)
    one = build_tiny_db(tmp_path / "one", n_docs=20)
    two = tmp_path / "two"
    shutil.copytree(one, two)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "-m", "index_builder"]
    common = ["--shard-size", "150", "--device", "cpu"]
    for stage, extra in (("embed", ["--embedder", str(bert), "--tokenize-workers", "0"]),
                         ("index", ["--index-key", "Flat"]), ("knn", [])):
        sub = common if stage != "index" else []
        assert run_cli([stage, "--db", one, *sub, *extra]) == 0
        cmd = (torchrun if stage != "index" else [sys.executable, "-m", "index_builder"])
        p = subprocess.run([*cmd, stage, "--db", str(two), *sub, *extra], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
    assert load_manifest(two)["stages"]["knn"]["stats"]["world_size"] == 2
    for split in ("train", "val"):
        for f in sorted((one / split / "embeddings").glob("*.npy")):
            assert f.read_bytes() == (two / split / "embeddings" / f.name).read_bytes()
        for got, want in zip(load_neighbours(two, split), load_neighbours(one, split)):
            np.testing.assert_array_equal(got, want)


def test_a_db_built_under_the_own_document_rule_redoes_knn(db, tmp_path):
    """A knn record without ``exclusion`` (the older own-document rule) is not 'already done':
    knn runs again and leaves sequence-level neighbours."""
    from chunk_store.manifest import save_manifest

    old = tmp_path / "old"
    shutil.copytree(db, old)
    m = load_manifest(old)
    m["stages"]["knn"]["params"].pop("exclusion")
    save_manifest(old, m)
    ids, dists = load_neighbours(old, "train")
    write_neighbours(old, "train", np.zeros_like(ids), dists, shard_rows=len(ids))
    shard = load_manifest(old)["stages"]["knn"]["params"]["shard_size"]
    assert run_cli(["knn", "--db", old, "--device", "cpu", "--shard-size", shard]) == 0
    assert load_manifest(old)["stages"]["knn"]["params"]["exclusion"] == "sequence"
    np.testing.assert_array_equal(load_neighbours(old, "train")[0], load_neighbours(db, "train")[0])
