"""benchmarks/low_overlap_causes.py: every chunk lands in exactly one cell (the query match
itself, retro.leakage.query_overlaps, is tested in tests/retro/test_evaluate.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import low_overlap_causes as causes  # noqa: E402


def test_every_chunk_is_counted_in_one_cell() -> None:
    rng = np.random.default_rng(1)
    target, query = rng.random((5, 9)), rng.random((5, 9))
    target[0, 0], query[0, 0] = 0.125, 0.5                    # on an edge: the lower bucket
    tokens, nbytes = rng.integers(1, 64, (5, 9)), rng.integers(1, 200, (5, 9))
    losses = {name: rng.random((5, 9)) for name in causes.VARIANTS}
    sums = causes.CauseSums()
    sums.add(target, query, losses, tokens, nbytes)
    rows = sums.report()
    assert sum(r["tokens"] for r in rows) == tokens.sum()
    assert sum(r["bytes"] for r in rows) == nbytes.sum()
    low_half = next(r for r in rows if r["target_overlap"] == [0.0, 0.125] and r["query_match"] == [0.125, 0.5])
    assert low_half["tokens"] == tokens[(target <= 0.125) & (query > 0.125) & (query <= 0.5)].sum()
    assert "| o <= 12.5% | 12.5% < q <= 50.0% |" in causes.table(rows)
