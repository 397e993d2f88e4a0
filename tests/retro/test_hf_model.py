"""RetroForCausalLM.from_pretrained is transformers' loader: dtype / torch_dtype, device_map,
sharded safetensors (retro.export's max_shard_size), the rotary buffers rebuilt after a
meta-device build, tied embeddings kept tied; logits equal the saved model's exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from retro.export import main as export_main
from retro.export import write_model_folder
from retro.hf_model import RetroForCausalLM
from retro.model import Rotary
from retro.run_layout import WEIGHTS, WEIGHTS_INDEX
from tests.fixtures.retro_hf import K, M, tiny_retro_hf


def _inputs(pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(4, 40, (2, 3 * M + 1), generator=g)
    nbrs = torch.randint(4, 40, (2, 3, K, 2 * M), generator=g)
    nbrs[:, :, 1, M:] = pad_id
    return x, nbrs


def _saved(tmp_path: Path, family: str, **kw) -> tuple[RetroForCausalLM, Path]:
    pad = 3 if family == "native" else 40
    model = tiny_retro_hf(family, pad_id=pad).float()
    folder = tmp_path / family
    write_model_folder(folder, model.config, model.state_dict(), {}, **kw)
    return model, folder


@pytest.mark.parametrize("family", ["native", "llama"])
def test_loads_exactly_in_the_dtype_asked(tmp_path: Path, family: str) -> None:
    model, folder = _saved(tmp_path, family)
    x, nbrs = _inputs(model.config.pad_token_id)
    loaded = RetroForCausalLM.from_pretrained(folder)
    assert not loaded.training and loaded.dtype == torch.float32
    with torch.no_grad():
        for n in (nbrs, None):
            assert torch.equal(loaded(x, neighbours=n).logits, model(x, neighbours=n).logits)
        wide = RetroForCausalLM.from_pretrained(folder, torch_dtype=torch.float64)
        assert {p.dtype for p in wide.parameters()} == {torch.float64}
        ref = model.double()
        for mod in ref.modules():  # the loader keeps rotary frequencies in float32 (bf16 would round them)
            if isinstance(mod, Rotary):
                mod.inv_freq = mod.inv_freq.float()
        assert torch.equal(wide(x, neighbours=nbrs).logits, ref(x, neighbours=nbrs).logits)
    half = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert isinstance(half, RetroForCausalLM) and {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.generate(x[:1, :5], max_new_tokens=3).shape == (1, 8)


def test_native_tied_embeddings_stay_tied(tmp_path: Path) -> None:
    model, folder = _saved(tmp_path, "native")
    assert model.retro.cfg.tie_embeddings
    loaded = RetroForCausalLM.from_pretrained(folder)
    assert loaded.retro.to_logits.weight is loaded.retro.token_emb.weight


def test_sharded_weights_load_as_one_file(tmp_path: Path) -> None:
    model, folder = _saved(tmp_path, "gpt2", max_shard_size=20_000)
    index = json.loads((folder / WEIGHTS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (folder / WEIGHTS).exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    assert all((folder / s).stat().st_size < 40_000 for s in shards)
    x, nbrs = _inputs(40)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(loaded(x, neighbours=nbrs).logits, model(x, neighbours=nbrs).logits)
    # exporting again into the same folder without shards leaves one file, no stale index
    write_model_folder(folder, model.config, model.state_dict(), {})
    assert (folder / WEIGHTS).exists() and not (folder / WEIGHTS_INDEX).exists()
    assert sorted(p.name for p in folder.glob("model*.safetensors")) == [WEIGHTS]


@pytest.mark.parametrize("family", ["native", "llama"])
def test_device_map(tmp_path: Path, family: str) -> None:
    """accelerate comes with the test extra (through retro[hf]): this runs wherever `make test` does."""
    model, folder = _saved(tmp_path, family)
    x, nbrs = _inputs(model.config.pad_token_id)
    for device_map in ("cpu", "auto"):
        loaded = RetroForCausalLM.from_pretrained(folder, device_map=device_map)
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}
        with torch.no_grad():
            for n in (nbrs, None):
                assert torch.equal(loaded(x, neighbours=n).logits, model(x, neighbours=n).logits)
        assert torch.equal(loaded.generate(x[:1, :5], max_new_tokens=4, do_sample=False),
                           model.generate(x[:1, :5], max_new_tokens=4, do_sample=False))
    # "auto" never splits a block over devices; a RETRO-fit's base decoder keeps its own layers whole
    unsplit = set(loaded._no_split_modules)
    assert {"DecoderBlock", "EncoderLayer"} <= unsplit
    if family == "llama":
        assert "LlamaDecoderLayer" in unsplit


def test_bad_shard_size_is_one_line(tmp_path: Path, capsys) -> None:
    assert export_main(["--run", str(tmp_path), "--out", str(tmp_path / "o"), "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size" in capsys.readouterr().err
