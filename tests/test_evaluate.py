"""Evaluation numbers on a tiny DB equal a naive per-sequence reference; the CLI prints them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from chunk_store import ChunkStore
from retro import RETRO, RetroConfig
from retro.checkpoint import save_checkpoint
from retro.dataset import RetroDataset
from retro.evaluate import eval_indices, evaluate, main
from retro.metrics import bits_per_byte, target_bytes
from retro.train_config import TrainConfig, save_resolved
from train_db import CHUNK, K, VOCAB, tiny_db


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return tiny_db(tmp_path_factory.mktemp("eval"))


def model_cfg(**kw) -> RetroConfig:
    base = dict(vocab_size=VOCAB, pad_id=3, dim=32, depth=2, heads=2, dim_head=16, enc_dim=32, enc_depth=1,
                enc_heads=2, enc_dim_head=16, cca_layers=[2], chunk_size=CHUNK, num_neighbours=K)
    return RetroConfig(**{**base, **kw})


def reference(model, ds, indices) -> dict[str, float]:
    """One sequence at a time, log-softmax and gather by hand, bytes from the DB's text."""
    tok = ds.store.tokenizer
    nll_r = nll_p = 0.0
    ntok = nbytes = 0
    for i in indices:
        s = ds[int(i)]
        x, y = s["tokens"][:-1][None], s["tokens"][1:]
        keep = y != ds.pad_id
        for nbrs, acc in ((s["neighbours"][None], "r"), (None, "p")):
            logp = torch.log_softmax(model(x, nbrs)[0].double(), -1)
            nll = -logp[torch.arange(len(y)), y][keep].sum().item()
            if acc == "r":
                nll_r += nll
            else:
                nll_p += nll
        ntok += int(keep.sum())
        nbytes += len(tok.decode(y[keep].tolist()).encode("utf-8"))
    return {"loss": nll_r / ntok, "loss_no_retrieval": nll_p / ntok, "tokens": ntok, "bytes": nbytes,
            "bits_per_byte": nll_r / nbytes / math.log(2), "bits_per_byte_no_retrieval": nll_p / nbytes / math.log(2)}


@torch.no_grad()
def test_evaluate_matches_naive_reference(db):
    torch.manual_seed(0)
    model = RETRO(model_cfg()).eval()
    ds = RetroDataset(db, "val", k=K)
    res = evaluate(model, ds, device=torch.device("cpu"), micro_batch_size=3, max_sequences=7)
    ref = reference(model, ds, eval_indices(len(ds), 7))
    assert res.sequences == 7 and res.tokens == ref["tokens"] and res.bytes == ref["bytes"]
    for key in ("loss", "loss_no_retrieval", "bits_per_byte", "bits_per_byte_no_retrieval"):
        assert getattr(res, key) == pytest.approx(ref[key], rel=1e-5), key
    assert res.loss != res.loss_no_retrieval  # the neighbours do reach the model


@torch.no_grad()
def test_control_scores_with_other_sequences_neighbours(db):
    torch.manual_seed(0)
    model = RETRO(model_cfg()).eval()
    ds = RetroDataset(db, "val", k=K)
    n = len(ds)
    res = evaluate(model, ds, device=torch.device("cpu"), micro_batch_size=2, control=True)
    plain = evaluate(model, ds, device=torch.device("cpu"), micro_batch_size=5)
    assert res.loss == pytest.approx(plain.loss, rel=1e-6) and res.loss_other_neighbours is not None
    nll = ntok = 0.0
    for i in range(n):  # reference: sequence i scored with sequence (i + n // 2) % n's neighbours
        x, y = ds[i]["tokens"][:-1][None], ds[i]["tokens"][1:]
        keep = y != ds.pad_id
        logp = torch.log_softmax(model(x, ds[(i + n // 2) % n]["neighbours"][None])[0].double(), -1)
        nll += -logp[torch.arange(len(y)), y][keep].sum().item()
        ntok += int(keep.sum())
    assert res.loss_other_neighbours == pytest.approx(nll / ntok, rel=1e-5)
    assert res.loss_other_neighbours != res.loss  # other neighbours do change the score
    d = res.to_dict()
    assert d["gain_over_other_neighbours_bits_per_byte"] == pytest.approx(
        res.bits_per_byte_other_neighbours - res.bits_per_byte)
    assert "loss_other_neighbours" not in plain.to_dict()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), m=st.integers(1, 300), world=st.integers(1, 8))
def test_eval_indices_spread_and_split_evenly(n, m, world):
    if min(n, m) < world:
        with pytest.raises(Exception, match="nothing to evaluate"):
            eval_indices(n, m, world)
        return
    idx = eval_indices(n, m, world)
    assert len(idx) % world == 0 and len(idx) > min(n, m) - world
    assert len(set(idx.tolist())) == len(idx) and idx.min() >= 0 and idx.max() < n


@settings(max_examples=30, deadline=None)
@given(loss=st.floats(0.01, 10), tokens=st.integers(1, 10_000), bytes_per_token=st.floats(0.5, 8))
def test_bits_per_byte_definition(loss, tokens, bytes_per_token):
    nbytes = max(1, int(tokens * bytes_per_token))
    assert bits_per_byte(loss * tokens, nbytes) == pytest.approx(loss * tokens / (nbytes * math.log(2)))


def test_target_bytes_decodes_rows_whole_and_skips_pad(db):
    store = ChunkStore.open(db, "val")
    tok = store.tokenizer
    ids = tok.encode("def f(x):\n    return x  # é\n")
    row = np.array(ids + [store.pad_id] * 5)
    assert target_bytes(tok, np.stack([row, row]), store.pad_id) == 2 * len(tok.decode(ids).encode("utf-8"))


def test_cli_prints_json_with_and_without_retrieval(db, tmp_path, capsys):
    cfg = model_cfg()
    torch.manual_seed(1)
    model = RETRO(cfg)
    save_resolved(tmp_path / "config.yaml", TrainConfig(seq_len=64), cfg.to_dict())
    save_checkpoint(tmp_path, 4, model, None, {})
    assert main(["--run", str(tmp_path), "--db", str(db), "--max-sequences", "6", "--batch-size", "4",
                 "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    res = evaluate(model.eval(), RetroDataset(db, "val", k=K), device=torch.device("cpu"), max_sequences=6)
    assert out["step"] == 4 and out["split"] == "val" and out["sequences"] == 6
    assert out["bits_per_byte"] == pytest.approx(res.bits_per_byte, rel=1e-6)
    assert out["bits_per_byte_no_retrieval"] == pytest.approx(res.bits_per_byte_no_retrieval, rel=1e-6)
    assert out["retrieval_gain_bits_per_byte"] == pytest.approx(
        out["bits_per_byte_no_retrieval"] - out["bits_per_byte"])
    rc = main(["--run", str(tmp_path), "--db", str(db), "--max-sequences", "6", "--no-progress", "--require-gain"])
    assert rc == (0 if out["retrieval_gain_bits_per_byte"] > 0 else 3)
    assert "bits per byte:" in capsys.readouterr().err
    assert main(["--run", str(tmp_path), "--db", str(db), "--max-sequences", "6", "--no-progress", "--control"]) == 0
    captured = capsys.readouterr()
    control = json.loads(captured.out)
    assert control["bits_per_byte"] == pytest.approx(out["bits_per_byte"], rel=1e-6)
    assert "gain_over_other_neighbours_bits_per_byte" in control and "(control)" in captured.err
    # a model that does not fit the DB is refused with both values named
    save_resolved(tmp_path / "config.yaml", TrainConfig(seq_len=64), model_cfg(vocab_size=600).to_dict())
    save_checkpoint(tmp_path, 5, RETRO(model_cfg(vocab_size=600)), None, {})
    assert main(["--run", str(tmp_path), "--db", str(db), "--no-progress"]) == 2
    assert "vocab_size=512 but the config has model.vocab_size=600" in capsys.readouterr().err
