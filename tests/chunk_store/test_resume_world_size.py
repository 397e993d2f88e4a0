"""A 2-rank chunk build with one rank killed at each of the stage's crash points, resumed with 1
and with 3 ranks, is the clean 2-rank build, file for file: no document lost or duplicated
(issue 24: resumed with 1 rank it once kept half the documents, with 3 it stored some twice)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from chunk_store import ChunkStore
from chunk_store.layout import SPLITS, DBLayout
from chunk_store.manifest import load_manifest
from index_builder.cli import main as cli
from tests.fixtures import random_text, write_corpus
from tests.fixtures.ranks import db_digest, torchrun

ARGS = ["--chunk-size", "16", "--seq-len", "64", "--val-fraction", "0.25", "--unit-mb", "0.002",
        "--workers", "1"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[list[str], Path]:
    """The arguments of a 40-file build (a tokenizer given) and its clean 2-rank result."""
    root = tmp_path_factory.mktemp("ws")
    rng = random.Random(24)
    write_corpus(root / "corpus", [random_text(rng, rng.randint(1, 40)) for _ in range(40)])
    assert cli(["chunk", "--input", str(root / "corpus"), "--out", str(root / "tok"), "--vocab-size", "400",
                *ARGS]) == 0
    argv = ["chunk", "--input", str(root / "corpus"), "--tokenizer", str(root / "tok" / "tokenizer.model"), *ARGS]
    out = torchrun(2, [*argv, "--out", root / "ref"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(load_manifest(root / "ref")["shards"]) == 2
    return argv, root / "ref"


def _arrays(db: Path) -> dict[str, np.ndarray]:
    out = {}
    for split in SPLITS:
        s = ChunkStore.open(db, split)
        out.update({f"{split}/chunks": np.asarray(s.chunks), f"{split}/doc_ids": np.asarray(s.doc_ids),
                    f"{split}/seq_starts": np.asarray(s.seq_starts)})
    return out


# rank 1 dies after its 2nd part (rank 0 is stopped by torchrun); rank 1 dies in its merge after
# rank 0 wrote its shard; rank 0 dies once every shard is written, before the manifest lists them
# chunk:2@1 runs with -m slow: test_chunk_build.py resumes a crash between parts by default
@pytest.mark.parametrize("crash", [pytest.param("chunk:2@1", marks=pytest.mark.slow), "chunk:merge@1",
                                   "chunk:finalize@0"])
def test_a_killed_two_rank_chunk_resumed_with_one_or_three_ranks_is_the_clean_build(
        clean, crash: str, tmp_path: Path) -> None:
    argv, ref = clean
    killed = tmp_path / "killed"
    # rank 1 dies in its merge only once rank 0's shard is whole (waiting on it, not on timing)
    after = DBLayout(killed).shard(0).shard_meta if crash == "chunk:merge@1" else None
    out = torchrun(2, [*argv, "--out", killed], crash=crash, crash_after=after, monitor_interval=3)
    assert out.returncode != 0, out.stderr[-3000:]
    if crash != "chunk:2@1":  # the state the user met: shard 0 whole, the run unfinished
        assert (DBLayout(killed).shard(0).shard_meta).exists()
        assert not load_manifest(killed)["stages"]["chunk"].get("finished")
    for world in (1, 3):
        db = tmp_path / f"resumed-{world}"
        shutil.copytree(killed, db)
        if world == 1:
            assert cli([*argv, "--out", str(db)]) == 0
        else:
            out = torchrun(world, [*argv, "--out", db])
            assert out.returncode == 0, out.stderr[-3000:]
        want, got = _arrays(ref), _arrays(db)
        for key in want:
            assert np.array_equal(want[key], got[key]), f"{crash}, resumed with {world} ranks: {key} differs"
        assert db_digest(db) == db_digest(ref), f"{crash}, resumed with {world} ranks"
        assert not DBLayout(db).chunk_work.exists()


def test_big_files_are_read_for_the_plan_by_every_rank(clean, tmp_path: Path) -> None:
    """Big .jsonl files are hashed and cut for the plan by the ranks in turn, not by rank 0 alone
    while the others wait; the plan, and so the documents in order, are a 1-rank build's."""
    argv, _ = clean
    tok = argv[argv.index("--tokenizer") + 1]
    rng = random.Random(5)
    corpus = tmp_path / "big"
    corpus.mkdir()
    for f in range(4):  # each well over a 2 KB unit
        lines = [json.dumps({"text": random_text(rng, rng.randint(5, 30))}) for _ in range(12)]
        (corpus / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    args = ["chunk", "--input", str(corpus), "--tokenizer", tok, *ARGS]
    two, one = tmp_path / "two", tmp_path / "one"
    out = torchrun(2, [*args, "--out", two], crash="chunk:finalize@0", monitor_interval=3)
    assert out.returncode != 0, out.stderr[-3000:]
    scans = [json.loads(p.read_text()) for p in sorted(DBLayout(two).chunk_work.glob("scan_*.json"))]
    assert [s["rank"] for s in scans] == [0, 1, 0, 1] and all(s["sha256"] for s in scans)
    assert cli([*args, "--out", str(two)]) == 0
    assert cli([*args, "--out", str(one)]) == 0
    for split in SPLITS:
        s1, s2 = ChunkStore.open(one, split), ChunkStore.open(two, split)
        assert np.array_equal(np.asarray(s1.chunks), np.asarray(s2.chunks))
        assert np.array_equal(np.asarray(s1.doc_ids), np.asarray(s2.doc_ids))
    assert load_manifest(one)["counts"]["train"]["docs"] == load_manifest(two)["counts"]["train"]["docs"] > 0


def test_the_partition_is_recorded_once_and_a_plan_without_one_drops_unlisted_shards(tmp_path: Path) -> None:
    """A plan from before the partition was recorded: the shards its interrupted merge wrote past
    the manifest's are removed (their parts are all still there) and rewritten under the new one."""
    from chunk_store.chunk.merge_plan import ensure_merge_plan, rank_jobs, shard_jobs
    from chunk_store.framework.errors import UserError

    db, plan_path = tmp_path / "db", tmp_path / "db" / ".chunk_work" / "plan.json"
    plan_path.parent.mkdir(parents=True)
    for n in (2, 3):  # shard 2 is listed in the manifest (base 3), shard 3 is not
        (DBLayout(db).shard(n).root / "train").mkdir(parents=True)
    plan = ensure_merge_plan({"units": [[]] * 5}, plan_path, db, base=3, world=2)
    assert plan["merge"] == {"base": 3, "ranges": [[0, 2], [2, 5]]}
    assert json.loads(plan_path.read_text())["merge"] == plan["merge"]
    assert DBLayout(db).shard(2).root.exists() and not DBLayout(db).shard(3).root.exists()
    assert ensure_merge_plan(plan, plan_path, db, base=3, world=3) is plan  # kept whatever the world
    assert [(j.index, j.lo, j.hi, j.first) for j in shard_jobs(plan)] == [(3, 0, 2, True), (4, 2, 5, False)]
    assert [j.index for j in rank_jobs(plan, 0, 1)] == [3, 4] and rank_jobs(plan, 2, 3) == []
    with pytest.raises(UserError, match="next shard is 4"):
        ensure_merge_plan(plan, plan_path, db, base=4, world=2)
