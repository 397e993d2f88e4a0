"""benchmarks/bench_generation_overlap.py's pieces on a fake Retriever: the teacher-forced stale
score retrieves each chunk with exactly its stale query and scores with those neighbours in the
right (sequence, chunk) places; the twin corpus writes each document twice; a timed generate
reports the cache's fetch wait."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from retro.hf_generation import stale_query
from retro.metrics import bits_per_byte, lm_loss, target_bytes
from tests.fixtures.retro_hf import K, M, V, tiny_retro_hf

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("bench_generation_overlap")


@dataclass
class Hit:
    chunk_id: int
    doc_id: int = 0
    distance: float = 0.0
    text: str = ""


class Tok:
    pad_id = 3

    def decode(self, ids):
        return " ".join(f"w{int(i)}" for i in ids)


class Store:
    tokenizer = Tok()

    def neighbour_tokens(self, ids: np.ndarray) -> np.ndarray:
        """Deterministic (.., k, 2m) tokens per id; pad for -1."""
        ids = np.asarray(ids)
        out = (ids[..., None] * 5 + np.arange(2 * M)) % V
        return np.where(ids[..., None] < 0, 3, out)


class FakeRetriever:
    """A query's hits are a function of its text; records every query."""

    def __init__(self) -> None:
        self.store = Store()
        self.queries: list[str] = []

    def search_text(self, texts, k=2):
        self.queries += list(texts)
        return [[Hit(chunk_id=(sum(map(ord, t)) + j) % 97) for j in range(k)] for t in texts]


def test_stale_bpb_scores_with_the_stale_queries_neighbours(bench) -> None:
    model = tiny_retro_hf("native").retro
    rng = np.random.default_rng(0)
    seqs = rng.integers(4, V, size=(5, 4 * M))
    for window in (0, 2, M + 1):
        fake = FakeRetriever()
        bpb, used = bench.stale_bpb(model, fake, seqs, window, batch=2)
        want_q = [Tok().decode(stale_query(row.tolist(), u, M, window)) for row in seqs for u in range(4)]
        assert fake.queries == want_q
        ref = FakeRetriever()
        ids = np.array([[h.chunk_id for h in hits] for hits in ref.search_text(want_q, k=K)])
        nbrs = Store().neighbour_tokens(ids).reshape(5, 4, K, 2 * M)
        assert np.array_equal(used, nbrs)
        tokens = torch.as_tensor(seqs)
        with torch.no_grad():
            logits = model(tokens, torch.as_tensor(nbrs))
        loss = float(lm_loss(logits[:, :-1], tokens[:, 1:], 3, reduction="sum"))
        assert bpb == pytest.approx(bits_per_byte(loss, target_bytes(Tok(), seqs[:, 1:], 3)), rel=1e-6)  # float32 loss sums
    none, used = bench.stale_bpb(model, FakeRetriever(), seqs, None)
    assert used is None and none != bpb


def test_twin_corpus_and_a_timed_generate(bench, tmp_path: Path) -> None:
    folder = bench.write_twin_corpus(tmp_path / "c", packages=("json",), lines=40)
    files = sorted(folder.glob("*.py"))
    twins = [f for f in files if f.stem.endswith("_twin")]
    assert twins and len(files) == 2 * len(twins)
    for t in twins:
        original = (folder / f"{t.stem[:-5]}.py").read_text()
        assert t.read_text() == f"# twin of {t.stem[:-5]}\n{original}"
    hf = tiny_retro_hf("native")
    prompts = torch.tensor([[5, 6, 7, 8, 9]])
    per_tok, wait, enc = bench.generate_once(hf, FakeRetriever(), prompts, 2 * M, None)
    assert per_tok > 0 and wait == 0.0 and enc == 0.0
    assert bench.generate_once(hf, FakeRetriever(), prompts, 2 * M, "instant")[2] > 0  # the encoder ran, timed
    assert "_encode" not in vars(hf.retro)  # the timer is gone
    res = bench.latency(hf, FakeRetriever(), prompts, 2 * M, (None, "instant"), repeats=1)
    assert set(res) == {None, "instant"}


class DBTok(Tok):
    vocab_size = V


class DBStore(Store):
    """The fake store with what ``timing_model`` reads of a real DB."""

    chunk_size = M
    tokenizer = DBTok()


class DBRetriever(FakeRetriever):
    def __init__(self) -> None:
        super().__init__()
        self.store = DBStore()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_timing_path_at_a_config_override_has_every_modes_row(bench, dtype: str, monkeypatch) -> None:
    """--timing-config: a random model at configs/tiny.yaml shrunk by --set overrides, its vocab,
    pad id and chunk size taken from the DB (and said so), times every mode at batch 1 and 2. bf16
    (the CUDA path's weights) is forced here on CPU to run that path too. No timing assertions."""
    import retro.evaluate

    monkeypatch.setattr(retro.evaluate, "compute_dtype", lambda device, d="auto": dtype)
    sets = ("model.dim=32", "model.depth=6", "model.heads=2", "model.dim_head=16", "model.cca_layers=null",
            "model.enc_dim=16", "model.enc_heads=2", "model.enc_dim_head=8")
    retriever = DBRetriever()
    hf, cfg, changed = bench.timing_model("configs/tiny.yaml", sets, retriever.store, torch.device("cpu"))
    assert (cfg.dim, cfg.depth, cfg.resolved_cca_layers) == (32, 6, [6])  # the paper's rule
    assert (cfg.vocab_size, cfg.pad_id, cfg.chunk_size) == (V, 3, M)
    assert next(hf.parameters()).dtype == getattr(torch, dtype)
    assert changed == [f"vocab_size 1024 -> {V} (the DB's)", f"chunk_size 64 -> {M} (the DB's)"]
    seqs = np.random.default_rng(0).integers(4, V, size=(2, 4 * M))
    lines = bench.latency_rows(hf, retriever, seqs, (1, 2, 3), M + 1, 2 * M, (2,), repeats=1)
    modes = ["no retrieval", "instant neighbours (CCA + encoding only)", "exact (stale_tokens=0)",
             "overlapped (stale_tokens=2)"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [(r[0], r[1]) for r in rows] == [(str(b), m) for b in (1, 2) for m in modes]  # batch 3 > 2 seqs: skipped
    assert retriever.queries  # the real retrieval modes searched
    plan = bench.parse(["--timing-config", "configs/small.yaml", "--timing-set", "model.dim=64"])
    assert (plan.timing_config, plan.timing_sets) == ("configs/small.yaml", ("model.dim=64",))
