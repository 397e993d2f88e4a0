"""The chunk stage under a hostile user (issue 12): every failure found is reproduced here."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from chunk_store.layout import DBLayout
from chunk_store.manifest import load_manifest, save_manifest
from chunk_store.chunk.input_formats import iter_sample_text
from chunk_store.chunk.text_files import InputFile
from tests.fixtures import full_manifest, random_text, write_corpus
from index_builder.cli import main as cli
from tests.fixtures import chunk_argv


@pytest.fixture()
def small_corpus(tmp_path: Path) -> Path:
    rng = random.Random(3)
    write_corpus(tmp_path / "in", [random_text(rng, 30) for _ in range(12)])
    return tmp_path / "in"


def test_a_non_utf8_file_name_is_read_and_recorded_losslessly(small_corpus: Path, tmp_path: Path) -> None:
    name = b"bad\xffname.txt"
    Path(os.fsdecode(os.fsencode(small_corpus) + b"/" + name)).write_bytes(b"words from a file whose name is not UTF-8\n" * 30)
    db = tmp_path / "db"
    assert cli(chunk_argv(small_corpus, db)) == 0
    sources = [json.loads(line)["source"] for s in ("train", "val")
               for line in DBLayout(db).shard(0).documents(s).read_text().splitlines()]
    assert os.fsencode(small_corpus) + b"/" + name in [os.fsencode(p) for p in sources]
    assert cli(chunk_argv(small_corpus, db)) == 0  # and the re-run is a no-op


def test_an_unreadable_or_vanished_big_file_is_a_counted_skip(tmp_path: Path) -> None:
    gone = str(tmp_path / "gone.txt")  # listed by the walk, then deleted (or unreadable)
    skipped: list[dict] = []
    assert list(iter_sample_text([InputFile(gone, 5 << 20, 0)], 1 << 20, skipped=skipped)) == []
    assert [s["reason"] for s in skipped] == ["unreadable"]


def test_out_inside_the_input_folder_is_never_read_and_the_rerun_is_a_no_op(small_corpus: Path,
                                                                             capsys) -> None:
    db = small_corpus / "db"
    assert cli(chunk_argv(small_corpus, db)) == 0
    n_inputs = len(full_manifest(db)["inputs"])
    capsys.readouterr()
    assert cli(chunk_argv(small_corpus, db)) == 0
    assert "already done" in capsys.readouterr().err
    assert len(full_manifest(db)["inputs"]) == n_inputs == 12


def test_a_folder_of_only_binaries_says_no_text_up_front(tmp_path: Path, capsys) -> None:
    src = tmp_path / "bin"
    src.mkdir()
    for i in range(3):
        (src / f"b{i}.bin").write_bytes(bytes(range(256)) * 8)
    (src / "e.txt").write_text("   \n")
    assert cli(chunk_argv(src, tmp_path / "db")) == 2
    err = capsys.readouterr().err
    assert "no text found in the inputs (4 files skipped: binary 3, empty 1)" in err
    assert "Traceback" not in err and "sentencepiece" not in err.lower()
    assert not DBLayout(tmp_path / "db").manifest.exists()  # nothing was started


def test_a_file_unreadable_during_the_build_and_readable_later_is_a_change(small_corpus: Path,
                                                                           tmp_path: Path, capsys) -> None:
    db = tmp_path / "db"
    assert cli(chunk_argv(small_corpus, db)) == 0
    log = DBLayout(db).shard(0).inputs_log  # as the build records a file it could not read: no sha256
    records = [json.loads(line) for line in log.read_text().splitlines()]
    records[3]["sha256"] = None
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = load_manifest(db)  # the size the build would have recorded
    manifest["stages"]["chunk"]["files"][log.relative_to(db).as_posix()] = log.stat().st_size
    save_manifest(db, manifest)
    capsys.readouterr()
    assert cli(chunk_argv(small_corpus, db)) == 2
    assert "was unreadable and is readable now" in capsys.readouterr().err


def test_a_long_document_is_encoded_in_pieces_that_decode_to_the_same_text(tmp_path: Path) -> None:
    from chunk_store import ChunkStore
    from tests.fixtures import build_tiny_db

    tok = ChunkStore.open(build_tiny_db(tmp_path / "db", n_docs=10), "train").tokenizer
    rng = random.Random(5)
    text = "".join(random_text(rng, 20) for _ in range(20))
    assert tok.encode_array(text).tolist() == tok.encode(text)  # short: exactly encode()
    pieces = tok.encode_array(text, piece_chars=300)
    assert pieces.dtype == tok.token_dtype
    assert tok.decode(pieces) == tok.decode(tok.encode(text))
    one_line = "word " * 400  # no newline: cut after a space
    assert tok.decode(tok.encode_array(one_line, piece_chars=128)) == tok.decode(tok.encode(one_line))
