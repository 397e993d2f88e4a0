"""Adding a stage is one registration: the toy stage, registered once, is a subcommand of
retro-build-index (and a step of `all`), `info` reports it in the registry's order, the stage
routine reads its prerequisite from the registry, and nothing else had to change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chunk_store.framework import registry
from chunk_store.framework.errors import UserError
from chunk_store.manifest import FORMAT_VERSION, load_manifest, save_manifest
from index_builder.cli import build_parser, main as cli
from tests.fixtures.toy_stage import TOY, ToyConfig, ToyStage

T = "2026-01-01T00:00:00+00:00"


def chunked_db(tmp_path: Path, chunk_finished: bool = True) -> Path:
    db = tmp_path / "db"
    db.mkdir()
    save_manifest(db, {"format_version": FORMAT_VERSION, "chunk_size": 4, "seq_len": 8,
                       "stages": {"chunk": {"params": {}, "started": T, "finished": T if chunk_finished else None,
                                            "stats": {}}}})
    return db


def subcommands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return set(sub.choices)


def test_the_built_in_stages_in_pipeline_order() -> None:
    assert registry.stage_names() == ("chunk", "add", "embed", "index", "knn")
    assert [e.name for e in registry.stages() if e.in_all] == ["chunk", "embed", "index", "knn"]
    assert [registry.requires(n) for n in ("chunk", "embed", "index", "knn")] == [None, "chunk", "embed", "index"]
    assert {"chunk", "add", "embed", "index", "knn", "all", "info", "search"} == subcommands()


def test_one_registration_makes_a_subcommand_that_runs_the_stage(tmp_path: Path, capsys,
                                                                 toy_registered: None) -> None:
    assert "toy" in subcommands()
    assert registry.stage_names()[-1] == "toy"
    db = chunked_db(tmp_path)
    assert cli(["toy", "--db", str(db), "--units", "5", "--scale", "2"]) == 0
    rec = load_manifest(db)["stages"]["toy"]
    assert rec["finished"] and rec["stats"]["total"] == 2 * sum(range(5))
    assert (db / "total").read_text() == "20"
    capsys.readouterr()
    assert cli(["info", "--db", str(db)]) == 0
    status = json.loads(capsys.readouterr().out)["status"]
    assert list(status) == ["chunk", "embed", "index", "knn", "toy"]  # the registry's order
    assert status["toy"] == "done" and status["embed"] == "missing"
    # `all` holds every in_all stage's options, the toy's included
    args = build_parser().parse_args(["all", "--out", str(db), "--input", "x", "--units", "3"])
    assert args.units == 3


def test_the_prerequisite_comes_from_the_registry(tmp_path: Path, capsys, toy_registered: None) -> None:
    db = chunked_db(tmp_path, chunk_finished=False)
    assert ToyStage(db, ToyConfig()).requires == "chunk"
    assert cli(["toy", "--db", str(db)]) == 2
    assert "toy needs the 'chunk' stage first" in capsys.readouterr().err
    assert "toy" not in load_manifest(db)["stages"]


def test_a_stage_is_registered_once(toy_registered: None) -> None:
    with pytest.raises(UserError, match="already registered"):
        registry.register(TOY)
    with pytest.raises(UserError, match="not registered"):
        registry.register(registry.StageEntry("orphan", "nowhere", requires="no-such-stage"))
    with pytest.raises(UserError, match="built in"):
        registry.unregister("knn")


def test_unregistered_the_toy_is_gone() -> None:
    assert "toy" not in registry.stage_names() and "toy" not in subcommands()
