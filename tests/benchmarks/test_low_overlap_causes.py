"""benchmarks/low_overlap_causes.py: the query match is the run the chunk *before* the target
shares with the neighbours it retrieved, and every chunk lands in exactly one cell."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import low_overlap_causes as causes  # noqa: E402
from tests.fixtures.token_runs import longest_common_run  # noqa: E402

PAD = 3


def test_query_match_is_the_previous_chunks_run_with_its_own_neighbours() -> None:
    rng = np.random.default_rng(0)
    m, chunks, k = 8, 4, 2
    tokens = rng.integers(4, 12, size=(3, chunks * m + 1))  # a small vocabulary: chance runs exist
    nbrs = rng.integers(4, 12, size=(3, chunks, k, 2 * m))
    nbrs[0, 1, 1, 3:3 + m] = tokens[0, m:2 * m]              # chunk 1's whole text, shifted by 3
    got = causes.query_matches(tokens, nbrs, m, PAD)
    assert got.shape == (3, chunks + 1)
    assert (got[:, 0] == 0).all()                             # chunk 0 has no neighbours
    assert got[0, 2] == 1.0                                   # target chunk 2 is predicted from Ret(chunk 1)
    for r in range(3):
        for c in range(1, chunks + 1):
            query = tokens[r, (c - 1) * m:c * m]
            want = max(longest_common_run(query.tolist(), nbrs[r, c - 1, j].tolist(), PAD) for j in range(k)) / m
            assert got[r, c] == want, (r, c)


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
