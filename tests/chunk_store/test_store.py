"""ChunkStore: memmapped attributes, text, neighbour_tokens against a reference, errors."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunk_store.layout import DBLayout
from chunk_store import ChunkStore, DBError
from chunk_store.manifest import load_manifest, record_stage, save_manifest
from chunk_store.framework.atomic import atomic_save_npy
from tests.fixtures import build_tiny_db


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    return build_tiny_db(tmp_path_factory.mktemp("store") / "db", n_docs=30, seed=5)


@pytest.fixture(scope="module")
def stores(db: Path) -> tuple[ChunkStore, ChunkStore]:
    return ChunkStore.open(db, "train"), ChunkStore.open(db, "val")


def test_attributes(stores, db: Path) -> None:
    train, val = stores
    m = load_manifest(db)
    for s in (train, val):
        assert isinstance(s.chunks, np.memmap) and s.chunks.dtype == np.uint16
        assert s.chunks.shape == (s.num_chunks, s.chunk_size) == (m["counts"][s.split]["chunks"], 16)
        assert s.doc_ids.shape == (s.num_chunks,) and s.doc_ids.dtype == np.int64
        assert s.num_docs == int(s.doc_ids[-1]) + 1 == m["counts"][s.split]["docs"]
        assert np.all(np.diff(s.doc_ids) >= 0) and np.all(np.diff(s.doc_ids) <= 1)
        assert s.seq_len == 64 and (s.seq_starts == np.arange(s.num_chunks // 4) * 4).all()
        assert s.tokenizer.pad_id == s.pad_id == 3 and s.tokenizer.eos_id == 2
        assert s.neighbours is None and s.neighbour_distances is None
        assert s.db == db and s.manifest["chunk_size"] == 16
    assert train.num_docs + val.num_docs == 30


def test_text_is_the_decoded_chunk(stores) -> None:
    train, _ = stores
    for i in range(0, train.num_chunks, 7):
        assert train.text(i) == train.tokenizer.decode(train.chunks[i])
    with pytest.raises(IndexError):
        train.text(train.num_chunks)


def reference_neighbour_tokens(train: ChunkStore, ids: np.ndarray) -> np.ndarray:
    cs, pad = train.chunk_size, train.pad_id
    out = np.full((*ids.shape, 2 * cs), pad, dtype=np.int64)
    for idx in np.ndindex(ids.shape):
        c = int(ids[idx])
        if c < 0:
            continue
        out[idx][:cs] = train.chunks[c]
        if c + 1 < train.num_chunks and train.doc_ids[c + 1] == train.doc_ids[c]:
            out[idx][cs:] = train.chunks[c + 1]
    return out


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_neighbour_tokens_matches_reference(stores, data) -> None:
    train, val = stores
    shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    ids = np.array(data.draw(st.lists(st.integers(-1, train.num_chunks - 1),
                                      min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
                   dtype=np.int64).reshape(shape)
    ref = reference_neighbour_tokens(train, ids)
    for s in (train, val):  # val reads the *train* chunks: neighbours are train ids
        got = s.neighbour_tokens(ids)
        assert got.shape == (*shape, 2 * train.chunk_size)
        assert (got.astype(np.int64) == ref).all()


def test_neighbour_tokens_edges(stores) -> None:
    train, _ = stores
    last = train.num_chunks - 1  # the last chunk has no continuation
    got = train.neighbour_tokens(np.array([[last, -1]]))
    assert (got[0, 0, train.chunk_size:] == train.pad_id).all()
    assert (got[0, 1] == train.pad_id).all()
    with pytest.raises(IndexError):
        train.neighbour_tokens(np.array([train.num_chunks]))
    assert train.neighbour_tokens(np.zeros((0, 2), dtype=np.int64)).shape == (0, 2, 32)


def test_pickle_reopens_instead_of_copying(stores) -> None:
    _, val = stores
    blob = pickle.dumps(val)
    assert len(blob) < 1000
    again = pickle.loads(blob)
    assert (again.chunks == val.chunks).all() and again.split == "val"


def test_neighbours_after_knn(db: Path, tmp_path: Path) -> None:
    db2 = tmp_path / "db"
    shutil.copytree(db, db2)
    for split in ("train", "val"):
        n = ChunkStore.open(db2, split).num_chunks
        atomic_save_npy(db2 / split / "neighbours.npy", np.full((n, 2), -1, dtype=np.int64))
        atomic_save_npy(db2 / split / "neighbour_distances.npy", np.full((n, 2), np.inf, np.float32))
    record_stage(db2, "knn", params={"k": 2}, started="x", finished="y")
    s = ChunkStore.open(db2, "val")
    assert s.neighbours.shape == (s.num_chunks, 2) and s.neighbour_distances.dtype == np.float32


def test_errors_name_the_file(db: Path, tmp_path: Path) -> None:
    with pytest.raises(DBError, match="no database directory"):
        ChunkStore.open(tmp_path / "absent")
    with pytest.raises(DBError, match="unknown split"):
        ChunkStore.open(db, "test")

    broken = tmp_path / "broken"
    shutil.copytree(db, broken)
    DBLayout(broken).shard(0).doc_ids("val").unlink()
    with pytest.raises(DBError, match=r"missing file .*val/doc_ids\.npy"):
        ChunkStore.open(broken, "val")
    path = DBLayout(broken).shard(0).chunks("train")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DBError, match=r"corrupt array file .*train/chunks\.npy"):
        ChunkStore.open(broken, "train")
    (broken / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(DBError, match="tokenizer.model"):
        ChunkStore.open(broken, "train")
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(DBError, match="corrupt .*manifest.json"):
        ChunkStore.open(broken, "train")

    unfinished = tmp_path / "unfinished"
    shutil.copytree(db, unfinished)
    m = json.loads((unfinished / "manifest.json").read_text())
    m["stages"]["chunk"]["finished"] = None
    save_manifest(unfinished, m)
    with pytest.raises(DBError, match="no finished 'chunk' stage"):
        ChunkStore.open(unfinished)


def test_empty_val_split(tmp_path: Path) -> None:
    db = build_tiny_db(tmp_path / "db", n_docs=3, val_fraction=0.0)
    val = ChunkStore.open(db, "val")
    assert (val.num_docs, val.num_chunks, val.num_seqs) == (0, 0, 0)
    assert val.chunks.shape == (0, 16)
    train = ChunkStore.open(db, "train")
    assert val.neighbour_tokens(np.array([[0, -1]])).shape == (1, 2, 32)
    assert train.num_docs == 3


def test_doc_source_reads_one_line(stores, db: Path) -> None:
    train, _ = stores
    lines = DBLayout(db).shard(0).documents("train").read_text().splitlines()
    assert [train.doc_source(i) for i in range(train.num_docs)] == [json.loads(x) for x in lines]
    with pytest.raises(IndexError):
        train.doc_source(train.num_docs)


# ----------------------------------------------------------------------------- contents vs. the documents
# An independent reference: each source file read back from the corpus, normalised (BOM, CRLF), split
# by the documented sha256 rule, encoded with sentencepiece itself (not the store's wrapper), EOS
# appended and padded to whole chunks, in the order documents.jsonl lists them.


def reference_split(db: Path, split: str) -> tuple[list[str], list[np.ndarray]]:
    """(normalised texts, reference chunk rows) of the split's documents, from the source files."""
    import hashlib

    import sentencepiece as spm

    m = load_manifest(db)
    sp = spm.SentencePieceProcessor(model_proto=(db / "tokenizer.model").read_bytes())
    eos, pad, cs = sp.eos_id(), sp.pad_id(), int(m["chunk_size"])
    frac = float(m["stages"]["chunk"]["params"]["val_fraction"])
    texts, rows = [], []
    for line in DBLayout(db).shard(0).documents(split).read_text().splitlines():
        raw = Path(json.loads(line)["source"]).read_bytes().decode("utf-8")
        text = raw.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
        in_val = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") < frac * 2.0**64
        assert in_val == (split == "val"), line
        ids = sp.encode(text) + [eos]
        ids += [pad] * (-len(ids) % cs)
        texts.append(text)
        rows.append(np.array(ids, dtype=np.int64).reshape(-1, cs))
    return texts, rows


def test_every_source_file_is_one_document_of_one_split(stores, db: Path) -> None:
    corpus = db.parent / f"{db.name}-corpus"
    sources = sorted(json.loads(x)["source"] for s in ("train", "val")
                     for x in DBLayout(db).shard(0).documents(s).read_text().splitlines())
    assert sources == sorted(str(p) for p in corpus.rglob("*.txt"))
    train, val = stores
    assert 0 < val.num_docs < train.num_docs  # val_fraction 0.2 of 30 documents: both splits hold some


def test_chunks_reproduce_the_documents(stores, db: Path) -> None:
    for s in stores:
        texts, rows = reference_split(db, s.split)
        assert s.num_docs == len(texts)
        # every document's tokens in order, EOS, pad to its last chunk: the whole stream, row for row
        want = np.concatenate(rows) if rows else np.zeros((0, s.chunk_size), np.int64)
        assert np.array_equal(np.asarray(s.chunks).astype(np.int64), want)
        # a chunk never spans two documents: doc_ids name each row's document
        want_ids = np.concatenate([np.full(len(r), d) for d, r in enumerate(rows)]) if rows else []
        assert np.array_equal(np.asarray(s.doc_ids), want_ids)
        for d, (text, r) in enumerate(zip(texts, rows)):
            assert s.doc_chunk_range(d) == (int(want_ids.searchsorted(d)), int(want_ids.searchsorted(d)) + len(r))
            assert s.doc_text(d) == text
            # the document's last chunk holds its EOS, then only pad; no other chunk holds EOS or pad
            flat = np.asarray(s.chunks[slice(*s.doc_chunk_range(d))]).ravel()
            end = int(np.flatnonzero(flat == s.tokenizer.eos_id)[0])
            assert (flat[end + 1:] == s.pad_id).all() and len(flat) - end <= s.chunk_size
            assert s.pad_id not in flat[:end]
        # sequences: consecutive non-overlapping runs over the stream, the last partial run dropped
        cps = s.seq_len // s.chunk_size
        assert np.array_equal(np.asarray(s.seq_starts), np.arange(0, s.num_chunks - cps + 1, cps))


def test_chunk_text_is_a_piece_of_its_document(stores, db: Path) -> None:
    for s in stores:
        texts, _ = reference_split(db, s.split)
        for d, text in enumerate(texts):
            lo, hi = s.doc_chunk_range(d)
            pos, joined = 0, True  # joined: the previous chunk's text ended at pos
            for i in range(lo, hi):
                piece = s.text(i)
                if "\ufffd" in piece:  # a character cut by a chunk boundary (byte fallback): not a substring
                    joined = False
                    continue
                # a chunk's text is the document's text from where the previous chunk stopped
                # (sentencepiece drops the space a chunk's text begins with)
                piece = piece.lstrip(" ")
                found = text.find(piece, pos)
                assert found >= 0, (d, i, piece)
                assert not joined or text[pos:found].strip(" ") == "", (d, i, piece, text[pos:pos + 80])
                pos, joined = found + len(piece), True
