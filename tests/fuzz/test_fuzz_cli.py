"""Fuzzing retro-build-index's front door (issue 12): hypothesis-generated file contents, file
names and argument values for the chunk stage, and argument values for the other stages. The only
outcomes allowed: exit 2 with one line on stderr and nothing written, or exit 0 where the stage
really ran (a finished record with the values asked for, outputs whole) or really was already done
(it says so, every file byte-identical, the values that shape the result the built ones). Never a
traceback. Bounded: a handful of tiny corpora, a few seconds each."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from chunk_store import ChunkStore
from chunk_store.manifest import load_manifest
from tests.fixtures import run_cli, shared_db, shared_tiny_bert

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


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> digest)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


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
    if rc == 0:  # the stage really ran: a finished record with the values asked for, and a database
        m = load_manifest(db)
        rec = m["stages"]["chunk"]
        assert rec["finished"], rec
        asked = {"--chunk-size": "8", "--seq-len": "16", **flags}
        assert m["chunk_size"] == rec["params"]["chunk_size"] == int(asked["--chunk-size"])
        assert m["seq_len"] == rec["params"]["seq_len"] == int(asked["--seq-len"])
        if "--val-fraction" in flags:
            assert rec["params"]["val_fraction"] == float(flags["--val-fraction"])
        written = {os.fsencode(os.path.join(src, n)) for n in files}
        for split in ("train", "val"):
            store = ChunkStore.open(db, split)
            assert store.num_chunks == m["counts"][split]["chunks"]
            assert store.num_docs == m["counts"][split]["docs"]
            assert np.all(np.asarray(store.doc_ids[:-1]) <= np.asarray(store.doc_ids[1:]))
            for d in range(store.num_docs):  # every document comes from one of the files written
                assert os.fsencode(store.doc_source(d)["source"]) in written
                lo, hi = store.doc_chunk_range(d)
                assert hi > lo and store.tokenizer.eos_id in np.asarray(store.chunks[hi - 1])
        assert sum(c["docs"] for c in m["counts"].values()) > 0  # never exit 0 with an empty database
        # the same command again: exit 0 because it is already done, every output unchanged
        before = tree_digest(db)
        try:
            again = run_cli(argv)
        except SystemExit as e:
            again = int(e.code or 0)
        out, err = capfd.readouterr()
        assert again == 0, err[-2000:]
        assert "(already done: nothing to do)" in out + err, (out + err)[-2000:]
        assert tree_digest(db) == before
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def done_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("fuzz-stages") / "db"  # a copy: a run that did start changes nothing shared
    shutil.copytree(shared_db(tmp_path_factory), db)
    return db


def _result_keys(module: str, cls: str):
    return lambda: getattr(importlib.import_module(module), cls).result_keys


# the parameters each stage refuses to change on a finished database
RESULT_KEYS = {"embed": _result_keys("index_builder.embed.stage", "EmbedStage"),
               "index": _result_keys("index_builder.index.stage", "IndexStage"),
               "knn": _result_keys("index_builder.knn.stage", "KnnStage")}


@pytest.fixture(scope="module")
def same_as_built(tmp_path_factory):
    """Per stage, the arguments done_db was built with (tests.fixtures.build_index_db): with them a
    stage is already done, so the fuzzed value decides between "already done" and a refusal."""
    embedder = str(shared_tiny_bert(tmp_path_factory))
    return {"embed": ["--embedder", embedder, "--shard-size", "256", "--tokenize-workers", "0", "--device", "cpu"],
            "index": ["--recall-sample", "300"], "knn": ["--k", "2", "--shard-size", "256", "--device", "cpu"],
            "search": ["--device", "cpu"]}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(stage=st.sampled_from(["embed", "index", "knn", "search"]),
       flag=st.sampled_from(["--shard-size", "--k", "--extra", "--batch-size", "--threads", "--max-length",
                             "--recall-sample", "--max-query-ms", "--exact-pass-rows"]), value=NUMBER)
# each stage's exit 0 is reached at least once, whatever hypothesis draws
@example(stage="embed", flag="--batch-size", value="32")  # the built value: already done
@example(stage="embed", flag="--batch-size", value="7")  # batch_size shapes the result: refused
@example(stage="index", flag="--threads", value="1")
@example(stage="knn", flag="--k", value="2")
@example(stage="search", flag="--k", value="3")
def test_other_stages_answer_any_argument_value_in_one_line(done_db, same_as_built, capfd, stage, flag, value):
    # the fuzzed flag comes last: argparse takes its value over the built one
    argv = [stage, "--db", done_db, *same_as_built[stage], flag, value] + (["some text"] if stage == "search" else [])
    before = tree_digest(done_db)
    record = load_manifest(done_db)["stages"].get(stage)
    try:
        rc = run_cli(argv)
    except SystemExit as e:
        rc = int(e.code or 0)
    out, err = capfd.readouterr()
    assert_one_line_or_success(rc, err)
    if rc == 2:  # refused: before anything was written
        assert tree_digest(done_db) == before
        return
    if stage == "search":  # a query: its neighbours printed as JSON, the database untouched
        results = json.loads(out)
        assert results and len(results[0]["neighbours"]) == int(value if flag == "--k" else 2), out[-2000:]
        assert tree_digest(done_db) == before
        return
    now = load_manifest(done_db)["stages"][stage]
    if now == record:  # already done: said so, and every file as it was
        assert f"{stage}: already done" in out + err, (out + err)[-2000:]
        assert tree_digest(done_db) == before
        key = flag.lstrip("-").replace("-", "_")  # a value that shapes the result must be the built one
        if key in RESULT_KEYS[stage]():
            built = record["params"].get(key)
            # embed resolves --max-length as the Embedder does: 0 is the model's maximum (the
            # built value here), larger values are cut to it
            want = str(min(int(value) or built, built)) if key == "max_length" else value
            assert str(built) == want, (key, built, value)
    else:  # it really ran: a finished record, and the stage's outputs whole
        assert now["finished"] and now["finished"] != record.get("finished"), now
        for split in ("train", "val"):
            store = ChunkStore.open(done_db, split)
            if stage == "knn":
                assert store.neighbours.shape[0] == store.num_chunks
