"""add --retrieval-only: a retrieval database larger than the training data. The new documents
are retrievable (train split, embedded, indexed, found by knn) but training and validation data
stay byte for byte what they were; old rows see the new data after `knn --refresh`."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from chunk_store import ChunkStore
from chunk_store.layout import SPLITS
from chunk_store.manifest import load_manifest
from chunk_store.neighbour_shards import load_neighbours
from index_builder.cli import main as cli
from tests.fixtures import build_tiny_db, random_text, shared_tiny_bert, write_corpus
from tests.fixtures.neighbour_ties import neighbour_vectors


def snapshot(db: Path) -> dict[str, dict[str, np.ndarray]]:
    """What training and evaluation read: each split's sequences' chunks and documents, and val whole."""
    out = {}
    for split in SPLITS:
        s = ChunkStore.open(db, split)
        rows = (s.seq_starts[:, None] + np.arange(s.seq_len // s.chunk_size)).reshape(-1)
        out[split] = {"seq_starts": np.array(s.seq_starts), "seq_chunks": np.array(s.chunks[rows]),
                      "seq_docs": np.array(s.doc_ids[rows])}
        if split == "val":
            out[split].update(chunks=np.array(s.chunks), doc_ids=np.array(s.doc_ids))
    return out


@pytest.fixture
def db_and_extra(tmp_path: Path) -> tuple[Path, Path]:
    db = build_tiny_db(tmp_path / "db", n_docs=30, seed=3, val_fraction=0.3)
    val = ChunkStore.open(db, "val")
    rng = random.Random(11)
    # near-copies of every val document (not exact: exact copies are dropped as duplicates) and
    # new text: what a large retrieval corpus holds
    texts = [val.tokenizer.decode(val.chunks[val.doc_ids == d].reshape(-1)) + "\nmore text\n"
             for d in np.unique(val.doc_ids)]
    texts += [random_text(rng) for _ in range(20)]
    extra = tmp_path / "extra"
    write_corpus(extra, texts)
    return db, extra


def test_training_and_validation_data_stay_byte_for_byte(db_and_extra) -> None:
    db, extra = db_and_extra
    before = snapshot(db)
    n_before = {s: ChunkStore.open(db, s).num_chunks for s in SPLITS}
    assert cli(["add", "--db", str(db), "--input", str(extra), "--retrieval-only"]) == 0
    after = snapshot(db)
    for split in SPLITS:
        for key, arr in before[split].items():
            assert np.array_equal(arr, after[split][key]), (split, key)
    train = ChunkStore.open(db, "train")
    assert train.num_chunks > n_before["train"]  # the new chunks are in the retrievable split
    assert ChunkStore.open(db, "val").num_chunks == n_before["val"]  # and none in val
    m = load_manifest(db)
    rec = m["shards"][-1]
    assert rec["retrieval_only"] is True and rec["counts"]["train"]["seqs"] == 0
    assert rec["counts"]["val"] == {"docs": 0, "chunks": 0, "tokens": 0, "seqs": 0}
    assert m["stages"]["add"]["params"]["retrieval_only"] is True
    assert not any(r.get("retrieval_only") for r in m["shards"][:-1])
    # the new documents' chunks start no sequence
    assert np.asarray(train.seq_starts).max() < n_before["train"]


def test_val_chunks_retrieve_the_retrieval_only_data_after_refresh(db_and_extra, tmp_path_factory) -> None:
    db, extra = db_and_extra
    bert = shared_tiny_bert(tmp_path_factory)
    stages = [["embed", "--db", str(db), "--embedder", str(bert), "--shard-size", "256", "--tokenize-workers", "0",
               "--device", "cpu"], ["index", "--db", str(db), "--index-key", "Flat", "--recall-sample", "100"],
              ["knn", "--db", str(db), "--k", "2", "--shard-size", "256", "--device", "cpu"]]
    for argv in stages:
        assert cli(argv) == 0
    n_old = ChunkStore.open(db, "train").num_chunks
    assert cli(["add", "--db", str(db), "--input", str(extra), "--retrieval-only"]) == 0
    for argv in stages[:2] + [stages[2] + ["--refresh"]]:
        assert cli(argv) == 0
    val = ChunkStore.open(db, "val")
    nb = np.asarray(val.neighbours)
    assert nb.shape[0] == val.num_chunks
    # the near-copies of each val document are the nearest chunks for most val chunks
    assert (nb[:, 0] >= n_old).mean() > 0.5
    train = ChunkStore.open(db, "train")
    assert np.asarray(train.neighbours).shape[0] == train.num_chunks  # every retrievable chunk has its row


def test_retrieval_only_refuses_keep_duplicates(db_and_extra, capsys) -> None:
    db, extra = db_and_extra
    assert cli(["add", "--db", str(db), "--input", str(extra), "--retrieval-only", "--keep-duplicates"]) == 2
    assert "validation document" in capsys.readouterr().err
    assert "add" not in load_manifest(db)["stages"]


def test_knn_leaves_retrieval_only_rows_unsearched_and_every_other_row_as_a_full_search(
        db_and_extra, tmp_path, tmp_path_factory, monkeypatch) -> None:
    """No sequence reads a retrieval-only chunk's neighbours, so knn does not search them (its cost
    stays with the data that trains); every row that is read gets exactly what a full search gives."""
    import shutil

    import index_builder.knn.stage as knn_stage

    db, extra = db_and_extra
    bert = shared_tiny_bert(tmp_path_factory)
    assert cli(["add", "--db", str(db), "--input", str(extra), "--retrieval-only"]) == 0
    for argv in (["embed", "--db", str(db), "--embedder", str(bert), "--shard-size", "256",
                  "--tokenize-workers", "0", "--device", "cpu"],
                 ["index", "--db", str(db), "--index-key", "Flat", "--recall-sample", "100"]):
        assert cli(argv) == 0
    full = tmp_path / "full"
    shutil.copytree(db, full)
    knn = ["--k", "2", "--shard-size", "100", "--device", "cpu"]
    assert cli(["knn", "--db", str(db), *knn]) == 0
    with monkeypatch.context() as m:  # the reference: every row searched
        m.setattr(knn_stage, "retrieval_only_ranges", lambda manifest, split: [])
        assert cli(["knn", "--db", str(full), *knn]) == 0
    n_old = int(load_manifest(db)["shards"][0]["counts"]["train"]["chunks"])
    got, ref = ChunkStore.open(db, "train"), ChunkStore.open(full, "train")
    nb, nb_ref = np.asarray(got.neighbours), np.asarray(ref.neighbours)
    assert neighbour_vectors(db, "train", n_old) == neighbour_vectors(full, "train", n_old)  # up to twins
    assert (nb[n_old:] == -1).all() and (nb_ref[n_old:] >= 0).any()
    dist = load_neighbours(db, "train")[1]
    assert np.isinf(dist[n_old:]).all()
    assert neighbour_vectors(db, "val") == neighbour_vectors(full, "val")
    stats = load_manifest(db)["stages"]["knn"]["stats"]
    assert stats["rows_not_searched"] == {"train": got.num_chunks - n_old}


def test_searched_runs_is_the_complement_of_the_unread_ranges() -> None:
    from chunk_store.shards import searched_runs

    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 60))
        cuts = np.sort(rng.choice(np.arange(n + 1), size=min(2 * int(rng.integers(0, 4)), 2 * ((n + 1) // 2)), replace=False))
        unread = [(int(lo), int(hi)) for lo, hi in cuts.reshape(-1, 2) if hi > lo]
        a = int(rng.integers(0, n))
        b = int(rng.integers(a + 1, n + 1))
        mask = np.zeros(n, dtype=bool)
        for lo, hi in unread:
            mask[lo:hi] = True
        want = np.flatnonzero(~mask[a:b]) + a
        runs = searched_runs(a, b, unread)
        got = np.concatenate([np.arange(lo, hi) for lo, hi in runs]) if runs else np.zeros(0, int)
        assert np.array_equal(got, want)
        assert all(hi > lo for lo, hi in runs)
