"""The chunk stage: packing, decoding rules, hostile folders, determinism, resume, splits."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunk_store import ChunkStore
from chunk_store.layout import CHUNK_WORK_DIR as WORK_DIR
from chunk_store.chunk.packing import is_val, sequence_starts
from chunk_store.chunk.part_files import pack_documents
from chunk_store.framework.stage import CRASH_ENV
from chunk_store.manifest import load_manifest
from tests.fixtures import chunk_argv, full_manifest, outputs, random_text, sigint_default, write_corpus
from chunk_store.chunk.input_formats import TextStream
from chunk_store.chunk.text_files import decode_bytes, split_jsonl
from index_builder.cli import main as cli



@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(7)
    write_corpus(root, [random_text(rng, rng.randint(1, 80)) for _ in range(60)])
    return root


@pytest.fixture(scope="module")
def reference_db(corpus: Path, tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("ref") / "db"
    assert cli(chunk_argv(corpus, db, "--workers", "1")) == 0
    return db


# ----------------------------------------------------------------------------- pure helpers


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(4, 65535), max_size=40), max_size=12), st.integers(1, 9),
       st.sampled_from([np.uint16, np.int32]))
def test_pack_documents_property(docs: list[list[int]], cs: int, dtype) -> None:
    chunks, doc_chunks = pack_documents(docs, cs, pad_id=3, eos_id=2, dtype=np.dtype(dtype))
    assert chunks.shape == (int(doc_chunks.sum()), cs) and chunks.dtype == dtype
    row = 0
    for doc, n in zip(docs, doc_chunks):
        assert n == -(-(len(doc) + 1) // cs)  # EOS included, whole chunks, never across docs
        flat = chunks[row:row + n].reshape(-1)
        assert flat[:len(doc)].tolist() == doc and flat[len(doc)] == 2
        assert (flat[len(doc) + 1:] == 3).all()
        row += n


@given(st.integers(0, 500), st.integers(1, 40))
def test_sequence_starts(num_chunks: int, per_seq: int) -> None:
    s = sequence_starts(num_chunks, per_seq)
    assert len(s) == num_chunks // per_seq
    assert (s == np.arange(len(s)) * per_seq).all()
    assert len(s) == 0 or s[-1] + per_seq <= num_chunks


def test_decode_rules() -> None:
    assert decode_bytes(b"\xef\xbb\xbfa\r\nb\rc\n").text == "a\nb\nc\n"
    assert decode_bytes(b"").reason == "empty"
    assert decode_bytes(b" \n\t\n").reason == "empty"
    assert decode_bytes(b"abc\x00def").reason == "binary"
    few = decode_bytes(b"caf\xe9 " + b"x" * 400)
    assert few.text == "caf\ufffd " + "x" * 400 and few.invalid_bytes == 1
    assert decode_bytes("é".encode("latin-1") * 50).reason == "undecodable"


def test_val_hash_is_stable_and_proportional() -> None:
    assert is_val("hello", 0.0) is False
    assert is_val("hello", 0.999999) is True
    frac = np.mean([is_val(f"document {i}", 0.3) for i in range(4000)])
    assert 0.27 < frac < 0.33


# ----------------------------------------------------------------------------- a hostile folder


def test_hostile_folder(tmp_path: Path, capsys) -> None:
    src = tmp_path / "in"
    (src / "ok" / "nested" / "deeper").mkdir(parents=True)
    (src / ".hidden").mkdir()
    files = {
        "ok/a.txt": b"plain ascii text\n",
        "ok/nested/deeper/b.md": "# Title\n\n\tindented 世界 😀\n".encode(),
        "bom.txt": b"\xef\xbb\xbfhello\r\nworld\r\n",
        "crlf.rst": b"line one\r\nline two\r\n",
        "latin1.txt": b"caf\xe9 au lait " + b"words and more words " * 40,
        "latin1_heavy.txt": "éèàü".encode("latin-1") * 100,
        "binary.bin": bytes(range(256)) * 8,
        "nul.txt": b"text\x00with nul\n",
        "empty.txt": b"",
        "blank.txt": b"  \n\n\t\n",
        "big_line.txt": b" ".join(b"w%d" % (i % 977) for i in range(500_000)),  # ~2.9 MB, one line
        "data.jsonl": b'{"text": "doc one"}\n{"text": ""}\nnot json\n{"no_text": 1}\n'
                      b'{"text": "doc two \\u65e5\\u672c\\r\\nend"}\n',
        ".hidden/secret.txt": b"never read\n",
        ".dotfile": b"never read\n",
    }
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    os.symlink("..", src / "ok" / "loop")  # a symlink loop
    os.symlink("nowhere", src / "dangling")

    db = tmp_path / "db"
    assert cli(chunk_argv(src, db, "--val-fraction", "0.5", "--workers", "2", "--unit-mb", "0.0001")) == 0
    err = capsys.readouterr().err
    summary = [line for line in err.splitlines() if line.startswith("chunk: ")][-1]
    assert "8 documents" in summary

    m = full_manifest(db)
    reasons: dict[str, int] = {}
    for s in m["skipped"]:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    assert reasons == {"empty": 3, "binary": 2, "undecodable": 1, "symlink_loop": 1,
                       "broken_symlink": 1, "jsonl_bad_line": 1, "missing_text_field": 1}
    assert m["stages"]["chunk"]["stats"]["skipped"] == reasons
    assert [r["path"].endswith("latin1.txt") for r in m["repaired"]] == [True]
    assert not any("hidden" in i["path"] or "dotfile" in i["path"] for i in m["inputs"])
    assert all(len(i["sha256"]) == 64 for i in m["inputs"])

    expected = {
        ("ok/a.txt", None): "plain ascii text\n",
        ("ok/nested/deeper/b.md", None): "# Title\n\n\tindented 世界 😀\n",
        ("bom.txt", None): "hello\nworld\n",
        ("crlf.rst", None): "line one\nline two\n",
        ("latin1.txt", None): "caf\ufffd au lait " + "words and more words " * 40,
        ("big_line.txt", None): files["big_line.txt"].decode(),
        ("data.jsonl", 1): "doc one",
        ("data.jsonl", 5): "doc two 日本\nend",
    }
    got = {}
    for split in ("train", "val"):
        store = ChunkStore.open(db, split)
        for d in range(store.num_docs):
            s = store.doc_source(d)
            got[(os.path.relpath(s["source"], src.resolve()), s.get("line"))] = store.doc_text(d)
    assert got == expected
    assert m["counts"]["train"]["docs"] + m["counts"]["val"]["docs"] == 8


# ----------------------------------------------------------------------------- round trip, determinism


def test_every_document_round_trips(reference_db: Path, corpus: Path) -> None:
    n = 0
    for split in ("train", "val"):
        store = ChunkStore.open(reference_db, split)
        assert store.doc_ids.tolist() == sorted(store.doc_ids.tolist())
        for d in range(store.num_docs):
            source = Path(store.doc_source(d)["source"])
            assert store.doc_text(d) == source.read_text(encoding="utf-8")
            lo, hi = store.doc_chunk_range(d)
            assert store.chunks[hi - 1, -1] == store.pad_id or \
                store.chunks[hi - 1, -1] == store.tokenizer.eos_id  # last chunk ends the doc
            n += 1
    assert n == 60


def test_workers_and_units_do_not_change_the_result(reference_db: Path, corpus: Path, tmp_path: Path) -> None:
    db = tmp_path / "db2"
    assert cli(chunk_argv(corpus, db, "--workers", "2", "--unit-mb", "0.002")) == 0
    assert outputs(db) == outputs(reference_db)
    assert not (db / WORK_DIR).exists()


def run_cli(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    # a session of its own: the Ctrl-C hook signals the whole process group, as a terminal does
    return subprocess.run([sys.executable, "-m", "index_builder", *argv], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120, start_new_session=True,
                          preexec_fn=sigint_default)


@pytest.mark.parametrize("hook", ["chunk:3", "chunk:merge"])
def test_kill_9_and_resume_is_byte_identical(hook: str, reference_db: Path, corpus: Path,
                                              tmp_path: Path) -> None:
    db = tmp_path / "db"
    argv = chunk_argv(corpus, db, "--workers", "2", "--unit-mb", "0.002")
    killed = run_cli(argv, **{CRASH_ENV: hook})
    assert killed.returncode == -9, killed.stderr
    m = load_manifest(db)
    assert m["stages"]["chunk"]["finished"] is None
    parts = sorted((db / WORK_DIR).glob("part_*"))
    assert len(parts) >= 3
    resumed = run_cli(argv)
    assert resumed.returncode == 0, resumed.stderr
    assert "nothing to do" not in resumed.stderr
    assert "resuming" in resumed.stderr
    assert outputs(db) == outputs(reference_db)
    assert load_manifest(db)["counts"] == load_manifest(reference_db)["counts"]
    assert not list(db.rglob(".*.tmp-*")), "temporary files left behind"


def test_rerun_is_a_noop_and_other_args_are_refused(reference_db: Path, corpus: Path, capsys) -> None:
    before = (reference_db / "manifest.json").read_bytes()
    assert cli(chunk_argv(corpus, reference_db, "--workers", "2")) == 0  # workers do not matter
    assert "already done" in capsys.readouterr().err
    assert (reference_db / "manifest.json").read_bytes() == before

    assert cli(chunk_argv(corpus, reference_db, "--chunk-size", "32")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "chunk_size" in err and "16" in err and "32" in err
    assert cli(chunk_argv(corpus, reference_db, "--val-fraction", "0.5")) == 2
    assert "val_fraction" in capsys.readouterr().err
    assert (reference_db / "manifest.json").read_bytes() == before


def test_bad_inputs_are_one_line_errors(tmp_path: Path, capsys) -> None:
    assert cli(chunk_argv(tmp_path / "absent", tmp_path / "db")) == 2
    assert "absent" in capsys.readouterr().err
    (tmp_path / "emptydir").mkdir()
    assert cli(chunk_argv(tmp_path / "emptydir", tmp_path / "db")) == 2
    assert "no input files" in capsys.readouterr().err
    (tmp_path / "notadb").mkdir()
    (tmp_path / "notadb" / "x").write_text("x")
    assert cli(chunk_argv(tmp_path / "notadb", tmp_path / "notadb")) == 2
    assert "not a retro database" in capsys.readouterr().err
    assert cli(chunk_argv(tmp_path / "notadb", tmp_path / "db2", "--seq-len", "20")) == 2
    assert "multiple" in capsys.readouterr().err


def test_splits_are_disjoint_and_stable(corpus: Path, reference_db: Path, tmp_path: Path) -> None:
    bigger = tmp_path / "bigger"
    bigger.mkdir()
    os.symlink(corpus, bigger / "old")
    rng = random.Random(99)
    write_corpus(bigger / "new", [random_text(rng) for _ in range(25)])
    db = tmp_path / "db"
    assert cli(["chunk", "--input", str(bigger), "--out", str(db), "--tokenizer",
                str(reference_db / "tokenizer.model"), "--chunk-size", "16", "--seq-len", "64",
                "--val-fraction", "0.25", "--workers", "1"]) == 0

    def split_texts(d: Path) -> dict[str, set[str]]:
        out = {}
        for split in ("train", "val"):
            s = ChunkStore.open(d, split)
            out[split] = {s.doc_text(i) for i in range(s.num_docs)}
        return out

    old, new = split_texts(reference_db), split_texts(db)
    assert old["val"] and old["train"]
    assert not old["train"] & old["val"] and not new["train"] & new["val"]
    assert old["val"] <= new["val"] and old["train"] <= new["train"]


def test_duplicate_and_nested_inputs_are_read_once(corpus: Path, reference_db: Path, tmp_path: Path) -> None:
    db = tmp_path / "db"
    argv = chunk_argv(corpus, db, "--input", str(corpus), "--input", str(corpus / "d000"))
    assert cli(argv) == 0
    assert outputs(db) == outputs(reference_db)
    assert [s["reason"] for s in full_manifest(db)["skipped"]] == ["duplicate_input"] * 2


def test_big_jsonl_is_split_into_line_aligned_units(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    rng = random.Random(4)
    lines, expected = [], {}
    for n in range(1, 301):
        if n % 37 == 0:
            lines.append(b"{broken json")
        elif n % 53 == 0:
            lines.append(b"")
        else:
            text = random_text(rng, rng.randint(1, 6)) + ("\ud800" if n == 100 else "")
            lines.append(json.dumps({"text": text, "id": n}).encode() + (b"\r" if n % 2 else b""))
            expected[n] = text.replace("\ud800", "?").replace("\r\n", "\n").replace("\r", "\n")
    data = b"\n".join(lines) + b"\n"
    (src / "big.jsonl").write_bytes(data)
    (src / "small.txt").write_text("a small file\n")

    small_units, big_units = tmp_path / "db1", tmp_path / "db2"
    assert cli(chunk_argv(src, small_units, "--workers", "2", "--unit-mb", "0.002")) == 0
    assert cli(chunk_argv(src, big_units, "--workers", "1", "--unit-mb", "64")) == 0
    assert outputs(small_units) == outputs(big_units)

    m = full_manifest(small_units)
    assert m["inputs"] == full_manifest(big_units)["inputs"]
    big = [i for i in m["inputs"] if i["path"].endswith("big.jsonl")]
    assert big == [{"path": big[0]["path"], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}]
    assert sorted(s["line"] for s in m["skipped"]) == [n for n in range(1, 301) if n % 37 == 0]
    got = {}
    for split in ("train", "val"):
        store = ChunkStore.open(small_units, split)
        for d in range(store.num_docs):
            s = store.doc_source(d)
            if "line" in s:
                got[s["line"]] = store.doc_text(d)
    assert got == expected


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=40),
       st.integers(1, 64), st.integers(1, 50), st.booleans())
def test_split_jsonl_ranges(tmp_path_factory, lines: list[bytes], unit: int, block: int,
                            trailing_newline: bool) -> None:
    path = tmp_path_factory.mktemp("split") / "x.jsonl"
    data = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    path.write_bytes(data)
    sha, ranges = split_jsonl(str(path), unit, block=block)
    assert sha == hashlib.sha256(data).hexdigest()
    assert ranges[0][0] == 0 and ranges[-1][1] == len(data)
    for (s0, e0, _), (s1, _, line1) in zip(ranges, ranges[1:]):
        assert e0 == s1 and data[e0 - 1:e0] == b"\n" and e0 - s0 >= min(unit, len(data))
        assert line1 == data[:s1].count(b"\n") + 1


def test_ctrl_c_exits_130_and_resumes(reference_db: Path, corpus: Path, tmp_path: Path) -> None:
    db = tmp_path / "db"
    argv = chunk_argv(corpus, db, "--workers", "2", "--unit-mb", "0.002")
    interrupted = run_cli(argv, **{CRASH_ENV: "chunk:2:sigint"})
    assert interrupted.returncode == 130, interrupted.stderr
    last = interrupted.stderr.strip().splitlines()[-1]
    assert last == "retro-build-index chunk: interrupted; re-run the same command to resume"
    assert "Traceback" not in interrupted.stderr
    assert run_cli(argv).returncode == 0
    assert outputs(db) == outputs(reference_db)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_file_is_counted_and_rerun_is_a_noop(tmp_path: Path, capsys) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "ok.txt").write_text("fine\n")
    (src / "secret.txt").write_text("no access\n")
    (src / "secret.txt").chmod(0)
    db = tmp_path / "db"
    assert cli(chunk_argv(src, db)) == 0
    assert [s["reason"] for s in full_manifest(db)["skipped"]] == ["unreadable"]
    assert cli(chunk_argv(src, db)) == 0
    assert "already done" in capsys.readouterr().err


def test_read_error_is_a_counted_skip(tmp_path: Path) -> None:
    stream = TextStream(str(tmp_path))  # a folder: open() fails like an unreadable file
    assert list(stream) == [] and stream.sha256 is None
    assert stream.reason == "unreadable"
