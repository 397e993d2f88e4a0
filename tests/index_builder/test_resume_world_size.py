"""embed and knn run by 2 ranks, one killed at each of the stage's crash points (after a unit of
its own; before rank 0 assembles and records the stage), resumed with 1 and with 3 ranks: the
database is the clean 2-rank build's, file for file (issue 24: nothing lost, whatever the world
size). Slow (RETRO_SLOW=1): each case starts torchrun three times, BERT loaded in every rank,
about 35 s (knn) to 80 s (embed) a case on two busy cores, plus a minute for the clean builds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from index_builder.cli import main as cli
from tests.fixtures import build_tiny_db, shared_tiny_bert
from tests.fixtures.ranks import db_digest, torchrun


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, object]:
    """A chunked DB, its clean 2-rank embed, the index, its clean 2-rank knn; each kept apart."""
    root = tmp_path_factory.mktemp("ws-index")
    bert = shared_tiny_bert(tmp_path_factory)
    chunked = build_tiny_db(root / "chunked", n_docs=20, seed=24)
    embed = ["embed", "--embedder", bert, "--shard-size", "128", "--tokenize-workers", "0", "--device", "cpu"]
    knn = ["knn", "--k", "2", "--shard-size", "128", "--device", "cpu"]
    shutil.copytree(chunked, root / "embedded")
    out = torchrun(2, [*embed, "--db", root / "embedded"])
    assert out.returncode == 0, out.stderr[-3000:]
    shutil.copytree(root / "embedded", root / "indexed")
    assert cli(["index", "--db", str(root / "indexed"), "--index-key", "Flat", "--recall-sample", "100",
                "--deterministic"]) == 0
    shutil.copytree(root / "indexed", root / "ref")
    out = torchrun(2, [*knn, "--db", root / "ref"])
    assert out.returncode == 0, out.stderr[-3000:]
    return {"chunked": chunked, "embedded": root / "embedded", "indexed": root / "indexed",
            "ref": root / "ref", "embed": embed, "knn": knn}


def _resume_each_way(killed: Path, argv: list, want: dict[str, str], tmp_path: Path, crash: str) -> None:
    for world in (1, 3):
        db = tmp_path / f"resumed-{world}"
        shutil.copytree(killed, db)
        if world == 1:
            assert cli([str(a) for a in argv] + ["--db", str(db)]) == 0
        else:
            out = torchrun(world, [*argv, "--db", db])
            assert out.returncode == 0, out.stderr[-3000:]
        got = db_digest(db)
        differ = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        assert not differ, f"{crash}, resumed with {world} ranks: {differ}"


@pytest.mark.slow
@pytest.mark.parametrize("crash", ["embed:1@1", "embed:finalize@0", "knn:1@1", "knn:finalize@0"])
def test_a_killed_two_rank_stage_resumed_with_one_or_three_ranks_is_the_clean_build(
        builds, crash: str, tmp_path: Path) -> None:
    stage = crash.split(":")[0]
    start, clean = {"embed": ("chunked", "embedded"), "knn": ("indexed", "ref")}[stage]
    killed = tmp_path / "killed"
    shutil.copytree(builds[start], killed)
    out = torchrun(2, [*builds[stage], "--db", killed], crash=crash, monitor_interval=3)
    assert out.returncode != 0, out.stderr[-3000:]
    _resume_each_way(killed, builds[stage], db_digest(builds[clean]), tmp_path, crash)
