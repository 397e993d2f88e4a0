"""Issue 22, "Many nodes": train.py and the database stages started as two torchrun "nodes" on
this machine (``--nnodes 2``, c10d rendezvous over loopback, one process a node: each has
LOCAL_RANK 0 and its own RANK, and its own TMPDIR as a node-local /tmp) give what one process
(or one node) gives: the same losses, the same database file for file.

The train and DB cases are slow (RETRO_SLOW=1): every launch pays torchrun's rendezvous and a
torch import per node, and the DB cases load BERT in every rank; up to a minute or two a case on
two busy cores. A rank failing on one node while the other waits takes seconds and always runs.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from chunk_store.manifest import load_manifest
from index_builder.cli import main as cli
from tests.fixtures import random_text, shared_tiny_bert, write_corpus
from tests.fixtures.nodes import assert_ok, two_nodes
from tests.fixtures.ranks import db_digest, torchrun
from tests.fixtures.train_db import REPO, tiny_db, write_train_config

sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the script at the repository root)

TRAIN_KEYS = {"batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
              "max_steps": 4, "eval_every": 4, "eval_batches": 1, "checkpoint_every": 2, "log_every": 1,
              "num_workers": 0, "seed": 5}
CHUNK_ARGS = ["--vocab-size", "400", "--chunk-size", "16", "--seq-len", "64", "--val-fraction", "0.25",
              "--unit-mb", "0.002", "--workers", "1"]


def _losses(run: Path) -> list[float]:
    return [r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]


def _same_db(got: Path, want: Path) -> None:
    a, b = db_digest(got), db_digest(want)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    assert not differ, f"{got} differs from {want}: {differ}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nodes-corpus")
    rng = random.Random(22)
    write_corpus(root / "corpus", [random_text(rng, rng.randint(1, 40)) for _ in range(30)])
    return root / "corpus"


@pytest.mark.slow
def test_train_on_two_nodes_equals_one_process(tmp_path: Path) -> None:
    """2 nodes x micro-batch 2 = 1 process x 2 micro-steps (same global batch of 4): the same
    losses, a checkpoint that records 2 ranks; then a resume on two nodes continues it exactly."""
    db = tiny_db(tmp_path)
    cfg = write_train_config(tmp_path / "cfg.yaml", TRAIN_KEYS)
    one, two = tmp_path / "one", tmp_path / "two"
    train.train(train.parse_args(["--config", str(cfg), "--db", str(db), "--out", str(one)]))
    assert_ok(two_nodes(["train.py", "--config", cfg, "--db", db, "--out", two, "--set", "stop_at=2"],
                        tmp_path))
    assert len(_losses(two)) == 2
    assert_ok(two_nodes(["train.py", "--db", db, "--out", two, "--resume", "--set", "stop_at=null"], tmp_path))
    want = _losses(one)
    assert len(want) == 4
    np.testing.assert_allclose(_losses(two), want, rtol=1e-5)
    state = json.loads((two / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    evals = [r for r in map(json.loads, (two / "metrics.jsonl").read_text().splitlines()) if "val_bpb" in r]
    assert evals and evals[-1]["step"] == 4


@pytest.mark.slow
def test_db_stages_on_two_nodes_equal_one_process(corpus: Path, tmp_path: Path, tmp_path_factory) -> None:
    """chunk on two nodes is the one-node 2-rank build file for file (a chunk build's shards
    follow the world size that starts it, so 2 ranks is the reference); embed, index and knn on
    two nodes over it equal one process's, stage after stage."""
    bert = shared_tiny_bert(tmp_path_factory)
    two, node = tmp_path / "two", tmp_path / "one-node"
    assert_ok(two_nodes(["-m", "index_builder", "chunk", "--input", corpus, "--out", two, *CHUNK_ARGS], tmp_path))
    out = torchrun(2, ["chunk", "--input", corpus, "--out", node, *CHUNK_ARGS])
    assert out.returncode == 0, out.stderr[-3000:]
    _same_db(two, node)
    assert len(load_manifest(two)["shards"]) == 2
    one = tmp_path / "one"
    shutil.copytree(two, one)
    stages = [["embed", "--embedder", bert, "--shard-size", "128", "--tokenize-workers", "0", "--device", "cpu"],
              ["index", "--index-key", "Flat", "--recall-sample", "100", "--deterministic", "--device", "cpu"],
              ["knn", "--k", "2", "--shard-size", "128", "--device", "cpu"]]
    for argv in stages:
        assert_ok(two_nodes(["-m", "index_builder", *argv, "--db", two], tmp_path))
        assert cli([str(a) for a in argv] + ["--db", str(one)]) == 0
        _same_db(two, one)
    assert load_manifest(two)["stages"]["knn"]["finished"]


@pytest.mark.slow
def test_all_then_add_on_two_nodes_equal_one_node(corpus: Path, tmp_path: Path, tmp_path_factory) -> None:
    """``all`` (chunk -> embed -> index -> knn in one process a rank), then ``add`` of new files
    and ``all`` again (chunk is done, the later stages update), on two nodes: the database a
    one-node 2-rank torchrun builds, file for file."""
    bert = shared_tiny_bert(tmp_path_factory)
    extra = tmp_path / "extra"
    rng = random.Random(23)
    write_corpus(extra, [random_text(rng, rng.randint(1, 40)) for _ in range(8)])
    common = [*CHUNK_ARGS, "--embedder", bert, "--shard-size", "128", "--tokenize-workers", "0",
              "--device", "cpu", "--index-key", "Flat", "--recall-sample", "100", "--deterministic",
              "--k", "2"]
    two, node = tmp_path / "two", tmp_path / "one-node"
    for db, launch in ((two, lambda argv: assert_ok(two_nodes(["-m", "index_builder", *argv], tmp_path))),
                       (node, lambda argv: _ok(torchrun(2, argv)))):
        launch(["all", "--input", corpus, "--out", db, *common])
        launch(["add", "--db", db, "--input", extra, "--workers", "1"])
        launch(["all", "--input", corpus, "--out", db, *common])  # chunk done; embed, index, knn update
    _same_db(two, node)
    assert load_manifest(two)["stages"]["knn"]["finished"]


def _ok(out) -> None:
    assert out.returncode == 0, out.stderr[-3000:]


def test_cuda_device_comes_from_local_rank_not_rank(monkeypatch) -> None:
    """On node 2 of 2 with 4 GPUs a node, RANK 5 is LOCAL_RANK 1: its GPU is cuda:1 (cuda:5 does
    not exist there); the work share and data shard follow RANK. No GPU needed: torch's view of
    CUDA is faked."""
    import torch

    from chunk_store.framework import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for key, value in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(key, value)
    assert runtime.resolve_device("cuda") == torch.device("cuda", 1)
    assert runtime.resolve_device("auto") == torch.device("cuda", 1)
    assert runtime.resolve_device("cuda:3") == torch.device("cuda", 3)
    assert (runtime.rank(), runtime.world_size(), runtime.local_rank()) == (5, 8, 1)


def test_index_report_on_a_rank_that_only_waited() -> None:
    """The index is built and recorded by rank 0; another rank's stats are empty, and its report
    says so (it once failed with KeyError 'index_key' at the end of a good 2-rank run)."""
    from chunk_store.framework.stage import RunInfo
    from index_builder.index.stage import IndexStage

    run = RunInfo(seconds=1.0, units_done=0, units_reused=0, rank=1, world_size=2)
    assert IndexStage.report(object.__new__(IndexStage), {}, run) == "index: built by rank 0 (rank 1 of 2 waited)"


FAILING_RANK = """
import sys
from pathlib import Path
from chunk_store.framework.errors import run_main
from chunk_store.framework.stage import run_stage
from tests.fixtures.toy_stage import ToyConfig, ToyStage

# 7 units over 2 ranks: rank 1 raises at unit 3, rank 0 does 0, 2, 4, 6 and waits for rank 1
sys.exit(run_main("toy", lambda: run_stage(ToyStage(Path(sys.argv[1]), ToyConfig(fail_at=3)))))
"""


def test_a_rank_failing_on_one_node_stops_the_rank_waiting_on_the_other(tmp_path: Path) -> None:
    """torchrun stops the ranks of the failed rank's node only; the rank of the other node, in
    the stage's barrier (which has no deadline), learns of the failure from the store and ends
    with a one-line error instead of waiting for ever (seen: a two-node ``all`` hung so)."""
    from chunk_store.manifest import FORMAT_VERSION, save_manifest

    db = tmp_path / "db"
    db.mkdir()
    t = "2026-01-01T00:00:00+00:00"
    save_manifest(db, {"format_version": FORMAT_VERSION, "chunk_size": 4, "seq_len": 8,
                       "stages": {"chunk": {"params": {}, "started": t, "finished": t, "stats": {}}}})
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    runs = two_nodes([script, db], tmp_path, grace=120, env={"PYTHONPATH": str(REPO)})
    assert all(r.returncode not in (0, -9) for r in runs), [r.returncode for r in runs]
    err = "".join(r.stderr for r in runs)
    assert "RuntimeError: boom" in err
    assert "toy: error: rank 1 of 2 ended with an error" in err and "rank 0 stops too" in err, err[-3000:]
    assert not (db / "total").exists()
