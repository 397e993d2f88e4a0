"""train.py: schedule, optimizer groups, config overrides, every clear error, exact resume,
a 2-rank gloo torchrun run (equal to 1 rank with gradient accumulation), RETRO-fitting."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings, strategies as st

from chunk_store.layout import DBLayout
from chunk_store import DBError
from chunk_store.framework.errors import UserError
from retro import RETRO, RetroConfig
from retro.checkpoint import checkpoint_dir, checkpoint_weights, load_weights
from retro.distributed import ShardedBatchSampler
from retro.train_config import TrainConfig, load_config
from tests.fixtures.train_db import (CHUNK, REPO, SEQ, TRAIN_KEYS, losses, tiny_db, torchrun,
                                     write_train_config)

sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the script at the repository root)

@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return tiny_db(tmp_path_factory.mktemp("train"))


@pytest.fixture()
def config(tmp_path):
    return write_train_config(tmp_path / "cfg.yaml", TRAIN_KEYS)


def run_inprocess(config, db, out, *sets, resume=False) -> dict:
    argv = (["--config", str(config)] if config else []) + ["--db", str(db), "--out", str(out)]
    argv += ["--resume"] if resume else []
    for s in sets:
        argv += ["--set", s]
    return train.train(train.parse_args(argv))


# ----------------------------------------------------------------------------- pure pieces


@settings(max_examples=50, deadline=None)
@given(total=st.integers(1, 500), warm_frac=st.floats(0, 1), step=st.integers(0, 600))
def test_lr_schedule_warmup_then_cosine(total, warm_frac, step):
    warm = int(warm_frac * total)
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=warm, max_steps=total)
    lr = train.lr_at(step, cfg)
    assert 0 < lr <= cfg.lr + 1e-12
    if step >= total:
        assert lr == cfg.min_lr
    elif step < warm:
        assert math.isclose(lr, cfg.lr * (step + 1) / warm)
    else:
        assert lr >= cfg.min_lr - 1e-12
        assert train.lr_at(step + 1, cfg) <= lr + 1e-12  # non-increasing after warmup
    if warm < total:
        assert math.isclose(train.lr_at(warm, cfg), cfg.lr)  # the peak right after warmup


def test_optimizer_groups_no_decay_on_norms_biases_embeddings():
    cfg = RetroConfig(vocab_size=50, pad_id=3, dim=16, depth=2, heads=2, dim_head=8, enc_dim=16,
                      enc_depth=1, enc_heads=2, enc_dim_head=8, cca_layers=[2], chunk_size=4)
    model = RETRO(cfg)
    opt = train.build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "token_emb.weight" in {names[id(p)] for p in no_decay["params"]}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_sampler_is_distributed_sampler_per_epoch_and_resumable():
    n, mb, world = 23, 3, 2
    samplers = [ShardedBatchSampler(n, mb, r, world, seed=4) for r in range(world)]
    per_epoch = samplers[0].batches_per_epoch
    streams = [[b for _, b in zip(range(3 * per_epoch), iter(s))] for s in samplers]
    for epoch in range(3):
        ref = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=0, seed=4, shuffle=True)
        ref.set_epoch(epoch)
        got = sum(streams[0][epoch * per_epoch:(epoch + 1) * per_epoch], [])
        assert got == list(ref)[: per_epoch * mb]
    assert streams[0][:per_epoch] != streams[0][per_epoch:2 * per_epoch]  # reshuffled
    # the two shards are disjoint but for DistributedSampler's wrap-around padding (24 - 23 = 1)
    assert len(set(sum(streams[0][:per_epoch], [])) & set(sum(streams[1][:per_epoch], []))) <= 1
    resumed = ShardedBatchSampler(n, mb, 1, world, seed=4, start=per_epoch + 1)
    assert [b for _, b in zip(range(4), iter(resumed))] == streams[1][per_epoch + 1:per_epoch + 5]


def test_retrieval_dropout_is_a_function_of_seed_and_step():
    cfg = TrainConfig(retrieval_dropout=0.3, seed=9)
    drops = [train.drops_retrieval(s, cfg) for s in range(2000)]
    assert drops == [train.drops_retrieval(s, cfg) for s in range(2000)]
    assert 0.25 < np.mean(drops) < 0.35
    assert not any(train.drops_retrieval(s, TrainConfig()) for s in range(100))


def test_chunk_retrieval_dropout_pads_whole_chunks_as_a_function_of_seed_step_rank_micro():
    cfg = TrainConfig(retrieval_dropout=0.3, retrieval_dropout_unit="chunk", seed=9)
    nbrs = torch.randint(4, 50, (64, 8, 2, 6))
    out = train.drop_chunk_neighbours(nbrs, cfg, 3, step=5, rank=0, micro=1)
    dropped = (out == 3).all(-1).all(-1)                              # (b, l) chunks made padding
    assert torch.equal(out[~dropped], nbrs[~dropped])                 # the others untouched
    assert not (out == 3).any(-1).any(-1)[~dropped].any()             # no chunk half-dropped
    assert 0.2 < dropped.float().mean() < 0.4
    assert torch.equal(out, train.drop_chunk_neighbours(nbrs, cfg, 3, step=5, rank=0, micro=1))
    assert not torch.equal(out, train.drop_chunk_neighbours(nbrs, cfg, 3, step=5, rank=1, micro=1))
    assert not torch.equal(out, train.drop_chunk_neighbours(nbrs, cfg, 3, step=6, rank=0, micro=1))
    assert not any(train.drops_retrieval(s, cfg) for s in range(100))  # never a whole step
    step_cfg = TrainConfig(retrieval_dropout=0.3, seed=9)
    assert train.drop_chunk_neighbours(nbrs, step_cfg, 3, step=5, rank=0, micro=1) is nbrs
    with pytest.raises(UserError, match="retrieval_dropout_unit must be step or chunk"):
        TrainConfig(retrieval_dropout_unit="token")


def test_retrieval_dropout_with_a_frozen_decoder_is_refused():
    """A step without neighbours would train nothing (and autograd fails on it): one-line error."""
    with pytest.raises(UserError, match="retrieval_dropout needs a decoder that trains"):
        TrainConfig(retrieval_dropout=0.5, freeze_decoder=True)
    TrainConfig(retrieval_dropout=0.0, freeze_decoder=True)
    TrainConfig(retrieval_dropout=0.5, freeze_decoder=False)


def test_config_overrides_and_unknown_keys(tmp_path):
    tcfg, model = load_config(None, ["lr=0.01", "betas=[0.8, 0.9]", "model.dim=64", "stop_at=null"],
                              base={"model": {"dim": 32}})
    assert tcfg.lr == 0.01 and tcfg.betas == (0.8, 0.9) and model == {"dim": 64} and tcfg.stop_at is None
    with pytest.raises(DBError, match="unknown training key.*learning_rate"):
        load_config(None, ["learning_rate=1"], base={})
    with pytest.raises(DBError, match="key=value"):
        load_config(None, ["lr"], base={})
    with pytest.raises(DBError, match="min_lr"):
        load_config(None, ["min_lr=1.0"], base={})


# ----------------------------------------------------------------------------- clear errors


def test_clear_errors_before_any_compute(db, config, tmp_path):
    def err(*sets, db_=db, resume=False, cfg=config, out=tmp_path / "r"):
        with pytest.raises(DBError) as e:
            run_inprocess(cfg, db_, out, *sets, resume=resume)
        return str(e.value)

    assert "chunk_size=16 but the config has model.chunk_size=32" in err("model.chunk_size=32")
    assert f"seq_len={SEQ} but the config has seq_len=128" in err("seq_len=128")
    assert "vocab_size=512 but the config has model.vocab_size=1000" in err("model.vocab_size=1000")
    assert "pad_id=3 but the config has model.pad_id=0" in err("model.pad_id=0")
    assert "batch_size=5 cannot split over 1 rank(s) x micro_batch_size=2" in err("batch_size=5")
    assert "no neighbours" in err(db_=tiny_db(tmp_path, neighbours=False))
    assert "has no config.yaml and checkpoint" in err(resume=True)
    assert not (tmp_path / "r" / "checkpoints").exists()  # nothing was computed
    with pytest.raises(DBError, match="batch_size=6 cannot split over 2 rank"):
        TrainConfig(batch_size=6, micro_batch_size=2).grad_accum_steps(2)


def test_decoder_only_db_needs_no_neighbours(tmp_path, config):
    """retrieval_dropout=1 (decoder-only pretraining) trains on a DB without the knn stage."""
    out = run_inprocess(config, tiny_db(tmp_path, neighbours=False), tmp_path / "dec",
                        "retrieval_dropout=1.0", "max_steps=2", "eval_every=2")
    # evaluated without retrieval only: val_bpb (with) is NaN, without retrieval is a number
    assert out["step"] == 2 and "val_bpb" in out and math.isnan(out["val_bpb"])
    assert 0 < out["val_bpb_no_retrieval"] < 20


# ----------------------------------------------------------------------------- resume, torchrun, RETRO-fit


def test_resume_10_plus_10_equals_20(db, config, tmp_path):
    sets = ["max_steps=20", "checkpoint_every=5", "retrieval_dropout=0.3", "model.mlp_ratio=2.0"]
    run_inprocess(config, db, tmp_path / "full", *sets)
    run_inprocess(config, db, tmp_path / "split", *sets, "stop_at=10")
    assert len(losses(tmp_path / "split")) == 10
    with pytest.raises(DBError, match="already holds a run"):
        run_inprocess(config, db, tmp_path / "split", *sets)
    with pytest.raises(DBError, match="cannot change model"):
        run_inprocess(None, db, tmp_path / "split", "model.dim=64", resume=True)
    with pytest.raises(DBError, match="other model settings"):  # the config without the run's model.* --set
        run_inprocess(config, db, tmp_path / "split", "stop_at=null", resume=True)
    # the command that started it, repeated with --resume (its --set model.* included), continues it
    run_inprocess(config, db, tmp_path / "split", *sets, "stop_at=null", resume=True)
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert len(full) == len(split) == 20
    assert full == split  # bit-identical on CPU
    wa, wb = load_weights(checkpoint_dir(tmp_path / "full")), load_weights(checkpoint_dir(tmp_path / "split"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_chunk_retrieval_dropout_changes_training_and_resumes_bit_for_bit(db, config, tmp_path):
    sets = ["max_steps=4", "checkpoint_every=2", "eval_every=0", "retrieval_dropout=0.5", "retrieval_dropout_unit=chunk"]
    run_inprocess(config, db, tmp_path / "full", *sets)
    run_inprocess(config, db, tmp_path / "split", *sets, "stop_at=2")
    run_inprocess(config, db, tmp_path / "split", *sets, "stop_at=null", resume=True)
    run_inprocess(config, db, tmp_path / "kept", "max_steps=2", "eval_every=0")
    assert losses(tmp_path / "full") == losses(tmp_path / "split") and len(losses(tmp_path / "full")) == 4
    assert losses(tmp_path / "full")[0] != losses(tmp_path / "kept")[0]  # step 0 already reads padding


def test_torchrun_two_ranks_gloo_ddp_and_fsdp_equal_one_rank_with_accumulation(db, config, tmp_path):
    """2 ranks x micro-batch 2 see the same 4 sequences per step as 1 rank x 2 micro-steps: DDP
    stopped at step 2, then FSDP2 (fully_shard on gloo) resumed from DDP's full checkpoint, gives
    the losses, the evaluation and the full weights of 1 rank never stopped (test_checkpoint_sharded
    covers DDP and FSDP2 through sharded checkpoints)."""
    sets = ["max_steps=4", "eval_every=4", "checkpoint_every=2"]
    torchrun(config, db, tmp_path / "run", *sets, "stop_at=2", "num_workers=1")
    ddp = json.loads((tmp_path / "run" / "checkpoints" / "step_00000002" / "state.json").read_text())
    torchrun(config, db, tmp_path / "run", "fsdp=true", "stop_at=null", "num_workers=0", resume=True)
    run_inprocess(config, db, tmp_path / "one", *sets, "num_workers=1")
    one = losses(tmp_path / "one")
    assert len(one) == 4
    np.testing.assert_allclose(losses(tmp_path / "run"), one, rtol=1e-5)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in records if "val_bpb" in r]
    assert ev and ev[-1]["step"] == 4 and ev[-1]["val_bpb"] > 0 and ev[-1]["val_bpb_no_retrieval"] > 0
    fsdp = json.loads((tmp_path / "run" / "checkpoints" / "step_00000004" / "state.json").read_text())
    for state, step in ((ddp, 2), (fsdp, 4)):
        assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["data"]["position"] == step
    a, b = load_weights(checkpoint_dir(tmp_path / "run")), load_weights(checkpoint_dir(tmp_path / "one"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_torchrun_retrieval_dropped_and_token_weighted_loss(db, config, tmp_path):
    """DDP with retrieval dropped on every step (retrieval_dropout=1, RETRO-fitting's first stage)
    and on some steps (0.5) runs past step 2; the loss is the mean over every non-pad target token
    of a step: 2 ranks x 2 micro-batches of 1 sequence give the losses of 1 rank x 1 micro-batch of
    4, although the sequences carry different amounts of padding (a mean of per-micro-batch means
    would differ)."""
    from retro.dataset import RetroDataset

    db = tiny_db(tmp_path)  # a private copy, padded unevenly: 0..16 pad tokens ending each sequence
    chunks = np.load(DBLayout(db).shard(0).chunks("train"))
    starts = np.load(DBLayout(db).shard(0).seq_starts("train"))
    for i, s in enumerate(starts.tolist()):
        r = (i * 5) % 17
        if r:
            chunks[s + SEQ // CHUNK - 1, CHUNK - r:] = 3
    np.save(DBLayout(db).shard(0).chunks("train"), chunks)
    ds = RetroDataset(db, "train", retrieval=False)
    pads = (ds.get_batch(np.arange(len(ds)))["tokens"][:, 1:] == 3).sum(1)
    assert len(set(pads.tolist())) > 5  # the premise: uneven padding across sequences
    sets = ["max_steps=4", "eval_every=0", "checkpoint_every=4", "retrieval_dropout=0.5"]
    torchrun(config, db, tmp_path / "two", *sets, "micro_batch_size=1")
    run_inprocess(config, db, tmp_path / "one", *sets, "micro_batch_size=4")
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    torchrun(config, db, tmp_path / "dropped", "max_steps=3", "retrieval_dropout=1.0")
    assert len(losses(tmp_path / "dropped")) == 3


def test_activation_checkpointing_key_trains_the_same(db, config, tmp_path, monkeypatch):
    """``activation_checkpointing=true`` reaches the model and changes no loss."""
    built = []
    real = train.model_from_config
    monkeypatch.setattr(train, "model_from_config", lambda *a, **kw: built.append(real(*a, **kw)) or built[-1])
    run_inprocess(config, db, tmp_path / "plain", "max_steps=3", "retrieval_dropout=0.3")
    run_inprocess(config, db, tmp_path / "ckpt", "max_steps=3", "retrieval_dropout=0.3", "activation_checkpointing=true")
    assert [m.activation_checkpointing for m in built] == [False, True]
    np.testing.assert_allclose(losses(tmp_path / "ckpt"), losses(tmp_path / "plain"), rtol=1e-6)
    assert yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())["activation_checkpointing"] is True


def test_retro_fitting_trains_only_encoder_and_cca(db, config, tmp_path):
    run_inprocess(config, db, tmp_path / "dec", "retrieval_dropout=1.0", "max_steps=3")
    base = load_weights(checkpoint_dir(tmp_path / "dec"))
    run_inprocess(config, db, tmp_path / "fit", f"init_from={tmp_path / 'dec'}", "freeze_decoder=true",
                  "max_steps=3", "lr=0.01")
    fit = checkpoint_weights(checkpoint_dir(tmp_path / "fit"))  # the trained part + its base's frozen part
    changed = {k for k in fit if not torch.equal(fit[k], base[k])}
    # listed independently of is_retrieval_param: the tiny model's encoder and its one CCA block
    retrieval = {k for k in fit if k.startswith(("encoder.", "enc_in.")) or k.startswith("layers.1.cca")}
    assert retrieval and changed and changed <= retrieval
    assert "token_emb.weight" in fit and not changed & {"token_emb.weight", "norm.weight"}
    assert {k for k in fit if k.startswith("layers.0.")}.isdisjoint(changed)  # decoder frozen
    with pytest.raises(DBError, match="lacks decoder weights|shape mismatch"):
        run_inprocess(config, db, tmp_path / "bad", f"init_from={tmp_path / 'dec'}", "model.dim=64")
