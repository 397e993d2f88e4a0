"""Sharded checkpoints (checkpoint_format: sharded, retro.sharded_checkpoint): resumes across
world sizes and DDP <-> FSDP2 equal an uninterrupted run, a crash mid-save keeps the previous
checkpoint the latest, an asynchronous save returns before its write ends with at most one in
flight, and a RETRO-fit's sharded checkpoint holds only what trains and checks its base's hash."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from chunk_store import DBError
from retro import RETRO, RetroConfig
from retro import checkpoint as ck
from retro import sharded_checkpoint as sc
from retro.frozen_base import freeze_decoder, trainable_names
from retro.run_layout import is_sharded, shards_dir
from tests.fixtures.checkpoints import step, tiny_cfg, trained
from tests.fixtures.train_db import REPO, losses, tiny_db, torchrun, write_train_config

sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the script at the repository root)

TRAIN_KEYS = {"batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
              "max_steps": 4, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 2, "log_every": 1,
              "num_workers": 0, "seed": 5}
SHARDED = "checkpoint_format=sharded"


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return tiny_db(tmp_path_factory.mktemp("sharded"))


@pytest.fixture()
def config(tmp_path):
    return write_train_config(tmp_path / "cfg.yaml", TRAIN_KEYS)


def run_inprocess(config, db, out, *sets, resume=False) -> dict:
    argv = (["--config", str(config)] if config and not resume else []) + ["--db", str(db), "--out", str(out)]
    argv += ["--resume"] if resume else []
    for s in sets:
        argv += ["--set", s]
    return train.train(train.parse_args(argv))


def latest(run: Path) -> str:
    return ck.checkpoint_dir(run).name


def writer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(sc.WRITER_THREAD)]


# ----------------------------------------------------------------------------- resume across world sizes and wrappers


def test_two_ranks_to_one_and_one_to_two_equal_an_uninterrupted_run(db, config, tmp_path):
    """2 gloo ranks save shards at step 2 and 1 rank resumes; 1 rank saves and 2 ranks resume:
    the losses are those of a run never stopped (full checkpoints, 1 rank)."""
    run_inprocess(config, db, tmp_path / "one", "checkpoint_every=0")
    torchrun(config, db, tmp_path / "2to1", SHARDED, "stop_at=2")
    ckpt = ck.checkpoint_dir(tmp_path / "2to1")
    assert is_sharded(ckpt) and not ck.weights_file(ckpt).exists()
    assert sorted(p.name for p in shards_dir(ckpt).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    run_inprocess(None, db, tmp_path / "2to1", "stop_at=null", resume=True)
    run_inprocess(config, db, tmp_path / "1to2", SHARDED, "stop_at=2")
    torchrun(config, db, tmp_path / "1to2", "stop_at=null", resume=True)
    one = losses(tmp_path / "one")
    assert len(one) == 4
    for run in ("2to1", "1to2"):
        np.testing.assert_allclose(losses(tmp_path / run), one, rtol=1e-5, err_msg=run)
        assert latest(tmp_path / run) == "step_00000004" and is_sharded(ck.checkpoint_dir(tmp_path / run))
    a, b = ck.load_weights(ck.checkpoint_dir(tmp_path / "1to2")), ck.load_weights(ck.checkpoint_dir(tmp_path / "one"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_ddp_async_to_fsdp2_equals_an_uninterrupted_run(db, config, tmp_path):
    """DDP writes asynchronously at steps 2 and 4 of 6 (stopped at 4); FSDP2 resumes from the
    shards and ends where an uninterrupted run ends."""
    sets = ["max_steps=6"]
    run_inprocess(config, db, tmp_path / "one", *sets, "checkpoint_every=0")
    torchrun(config, db, tmp_path / "run", *sets, SHARDED, "checkpoint_async=true", "stop_at=4")
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")] != []
    assert latest(tmp_path / "run") == "step_00000004"
    state = json.loads(ck.state_file(ck.checkpoint_dir(tmp_path / "run")).read_text())
    assert state["format"] == "sharded" and state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["data"]["position"] == 4
    torchrun(config, db, tmp_path / "run", "fsdp=true", "stop_at=null", resume=True)
    np.testing.assert_allclose(losses(tmp_path / "run"), losses(tmp_path / "one"), rtol=1e-5)
    assert not list((tmp_path / "run" / "checkpoints").glob(".partial-*"))
    # FSDP2 wrote step 6 asynchronously too (the run's config keeps checkpoint_async): its shards
    # hold the same weights as the uninterrupted run's full checkpoint
    assert latest(tmp_path / "run") == "step_00000006" and is_sharded(ck.checkpoint_dir(tmp_path / "run"))
    a, b = ck.load_weights(ck.checkpoint_dir(tmp_path / "run")), ck.load_weights(ck.checkpoint_dir(tmp_path / "one"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# ----------------------------------------------------------------------------- a crash mid-save


class DyingWriter(FileSystemWriter):
    """Fails while writing step 4's shards, as a process killed mid-save would leave them."""

    def write_data(self, plan, planner):
        if "step_00000004" in str(self.path):
            raise OSError("disk died mid-save")
        return super().write_data(plan, planner)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_crash_mid_save_keeps_the_previous_checkpoint_latest(db, config, tmp_path, monkeypatch, asynchronous):
    sets = [SHARDED, f"checkpoint_async={str(asynchronous).lower()}"]
    run_inprocess(config, db, tmp_path / "one", "checkpoint_every=0")
    monkeypatch.setattr(sc, "_file_system_writer", lambda path: DyingWriter(str(path)))
    with pytest.raises(sc.CheckpointWriteError, match="step_00000004 was not written .*disk died"):
        run_inprocess(config, db, tmp_path / "run", *sets)
    assert not writer_threads()
    ckpts = tmp_path / "run" / "checkpoints"
    assert latest(tmp_path / "run") == "step_00000002"
    assert not (ckpts / "step_00000004").exists()
    assert (ckpts / ".partial-step_00000004").is_dir() and not is_sharded(ckpts / ".partial-step_00000004")
    assert [p.name for p in ckpts.iterdir() if p.name.startswith("step_")] == ["step_00000002"]
    monkeypatch.undo()
    run_inprocess(None, db, tmp_path / "run", resume=True)
    np.testing.assert_allclose(losses(tmp_path / "run"), losses(tmp_path / "one"), rtol=1e-6)
    assert latest(tmp_path / "run") == "step_00000004"
    assert not (ckpts / ".partial-step_00000004").exists()  # the next save cleared the leftovers


# ----------------------------------------------------------------------------- asynchronous saves


def test_async_save_returns_before_the_write_and_keeps_one_in_flight(tmp_path):
    """Step 1's writer is held back: save returns with the checkpoint unpublished; the save of
    step 2 first waits for step 1 (its wait finds it pending and releases it), so the writes
    never overlap; close() leaves no writer thread."""
    gate, events, found_pending = threading.Event(), [], []

    class GatedWriter(FileSystemWriter):
        def write_data(self, plan, planner):
            events.append(("begin", self.path.parent.name))
            if "step_00000001" in str(self.path) and not gate.wait(timeout=120):
                raise TimeoutError("the gate was never opened: nobody waited for the save in flight")
            fut = super().write_data(plan, planner)
            fut.wait()
            events.append(("end", self.path.parent.name))
            return fut

    class Probe(sc.ShardedCheckpointer):
        def wait(self):
            if self.pending is not None and not self.pending.done():
                found_pending.append(True)
                gate.set()
            return super().wait()

    model, opt = trained(tiny_cfg(), steps=1)
    saver = Probe(tmp_path, async_save=True, writer=lambda p: GatedWriter(str(p)))
    saver.save(1, model, opt, {"data": {"position": 1}})
    assert saver.pending is not None and not saver.pending.done()
    assert not (tmp_path / "checkpoints" / "latest").exists()  # nothing published yet
    assert ("end", ".partial-step_00000001") not in events
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step(model, opt)  # training goes on; the staged copy is what gets written
    saver.save(2, model, opt, {"data": {"position": 2}})
    assert found_pending == [True]
    assert saver.close() == tmp_path / "checkpoints" / "step_00000002"
    assert events == [("begin", ".partial-step_00000001"), ("end", ".partial-step_00000001"),
                      ("begin", ".partial-step_00000002"), ("end", ".partial-step_00000002")]  # one at a time
    assert saver.pending is None and not writer_threads()
    assert latest(tmp_path) == "step_00000002"
    w1 = ck.load_weights(ck.checkpoint_dir(tmp_path, 1))
    assert all(torch.equal(w1[k], before[k]) for k in before)
    model2 = RETRO(tiny_cfg())
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, betas=(0.9, 0.95))
    assert sc.load_sharded(ck.checkpoint_dir(tmp_path), model2, opt2)["data"] == {"position": 2}
    assert step(model, opt) == step(model2, opt2)


def test_config_refuses_async_full_checkpoints():
    from retro.train_config import TrainConfig

    with pytest.raises(DBError, match="checkpoint_async needs checkpoint_format: sharded"):
        TrainConfig(checkpoint_async=True)
    with pytest.raises(DBError, match="checkpoint_format must be full or sharded"):
        TrainConfig(checkpoint_format="zip")


# ----------------------------------------------------------------------------- RETRO-fit


def test_retrofit_sharded_checkpoint_holds_only_what_trains_and_checks_the_base(db, config, tmp_path):
    run_inprocess(config, db, tmp_path / "dec", "retrieval_dropout=1.0", "max_steps=2")
    fit = ["init_from=" + str(tmp_path / "dec"), "freeze_decoder=true", "lr=0.01"]
    run_inprocess(config, db, tmp_path / "full", *fit, "checkpoint_every=0")
    run_inprocess(config, db, tmp_path / "fit", *fit, SHARDED, "checkpoint_async=true", "stop_at=2")
    assert not writer_threads()  # the run waited for its last save and joined the writer
    ckpt = ck.checkpoint_dir(tmp_path / "fit")
    saved = FileSystemReader(str(shards_dir(ckpt))).read_metadata().state_dict_metadata
    model = RETRO(RetroConfig.from_dict(json.loads(ck.state_file(ckpt).read_text())["config"]["model"]))
    freeze_decoder(model)  # only for the names: which parameters a RETRO-fit trains
    stored = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    assert stored == trainable_names(model) and "token_emb.weight" not in stored
    optim = {k for k in saved if k.startswith("optim.state.")}
    assert optim and all(k.split(".", 2)[2].rsplit(".", 1)[0] in stored for k in optim)
    assert json.loads(ck.state_file(ckpt).read_text())["frozen_base"]["kind"] == "checkpoint"
    run_inprocess(None, db, tmp_path / "fit", "stop_at=null", resume=True)  # the base's hash checked, resumes
    np.testing.assert_allclose(losses(tmp_path / "fit"), losses(tmp_path / "full"), rtol=1e-6)
    a, b = ck.checkpoint_weights(ck.checkpoint_dir(tmp_path / "fit")), ck.checkpoint_weights(ck.checkpoint_dir(tmp_path / "full"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # 2 FSDP2 ranks write a RETRO-fit's shards (DTensors, frozen ones left out); 1 plain rank resumes
    torchrun(config, db, tmp_path / "fsdp", *fit, SHARDED, "checkpoint_async=true", "fsdp=true", "stop_at=2")
    saved = FileSystemReader(str(shards_dir(ck.checkpoint_dir(tmp_path / "fsdp")))).read_metadata().state_dict_metadata
    assert {k.removeprefix("model.") for k in saved if k.startswith("model.")} == stored
    run_inprocess(None, db, tmp_path / "fsdp", "stop_at=null", "fsdp=false", resume=True)
    np.testing.assert_allclose(losses(tmp_path / "fsdp"), losses(tmp_path / "full"), rtol=1e-5)
    # another base under the recorded path: loading refuses it, naming the hash
    dec = ck.checkpoint_dir(tmp_path / "dec")
    weights = ck.load_weights(dec)
    weights["norm.weight"] = weights["norm.weight"] + 1
    save_file(ck._dedup_for_safetensors(weights), str(ck.weights_file(dec)))
    with pytest.raises(DBError, match="another base"):
        ck.checkpoint_weights(ck.checkpoint_dir(tmp_path / "fit"))
    with pytest.raises(DBError, match="another base"):
        run_inprocess(None, db, tmp_path / "fit", "max_steps=6", resume=True)


def test_a_sharded_checkpoint_of_another_shape_or_without_optimizer_is_one_line(tmp_path):
    cfg = tiny_cfg()
    model, opt = trained(cfg, steps=1)
    sc.ShardedCheckpointer(tmp_path).save(1, model, None, {})
    wider = RETRO(RetroConfig.from_dict(cfg.to_dict() | {"dim": 48}))
    with pytest.raises(DBError, match=r"does not fit the model: .* has shape \(.*32.*\) in the checkpoint") as e:
        sc.load_sharded(ck.checkpoint_dir(tmp_path), wider, None)
    assert "\n" not in str(e.value)
    fresh = RETRO(cfg)
    with pytest.raises(DBError, match="no optimizer state"):
        sc.load_sharded(ck.checkpoint_dir(tmp_path), fresh, torch.optim.AdamW(fresh.parameters()))
    sc.load_sharded(ck.checkpoint_dir(tmp_path), fresh, None)  # the weights alone load
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
