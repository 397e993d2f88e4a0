"""The stage routine (chunk_store.framework.stage) on a toy stage: record, refuse, skip, resume, share
units over ranks, clean stale temporary files. The real stages' crash tests are in their files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chunk_store.framework import runtime
from chunk_store.framework.errors import UserError
from chunk_store.layout import temp_path
from chunk_store.manifest import FORMAT_VERSION, load_manifest, save_manifest
from chunk_store.framework.stage import clean_stale_tmp, run_stage
from tests.fixtures.toy_stage import ToyConfig, ToyStage


@pytest.fixture
def db(tmp_path: Path, toy_registered: None) -> Path:
    db = tmp_path / "db"
    db.mkdir()
    t = "2026-01-01T00:00:00+00:00"
    save_manifest(db, {"format_version": FORMAT_VERSION, "chunk_size": 4, "seq_len": 8,
                       "stages": {"chunk": {"params": {}, "started": t, "finished": t, "stats": {}}}})
    return db


def test_run_records_and_rerun_skips(db: Path) -> None:
    stats = run_stage(ToyStage(db, ToyConfig()))
    assert stats == {"total": 3 * sum(range(7)), "reused": 0, "done": 7}
    rec = load_manifest(db)["stages"]["toy"]
    assert rec["params"] == {"units": 7, "scale": 3} and rec["finished"] and rec["stats"] == stats
    before = (db / "manifest.json").read_bytes()
    again = ToyStage(db, ToyConfig())
    assert run_stage(again) == {"skipped": True, **stats}
    assert again.computed == [] and (db / "manifest.json").read_bytes() == before


def test_other_params_are_refused_naming_the_value(db: Path) -> None:
    run_stage(ToyStage(db, ToyConfig()))
    with pytest.raises(UserError, match="scale differs.*scale=3.*scale=4"):
        run_stage(ToyStage(db, ToyConfig(scale=4)))


def test_requires_the_previous_stage(db: Path) -> None:
    m = load_manifest(db)
    m["stages"]["chunk"]["finished"] = None
    save_manifest(db, m)
    with pytest.raises(UserError, match="needs the 'chunk' stage"):
        run_stage(ToyStage(db, ToyConfig()))


def test_a_crash_keeps_finished_units_and_the_rerun_does_only_the_rest(db: Path) -> None:
    first = ToyStage(db, ToyConfig(fail_at=4))
    with pytest.raises(RuntimeError, match="boom"):
        run_stage(first)
    assert first.computed == [0, 1, 2, 3]
    assert load_manifest(db)["stages"]["toy"]["finished"] is None
    second = ToyStage(db, ToyConfig())
    stats = run_stage(second)
    assert second.computed == [4, 5, 6]
    assert stats == {"total": 3 * sum(range(7)), "reused": 4, "done": 3}


@pytest.mark.parametrize("world", [2, 3])
def test_units_are_shared_over_ranks_and_rank_0_finalizes(db: Path, monkeypatch, world: int) -> None:
    monkeypatch.setattr(runtime, "barrier", lambda: None)  # ranks run one after the other here
    monkeypatch.setenv("WORLD_SIZE", str(world))
    seen: list[int] = []
    for rank in reversed(range(world)):  # rank 0 last: it finalizes once every unit is on disk
        monkeypatch.setenv("RANK", str(rank))
        stage = ToyStage(db, ToyConfig())
        stats = run_stage(stage)
        assert stage.computed == [i for i in range(7) if i % world == rank]
        assert stats == ({} if rank else {"total": 3 * sum(range(7)), "reused": 0,
                                          "done": len(stage.computed)})
        seen += stage.computed
    assert sorted(seen) == list(range(7))
    assert load_manifest(db)["stages"]["toy"]["finished"]


def test_stale_temporary_files_of_dead_writers_go_live_ones_stay(db: Path) -> None:
    out = db / "out"
    out.mkdir()
    dead = temp_path(out / "3", pid=2**22 + 12345)  # above Linux's pid_max default: no such process
    live = temp_path(out / "99")  # this process: a writer at work
    folder = temp_path(db / "out" / "build", pid=2**22 + 12346)
    dead.write_text("half")
    live.write_text("half")
    folder.mkdir()
    (out / "other.tmp").write_text("not ours")
    assert clean_stale_tmp([out]) == 2
    assert not dead.exists() and not folder.exists() and live.exists() and (out / "other.tmp").exists()
    run_stage(ToyStage(db, ToyConfig()))
    assert live.exists(), "a live writer's file must survive a concurrent rank's cleaning"
    assert json.loads((db / "manifest.json").read_text())["stages"]["toy"]["finished"]
