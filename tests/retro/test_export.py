"""`python -m retro.export` -> a folder `RetroForCausalLM.from_pretrained` loads, scoring exactly as
the run's checkpoint (native runs here; RETRO-fitted runs in tests/test_retrofit.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from chunk_store import ChunkStore
from chunk_store.layout import TOKENIZER
from retro import RETRO, RetroConfig
from tests.fixtures import assert_round_trip
from retro.checkpoint import save_checkpoint
from retro.export import main as export_main
from retro.run_layout import DB_RECORD
from tests.fixtures.train_db import tiny_db as _tiny_db


def test_native_run_round_trips(tmp_path: Path) -> None:
    db = _tiny_db(tmp_path)
    store = ChunkStore.open(db, "train")
    tok = store.tokenizer
    cfg = RetroConfig(vocab_size=tok.vocab_size, pad_id=tok.pad_id, dim=32, depth=2, heads=2, dim_head=16,
                      cca_layers=[2], enc_dim=32, enc_depth=1, enc_heads=2, enc_dim_head=16,
                      chunk_size=store.chunk_size, num_neighbours=2)
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"seq_len": store.seq_len, "model": cfg.to_dict()}))
    (run / DB_RECORD).write_text(json.dumps({"db": str(db)}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 7, "val_loss": 5.5, "val_bpb": 2.25}) + "\n")
    save_checkpoint(run, 7, RETRO(cfg), None, {"step": 7})
    m = store.chunk_size
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, tok.vocab_size, (2, 3 * m), generator=g)
    nbrs = torch.from_numpy(store.neighbour_tokens(torch.randint(0, store.num_chunks, (2, 3, 2), generator=g).numpy()))
    out = tmp_path / "hf"
    assert_round_trip(run, out, x, nbrs.long())
    assert (out / TOKENIZER).read_bytes() == Path(tok.source).read_bytes()
    card = (out / "README.md").read_text()
    assert "optimizer steps: 7" in card and "2.2500" in card and str(db) in card


def test_native_run_without_db_record_needs_db(tmp_path: Path) -> None:
    cfg = RetroConfig(vocab_size=64, pad_id=3, dim=16, depth=1, heads=2, dim_head=8, cca_layers=[1],
                      enc_dim=16, enc_depth=1, enc_heads=2, enc_dim_head=8, chunk_size=4)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()}))
    save_checkpoint(run, 1, RETRO(cfg), None, {"step": 1})
    assert export_main(["--run", str(run), "--out", str(tmp_path / "hf")]) == 2


def test_retro_exposes_the_hf_classes_and_registers_them() -> None:
    """`from retro import RetroForCausalLM` is the documented door; it registers the Auto classes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from retro import RetroForCausalLM, RetroHFConfig

    cfg = AutoConfig.for_model("retro")
    assert isinstance(cfg, RetroHFConfig)
    assert AutoModelForCausalLM._model_mapping[RetroHFConfig] is RetroForCausalLM
    with pytest.raises(AttributeError):
        import retro

        retro.NoSuchThing  # noqa: B018


def test_sharded_checkpoint_exports_the_same_tensors_as_a_full_one(tmp_path: Path) -> None:
    """One state saved both ways (safetensors; DCP shards): the two exported folders hold the
    same tensors under the same names, in one model.safetensors each."""
    from safetensors.torch import load_file

    from retro.run_layout import is_sharded
    from retro.sharded_checkpoint import ShardedCheckpointer

    db = _tiny_db(tmp_path)
    tok = ChunkStore.open(db, "train").tokenizer
    cfg = RetroConfig(vocab_size=tok.vocab_size, pad_id=tok.pad_id, dim=16, depth=2, heads=2, dim_head=8,
                      cca_layers=[2], enc_dim=16, enc_depth=1, enc_heads=2, enc_dim_head=8, chunk_size=16)
    torch.manual_seed(0)
    model = RETRO(cfg)
    opt = torch.optim.AdamW(model.parameters())
    exported = {}
    for kind in ("full", "sharded"):
        run = tmp_path / kind
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()}))
        (run / DB_RECORD).write_text(json.dumps({"db": str(db)}))
        if kind == "full":
            save_checkpoint(run, 3, model, opt, {})
        else:
            saver = ShardedCheckpointer(run, async_save=True)
            saver.save(3, model, opt, {})
            saver.close()
        assert export_main(["--run", str(run), "--out", str(tmp_path / f"hf-{kind}")]) == 0
        exported[kind] = load_file(str(tmp_path / f"hf-{kind}" / "model.safetensors"))
    assert is_sharded(tmp_path / "sharded" / "checkpoints" / "step_00000003")
    full, sharded = exported["full"], exported["sharded"]
    assert full.keys() == sharded.keys() and "retro.token_emb.weight" in full
    assert all(torch.equal(full[k], sharded[k]) for k in full)
