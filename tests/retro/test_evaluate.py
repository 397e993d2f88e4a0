"""Evaluation numbers on a tiny DB equal a naive per-sequence reference; the CLI prints them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from chunk_store import ChunkStore
from retro import RETRO, RetroConfig
from retro.checkpoint import save_checkpoint
from retro.dataset import RetroDataset
from retro.evaluate import eval_indices, evaluate, gain_failure, main
from retro.metrics import bits_per_byte, target_bytes
from retro.train_config import TrainConfig, save_resolved
from tests.fixtures.train_db import CHUNK, K, VOCAB, tiny_db
from tests.fixtures.token_runs import longest_common_run


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return tiny_db(tmp_path_factory.mktemp("eval"))


def model_cfg(**kw) -> RetroConfig:
    base = dict(vocab_size=VOCAB, pad_id=3, dim=32, depth=2, heads=2, dim_head=16, enc_dim=32, enc_depth=1,
                enc_heads=2, enc_dim_head=16, cca_layers=[2], chunk_size=CHUNK, num_neighbours=K)
    return RetroConfig(**{**base, **kw})


def reference(model, ds, indices) -> dict[str, float]:
    """One sequence and one target token at a time, no retro.metrics code: nats from
    F.cross_entropy of each token, bits from log2 of its softmax probability, bytes as the UTF-8
    length of each sequence's non-pad targets decoded."""
    tok = ds.store.tokenizer
    nats = {"r": 0.0, "p": 0.0}
    bits = {"r": 0.0, "p": 0.0}
    ntok = nbytes = 0
    for i in indices:
        s = ds[int(i)]
        x, y = s["tokens"][:-1][None], s["tokens"][1:]
        for acc, nbrs in (("r", s["neighbours"][None]), ("p", None)):
            logits = model(x, nbrs)[0].double()
            for t in range(len(y)):
                if int(y[t]) == ds.pad_id:
                    continue
                nats[acc] += F.cross_entropy(logits[t], y[t]).item()
                bits[acc] -= math.log2(torch.softmax(logits[t], -1)[y[t]].item())
        targets = [int(t) for t in y if int(t) != ds.pad_id]
        ntok += len(targets)
        nbytes += len(tok.decode(targets).encode("utf-8"))
    return {"loss": nats["r"] / ntok, "loss_no_retrieval": nats["p"] / ntok, "tokens": ntok, "bytes": nbytes,
            "bits_per_byte": bits["r"] / nbytes, "bits_per_byte_no_retrieval": bits["p"] / nbytes}


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
@given(vocab=st.integers(2, 70_000), tokens=st.integers(1, 10_000), bytes_per_token=st.floats(0.5, 8))
def test_bits_per_byte_of_a_uniform_guess(vocab, tokens, bytes_per_token):
    """A uniform guess over ``vocab`` symbols costs log2(vocab) bits a token (ln(vocab) nats)."""
    nbytes = max(1, int(tokens * bytes_per_token))
    assert bits_per_byte(tokens * math.log(vocab), nbytes) == pytest.approx(tokens * math.log2(vocab) / nbytes)
    assert bits_per_byte(256 * math.log(256), 256) == pytest.approx(8.0)  # a byte-level uniform guess: 8 bits
    assert math.isnan(bits_per_byte(1.0, 0))


@torch.no_grad()
def test_a_uniform_model_scores_log_vocab(db):
    """With zero output weights every token has probability 1/vocab: loss ln(vocab) exactly, bits
    per byte log2(vocab) x tokens / the targets' decoded UTF-8 bytes."""
    torch.manual_seed(0)
    model = RETRO(model_cfg()).eval()
    model.to_logits.weight.zero_()  # tied: the embedding too, so the input is zero as well
    ds = RetroDataset(db, "val", k=K)
    res = evaluate(model, ds, device=torch.device("cpu"), micro_batch_size=4, max_sequences=5)
    targets = [[int(t) for t in ds[int(i)]["tokens"][1:] if int(t) != ds.pad_id] for i in eval_indices(len(ds), 5)]
    nbytes = sum(len(ds.store.tokenizer.decode(t).encode("utf-8")) for t in targets)
    assert res.tokens == sum(map(len, targets)) and res.bytes == nbytes
    assert res.loss == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert res.bits_per_byte == pytest.approx(res.tokens * math.log2(VOCAB) / nbytes, rel=1e-6)


def test_target_bytes_decodes_rows_whole_and_skips_pad(db):
    store = ChunkStore.open(db, "val")
    tok = store.tokenizer
    ids = tok.encode("def f(x):\n    return x  # é\n")
    row = np.array(ids + [store.pad_id] * 5)
    text = "def f(x):\n    return x  # é\n"
    assert tok.decode(ids) == text  # the premise: encoding round-trips
    assert target_bytes(tok, np.stack([row, row]), store.pad_id) == 2 * len(text.encode("utf-8"))


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


def test_cli_neighbour_min_match_scores_as_a_run_trained_with_it(db, tmp_path, capsys):
    """--neighbour-min-match S scores the same weights exactly as a run whose config says S
    (only the dataset reads it); a run without content alignment, or S outside [0, 1], is refused."""
    torch.manual_seed(1)
    model = RETRO(model_cfg(neighbour_alignment="content"))
    runs = {}
    for share in (0.0, 0.95):
        runs[share] = tmp_path / f"mm{share}"
        cfg = model_cfg(neighbour_alignment="content", neighbour_min_match=share)
        save_resolved(runs[share] / "config.yaml", TrainConfig(seq_len=64), cfg.to_dict())
        save_checkpoint(runs[share], 4, model, None, {})
    args = ["--db", str(db), "--max-sequences", "6", "--no-progress", "--control"]

    def scored(*extra: str) -> dict:
        assert main([*args, *extra]) == 0
        return json.loads(capsys.readouterr().out)

    trained, stricter = scored("--run", str(runs[0.0])), scored("--run", str(runs[0.95]))
    assert trained["neighbour_min_match"] == 0.0 and "trained_neighbour_min_match" not in trained
    # the share changes what the model sees here, so equality below is not a coincidence
    assert trained["bits_per_byte"] != pytest.approx(stricter["bits_per_byte"], rel=1e-9)
    override = scored("--run", str(runs[0.0]), "--neighbour-min-match", "0.95")
    assert override["neighbour_min_match"] == 0.95 and override["trained_neighbour_min_match"] == 0.0
    for key in ("bits_per_byte", "bits_per_byte_no_retrieval", "bits_per_byte_other_neighbours", "tokens"):
        assert override[key] == pytest.approx(stricter[key], rel=1e-12), key
    assert main([*args, "--run", str(runs[0.0]), "--neighbour-min-match", "1.5"]) == 2
    assert "--neighbour-min-match 1.5: model.neighbour_min_match must be in [0, 1]" in capsys.readouterr().err
    chunk_run = tmp_path / "chunk"
    save_resolved(chunk_run / "config.yaml", TrainConfig(seq_len=64), model_cfg().to_dict())
    save_checkpoint(chunk_run, 4, RETRO(model_cfg()), None, {})
    assert main([*args, "--run", str(chunk_run), "--neighbour-min-match", "0.5"]) == 2
    assert "needs model.neighbour_alignment: content" in capsys.readouterr().err


# ----------------------------------------------------------------------------- baseline, leakage


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), m=st.integers(1, 9), k=st.integers(1, 3), r=st.integers(1, 12),
       vocab=st.integers(2, 5))
def test_longest_shared_run_matches_brute_force(seed, m, k, r, vocab):
    from retro.leakage import longest_shared_run

    rng = np.random.default_rng(seed)
    chunks = rng.integers(0, vocab, (4, m))
    nbrs = rng.integers(0, vocab, (4, k, r))
    got = longest_shared_run(chunks, nbrs, pad_id=0)
    want = [max(longest_common_run(chunks[i].tolist(), nbrs[i, j].tolist(), 0) for j in range(k)) for i in range(4)]
    assert got.tolist() == want


def test_chunk_overlaps_pair_chunk_c_with_the_neighbours_of_chunk_c_minus_1():
    """Target chunk c is predicted from Ret(C_{c-1}): a neighbour of chunk 1 whose continuation
    copies chunk 2 gives chunk 2 overlap 1; chunk 0 sees no neighbours (0)."""
    from retro.leakage import chunk_overlaps

    m, pad = 4, 0
    tokens = np.arange(1, 3 * m + 2)[None]  # (1, n + 1): 3 chunks + the next chunk's first token
    nbrs = np.full((1, 3, 1, 2 * m), 99)
    nbrs[0, 1, 0, m:] = tokens[0, 2 * m:3 * m]  # continuation of chunk 1's neighbour == chunk 2
    nbrs[0, 0, 0, :2] = tokens[0, m + 1:m + 3]  # 2 tokens of chunk 1 in chunk 0's neighbour
    ov = chunk_overlaps(tokens, nbrs, m, pad)
    assert ov.shape == (1, 4) and ov[0].tolist() == [0.0, 0.5, 1.0, 0.0]


def test_query_overlap_is_the_previous_chunks_run_with_its_own_neighbours():
    """Against a brute-force longest common run: target chunk c's query overlap is chunk c - 1's
    run with Ret(C_{c-1}), token 0 included (it is a query token, though never a target)."""
    from retro.leakage import query_overlaps

    rng = np.random.default_rng(0)
    m, chunks, k, pad = 8, 4, 2, 3
    tokens = rng.integers(4, 12, size=(3, chunks * m + 1))  # a small vocabulary: chance runs exist
    nbrs = rng.integers(4, 12, size=(3, chunks, k, 2 * m))
    nbrs[0, 1, 1, 3:3 + m] = tokens[0, m:2 * m]              # chunk 1's whole text, shifted by 3
    nbrs[1, 0, 0, :m] = tokens[1, :m]                        # chunk 0, token 0 included
    got = query_overlaps(tokens, nbrs, m, pad)
    assert got.shape == (3, chunks + 1) and (got[:, 0] == 0).all()  # chunk 0 has no neighbours
    assert got[0, 2] == 1.0 and got[1, 1] == 1.0
    for r in range(3):
        for c in range(1, chunks + 1):
            query = tokens[r, (c - 1) * m:c * m]
            want = max(longest_common_run(query.tolist(), nbrs[r, c - 1, j].tolist(), pad) for j in range(k)) / m
            assert got[r, c] == want, (r, c)


@torch.no_grad()
def test_baseline_and_overlap_buckets_add_up(db):
    """The baseline is scored on the same tokens (itself as baseline: equal to no retrieval); the
    100% bucket is every chunk (tokens, bytes and bits per byte equal the overall numbers, bytes
    counted as the decoded text's UTF-8 length); buckets grow with alpha."""
    torch.manual_seed(0)
    model = RETRO(model_cfg()).eval()
    base = RETRO(model_cfg(cca_layers=[])).eval()
    ds = RetroDataset(db, "val", k=K)
    res = evaluate(model, ds, device=torch.device("cpu"), micro_batch_size=3, max_sequences=6,
                   baseline=base, overlap=True)
    same = evaluate(model, ds, device=torch.device("cpu"), micro_batch_size=4, max_sequences=6, baseline=model)
    assert same.bits_per_byte_baseline == pytest.approx(same.bits_per_byte_no_retrieval, rel=1e-6)
    assert res.bits_per_byte_baseline != pytest.approx(res.bits_per_byte_no_retrieval, rel=1e-3)
    ref_bytes = sum(len(ds.store.tokenizer.decode([t for t in ds[int(i)]["tokens"][1:].tolist() if t != 3])
                        .encode("utf-8")) for i in eval_indices(len(ds), 6))
    rows = res.overlap
    assert [r["alpha"] for r in rows] == [0.125, 0.25, 0.5, 0.75, 1.0]
    full = rows[-1]
    assert full["tokens"] == res.tokens and full["bytes"] == res.bytes == ref_bytes
    assert full["bits_per_byte_retrieval"] == pytest.approx(res.bits_per_byte, rel=1e-6)
    assert full["bits_per_byte_no_retrieval"] == pytest.approx(res.bits_per_byte_no_retrieval, rel=1e-6)
    assert full["bits_per_byte_baseline"] == pytest.approx(res.bits_per_byte_baseline, rel=1e-6)  # float32 sums
    assert all(a["tokens"] <= b["tokens"] for a, b in zip(rows, rows[1:]))
    assert rows[0]["tokens"] > 0


def test_cli_baseline_and_overlap(db, tmp_path, capsys):
    """--baseline RUN_BASE scores the decoder-only run beside RETRO; --overlap adds the buckets;
    --require-gain passes only when RETRO beats both its weights without retrieval and the baseline
    (the verdict itself: test_require_gain_verdict)."""
    torch.manual_seed(1)
    retro_run, base_run = tmp_path / "retro", tmp_path / "base"
    for run, cfg in ((retro_run, model_cfg()), (base_run, model_cfg(cca_layers=[]))):
        save_resolved(run / "config.yaml", TrainConfig(seq_len=64), cfg.to_dict())
        save_checkpoint(run, 4, RETRO(cfg), None, {})
    args = ["--db", str(db), "--max-sequences", "4", "--no-progress"]
    assert main(["--run", str(retro_run), "--baseline", str(base_run), "--overlap", *args]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["baseline_step"] == 4 and out["bits_per_byte_baseline"] > 0
    assert out["gain_over_baseline_bits_per_byte"] == pytest.approx(out["bits_per_byte_baseline"] - out["bits_per_byte"])
    assert len(out["overlap"]) == 5 and "gain_over_baseline" in out["overlap"][0]
    assert "trained baseline" in captured.err and "overlap <=" in captured.err
    save_checkpoint(base_run, 2, RETRO(model_cfg(cca_layers=[])), None, {})  # an earlier step
    assert main(["--run", str(retro_run), "--baseline", str(base_run), "--baseline-step", "2", *args]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["baseline_step"] == 2 and "baseline is at step 2, RETRO at 4" in captured.err
    rc = main(["--run", str(retro_run), "--baseline", str(base_run), "--require-gain", *args])
    out = json.loads(capsys.readouterr().out)
    beats = out["bits_per_byte"] < min(out["bits_per_byte_no_retrieval"], out["bits_per_byte_baseline"])
    assert rc == (0 if beats else 3)
    rc = main(["--run", str(retro_run), "--baseline", str(base_run), "--require-gain", "retrieval", *args])
    out = json.loads(capsys.readouterr().out)
    assert "bits_per_byte_baseline" in out  # still scored and reported
    assert rc == (0 if out["bits_per_byte"] < out["bits_per_byte_no_retrieval"] else 3)


def test_require_gain_verdict():
    from retro.evaluate import EvalResult

    def res(bpb, plain, other=None, base=None):
        return EvalResult(1.0, bpb, 1.0, plain, 10, 10, 1, None, other, None, base)

    assert gain_failure(res(1.0, 1.1)) is None
    assert "did not lower" in gain_failure(res(1.1, 1.1))
    assert "other sequences" in gain_failure(res(1.0, 1.1, other=1.0))
    assert gain_failure(res(1.0, 1.1, other=1.05, base=1.01)) is None
    assert "trained baseline" in gain_failure(res(1.0, 1.1, base=0.99))
    assert "trained baseline" in gain_failure(res(1.0, 1.1, base=1.0))
    # '--require-gain retrieval' (make demo): the baseline is reported, not part of the verdict
    assert gain_failure(res(1.0, 1.1, other=1.05, base=0.99), over_baseline=False) is None
    assert "other sequences" in gain_failure(res(1.0, 1.1, other=1.0, base=1.2), over_baseline=False)
    assert "did not lower" in gain_failure(res(1.1, 1.1, base=1.2), over_baseline=False)


def test_plot_leakage_draws_a_png_and_refuses_other_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from retro.plot import main as plot_main

    rows = [{"alpha": a, "tokens": 10, "bytes": 30, "bits_per_byte_retrieval": 1.0 + a,
             "bits_per_byte_no_retrieval": 1.1 + a, "bits_per_byte_baseline": 1.2,
             "gain_over_no_retrieval": 0.1, "gain_over_baseline": 0.2 - a} for a in (0.125, 0.25, 0.5, 0.75, 1.0)]
    (tmp_path / "eval.json").write_text(json.dumps({"overlap": rows}))
    assert plot_main(["--leakage", str(tmp_path / "eval.json")]) == 0
    png = tmp_path / "leakage.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and capsys.readouterr().out.strip() == str(png)
    (tmp_path / "plain.json").write_text(json.dumps({"bits_per_byte": 1.0}))
    assert plot_main(["--leakage", str(tmp_path / "plain.json")]) == 2
    assert "--overlap" in capsys.readouterr().err
