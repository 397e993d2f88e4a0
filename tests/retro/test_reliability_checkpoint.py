"""Checkpoint faults a hostile user tried (issue 12): each is one UserError line, never a traceback."""

from __future__ import annotations

import json

import pytest
import torch

from chunk_store import DBError
from retro import RETRO
from retro import checkpoint as ck
from retro.train_config import TrainConfig, save_resolved
from tests.fixtures.checkpoints import tiny_cfg, trained


def test_a_checkpoint_of_another_shape_is_one_line_naming_the_shape(tmp_path):
    cfg = tiny_cfg()
    model, opt = trained(cfg, steps=1)
    ck.save_checkpoint(tmp_path, 1, model, opt, {})
    wider = cfg.to_dict() | {"dim": 48}
    save_resolved(tmp_path / "config.yaml", TrainConfig(), wider)
    with pytest.raises(DBError, match=r"does not fit the model: .* has shape \(.*32.*\) in the checkpoint") as e:
        ck.load_model(tmp_path)
    assert "\n" not in str(e.value)
    other = RETRO(type(cfg).from_dict(wider))
    with pytest.raises(DBError, match="has shape"):
        ck.load_checkpoint(ck.checkpoint_dir(tmp_path), other, torch.optim.AdamW(other.parameters()))


@pytest.mark.parametrize("state", ['{"step": "abc"}', '{"step": -1}', "[]", '{"step": true}', "\xff"])
def test_a_bad_state_file_is_one_line(tmp_path, state):
    model, opt = trained(tiny_cfg(), steps=1)
    path = ck.save_checkpoint(tmp_path, 1, model, opt, {})
    (path / "state.json").write_bytes(state.encode("utf-8", "surrogateescape") if state != "\xff" else b"\xff")
    with pytest.raises(DBError, match="corrupt"):
        ck.read_state(path)


def test_a_truncated_optimizer_file_is_one_line(tmp_path):
    cfg = tiny_cfg()
    model, opt = trained(cfg, steps=1)
    path = ck.save_checkpoint(tmp_path, 1, model, opt, {})
    data = (path / "optimizer.safetensors").read_bytes()
    (path / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    fresh = RETRO(cfg)
    with pytest.raises(DBError, match="corrupt .*optimizer.safetensors"):
        ck.load_checkpoint(path, fresh, torch.optim.AdamW(fresh.parameters()))
    meta = json.loads((path / "state.json").read_text())
    assert meta["step"] == 1
