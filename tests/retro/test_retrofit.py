"""RETRO-fitting a pretrained Hugging Face decoder (tiny random GPT-2 and Llama built from configs,
a tokenizer trained on the fly): chunk with its tokenizer, embed, index, knn, train the retrieval
parts only, evaluate and generate with and without retrieval."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from chunk_store.framework.errors import UserError
from chunk_store.tokenization.hugging_face import load_hf_tokenizer
from tests.fixtures import (HF_FAMILIES, assert_round_trip, build_index_db, build_tiny_db, make_hf_tokenizer, make_tiny_hf_decoder,
                      random_text, shared_tiny_bert, write_corpus)
from retro.checkpoint import checkpoint_dir, load_model, load_weights, read_state
from retro.config import RetroConfig
from retro.hf_decoder import load_pretrained, retrofit_config
from tests.fixtures.train_db import REPO

sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the script at the repository root)

CHUNK, SEQ = 16, 64
SMALL = dict(cca_layers=[2, 4], chunk_size=CHUNK, num_neighbours=2, enc_dim=32, enc_depth=1, enc_heads=2,
             enc_dim_head=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per family: its decoder folder (with tokenizer) and a DB chunked with that tokenizer, with
    embeddings, an index and neighbours."""
    root = tmp_path_factory.mktemp("retrofit")
    texts = [random_text(random.Random(i)) for i in range(30)]
    write_corpus(root / "corpus", texts)
    bert = shared_tiny_bert(tmp_path_factory)
    out = {}
    for family in HF_FAMILIES:
        tok = make_hf_tokenizer(root / f"tok-{family}", texts, family=family)
        decoder = make_tiny_hf_decoder(root / f"decoder-{family}", tok, family=family)
        db = build_tiny_db(root / f"db-{family}", root / "corpus", tokenizer_file=f"hf:{decoder}",
                           chunk_size=CHUNK, seq_len=SEQ)
        build_index_db(db, bert, chunk_size=CHUNK)
        out[family] = {"decoder": decoder, "db": db}
    return out


def _model(decoder: Path) -> torch.nn.Module:
    cfg = retrofit_config(RetroConfig(hf_decoder=str(decoder), **SMALL), load_hf_tokenizer(str(decoder)))
    return load_pretrained(cfg).eval()


@pytest.fixture(scope="module")
def decoders(setup: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """GPT-2 and Llama (with their DBs), plus Mistral and Qwen2 (Llama's tokenizer), no DB."""
    root = tmp_path_factory.mktemp("more-decoders")
    out = {family: setup[family]["decoder"] for family in HF_FAMILIES}
    for family in ("mistral", "qwen2"):
        out[family] = make_tiny_hf_decoder(root / family, setup["llama"]["decoder"], family=family)
    return out


@pytest.mark.parametrize("family", [*HF_FAMILIES, "mistral", "qwen2"])
def test_step0_logits_are_the_base_models(decoders: dict, family: str) -> None:
    """Zero-initialised CCA outputs: with neighbours, the untrained retrofit IS the base model; and
    once CCA is non-zero, incremental decoding (the decoder's KV cache, chunk-end encoding) equals
    the full forward, as in the native model."""
    from transformers import AutoModelForCausalLM

    decoder = decoders[family]
    model = _model(decoder)
    base = AutoModelForCausalLM.from_pretrained(decoder).eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.cfg.vocab_size
    x = torch.randint(0, vocab, (2, 3 * CHUNK + 5), generator=g)
    nbrs = torch.randint(0, vocab, (2, 3, 2, 2 * CHUNK), generator=g)
    with torch.no_grad():
        ref = base(torch.where(x < base.config.vocab_size, x, model.fill_id)).logits
        assert torch.equal(model(x, nbrs), ref) and torch.equal(model(x), ref)
        for cca in model.cca.values():
            torch.nn.init.normal_(cca.attn.to_out.weight, std=0.3)
        full = model(x, nbrs)
        assert not torch.allclose(full, ref, atol=1e-3)
        cache = model.new_cache(2, x.shape[1])
        parts = [model.forward_incremental(x[:, :CHUNK - 3], cache, nbrs[:, :0])]
        for t in range(CHUNK - 3, x.shape[1]):
            parts.append(model.forward_incremental(x[:, t:t + 1], cache, nbrs[:, :(t + 1) // CHUNK]))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


def _sets(setup: dict, family: str, steps: int = 3, extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    return [f"model.hf_decoder={setup[family]['decoder']}", "model.cca_layers=[2,4]",
            f"model.chunk_size={CHUNK}", "model.num_neighbours=2", "model.enc_dim=32", "model.enc_depth=1",
            "model.enc_heads=2", "model.enc_dim_head=16", f"seq_len={SEQ}", "batch_size=4",
            "micro_batch_size=4", "lr=1e-2", "min_lr=1e-3", "warmup_steps=1", f"max_steps={steps}",
            "eval_every=0", "eval_batches=2", "checkpoint_every=0", "num_workers=0", "dtype=float32", "log_every=1",
            "device=cpu", *extra]


def _train(setup: dict, family: str, out: Path, db: Path | None = None, steps: int = 3,
           extra: tuple[str, ...] | list[str] = ()) -> dict:
    sets = _sets(setup, family, steps, extra)
    args = train.parse_args(["--config", str(REPO / "configs" / "retrofit.yaml"), "--db",
                             str(db or setup[family]["db"]), "--out", str(out),
                             *[a for s in sets for a in ("--set", s)]])
    return train.train(args)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_retrofit_trains_only_retrieval(setup: dict, family: str, tmp_path: Path, capsys) -> None:
    """A few steps: every decoder weight bit-identical to the pretrained file, every CCA output
    projection moved off zero; evaluate without retrieval scores the base model; generation
    without retrieval is the base model's greedy decoding; with retrieval it retrieves."""
    from transformers import AutoModelForCausalLM

    from retro.evaluate import main as evaluate_main
    from retro.generate import main as generate_main

    run = tmp_path / "run"
    _train(setup, family, run, extra=["stop_at=2"])
    summary = train.train(train.parse_args(["--db", str(setup[family]["db"]), "--out", str(run), "--resume",
                                                "--set", "stop_at=null"]))
    assert summary["step"] == 3 and summary["val_bpb"] == summary["val_bpb"]
    saved = load_weights(checkpoint_dir(run))  # only what trains; the frozen decoder is the base's
    assert saved and not any(k.startswith("decoder.") for k in saved)
    record = read_state(checkpoint_dir(run))["frozen_base"]
    assert (record["kind"], record["path"]) == ("hf", str(Path(setup[family]["decoder"]).resolve()))
    weights = load_model(run)[0].state_dict()
    base = AutoModelForCausalLM.from_pretrained(setup[family]["decoder"]).eval()
    base_sd = base.state_dict()
    decoder_keys = [k for k in weights if k.startswith("decoder.")]
    assert len(decoder_keys) == len(base_sd)
    for k in decoder_keys:
        assert torch.equal(weights[k], base_sd[k[len("decoder."):]]), k
    outs = [k for k in weights if k.startswith("cca.") and k.endswith("to_out.weight")]
    assert outs and all(weights[k].abs().max() > 0 for k in outs)

    capsys.readouterr()
    assert evaluate_main(["--run", str(run), "--db", str(setup[family]["db"]), "--max-sequences", "4",
                          "--device", "cpu", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    model, cfg = load_model(run)
    with torch.no_grad():  # the same sequences scored by the untouched base model
        from chunk_store import ChunkStore
        from retro.dataset import RetroDataset
        from retro.evaluate import eval_indices, summed_loss

        ds = RetroDataset(ChunkStore.open(setup[family]["db"], "val"), "val", k=2)
        toks = torch.from_numpy(ds.get_batch(eval_indices(len(ds), 4))["tokens"])
        plain = summed_loss(lambda x, _n: base(torch.where(x < base.config.vocab_size, x, model.fill_id)).logits,
                            toks[:, :-1], toks[:, 1:], None, cfg.pad_id)
    assert res["loss_no_retrieval"] == pytest.approx(plain / res["tokens"], rel=1e-5)

    common = ["--run", str(run), "--db", str(setup[family]["db"]), "--prompt", "def f(x):\n    return",
              "--max-new-tokens", "40", "--temperature", "0", "--device", "cpu", "--json"]
    assert generate_main([*common, "--no-retrieval"]) == 0
    plain_gen = json.loads(capsys.readouterr().out)
    prompt = load_hf_tokenizer(str(setup[family]["decoder"])).encode("def f(x):\n    return")
    ref = base.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0].tolist()
    n = len(plain_gen["tokens"])
    assert plain_gen["tokens"] == ref[:n]
    assert generate_main(common) == 0
    with_ret = json.loads(capsys.readouterr().out)
    assert with_ret["retrieval"] and len(with_ret["chunks"]) >= 1

    # export: the folder loads as a transformers model scoring exactly as the checkpoint, with the
    # decoder's tokenizer, and generates as the CLI does, with a retriever and without
    from transformers import AutoTokenizer

    from index_builder import Retriever

    batch = ds.get_batch(eval_indices(len(ds), 2))
    out = tmp_path / "hf"
    hf = assert_round_trip(run, out, torch.from_numpy(batch["tokens"]).long(),
                           torch.from_numpy(batch["neighbours"]).long())
    assert AutoTokenizer.from_pretrained(out)("def f(x):\n    return")["input_ids"] == prompt
    assert "RETRO-fitted" in (out / "README.md").read_text()
    ids = torch.tensor([prompt])
    assert hf.generate(ids, max_new_tokens=40)[0].tolist() == plain_gen["tokens"]
    got = hf.generate(ids, max_new_tokens=40, retriever=Retriever.open(setup[family]["db"]))[0].tolist()
    assert got == with_ret["tokens"]


def test_db_with_another_tokenizer_is_refused(setup: dict, tmp_path: Path) -> None:
    """The DB must use the decoder's tokenizer: one line, before any weight is loaded."""
    with pytest.raises(UserError, match="is not .*tokenizer"):
        _train(setup, "gpt2", tmp_path / "run", db=setup["llama"]["db"])
    sp_db = build_tiny_db(tmp_path / "sp-db", chunk_size=CHUNK, seq_len=SEQ, n_docs=8)
    with pytest.raises(UserError, match="sentencepiece"):
        _train(setup, "gpt2", tmp_path / "run2", db=sp_db)


@pytest.mark.slow
def test_retrofit_of_a_trained_decoder_pays(tmp_path: Path) -> None:
    """The demo corpus (stdlib encodings/): a tiny GPT-2 is first trained as a plain LM (train.py
    with model.hf_decoder, freeze_decoder=false, retrieval_dropout=1), saved as a Hugging Face
    folder, then RETRO-fitted frozen; retrieval must lower val bits per byte, also against the
    control (other sequences' neighbours)."""
    import shutil
    import sysconfig

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from index_builder.embed.embedder import default_embedder
    from retro.evaluate import main as evaluate_main

    encodings = Path(sysconfig.get_paths()["stdlib"]) / "encodings"
    texts = [p.read_text() for p in sorted(encodings.glob("*.py"))]
    tok = make_hf_tokenizer(tmp_path / "tok", texts, vocab_size=1024)
    scratch = make_tiny_hf_decoder(tmp_path / "scratch", tok, "gpt2", hidden=128, layers=4)
    db = build_tiny_db(tmp_path / "db", encodings, tokenizer_file=f"hf:{scratch}", chunk_size=64, seq_len=512,
                       val_fraction=0.1)
    build_index_db(db, default_embedder(), chunk_size=64, shard_size=4096)
    common = ["seq_len=512", "batch_size=4", "micro_batch_size=4", "eval_every=0", "eval_batches=8",
              "checkpoint_every=0", "num_workers=0", "dtype=float32", "device=cpu", "model.chunk_size=64",
              "model.cca_layers=[2,4]", "model.enc_dim=64", "model.enc_depth=2", "model.enc_heads=2",
              "model.enc_dim_head=32"]

    def run_train(out: Path, decoder: Path, extra: list[str]) -> None:
        sets = [f"model.hf_decoder={decoder}", *common, *extra]
        train.train(train.parse_args(["--config", str(REPO / "configs" / "retrofit.yaml"), "--db", str(db),
                                      "--out", str(out), *[a for s in sets for a in ("--set", s)]]))

    # 1. the "pretrained" decoder: a plain LM on the corpus, then saved as a Hugging Face folder
    run_train(tmp_path / "pretrain", scratch, ["freeze_decoder=false", "retrieval_dropout=1.0", "lr=3e-3",
                                               "min_lr=3e-4", "warmup_steps=30", "max_steps=300"])
    weights = load_file(str(checkpoint_dir(tmp_path / "pretrain") / "model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(scratch)
    base.load_state_dict({k[len("decoder."):]: v for k, v in weights.items() if k.startswith("decoder.")})
    pretrained = tmp_path / "pretrained"
    base.save_pretrained(pretrained)
    for f in tok.iterdir():
        shutil.copy(f, pretrained / f.name)
    # 2. RETRO-fit it, frozen
    run = tmp_path / "retrofit"
    run_train(run, pretrained, ["lr=3e-3", "min_lr=3e-4", "warmup_steps=30", "max_steps=300"])
    assert evaluate_main(["--run", str(run), "--db", str(db), "--control", "--require-gain", "--device", "cpu",
                          "--no-progress"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True])
def test_retrofit_two_ranks_equal_one(setup: dict, tmp_path: Path, fsdp: bool) -> None:
    """torchrun, 2 gloo ranks x micro-batch 2 (DDP, or FSDP2 fully_shard): the losses of one rank x
    2 micro-batches of 2 (gradient accumulation), the frozen Llama decoder bit-identical."""
    import os
    import subprocess

    from retro.metrics import read_metrics

    sets = [s for s in _sets(setup, "llama", steps=2) if not s.startswith("micro_batch_size")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--config", str(REPO / "configs" / "retrofit.yaml"), "--db", str(setup["llama"]["db"]),
           "--out", str(tmp_path / "two"), *[a for s in [*sets, "micro_batch_size=2", f"fsdp={str(fsdp).lower()}"]
                                             for a in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _train(setup, "llama", tmp_path / "one", steps=2, extra=["micro_batch_size=2"])  # 2 micro-steps
    two, one = ([r["train_loss"] for r in read_metrics(tmp_path / run) if "train_loss" in r] for run in ("two", "one"))
    # the same 4 sequences a step, grouped otherwise into micro-batches (rank r takes every 2nd
    # index): each micro-batch's mean over its non-pad tokens weighs the sequences a little differently
    assert len(one) == 2 and two == pytest.approx(one, rel=1e-3)
    a, b = load_model(tmp_path / "two")[0].state_dict(), load_model(tmp_path / "one")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))


def test_bf16_frozen_decoder_checkpoint_loads_on_cpu(decoders: dict, tmp_path: Path) -> None:
    """A GPU RETRO-fit holds its frozen decoder in bf16 (train.build_model): the checkpoint keeps
    only CCA/encoder, the hash is of the bf16 tensors, and a CPU load rebuilds them in bf16, then
    float32 (as a full bf16 checkpoint always loaded); another dtype's base is refused."""
    from retro.checkpoint import save_checkpoint
    from retro.frozen_base import freeze_decoder, identify_base
    from retro.hf_decoder import save_decoder_files
    from retro.run_layout import RunLayout
    from retro.train_config import TrainConfig, save_resolved

    decoder = decoders["gpt2"]
    cfg = retrofit_config(RetroConfig(hf_decoder=str(decoder), **SMALL), load_hf_tokenizer(str(decoder)))
    model = load_pretrained(cfg, dtype=torch.bfloat16)
    freeze_decoder(model)
    tcfg = TrainConfig(freeze_decoder=True)
    base = identify_base(model, tcfg, cfg)
    assert base is not None and (base.kind, base.dtype) == ("hf", "bfloat16")
    run = tmp_path / "run"
    run.mkdir()
    save_resolved(RunLayout(run).config, tcfg, cfg.to_dict())
    save_decoder_files(cfg, RunLayout(run).decoder_dir)
    save_checkpoint(run, 1, model, None, {}, frozen_base=base)
    assert not any(k.startswith("decoder.") for k in load_weights(checkpoint_dir(run)))
    loaded = load_model(run)[0].state_dict()
    assert all(torch.equal(loaded[k], v.float()) for k, v in model.state_dict().items())
    state = json.loads((checkpoint_dir(run) / "state.json").read_text())
    state["frozen_base"]["dtype"] = "float32"  # the same base, held otherwise: other bytes
    (checkpoint_dir(run) / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match="the run froze"):
        load_model(run)


def test_resume_with_a_moved_base_decoder(setup: dict, tmp_path: Path) -> None:
    """The base decoder's folder moved between stop and resume: refused in one line, then resumed
    with --base (checked by hash), which the run records from then on."""
    import shutil

    decoder = tmp_path / "decoder"
    shutil.copytree(setup["gpt2"]["decoder"], decoder)
    run = tmp_path / "run"
    _train(setup, "gpt2", run, extra=[f"model.hf_decoder={decoder}", "stop_at=2"])  # the later --set wins
    moved = tmp_path / "moved"
    decoder.rename(moved)
    resume = ["--db", str(setup["gpt2"]["db"]), "--out", str(run), "--resume", "--set", "stop_at=null"]
    with pytest.raises(UserError, match=str(decoder)):
        train.train(train.parse_args(resume))
    summary = train.train(train.parse_args([*resume, "--base", str(moved)]))
    assert summary["step"] == 3
    record = read_state(checkpoint_dir(run))["frozen_base"]
    assert record["path"] == str(moved.resolve())
    weights = load_model(run, base=str(moved))[0].state_dict()
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(moved).state_dict()
    assert all(torch.equal(weights[f"decoder.{k}"], v) for k, v in base.items())
