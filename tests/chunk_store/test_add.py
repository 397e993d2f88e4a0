"""A database made of shards: add equals a build of the union, duplicates stored once, many
ranks give the same documents, a killed add resumes, an old single-shard DB opens, the
manifest stays small."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunk_store import ChunkStore
from chunk_store.layout import SPLITS, DBLayout
from chunk_store.manifest import load_manifest, save_manifest
from chunk_store.sharded_array import ShardedArray
from chunk_store.framework.stage import CRASH_ENV
from chunk_store.neighbour_shards import load_neighbours
from tests.fixtures import full_manifest, random_text, write_corpus
from tests.fixtures.neighbour_ties import neighbour_vectors_by_text
from index_builder.cli import main as cli

ARGS = ["--chunk-size", "16", "--seq-len", "64", "--val-fraction", "0.25"]


def run_cli(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "index_builder", *argv], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300, start_new_session=True)


def contents(db: Path) -> dict[str, Counter]:
    """Per split: the multiset of document texts and of chunk rows (order-free)."""
    out = {}
    for split in SPLITS:
        store = ChunkStore.open(db, split)
        out[f"{split}_docs"] = Counter(store.doc_text(d) for d in range(store.num_docs))
        out[f"{split}_chunks"] = Counter(bytes(np.asarray(store.chunks[i]).tobytes()) for i in range(store.num_chunks))
    return out


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A, B (10 of its documents are copies of A's, under other names) and a tokenizer."""
    root = tmp_path_factory.mktemp("add")
    rng = random.Random(11)
    texts = [random_text(rng, rng.randint(1, 40)) for _ in range(50)]
    write_corpus(root / "a", texts[:30])
    write_corpus(root / "b", texts[20:50])
    tok_db = root / "tok"
    assert cli(["chunk", "--input", str(root / "a"), "--out", str(tok_db), "--vocab-size", "400", *ARGS]) == 0
    return root / "a", root / "b", tok_db / "tokenizer.model"


def test_add_equals_a_build_of_the_union(corpora, tmp_path: Path, capsys) -> None:
    a, b, tok = corpora
    grown, union = tmp_path / "grown", tmp_path / "union"
    assert cli(["chunk", "--input", str(a), "--out", str(grown), "--tokenizer", str(tok), *ARGS]) == 0
    assert cli(["add", "--db", str(grown), "--input", str(b)]) == 0
    assert "10 duplicate documents dropped" in capsys.readouterr().err
    assert cli(["chunk", "--input", str(a), "--input", str(b), "--out", str(union), "--tokenizer", str(tok),
                *ARGS]) == 0
    assert contents(grown) == contents(union)
    m = load_manifest(grown)
    assert [s["dir"] for s in m["shards"]] == ["shards/000000", "shards/000001"]
    def no_seqs(counts: dict) -> dict:  # sequences never cross a shard: their number may differ
        return {s: {k: v for k, v in c.items() if k != "seqs"} for s, c in counts.items()}

    assert no_seqs(m["counts"]) == no_seqs(load_manifest(union)["counts"])
    assert m["shards"][1]["duplicates"] == 10 == load_manifest(union)["shards"][0]["duplicates"]
    # the same add again: nothing new; a finished shard is never rewritten
    before = {p: p.stat().st_mtime_ns for p in (grown / "shards").rglob("*") if p.is_file()}
    assert cli(["add", "--db", str(grown), "--input", str(b)]) == 0
    assert "nothing new" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (grown / "shards").rglob("*") if p.is_file()} == before
    # --keep-duplicates stores them
    kept = tmp_path / "kept"
    assert cli(["chunk", "--input", str(a), "--input", str(b), "--out", str(kept), "--tokenizer", str(tok),
                "--keep-duplicates", *ARGS]) == 0
    total = sum(c["docs"] for c in load_manifest(kept)["counts"].values())
    assert total == sum(c["docs"] for c in m["counts"].values()) + 10


def test_a_store_of_many_shards_has_global_ids(corpora, tmp_path: Path) -> None:
    a, b, tok = corpora
    db = tmp_path / "db"
    assert cli(["chunk", "--input", str(a), "--out", str(db), "--tokenizer", str(tok), *ARGS]) == 0
    assert cli(["add", "--db", str(db), "--input", str(b)]) == 0
    for split in SPLITS:
        store = ChunkStore.open(db, split)
        shards = [DBLayout(db).shard(i) for i in range(2)]
        local = [np.load(s.chunks(split)) for s in shards]
        assert np.array_equal(np.asarray(store.chunks), np.concatenate(local))
        docs = np.asarray(store.doc_ids)
        assert np.all(np.diff(docs) >= 0) and docs[-1] == store.num_docs - 1
        per_seq = store.chunks_per_seq
        n0 = len(local[0])
        for s in np.asarray(store.seq_starts):  # a sequence never crosses a shard
            assert (s + per_seq <= n0) or s >= n0
        for d in range(store.num_docs):
            lo, hi = store.doc_chunk_range(d)
            assert np.all(docs[lo:hi] == d) and store.doc_source(d)["source"].endswith(".txt")
        ids = np.arange(store.num_chunks)
        assert np.array_equal(store.continuation_ids(ids)[:-1] >= 0, docs[1:] == docs[:-1])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=5), st.data())
def test_sharded_array_reads_as_its_concatenation(sizes: list[int], data) -> None:
    rng = np.random.default_rng(len(sizes))
    parts = [rng.integers(0, 100, size=(n, 3)) for n in sizes]
    add = data.draw(st.lists(st.integers(0, 50), min_size=len(sizes), max_size=len(sizes)))
    arr = ShardedArray(parts, add)
    ref = np.concatenate([p + a for p, a in zip(parts, add)])
    assert arr.shape == ref.shape and np.array_equal(np.asarray(arr), ref)
    if len(ref):
        idx = np.asarray(data.draw(st.lists(st.integers(-len(ref), len(ref) - 1), max_size=12)), dtype=np.int64)
        assert np.array_equal(arr[idx], ref[idx])
        assert np.array_equal(arr[idx.reshape(-1, 1)], ref[idx.reshape(-1, 1)]) if len(idx) else True
        lo, hi = sorted(data.draw(st.tuples(st.integers(0, len(ref)), st.integers(0, len(ref)))))
        assert np.array_equal(arr[lo:hi], ref[lo:hi]) and np.array_equal(arr[lo:hi, 1], ref[lo:hi, 1])
        i = data.draw(st.integers(-len(ref), len(ref) - 1))
        assert np.array_equal(arr[i], ref[i])
    with pytest.raises(IndexError):
        arr[len(ref)]


def test_a_killed_add_resumes_to_the_same_bytes(corpora, tmp_path: Path) -> None:
    a, b, tok = corpora
    ref, db = tmp_path / "ref", tmp_path / "db"
    for d in (ref, db):
        assert cli(["chunk", "--input", str(a), "--out", str(d), "--tokenizer", str(tok), *ARGS]) == 0
    assert cli(["add", "--db", str(ref), "--input", str(b)]) == 0
    for hook in ("add:1", "add:merge"):
        killed = run_cli(["add", "--db", str(db), "--input", str(b), "--unit-mb", "0.001", "--workers", "1"],
                         **{CRASH_ENV: hook})
        assert killed.returncode == -9, killed.stderr
    assert run_cli(["add", "--db", str(db), "--input", str(b), "--workers", "2"]).returncode == 0
    for split in SPLITS:
        for f in ("chunks", "doc_ids", "seq_starts", "documents"):
            path = getattr(DBLayout(db).shard(1), f)(split)
            assert path.read_bytes() == getattr(DBLayout(ref).shard(1), f)(split).read_bytes(), path
    assert load_manifest(db)["counts"] == load_manifest(ref)["counts"]
    assert not list(db.rglob(".*.tmp-*"))


def test_an_old_single_shard_db_opens_and_grows(corpora, tmp_path: Path) -> None:
    """The layout before shards: arrays in DB/<split>/, per-file records in the manifest."""
    a, b, tok = corpora
    db = tmp_path / "old"
    assert cli(["chunk", "--input", str(a), "--out", str(db), "--tokenizer", str(tok), *ARGS]) == 0
    before = contents(db)
    first = [ChunkStore.open(db, s).doc_text(0) for s in SPLITS]
    m = full_manifest(db)
    shard = DBLayout(db).shard(0)
    for split in SPLITS:
        shutil.move(shard.split(split), db / split)
    shutil.rmtree(db / "shards")
    for key in ("shards",):
        m.pop(key)
    m["stages"]["chunk"].pop("files")
    save_manifest(db, m)
    assert contents(db) == before
    assert cli(["add", "--db", str(db), "--input", str(b)]) == 0
    grown = load_manifest(db)
    assert [s["dir"] for s in grown["shards"]] == [".", "shards/000000"]
    assert sum(c["docs"] for c in grown["counts"].values()) == 60  # b's 10 copies of a: not deduplicated
    assert [ChunkStore.open(db, s).doc_text(0) for s in SPLITS] == first  # the old shard comes first
    after = contents(db)
    assert all(not before[k] - after[k] for k in before)  # nothing of the old shard is lost


def test_the_manifest_stays_small_with_10k_input_files(tmp_path: Path) -> None:
    src = tmp_path / "many"
    src.mkdir()
    for i in range(10_000):
        (src / f"f{i:05d}.txt").write_text(f"file number {i} says hello {i * 7}\n")
    db = tmp_path / "db"
    assert cli(["chunk", "--input", str(src), "--out", str(db), "--vocab-size", "300", "--workers", "2",
                *ARGS]) == 0
    size = DBLayout(db).manifest.stat().st_size
    assert size < 16_000, f"manifest is {size} bytes"
    assert len(full_manifest(db)["inputs"]) == 10_000


def test_one_and_two_torchrun_ranks_give_the_same_documents(corpora, tmp_path: Path) -> None:
    a, b, tok = corpora
    one, two = tmp_path / "one", tmp_path / "two"
    argv = ["--input", str(a), "--input", str(b), "--tokenizer", str(tok), "--unit-mb", "0.002", "--workers", "1",
            *ARGS]
    assert cli(["chunk", "--out", str(one), *argv]) == 0
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "-m", "index_builder", "chunk", "--out", str(two), *argv],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(load_manifest(two)["shards"]) == 2
    for split in SPLITS:
        s1, s2 = ChunkStore.open(one, split), ChunkStore.open(two, split)
        assert np.array_equal(np.asarray(s1.chunks), np.asarray(s2.chunks))  # the same order, too
        assert np.array_equal(np.asarray(s1.doc_ids), np.asarray(s2.doc_ids))
        assert [s1.doc_source(d) for d in range(s1.num_docs)] == [s2.doc_source(d) for d in range(s2.num_docs)]
    assert json.loads(json.dumps(full_manifest(one)["inputs"])) == full_manifest(two)["inputs"]


def _update(db: Path, bert: Path, *knn_extra: str) -> None:
    common = ["--db", str(db)]
    assert cli(["embed", *common, "--embedder", str(bert), "--shard-size", "200", "--tokenize-workers", "0",
                "--device", "cpu"]) == 0
    assert cli(["index", *common, "--index-key", "Flat", "--recall-sample", "100"]) == 0
    assert cli(["knn", *common, "--k", "2", "--shard-size", "200", "--device", "cpu", *knn_extra]) == 0


def test_add_then_update_every_stage(corpora, tmp_path: Path, tmp_path_factory, capsys) -> None:
    """embed embeds only the new chunks, index adds their vectors without training, knn searches
    only the new chunks (--refresh: all); val neighbours (no exclusion) then equal a build of the
    union's, with an exact index."""
    from tests.fixtures import shared_tiny_bert

    a, b, tok = corpora
    bert = shared_tiny_bert(tmp_path_factory)
    grown, union = tmp_path / "grown", tmp_path / "union"
    assert cli(["chunk", "--input", str(a), "--out", str(grown), "--tokenizer", str(tok), *ARGS]) == 0
    _update(grown, bert)
    old = {s: load_neighbours(grown, s)[0] for s in SPLITS}
    old_emb = np.load(DBLayout(grown).embedding_shard("train", 0))
    capsys.readouterr()
    assert cli(["add", "--db", str(grown), "--input", str(b)]) == 0
    _update(grown, bert)
    err = capsys.readouterr()
    assert "2 shards reused" in err.out  # embed: the full shards embedded before the add were kept
    m = load_manifest(grown)
    assert m["stages"]["index"]["stats"]["added_without_training"] == m["counts"]["train"]["chunks"] - len(old["train"])
    assert np.array_equal(np.load(DBLayout(grown).embedding_shard("train", 0))[: len(old_emb)], old_emb)
    for s in SPLITS:  # the rows found before the add are kept as they were
        new = load_neighbours(grown, s)[0]
        assert new.shape == (m["counts"][s]["chunks"], 2) and np.array_equal(new[: len(old[s])], old[s])
    assert cli(["chunk", "--input", str(a), "--input", str(b), "--out", str(union), "--tokenizer", str(tok),
                *ARGS]) == 0
    _update(union, bert)
    _update(grown, bert, "--refresh")
    assert neighbour_vectors_by_text(grown, "val") == neighbour_vectors_by_text(union, "val")  # up to twins


def test_all_on_a_built_database_adds_what_is_new(corpora, tmp_path: Path, tmp_path_factory) -> None:
    from tests.fixtures import shared_tiny_bert

    a, b, tok = corpora
    src = tmp_path / "src"
    shutil.copytree(a, src)
    db = tmp_path / "db"
    argv = ["all", "--input", str(src), "--out", str(db), "--tokenizer", str(tok), *ARGS,
            "--embedder", str(shared_tiny_bert(tmp_path_factory)), "--tokenize-workers", "0", "--device", "cpu",
            "--index-key", "Flat", "--recall-sample", "100", "--shard-size", "200"]
    assert cli(argv) == 0
    n0 = load_manifest(db)["counts"]["train"]["chunks"]
    shutil.copytree(b, src / "more")
    assert cli(argv) == 0
    m = load_manifest(db)
    assert len(m["shards"]) == 2 and m["stages"]["add"]["finished"] and m["shards"][1]["duplicates"] == 10
    n = m["counts"]["train"]["chunks"]
    assert n > n0 and m["stages"]["index"]["stats"]["ntotal"] == n
    assert ChunkStore.open(db, "train").neighbours.shape == (n, 2)
    assert cli(argv) == 0  # and then nothing is left to do
    assert load_manifest(db)["stages"]["add"]["finished"] == m["stages"]["add"]["finished"]


def test_the_dataset_and_the_retriever_read_a_grown_database(corpora, tmp_path: Path, tmp_path_factory) -> None:
    from tests.fixtures import shared_tiny_bert
    from index_builder import Retriever
    from retro.dataset import RetroDataset

    a, b, tok = corpora
    bert = shared_tiny_bert(tmp_path_factory)
    db = tmp_path / "db"
    assert cli(["chunk", "--input", str(a), "--out", str(db), "--tokenizer", str(tok), *ARGS]) == 0
    assert cli(["add", "--db", str(db), "--input", str(b)]) == 0
    _update(db, bert)
    store = ChunkStore.open(db, "train")
    ds = RetroDataset(store, k=2)
    last = ds[len(ds) - 1]  # a sequence of the second shard
    start = int(store.seq_starts[len(ds) - 1])
    assert start >= len(np.load(DBLayout(db).shard(0).chunks("train")))
    per = store.chunks_per_seq
    expect = np.asarray(store.chunks[start:start + per]).reshape(-1)
    assert np.array_equal(np.asarray(last["tokens"][:-1]), expect.astype(np.int64))
    nbr_ids = store.neighbours[start:start + per]
    assert np.array_equal(np.asarray(last["neighbours"]), store.neighbour_tokens(nbr_ids).astype(np.int64))
    query = store.text(store.num_chunks - 1)
    hit = Retriever.open(db, embedder=str(bert)).search_text([query], k=1)[0][0]
    assert hit.chunk_id == store.num_chunks - 1 and hit.text == query  # a chunk of the added shard


def test_only_rank_0_refuses_a_folder_without_a_manifest(corpora, tmp_path: Path, monkeypatch) -> None:
    """Under torchrun rank 0 creates the DB folder and writes the manifest while the other ranks
    start: a folder holding only rank 0's temporary manifest is no error for them."""
    from chunk_store.chunk.stage import ChunkConfig, ChunkStage
    from chunk_store.framework.errors import UserError

    a, _, tok = corpora
    db = tmp_path / "db"
    db.mkdir()
    (db / ".manifest.json.tmp-12345").write_text("{")
    cfg = ChunkConfig(inputs=(str(a),), tokenizer_file=str(tok), chunk_size=16, seq_len=64)
    monkeypatch.setenv("RANK", "1")
    assert ChunkStage(db, cfg).open_manifest()["stages"] == {}
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="not a retro database"):
        ChunkStage(db, cfg).open_manifest()
