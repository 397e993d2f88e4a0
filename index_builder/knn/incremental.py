"""knn --refresh after ``add``: old rows search the NEW train chunks only and merge them in.

Why: a full refresh re-searches every row against the whole grown index, a cost that grows with
the database; but an old row's neighbour list is already the k nearest among the train chunks it
was searched against, so the grown list is the k nearest of (its list + the k nearest among the
added chunks). Only the added chunks are searched (index_builder.knn.added_search: exactly, or
through an IVF over the added vectors alone that shares the grown index's trained quantizer and
codes, whichever scans fewer): the work is (old rows) x (a search of the added chunks), growing
with the added data, where a full refresh pays (all rows) x (a search of the whole index).

What each row of ``neighbours.npy`` was searched against is recorded as the knn stage's
``coverage``: per split, segments ``[row_end, train_chunks]`` (rows up to ``row_end`` hold the k
nearest among train chunks ``[0, train_chunks)``). A plain ``knn`` after ``add`` appends a
segment for the new rows; ``--refresh`` merges every row whose segment falls short of the train
split. Incremental is only sound when the old lists were made under the same rule: same k, extra,
exclusion, method, re-rank and recall target, and (index method) the same trained index grown by
``add`` (not retrained by ``index --rebuild``); else, or for a database without a coverage record,
``--refresh`` (auto) re-searches every row and says why (:func:`decide`).

Exclusions: the new candidates go through the stage's own rule (``search_block``:
index_builder.knn.exclusion), and the merged list goes through it once more, so no row keeps a
chunk of its own training sequence's documents, itself, or a blank chunk. Distances: the stored
ones may be a lossy index's code approximations (SQ/PQ without re-rank) or faiss's flat
arithmetic, the new candidates' torch's; so every candidate of a merged row, old and new, is
re-scored by one formula from the stored embeddings (index_builder.knn.rerank.true_distances,
:func:`rescored`) before the k best are kept, and a merged row holds true squared L2 distances
(as re-ranked rows do). Ties at equal distance: the lower chunk id first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from chunk_store.framework.errors import UserError
from chunk_store.layout import DBLayout
from chunk_store.manifest import check_params

MODES = ("auto", "incremental", "full")
# coverage: split -> [[row_end, train chunks searched], ...]; None where unknown (older databases)
Coverage = dict[str, list[list[int]]]


@dataclass
class Decision:
    """What a knn run does with the rows already there, and why (reported and recorded)."""

    mode: str  # "new_rows" (keep them), "incremental" (merge the added chunks in), "full" (search all)
    reason: str
    before: dict[str, Any] | None = None  # {"coverage": Coverage, "index_trained": str}: the prior rows


def index_trained_id(manifest: dict[str, Any]) -> str:
    """The trained index behind a knn result: its key and the build's start (an ``index`` run
    that adds vectors after ``add`` keeps the record's start; ``--rebuild`` starts anew)."""
    rec = manifest.get("stages", {}).get("index", {})
    return f"{rec.get('stats', {}).get('index_key')}@{rec.get('started')}"


def prior_rows(recorded: dict[str, Any]) -> dict[str, Any] | None:
    """What the rows on disk were searched against: a finished run's coverage, or the one an
    interrupted run started from (recorded in its params, so the resumed run plans the same)."""
    if recorded.get("finished") is not None:
        stats = recorded.get("stats", {})
        if stats.get("coverage") is None:
            return None
        return {"coverage": stats["coverage"], "index_trained": stats.get("index_trained")}
    return recorded.get("params", {}).get("rows_before")


def decide(request: str | None, recorded: dict[str, Any], params: dict[str, Any], keys: Sequence[str],
           trained: str, stage: str = "knn") -> Decision:
    """The refresh mode for ``request`` (None: no --refresh; "auto", "incremental", "full")."""
    before = prior_rows(recorded)
    if request is None:
        return Decision("new_rows", "no --refresh: rows already searched are kept", before)
    if request == "full":
        return Decision("full", "--refresh full", None)
    prev = recorded.get("params", {})
    if recorded.get("finished") is None and prev.get("refresh") == "full":
        why = "an interrupted full refresh is resumed"
    elif before is None or any(s is None or t is None for segs in before["coverage"].values() for s, t in segs):
        why = "the database records no coverage of its neighbour rows (built before incremental refresh)"
    elif prev.get("method") in ("index", "torch-ivf") and before.get("index_trained") != trained:
        why = "the index was rebuilt since the neighbours were found"
    else:
        try:
            check_params(prev, params, stage, keys=[k for k in keys if k != "index_id"])
            return Decision("incremental", "old rows merge the added train chunks", before)
        except UserError as e:
            why = str(e)
    if request == "incremental":
        raise UserError(f"knn --refresh incremental: not possible here: {why}; use --refresh full")
    return Decision("full", why, None)


def merge_prefix(coverage: list[list[int]] | None, kept: int, train_chunks: int) -> tuple[int, list[list[int]]]:
    """(rows to merge, their segments) of one split: the rows whose search fell short of the
    grown train split; none when the file's rows disagree with the coverage (the caller then
    searches them again)."""
    if not coverage or kept == 0 or coverage[-1][0] != kept:
        return 0, []
    segs = [[int(e), int(t)] for e, t in coverage if int(t) < train_chunks]
    return (segs[-1][0], segs) if segs else (0, [])


def coverage_after(mode: str, before: Coverage | None, split: str, kept: int, rows: int,
                   train_chunks: int) -> list[list[int]]:
    """The coverage recorded after a run: refreshed rows cover the whole train split; rows kept
    as they were keep their segments (unknown for an older database)."""
    if mode != "new_rows" or kept == 0:
        return [[rows, train_chunks]] if rows else []
    old = (before or {}).get(split) or [[kept, None]]
    segs = [s for s in old if s[0] <= kept]
    if not segs or segs[-1][0] < kept:  # rows the record does not describe
        segs = segs + [[kept, None]]
    if rows > kept:
        segs = segs + [[rows, train_chunks]]
    out: list[list[int]] = []
    for e, t in segs:  # neighbouring segments of one train size are one
        if out and out[-1][1] == t:
            out[-1][0] = e
        else:
            out.append([e, t])
    return out


def merge_shard(db: Path, split: str, index: int) -> tuple[Path, Path]:
    """(ids, distances) of one shard of merged old rows, beside the searched shards."""
    return DBLayout(db).knn_merged_shard(split, index)


def row_starts(segments: list[list[int]], a: int, b: int) -> list[tuple[int, int, int]]:
    """(row_lo, row_hi, first added train chunk) runs of rows [a, b) by segment."""
    out, lo = [], 0
    for end, t in segments:
        r0, r1 = max(a, lo), min(b, end)
        if r0 < r1:
            out.append((r0, r1, t))
        lo = end
    return out


def rescored(queries: np.ndarray, ids: np.ndarray, train: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, true squared L2 of each, inf for -1), all by one formula from the stored embeddings.

    Why: the old lists' distances came from the index (a lossy index's codes, or faiss's flat
    arithmetic) and the new candidates' from torch; two chunks with one embedding (duplicate
    text) must tie exactly, and the tie rule, not float noise, decide between them, as in a
    full re-search. 2k rows read a query: small beside the search of the added chunks."""
    from index_builder.knn.rerank import take_rows, true_distances

    return ids, true_distances(queries, ids, lambda rows: take_rows(train, rows))


def sort_candidates(ids: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's candidates sorted by (distance, chunk id), -1 / inf last: the caller's exclusion
    rule (select_neighbours) then keeps the first k allowed (the deterministic tie rule)."""
    ids = ids.astype(np.int64)
    d = np.where(ids < 0, np.inf, d).astype(np.float32)
    key = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key, d), axis=-1)
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(d, order, axis=1)


__all__ = ["Coverage", "Decision", "MODES", "coverage_after", "decide", "index_trained_id",
           "merge_prefix", "merge_shard", "prior_rows", "rescored", "row_starts", "sort_candidates"]
