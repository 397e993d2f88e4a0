"""The index stage's recall check: recall@k of an index against exact search, on a sample of
train chunks as queries that do not count themselves."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from index_builder.embed.stage import open_embeddings
from index_builder.index.exact_search import ExactSearchConfig, exact_search

RECALL_KS = (1, 2, 10)


def measure_recall(db: str | os.PathLike, index: Any, sample: int = 1000, ks: tuple[int, ...] = RECALL_KS,
                   seed: int = 0, device: str = "cpu", rerank: int = 1) -> dict[str, float]:
    """recall@k of ``index`` vs exact search, on ``sample`` random train chunks as queries, each
    query's own row left out of both (a chunk that finds itself at distance 0 is not a neighbour
    knn would use, and counting it inflates recall@1 towards 1 for any index that stores exact
    vectors, e.g. HNSW).

    A returned id counts as a hit when its true distance is within the exact k-th distance
    (ties between duplicate chunks are common in real corpora and are not misses). With
    ``rerank`` > 1 the index is asked for that many times the candidates, re-ranked by true
    distance as the knn stage does (index_builder.knn.rerank), and the raw index's recall is
    reported beside it as ``raw_recall@k``.
    """
    from index_builder.knn.rerank import pick_rows, take_rows
    from index_builder.knn.rerank import rerank as rerank_rows
    from index_builder.knn.rerank import true_distances

    shards = open_embeddings(db, "train")
    n = sum(s.shape[0] for s in shards)
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    queries = pick_rows(shards, ids)
    kmax = min(max(ks), n - 1)
    if kmax < 1:
        return {}
    exact_i, exact_d = exact_search(queries, shards, kmax + 1, ExactSearchConfig(device=device))
    exact_d = np.sort(np.where(exact_i == ids[:, None], np.inf, exact_d), axis=1)[:, :kmax]
    _, got_i = index.search(queries, min(kmax * max(rerank, 1) + 1, n))
    got_i = without_self(got_i, ids)
    read = lambda u: take_rows(shards, u)  # noqa: E731
    # the index's own top kmax, in its order; re-ranked: the nearest kmax of its candidates
    results = {"": true_distances(queries, got_i[:, :kmax], read)}
    if rerank > 1:
        results = {"": rerank_rows(queries, got_i, kmax, read)[1], "raw_": results[""]}
    out = {}
    for prefix, true_d in results.items():
        for k in ks:
            if k > kmax:
                continue
            thresh = exact_d[:, k - 1:k] * (1 + 1e-3) + 1e-4
            hits = (true_d[:, :k] <= thresh).sum(axis=1)
            out[f"{prefix}recall@{k}"] = round(float(hits.mean() / k), 4)
    return out


def without_self(found: np.ndarray, self_ids: np.ndarray) -> np.ndarray:
    """``found`` (q, c) with each row's own id dropped, the rest kept in order, -1 at the end."""
    is_self = found == self_ids[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")
    out = np.take_along_axis(found, order, axis=1)
    out[np.take_along_axis(is_self, order, axis=1)] = -1
    return out
