"""index: autofaiss build over the shards, recall vs exact search in the manifest, the faiss
>= 1.14 OPQMatrix shim, memory-mapped loading, and the Spark path (marked)."""

from __future__ import annotations

import importlib.util
import shutil

import faiss
import numpy as np
import pytest

from chunk_store.manifest import DBError, load_manifest
from index_builder.index.recall import measure_recall, without_self
from index_builder.index.faiss_compat import _FaissWithOPQKeywords, patch_autofaiss_for_faiss_114
from index_builder.index.stage import load_index
from tests.fixtures import run_cli, shared_db



def embedded_db_copy(tmp_path, tmp_path_factory):
    """A copy of the shared DB with embeddings but no index or neighbours (stages popped)."""
    from chunk_store.manifest import save_manifest

    db = tmp_path / "db"
    shutil.copytree(shared_db(tmp_path_factory), db, ignore=shutil.ignore_patterns("index", "neighbour*"))
    m = load_manifest(db)
    m["stages"].pop("index")
    m["stages"].pop("knn")
    save_manifest(db, m)
    return db

def test_default_index_recall_is_recorded_and_high(tmp_path_factory):
    db = shared_db(tmp_path_factory)
    rec = load_manifest(db)["stages"]["index"]
    stats = rec["stats"]
    assert rec["finished"] and rec["params"]["metric"] == "l2"
    assert stats["ntotal"] == load_manifest(db)["counts"]["train"]["chunks"]
    assert stats["recall"]["recall@2"] >= 0.9
    index = load_index(db)
    # recall is re-measurable and agrees with the stored figure
    again = measure_recall(db, index, sample=200, seed=1)
    assert again["recall@2"] >= 0.9


def test_recall_counts_misses(tmp_path_factory):
    """A deliberately bad index (1-bit-ish PQ) must score below a Flat one: recall is measured."""
    db = shared_db(tmp_path_factory)
    shards = [np.load(f) for f in sorted((db / "train" / "embeddings").glob("*.npy"))]
    xb = np.concatenate(shards).astype(np.float32)
    bad = faiss.index_factory(xb.shape[1], "PQ2x4")
    bad.train(xb)
    bad.add(xb)
    flat = faiss.IndexFlatL2(xb.shape[1])
    flat.add(xb)
    r_bad = measure_recall(db, bad, sample=200)
    r_flat = measure_recall(db, flat, sample=200)
    assert r_flat["recall@10"] == 1.0 and r_bad["recall@10"] < 0.9


def test_recall_queries_do_not_find_themselves(tmp_path):
    """An index that returns each query's own row first and then junk scored recall@1 = 1 when a
    query could find itself; left out, that index scores what its junk is worth. (Distinct
    vectors: a duplicate of the query at distance 0 is a true neighbour, not itself.)"""
    db = tmp_path / "db"
    (db / "train" / "embeddings").mkdir(parents=True)
    xb = np.random.default_rng(0).standard_normal((400, 16)).astype(np.float16)
    np.save(db / "train" / "embeddings" / "000000.npy", xb[:250])
    np.save(db / "train" / "embeddings" / "000001.npy", xb[250:])
    xb = xb.astype(np.float32)
    flat = faiss.IndexFlatL2(xb.shape[1])
    flat.add(xb)

    class SelfThenFar:
        ntotal = flat.ntotal

        def search(self, q, k):
            d, i = flat.search(q, flat.ntotal)  # the query itself first, then the farthest rows
            return np.concatenate([d[:, :1], d[:, ::-1][:, :k - 1]], 1), np.concatenate([i[:, :1], i[:, ::-1][:, :k - 1]], 1)

    assert measure_recall(db, SelfThenFar(), sample=100)["recall@1"] < 0.1
    assert measure_recall(db, flat, sample=100)["recall@1"] == 1.0
    assert without_self(np.array([[5, 1, 2], [3, 4, 4]]), np.array([1, 9])).tolist() == [[5, 2, -1], [3, 4, 4]]


def test_opq_shim_builds_opq_indexes_when_faiss_rejects_keywords(monkeypatch):
    """Simulate faiss >= 1.14 (positional-only OPQMatrix) and build autofaiss's OPQ IP index."""
    from autofaiss.indices import index_factory as af

    real = faiss.OPQMatrix

    def positional_only(*args, **kwargs):
        if kwargs:
            raise TypeError("OPQMatrix() takes no keyword arguments")
        return real(*args)

    monkeypatch.setattr(faiss, "OPQMatrix", positional_only)
    monkeypatch.setattr(af, "faiss", faiss)
    with pytest.raises(TypeError):
        af.index_factory(32, "OPQ4_16,IVF4,PQ4x8", faiss.METRIC_INNER_PRODUCT)
    assert patch_autofaiss_for_faiss_114() is True
    assert isinstance(af.faiss, _FaissWithOPQKeywords)
    index = af.index_factory(32, "OPQ4_16,IVF4,PQ4x8", faiss.METRIC_INNER_PRODUCT)
    xb = np.random.default_rng(0).standard_normal((2000, 32)).astype(np.float32)
    index.train(xb)
    index.add(xb)
    assert index.ntotal == 2000 and index.search(xb[:3], 2)[1].shape == (3, 2)
    monkeypatch.setattr(af, "faiss", faiss)  # undo for the rest of the session
    monkeypatch.setattr(faiss, "OPQMatrix", real)
    assert patch_autofaiss_for_faiss_114() is False  # faiss 1.13 takes keywords: no shim needed


def test_memory_mappable_ivf_index_and_forced_key(tmp_path, tmp_path_factory):
    db = embedded_db_copy(tmp_path, tmp_path_factory)
    assert run_cli(["index", "--db", db, "--index-key", "IVF8,Flat", "--recall-sample", 200]) == 0
    stats = load_manifest(db)["stages"]["index"]["stats"]
    assert stats["index_key"] == "IVF8,Flat" and stats["recall"]["recall@2"] >= 0.5
    index = load_index(db, mmap=True)
    assert index.ntotal == stats["ntotal"]
    # other parameters on the same DB are refused, naming both values
    with pytest.raises(DBError, match=r"index_key.*'IVF8,Flat'.*'Flat'"):
        from index_builder.cli import build_parser

        args = build_parser().parse_args(["index", "--db", str(db), "--index-key", "Flat"])
        args.func(args)


def test_index_before_embed_is_a_one_line_error(tmp_path):
    from tests.fixtures import build_tiny_db

    db = build_tiny_db(tmp_path / "db", n_docs=4)
    with pytest.raises(DBError, match="needs the 'embed' stage first"):
        from index_builder.cli import build_parser

        args = build_parser().parse_args(["index", "--db", str(db)])
        args.func(args)


@pytest.mark.skipif(importlib.util.find_spec("pyspark") is not None, reason="pyspark installed")
def test_distributed_without_pyspark_says_how_to_install(tmp_path, tmp_path_factory):
    db = tmp_path / "db"
    shutil.copytree(shared_db(tmp_path_factory), db, ignore=shutil.ignore_patterns("index"))
    m = load_manifest(db)
    m["stages"].pop("index")
    from chunk_store.manifest import save_manifest

    save_manifest(db, m)
    with pytest.raises(DBError, match=r"pip install 'retro\[spark\]'"):
        from index_builder.cli import build_parser

        args = build_parser().parse_args(["index", "--db", str(db), "--distributed", "pyspark"])
        args.func(args)


@pytest.mark.spark
@pytest.mark.slow
def test_distributed_pyspark_local_mode(tmp_path, tmp_path_factory, monkeypatch):
    """autofaiss's Spark mode with a local[2] session (Java 17); same index contract."""
    import sys

    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)  # executors need this venv

    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]").appName("retro-index-test")
             .config("spark.driver.memory", "2g").config("spark.pyspark.python", sys.executable)
             .getOrCreate())
    try:
        db = embedded_db_copy(tmp_path, tmp_path_factory)
        assert run_cli(["index", "--db", db, "--distributed", "pyspark", "--recall-sample", 200]) == 0
        stats = load_manifest(db)["stages"]["index"]["stats"]
        assert stats["ntotal"] == load_manifest(db)["counts"]["train"]["chunks"]
        assert stats["recall"]["recall@2"] >= 0.9
        assert run_cli(["knn", "--db", db, "--device", "cpu"]) == 0
    finally:
        spark.stop()


def test_recall_queries_are_held_out_val_chunks(tmp_path):
    """An index that recognises its own vectors (exact neighbours for a stored vector, junk for
    any other) scored recall 1 when the queries were train chunks; with the val split embedded
    the queries are val chunks, not in the index, and it scores what it is worth on new text."""
    from index_builder.index.recall import recall_queries

    db = tmp_path / "db"
    rng = np.random.default_rng(0)
    for split, n in (("train", 500), ("val", 80)):
        (db / split / "embeddings").mkdir(parents=True)
        np.save(db / split / "embeddings" / "000000.npy", rng.standard_normal((n, 16)).astype(np.float16))
    xb = np.load(db / "train" / "embeddings" / "000000.npy").astype(np.float32)
    flat = faiss.IndexFlatL2(16)
    flat.add(xb)
    stored = {row.tobytes(): i for i, row in enumerate(xb)}

    class Memorising:
        ntotal = flat.ntotal

        def search(self, q, k):
            d, i = flat.search(q, k)
            junk = rng.integers(0, len(xb), i.shape)
            known = np.array([row.tobytes() in stored for row in q])[:, None]
            return d, np.where(known, i, junk)

    assert recall_queries(db, 50)[2] == "val" and recall_queries(db, 50)[1] is None
    assert measure_recall(db, Memorising(), sample=80)["recall@10"] < 0.2
    assert measure_recall(db, flat, sample=80)["recall@10"] == 1.0
    shutil.rmtree(db / "val")  # no val split: train queries, their own ids left out
    queries, ids, split = recall_queries(db, 50)
    assert split == "train" and len(ids) == 50 and np.array_equal(queries, xb[ids])
