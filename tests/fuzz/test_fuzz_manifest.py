"""Fuzzing the database's manifest.json (issue 12): a manifest that is valid JSON of the wrong
shape is refused in one line (exit 2) by every reader, never a TypeError/KeyError traceback."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chunk_store import ChunkStore, DBError
from chunk_store.layout import DBLayout
from chunk_store.manifest import load_manifest
from tests.fixtures import run_cli, shared_db

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                 max_size=3), max_leaves=6)


@pytest.fixture(scope="module")
def db_copy(tmp_path_factory):
    src = shared_db(tmp_path_factory)
    dst = tmp_path_factory.mktemp("fuzz-manifest") / "db"
    shutil.copytree(src, dst)
    return dst, json.loads(DBLayout(dst).manifest.read_text())


def paths_of(obj, prefix=()):
    """Every (path) into a JSON value, to pick one to replace."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths_of(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            yield from paths_of(v, prefix + (i,))


def replaced(obj, path, value):
    out = copy.deepcopy(obj)
    if not path:
        return value
    node = out
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return out


def readers_answer_in_one_line(db, capsys) -> None:
    assert run_cli(["info", "--db", db]) in (0, 2)
    for split in ("train", "val"):
        try:
            ChunkStore.open(db, split)
        except DBError as e:
            assert "\n" not in str(e)
    err = capsys.readouterr().err
    assert "Traceback" not in err and (not err or len(err.strip().splitlines()) == 1), err


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_one_value_replaced_is_read_or_refused_in_one_line(db_copy, capsys, data):
    db, good = db_copy
    path = data.draw(st.sampled_from(list(paths_of(good))))
    bad = replaced(good, path, data.draw(JSON))
    DBLayout(db).manifest.write_text(json.dumps(bad))
    try:
        readers_answer_in_one_line(db, capsys)
    finally:
        DBLayout(db).manifest.write_text(json.dumps(good))


@pytest.mark.parametrize("edit", [{"format_version": "1"}, {"stages": []}, {"chunk_size": None},
                                  {"format_version": True}, {"stages": {"chunk": []}}, {"counts": {"train": 5}}])
def test_the_reported_shapes_are_one_line(db_copy, edit):
    db, good = db_copy
    bad = {k: v for k, v in {**good, **edit}.items() if v is not None}
    DBLayout(db).manifest.write_text(json.dumps(bad))
    try:
        with pytest.raises(DBError, match="corrupt .*manifest.json"):
            load_manifest(db)
    finally:
        DBLayout(db).manifest.write_text(json.dumps(good))
