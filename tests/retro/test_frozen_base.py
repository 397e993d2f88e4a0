"""A RETRO-fit's checkpoints hold only what trains plus its frozen base's identity (path and
hash); loading rebuilds the full model from the base, checks the hash, and refuses a missing or
different base in one line. Exact resume, export and old full-state checkpoints still work.
(Native RETRO-fits here, via train.py's init_from; Hugging Face ones in tests/test_retrofit.py.)"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chunk_store import ChunkStore, DBError
from retro import RETRO, RetroConfig
from retro.checkpoint import checkpoint_dir, load_model, load_weights, read_state
from retro.frozen_base import freeze_decoder, state_sha256, trainable_names
from retro.run_layout import state_file, weights_file
from tests.fixtures import assert_round_trip
from tests.fixtures.train_db import REPO, tiny_db, write_train_config

sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the script at the repository root)

KEYS = {"batch_size": 4, "micro_batch_size": 2, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "max_steps": 6,
        "eval_every": 0, "eval_batches": 1, "checkpoint_every": 3, "log_every": 1, "num_workers": 0, "seed": 5}


def _train(config: Path | None, db: Path, out: Path, *sets: str, resume: bool = False, base: Path | None = None) -> dict:
    argv = (["--config", str(config)] if config else []) + ["--db", str(db), "--out", str(out)]
    argv += (["--resume"] if resume else []) + (["--base", str(base)] if base else [])
    return train.train(train.parse_args([*argv, *[a for s in sets for a in ("--set", s)]]))


def _losses(run: Path) -> list[float]:
    return [r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]


def _set_base_path(ckpt: Path, path: str) -> None:
    state = json.loads(state_file(ckpt).read_text())
    state["frozen_base"]["path"] = path
    state_file(ckpt).write_text(json.dumps(state))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A decoder-only base run (3 steps), and a RETRO-fit of it (6 steps, checkpoints at 3 and 6)."""
    root = tmp_path_factory.mktemp("frozen-base")
    db = tiny_db(root)
    config = write_train_config(root / "cfg.yaml", KEYS)
    _train(config, db, root / "dec", "retrieval_dropout=1.0", "max_steps=3")
    fit = [f"init_from={root / 'dec'}", "freeze_decoder=true"]
    _train(config, db, root / "fit", *fit)
    return {"root": root, "db": db, "config": config, "dec": root / "dec", "fit": root / "fit", "sets": fit}


def test_checkpoint_holds_only_what_trains(runs: dict) -> None:
    ckpt, base_ckpt = checkpoint_dir(runs["fit"]), checkpoint_dir(runs["dec"])
    cfg = RetroConfig.from_yaml(runs["fit"] / "config.yaml")
    model = RETRO(cfg)
    freeze_decoder(model)
    saved = load_weights(ckpt)
    assert set(saved) == trainable_names(model) and "token_emb.weight" not in saved
    assert weights_file(ckpt).stat().st_size < 0.6 * weights_file(base_ckpt).stat().st_size
    record = read_state(ckpt)["frozen_base"]
    base = load_weights(base_ckpt)
    frozen = {k: v for k, v in base.items() if k not in saved}
    assert record == {"kind": "checkpoint", "path": str(base_ckpt.resolve()), "sha256": state_sha256(frozen),
                      "dtype": "float32", "tensors": len(frozen)}
    full, _ = load_model(runs["fit"])
    sd = full.state_dict()
    assert set(sd) == set(base)
    assert all(torch.equal(sd[k], base[k]) for k in frozen)  # the decoder: the base's, frozen
    assert all(torch.equal(sd[k], saved[k]) for k in saved)
    assert any(not torch.equal(saved[k], base[k]) for k in saved)  # retrieval trained
    assert read_state(checkpoint_dir(runs["dec"])).get("frozen_base") is None  # other runs: unchanged


def test_missing_moved_and_other_base(runs: dict, tmp_path: Path) -> None:
    run = tmp_path / "fit"
    shutil.copytree(runs["fit"], run)
    ckpt, base = checkpoint_dir(run), checkpoint_dir(runs["dec"])
    _set_base_path(ckpt, str(tmp_path / "gone"))
    with pytest.raises(DBError, match=rf"frozen base, and the base {tmp_path / 'gone'} cannot be loaded.*--base"):
        load_model(run)
    moved = tmp_path / "moved"
    shutil.copytree(runs["dec"], moved)
    model, _ = load_model(run, base=str(moved))  # a moved base: the same bytes
    ref, _ = load_model(runs["fit"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    other = tmp_path / "other"
    shutil.copytree(base, other)
    weights = load_file(str(weights_file(other)))
    weights["norm.weight"] = weights["norm.weight"] + 1e-3
    save_file(weights, str(weights_file(other)))
    with pytest.raises(DBError) as e:
        load_model(run, base=str(other))
    msg = str(e.value)
    assert "\n" not in msg and str(other.resolve()) in msg and "the run froze" in msg
    assert f"(recorded: {tmp_path / 'gone'})" in msg
    assert read_state(ckpt)["frozen_base"]["sha256"][:16] in msg
    from retro.export import main as export_main

    assert export_main(["--run", str(run), "--out", str(tmp_path / "hf"), "--base", str(other)]) != 0
    with pytest.raises(DBError, match=rf"the base {tmp_path / 'nowhere'} cannot be loaded"):
        load_model(run, base=str(tmp_path / "nowhere"))  # a --base that is not there either


def test_exact_resume_with_a_moved_base(runs: dict, tmp_path: Path) -> None:
    """Stopped at step 3 and resumed: the losses and weights of the uninterrupted run; the base
    recorded as moved is refused until --base names it, then recorded at its new place."""
    split = tmp_path / "split"
    _train(runs["config"], runs["db"], split, *runs["sets"], "stop_at=3")
    assert set(load_weights(checkpoint_dir(split))) == set(load_weights(checkpoint_dir(runs["fit"])))
    _set_base_path(checkpoint_dir(split), str(tmp_path / "gone"))
    with pytest.raises(DBError, match="cannot be loaded"):
        _train(None, runs["db"], split, "stop_at=null", resume=True)
    with pytest.raises(DBError, match="--base is for --resume"):
        _train(runs["config"], runs["db"], tmp_path / "new", *runs["sets"], base=runs["dec"])
    _train(None, runs["db"], split, "stop_at=null", resume=True, base=runs["dec"])
    assert _losses(split) == _losses(runs["fit"])  # bit-identical on CPU
    assert read_state(checkpoint_dir(split))["frozen_base"] == read_state(checkpoint_dir(runs["fit"]))["frozen_base"]
    a, b = load_model(split)[0].state_dict(), load_model(runs["fit"])[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_old_full_state_checkpoints_load_and_resume(runs: dict, tmp_path: Path, monkeypatch) -> None:
    """A RETRO-fit saved before the base was recorded (the full state, no frozen_base) loads, and
    resumes exactly; its later checkpoints stay full (nothing recorded which base it froze)."""
    old = tmp_path / "old"
    with monkeypatch.context() as m:
        m.setattr(train, "identify_base", lambda *a: None)  # what older versions wrote
        _train(runs["config"], runs["db"], old, *runs["sets"], "stop_at=3")
    assert "token_emb.weight" in load_weights(checkpoint_dir(old))
    assert "frozen_base" not in read_state(checkpoint_dir(old))
    _train(None, runs["db"], old, "stop_at=null", resume=True)
    assert _losses(old) == _losses(runs["fit"])
    a, b = load_model(old)[0].state_dict(), load_model(runs["fit"])[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and "token_emb.weight" in load_weights(checkpoint_dir(old))


def test_export_writes_the_full_model(runs: dict, tmp_path: Path) -> None:
    store = ChunkStore.open(runs["db"], "train")
    m, vocab = store.chunk_size, RetroConfig.from_yaml(runs["fit"] / "config.yaml").vocab_size
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (2, 3 * m), generator=g)
    nbrs = torch.from_numpy(store.neighbour_tokens(torch.randint(0, store.num_chunks, (2, 3, 2), generator=g).numpy()))
    out = tmp_path / "hf"
    assert_round_trip(runs["fit"], out, x, nbrs.long())
    exported = load_file(str(out / "model.safetensors"))
    full, _ = load_model(runs["fit"])
    assert set(exported) == {f"retro.{k}" for k in full.state_dict()}


@pytest.mark.slow
def test_fsdp_two_ranks_save_and_resume_only_what_trains(runs: dict, tmp_path: Path) -> None:
    """torchrun, 2 gloo ranks, FSDP2: the gathered checkpoint keeps only the trainable tensors,
    every rank rebuilds the base on resume, and the losses are the 1-rank run's."""
    import os
    import subprocess

    def torchrun(*args: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
               "--db", str(runs["db"]), "--out", str(tmp_path / "fsdp"), *args]
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    sets = [*runs["sets"], "fsdp=true", "stop_at=3"]
    torchrun("--config", str(runs["config"]), *[a for s in sets for a in ("--set", s)])
    assert set(load_weights(checkpoint_dir(tmp_path / "fsdp"))) == set(load_weights(checkpoint_dir(runs["fit"])))
    torchrun("--resume", "--set", "stop_at=null")
    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(runs["fit"]), rel=1e-5)
    assert read_state(checkpoint_dir(tmp_path / "fsdp"))["frozen_base"] == read_state(checkpoint_dir(runs["fit"]))["frozen_base"]
