"""Search parameters (nprobe, efSearch) chosen by the recall of the FINAL neighbours.

Why not autofaiss's tuning: it picks the cheapest parameters that meet a query-time target
(``--max-query-ms``), whatever recall that gives, and measures the raw index, not what knn keeps
after dropping the chunk itself, its training sequence's documents and blank chunks. On real text
a chunk's nearest candidates are mostly its own document's near-duplicates, so the neighbours
that survive the exclusion lie further out, where a cheaply searched index misses most.

Here each candidate setting, from the cheapest, computes the final neighbours of a sample of
train chunks (the caller's ``final`` function: the knn stage's own search with exclusions)
and compares them with the same pipeline over exact search; the first setting whose recall@k
reaches the target is kept. Where none does, the index's codes (not the probes) limit recall:
once two doublings gain less than :data:`PLATEAU`, the search stops, and the cheapest setting
within :data:`PLATEAU` of the best is kept, not a 16x dearer one that buys a rounding error
(a 150k-chunk run of synthetic vectors once climbed to nprobe 1,024 for recall@2 0.72, the
recall of nprobe 64). A returned neighbour counts as a hit when its true distance is within
the exact k-th neighbour's (ties between duplicate chunks are not misses). Pure functions of
the index and the callables: issue 9's shards tune each shard the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from index_builder.index.faiss_params import apply_search_params

HNSW_EF = (16, 32, 64, 128, 256, 512, 1024, 2048)
PLATEAU = 0.005  # recall@k: less than this gained over two doublings means the codes limit it
PLATEAU_AFTER = 4  # settings tried before a plateau may end the search (recall rises fast at first)


@dataclass(frozen=True)
class Tuning:
    """The chosen setting, its measured recall@k and every setting tried (cheapest first)."""

    param: str
    recall: float
    target: float
    reached: bool
    sample: int
    k: int
    tried: list[tuple[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidate_params(index: Any) -> list[str]:
    """faiss ParameterSpace strings, cheapest first; [] for an index with nothing to tune (Flat)."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        hnsw_q = isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)
        out, nprobe = [], 1
        while True:
            nprobe = min(nprobe, ivf.nlist)
            out.append(f"nprobe={nprobe}" + (f",quantizer_efSearch={max(64, 2 * nprobe)}" if hnsw_q else ""))
            if nprobe >= ivf.nlist:
                return out
            nprobe *= 2
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return [f"efSearch={ef}" for ef in HNSW_EF]
    return []


def neighbour_recall(got_true_d: np.ndarray, exact_d: np.ndarray) -> float:
    """recall@k of final neighbours: ``got_true_d`` (q, k) the true distances of the returned ids
    (inf where none), ``exact_d`` (q, k) exact search's (inf where fewer than k exist).

    Per row, hits = returned neighbours within the exact k-th distance (a small tolerance for
    float noise), capped at the number of exact neighbours; recall = hits / exact neighbours.
    """
    valid = np.isfinite(exact_d)
    n_true = valid.sum(axis=1)
    if n_true.sum() == 0:
        return 1.0
    kth = np.where(n_true > 0, exact_d[np.arange(len(exact_d)), np.maximum(n_true - 1, 0)], -np.inf)
    thresh = kth * (1 + 1e-3) + 1e-4
    hits = np.minimum((got_true_d <= thresh[:, None]).sum(axis=1), n_true)
    return float(hits.sum() / n_true.sum())


def tune_search(candidates: list[str], final: Callable[[str], np.ndarray], exact_d: np.ndarray,
                true_dist: Callable[[np.ndarray], np.ndarray], target: float = 0.95) -> Tuning:
    """The cheapest candidate whose final neighbours reach ``target`` recall@k; else, where
    recall plateaus below it, the cheapest within :data:`PLATEAU` of the best tried.

    ``final(param)`` -> final neighbour ids (q, k) of the sample with ``param`` applied;
    ``true_dist(ids)`` -> their true distances to the sample's queries (inf for -1).
    """
    q, k = exact_d.shape
    tried: list[tuple[str, float]] = []
    for param in candidates:
        r = round(neighbour_recall(true_dist(final(param)), exact_d), 4)
        tried.append((param, r))
        if r >= target:
            return Tuning(param, r, target, True, q, k, tried)
        if len(tried) >= PLATEAU_AFTER and r - tried[-3][1] < PLATEAU:
            break  # two doublings bought nothing: dearer settings will not reach the target either
    if not tried:
        return Tuning("", 1.0, target, True, q, k, tried)
    top = max(r for _, r in tried)
    param, r = next(t for t in tried if t[1] >= top - PLATEAU)
    return Tuning(param, r, target, False, q, k, tried)


def tune_index(index: Any, final_ids: Callable[[], np.ndarray], exact_d: np.ndarray, queries: np.ndarray,
               read: Callable[[np.ndarray], np.ndarray], target: float, also: Sequence[Any] = ()) -> Tuning:
    """:func:`tune_search` over the index's candidates, leaving the chosen setting applied.

    ``final_ids()`` -> the sample's final neighbour ids with the index as currently set;
    ``read(sorted ids)`` -> their stored vectors; ``also``: copies of the index that take the
    same parameters (the fast-scan copy knn searches: index_builder.index.fast_scan)."""
    def final(param: str) -> np.ndarray:
        for each in (index, *also):
            apply_search_params(each, param)
        return final_ids()

    from index_builder.knn.rerank import true_distances

    tuning = tune_search(candidate_params(index), final, exact_d,
                         lambda ids: true_distances(queries, ids, read), target)
    for each in (index, *also):
        apply_search_params(each, tuning.param)
    return tuning
