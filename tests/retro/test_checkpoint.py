"""Checkpoints: exact round trip through safetensors + JSON, no unpickling, atomic publication."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch

from chunk_store import DBError
from retro import RETRO
from retro import checkpoint as ck
from retro.train_config import TrainConfig, save_resolved
from tests.fixtures.checkpoints import step, tiny_cfg, trained


def test_round_trip_is_exact_and_training_continues_identically(tmp_path):
    cfg = tiny_cfg()
    model, opt = trained(cfg)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = ck.save_checkpoint(tmp_path, 2, model, opt, {"data": {"position": 5}, "note": (1, 2)})
    expect_rng = (random.random(), np.random.rand(), torch.rand(1).item())
    assert path == tmp_path / "checkpoints" / "step_00000002"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"

    model2 = RETRO(cfg)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, betas=(0.9, 0.95))
    meta = ck.load_checkpoint(ck.checkpoint_dir(tmp_path), model2, opt2)
    assert meta["step"] == 2 and meta["data"] == {"position": 5} and ck._from_json(meta["note"]) == (1, 2)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect_rng
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k
    assert model2.to_logits.weight is model2.token_emb.weight  # tying survives
    assert tuple(opt2.param_groups[0]["betas"]) == (0.9, 0.95)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        for key in s1[i]:
            assert torch.equal(torch.as_tensor(s1[i][key]), torch.as_tensor(s2[i][key])), (i, key)
    assert step(model, opt) == step(model2, opt2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model, opt = trained(tiny_cfg(), steps=1)
    ck.save_checkpoint(tmp_path, 1, model, opt, {})

    def refuse(*a, **k):
        raise AssertionError("a checkpoint load tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model2 = RETRO(tiny_cfg())
    opt2 = torch.optim.AdamW(model2.parameters())
    ck.load_checkpoint(ck.checkpoint_dir(tmp_path), model2, opt2)
    files = sorted(p.name for p in (tmp_path / "checkpoints" / "step_00000001").iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "state.json"]
    json.loads((tmp_path / "checkpoints" / "step_00000001" / "state.json").read_text())


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = trained(tiny_cfg(), steps=1)
    ck.save_checkpoint(tmp_path, 1, model, opt, {})
    before = ck.load_weights(ck.checkpoint_dir(tmp_path))
    step(model, opt)
    real = ck.save_file
    calls = []

    def dying_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # weights written, optimizer not: the process "dies"
            raise KeyboardInterrupt
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 2, model, opt, {})
    monkeypatch.setattr(ck, "save_file", real)
    assert ck.checkpoint_dir(tmp_path).name == "step_00000001"
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()
    after = ck.load_weights(ck.checkpoint_dir(tmp_path))
    assert all(torch.equal(before[k], after[k]) for k in before)
    # saving the same step again replaces it atomically
    ck.save_checkpoint(tmp_path, 1, model, opt, {})
    changed = ck.load_weights(ck.checkpoint_dir(tmp_path, 1))
    assert not all(torch.equal(before[k], changed[k]) for k in before)


def test_load_model_and_errors(tmp_path):
    cfg = tiny_cfg()
    with pytest.raises(DBError, match="no checkpoint"):
        ck.checkpoint_dir(tmp_path)
    model, opt = trained(cfg, steps=1)
    save_resolved(tmp_path / "config.yaml", TrainConfig(), cfg.to_dict())
    ck.save_checkpoint(tmp_path, 1, model, opt, {})
    ck.save_checkpoint(tmp_path, 3, model, None, {})
    loaded, cfg2 = ck.load_model(tmp_path, step=1)
    assert cfg2 == cfg and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(DBError, match=r"no checkpoint for step 2 .*step_00000001, step_00000003"):
        ck.checkpoint_dir(tmp_path, 2)
    with pytest.raises(DBError, match="no optimizer state"):
        ck.load_checkpoint(ck.checkpoint_dir(tmp_path), RETRO(cfg), torch.optim.AdamW(RETRO(cfg).parameters()))
    (ck.checkpoint_dir(tmp_path) / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DBError, match="corrupt"):
        ck.load_model(tmp_path)
