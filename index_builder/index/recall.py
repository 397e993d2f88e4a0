"""The index stage's recall check: recall@k of an index against exact search, with queries that
are not in the index: the val split's chunks where they are embedded, else a sample of train
chunks whose own ids are left out of both searches.

Why held-out queries: an index answers a vector it stores better than a new one (its own list is
the nearest to it, its code is its own, a graph index reaches it by its own links); the knn stage
asks for train and val chunks alike, and the Retriever for text it has never seen."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from chunk_store.framework.errors import UserError
from index_builder.embed.stage import open_embeddings
from index_builder.index.exact_search import ExactSearchConfig, exact_search

RECALL_KS = (1, 2, 10)


def query_split(db: str | os.PathLike) -> tuple[list[np.ndarray], str]:
    """(shards, split) the recall queries come from: val where it is embedded, else train."""
    try:
        val = open_embeddings(db, "val")
    except UserError:
        val = []
    return (val, "val") if sum(s.shape[0] for s in val) else (open_embeddings(db, "train"), "train")


def recall_queries(db: str | os.PathLike, sample: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(queries, their train ids or None, "val" | "train"): ``sample`` random val chunks where the
    val split is embedded (not in the index), else train chunks (their ids, to leave them out)."""
    from index_builder.knn.rerank import pick_rows

    shards, split = query_split(db)
    n = sum(s.shape[0] for s in shards)
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    return pick_rows(shards, ids), (ids if split == "train" else None), split


def measure_recall(db: str | os.PathLike, index: Any, sample: int = 1000, ks: tuple[int, ...] = RECALL_KS,
                   seed: int = 0, device: str = "cpu", rerank: int = 1) -> dict[str, float]:
    """recall@k of ``index`` vs exact search over the train chunks, on ``sample`` held-out
    queries (:func:`recall_queries`): val chunks, else train chunks with each query's own row left
    out of both (a chunk that finds itself at distance 0 is not a neighbour knn would use, and
    counting it inflates recall@1 towards 1 for any index that stores exact vectors, e.g. HNSW).

    A returned id counts as a hit when its true distance is within the exact k-th distance
    (ties between duplicate chunks are common in real corpora and are not misses). With
    ``rerank`` > 1 the index is asked for that many times the candidates, re-ranked by true
    distance as the knn stage does (index_builder.knn.rerank), and the raw index's recall is
    reported beside it as ``raw_recall@k``.
    """
    from index_builder.index.fast_scan import fast_scan_or_index
    from index_builder.knn.rerank import take_rows
    from index_builder.knn.rerank import rerank as rerank_rows
    from index_builder.knn.rerank import true_distances

    shards = open_embeddings(db, "train")
    n = sum(s.shape[0] for s in shards)
    queries, ids, _ = recall_queries(db, sample, seed)
    own = 0 if ids is None else 1  # a train query's own row, searched for and dropped
    kmax = min(max(ks), n - own)
    if kmax < 1 or not len(queries):
        return {}
    exact_i, exact_d = exact_search(queries, shards, kmax + own, ExactSearchConfig(device=device))
    if ids is not None:
        exact_d = np.where(exact_i == ids[:, None], np.inf, exact_d)
    exact_d = np.sort(exact_d, axis=1)[:, :kmax]
    searched = fast_scan_or_index(index)  # 4-bit PQ codes: searched as knn and the Retriever search them
    _, got_i = searched.search(queries, min(kmax * max(rerank, 1) + own, n))
    if ids is not None:
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
