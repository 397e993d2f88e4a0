"""Fuzzing retro-build-index's front door (issue 12): hypothesis-generated file contents, file
names and argument values for the chunk stage, and argument values for the other stages. The only
outcomes allowed: exit 0 with a database that opens and counts what it holds, or exit 2 with one
line on stderr. Never a traceback. Bounded: a handful of tiny corpora, a few seconds each."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chunk_store import ChunkStore
from chunk_store.manifest import load_manifest
from tests.fixtures import run_cli, shared_db

CONTENT = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"\x00\x01\x02", b"\xef\xbb\xbf", b"\n" * 50, b"word " * 40, b"\xff\xfe" * 30,
                     b'{"text": "a jsonl line"}\n{"text": 5}\nnot json\n', b"\r\n" * 20 + b"x"]),
)
NAME = st.one_of(st.sampled_from([b"a.txt", b"b\xffc.txt", b"d.jsonl", b" sp ace.py", b"\xe2\x80\x8b.md",
                                  b"x" * 200]), st.binary(min_size=1, max_size=12).filter(
    lambda n: b"/" not in n and b"\x00" not in n and n not in (b".", b"..")))
NUMBER = st.one_of(st.integers(-3, 70).map(str), st.sampled_from(["nan", "inf", "-1", "0", "abc", "1e9", "0.5"]))
FLAGS = st.dictionaries(st.sampled_from(["--chunk-size", "--seq-len", "--val-fraction", "--vocab-size",
                                         "--workers", "--max-invalid-fraction"]), NUMBER, max_size=2)


def assert_one_line_or_success(rc: int, err: str) -> None:
    assert rc in (0, 2), (rc, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    if rc == 2:
        last = [line for line in err.splitlines() if line.strip()]
        assert last and ": error: " in last[-1], err[-2000:]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(files=st.dictionaries(NAME, CONTENT, min_size=1, max_size=4), flags=FLAGS)
def test_chunk_answers_any_folder_and_arguments_in_one_line(tmp_path_factory, capfd, files, flags):
    root = tmp_path_factory.mktemp("fuzz-chunk")
    src = os.path.join(os.fsencode(root), b"in")
    os.makedirs(src)
    for name, data in files.items():
        with open(os.path.join(src, name), "wb") as f:
            f.write(data)
    db = root / "db"
    argv = ["chunk", "--input", os.fsdecode(src), "--out", db, "--vocab-size", "300", "--chunk-size", "8",
            "--seq-len", "16", "--tokenizer-sample-mb", "0.1"]
    for flag, value in flags.items():
        argv += [flag, value]
    try:
        rc = run_cli(argv)
    except SystemExit as e:  # argparse: exit 2 with its usage line
        rc = int(e.code or 0)
    assert_one_line_or_success(rc, capfd.readouterr().err)
    if rc == 0:
        m = load_manifest(db)
        for split in ("train", "val"):
            store = ChunkStore.open(db, split)
            assert store.num_chunks == m["counts"][split]["chunks"]
            assert np.all(np.asarray(store.doc_ids[:-1]) <= np.asarray(store.doc_ids[1:]))
        assert sum(c["docs"] for c in m["counts"].values()) > 0  # never exit 0 with an empty database
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def done_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("fuzz-stages") / "db"  # a copy: a run that did start changes nothing shared
    shutil.copytree(shared_db(tmp_path_factory), db)
    return db


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(stage=st.sampled_from(["embed", "index", "knn", "search"]),
       flag=st.sampled_from(["--shard-size", "--k", "--extra", "--batch-size", "--threads", "--max-length",
                             "--recall-sample", "--max-query-ms", "--exact-pass-rows"]), value=NUMBER)
def test_other_stages_answer_any_argument_value_in_one_line(done_db, capfd, stage, flag, value):
    argv = [stage, "--db", done_db, flag, value] + (["some text"] if stage == "search" else [])
    try:
        rc = run_cli(argv)
    except SystemExit as e:
        rc = int(e.code or 0)
    assert_one_line_or_success(rc, capfd.readouterr().err)
