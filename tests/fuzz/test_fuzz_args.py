"""Fuzzing the argument front doors of train.py, retro.evaluate and retro.generate (issue 12).

The only outcomes allowed for any value: it is accepted (and then means something: finite,
in range), or it is refused with one line (UserError, or argparse's exit status 2). Never a
traceback. Bounded: hypothesis examples only, no model is trained here.
"""

from __future__ import annotations

import math
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from chunk_store import DBError
from retro import RetroConfig
from retro.train_config import TRAIN_KEYS, load_config
from tests.fixtures.train_db import REPO, tiny_model_sets

sys.path.insert(0, str(REPO))
import train  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODEL_KEYS = sorted(f for f in RetroConfig.__dataclass_fields__)
# YAML-ish value texts: numbers, specials, lists, nested lists, strings, nulls, booleans
VALUES = st.one_of(
    st.sampled_from(["abc", "[1,2]", "[a,b]", "[]", "[[1]]", "nan", ".nan", ".inf", "-.inf", "-1", "0",
                     "1e400", "null", "true", "{a: 1}", "[1, 2, 3]", "0.5", "2", "1e-3", "'x'", ": :", "[",
                     "2**70", "99999999999999999999", "\x00", "\ud800"]),
    st.integers(-10**20, 10**20).map(str), st.floats(allow_nan=True).map(repr),
    st.text(max_size=12),
)


def one_line(e: BaseException) -> bool:
    return "\n" not in str(e) and str(e).strip() != ""


@FUZZ
@given(key=st.sampled_from(sorted(TRAIN_KEYS) + [f"model.{k}" for k in MODEL_KEYS]), value=VALUES)
@example(key="model.hf_decoder", value=".nan")  # found by this test: YAML's NaN taken as a model name
def test_any_set_value_is_accepted_meaningfully_or_refused_in_one_line(key, value):
    try:
        tcfg, mdict = load_config(None, tiny_model_sets() + [f"{key}={value}"], base={})
        mcfg = RetroConfig.from_dict(mdict)
    except DBError as e:
        assert one_line(e), str(e)
        return
    for v in list(tcfg.to_dict().values()) + list(mcfg.to_dict().values()):
        if isinstance(v, float):
            assert math.isfinite(v), (key, value)
    assert len(tcfg.betas) == 2


@pytest.mark.parametrize("item", ["betas=[a,b]", "model.mlp_ratio=abc", "model.rope_base=abc",
                                  "model.cca_layers=abc", "model.init_std=[1,2]", "model.cca_layers=5",
                                  "lr=.inf", "betas=[[1],2]", "model.dropout=abc"])
def test_the_reported_set_values_are_one_line(item):
    with pytest.raises(DBError) as e:
        tcfg, mdict = load_config(None, tiny_model_sets() + [item], base={})
        RetroConfig.from_dict(mdict)
    assert one_line(e.value)


def parse(module, argv):
    """argparse of a CLI: the Namespace, or the exit status it refused with."""
    try:
        return module.build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code


NUMBERS = st.one_of(st.sampled_from(["-3", "0", "-1", "nan", "inf", "-inf", "1e9", "abc", "", "2", "1.5",
                                     "0.0", "1.0", "1000"]),
                    st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True).map(repr))


@FUZZ
@given(flag=st.sampled_from(["--batch-size", "--max-sequences", "--k", "--step"]), value=NUMBERS)
def test_evaluate_arguments_parse_to_meaningful_values_or_exit_2(flag, value):
    from retro import evaluate

    args = parse(evaluate, ["--run", "r", "--db", "d", flag, value])
    if isinstance(args, int) or args is None:
        assert args == 2
        return
    assert args.batch_size >= 1 and args.max_sequences >= 0
    assert args.k is None or args.k >= 1
    assert args.step is None or args.step >= 0


@FUZZ
@given(flag=st.sampled_from(["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--k", "--seed"]),
       value=NUMBERS)
def test_generate_arguments_parse_to_meaningful_values_or_exit_2(flag, value):
    from retro import generate

    args = parse(generate, ["--run", "r", "--db", "d", "--prompt", "x", flag, value])
    if isinstance(args, int) or args is None:
        assert args == 2
        return
    assert args.max_new_tokens >= 0 and args.top_k >= 0 and args.seed >= 0
    assert math.isfinite(args.temperature) and args.temperature >= 0
    assert 0 < args.top_p <= 1 and (args.k is None or args.k >= 1)


def test_the_reported_generate_and_evaluate_arguments_exit_2(capsys):
    from retro import evaluate, generate

    for argv in (["--max-new-tokens", "-1"], ["--k", "-2"], ["--temperature", "nan"], ["--temperature", "-1"],
                 ["--top-p", "2"], ["--top-k", "-5"], ["--prompt", "bad\udcffprompt"]):
        assert parse(generate, ["--run", "r", "--db", "d", "--prompt", "x", *argv]) == 2, argv
    for argv in (["--batch-size", "-3"], ["--batch-size", "0"], ["--k", "0"]):
        assert parse(evaluate, ["--run", "r", "--db", "d", *argv]) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not valid UTF-8" in err


def test_out_naming_a_file_is_one_line(tmp_path):
    out = tmp_path / "afile"
    out.write_text("x")
    args = train.parse_args(["--config", "c.yaml", "--db", "d", "--out", str(out)])
    with pytest.raises(DBError, match="is a file, not a run directory"):
        train.resolve_config(args)


def test_generate_refuses_more_neighbours_than_the_model_was_trained_with(tmp_path, tmp_path_factory, capsys):
    import torch
    import yaml

    from chunk_store import ChunkStore
    from tests.fixtures import shared_db
    from retro import RETRO, generate
    from retro.checkpoint import save_checkpoint

    db = shared_db(tmp_path_factory)
    store = ChunkStore.open(db, "train")
    cfg = RetroConfig(vocab_size=store.tokenizer.vocab_size, pad_id=store.tokenizer.pad_id, dim=32, depth=2,
                      heads=2, dim_head=16, cca_layers=[2], enc_dim=32, enc_depth=1, enc_heads=2,
                      enc_dim_head=16, chunk_size=store.chunk_size, num_neighbours=2)
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"seq_len": store.seq_len, "model": cfg.to_dict()}))
    save_checkpoint(run, 1, RETRO(cfg), None, {})
    argv = ["--run", str(run), "--db", str(db), "--prompt", "x", "--device", "cpu", "--max-new-tokens", "1"]
    assert generate.main(argv + ["--k", "1000"]) == 2
    assert "trained with 2 neighbours" in capsys.readouterr().err
    assert generate.main(argv + ["--max-new-tokens", "0"]) == 0
