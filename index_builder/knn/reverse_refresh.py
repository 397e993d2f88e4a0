"""knn --refresh (incremental), reversed: each added chunk finds the old rows it should enter.

Why: the forward merge (index_builder.knn.added_search) makes every old row a query against the
added chunks. Each query pays a fixed cost (the OPQ rotation, the coarse quantizer's HNSW walk,
the PQ lookup tables) before it scans a code, so its work grows with the old rows, not the added
data: at 4M old rows + 1M added it took more CPU than a full search of the 4M base
(docs/BENCHMARKS.md, "Growing by add"). Reversed, the M added chunks are the queries: each
searches the grown index restricted (a faiss ID selector) to the old rows that knn searches, for
its ``depth`` nearest, whose true distances are computed from the stored embeddings; a pair
(row, chunk) is kept where the chunk is closer than the row's current k-th neighbour. The codes
scanned are the same (old rows x added chunks x nprobe / nlist either way); the fixed costs are
paid M times instead of once an old row. So the cost grows with the added data.

Exactness: row i gains chunk j only if i is among j's ``depth`` nearest old rows by the index's
codes: a chunk that is the nearest new neighbour of more than ``depth`` rows (a hub) reaches only
``depth`` of them, and a pair the codes misorder is missed, as a search misses. The recall
against the forward merge is measured (benchmarks/bench_knn_refresh.py) and tested. The merge
itself is the forward merge's: every candidate, old and new, re-scored by one formula, the
exclusion rule applied, the k best kept by (distance, chunk id).

The pass is split into units of added chunks (spread over ranks like every knn unit), each
writing its pairs to ``DB/<split>/knn_shards/reverse_NNNNNN.npy``; a merge unit waits until every
pair file is there (another rank may still be writing one), reads the pairs of its rows and
merges them. Rows no pair names keep their lists untouched: nothing is read for them but their
old neighbours.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from chunk_store.framework.atomic import atomic_save_npy
from chunk_store.layout import DBLayout

log = logging.getLogger(__name__)

DEPTH = 64  # old rows an added chunk reaches (--reverse-depth; KnnConfig.reverse_depth)
SLACK = 1.05  # a pair is kept while its true distance is within this factor of the row's k-th (stored
# distances may be an index's approximations; the merge decides exactly)
PAIR_DTYPE = np.dtype([("row", "<i8"), ("chunk", "<i8"), ("dist", "<f4")])
WAIT_LOG_SECONDS = 60.0


def pairs_path(db: Path, split: str, index: int) -> Path:
    """The pairs file of one unit of added chunks (beside the knn shards: a temp folder)."""
    return DBLayout(db).knn_shards_dir(split) / f"reverse_{index:06d}.npy"


def worth_it(added: int, old_queries: int, depth: int, index_key: str | None) -> bool:
    """Whether the reverse pass pays: an IVF index (a selector costs an HNSW graph a long walk
    past the refused nodes) and fewer added chunks than old rows searched (the fixed costs are
    paid once a query either way)."""
    return depth > 0 and bool(index_key) and "IVF" in str(index_key) and 0 < added < old_queries


def selector_of_runs(runs: Sequence[tuple[int, int]]) -> Any:
    """A faiss ID selector accepting the half-open id ranges ``runs`` (the old rows knn searches:
    retrieval-only rows are never queries, so they must not take an added chunk's places)."""
    import faiss

    parts = [faiss.IDSelectorRange(int(a), int(b)) for a, b in runs]
    if not parts:
        return faiss.IDSelectorRange(0, 0)
    sel = parts[0]
    keep = list(parts)
    for p in parts[1:]:
        sel = faiss.IDSelectorOr(sel, p)
        keep.append(sel)
    sel.referenced = keep  # the SWIG objects the composite points to must outlive it
    return sel


@dataclass
class ReversePass:
    """The search of added chunks [first, ntotal) for the old rows they enter."""

    index: Any  # the faiss index searched (the grown index, or its fast-scan copy)
    ivf_of: Any  # the index whose nprobe / efSearch the search uses (range_exclusion.search_params)
    emb: Sequence[np.ndarray]  # train embeddings, every shard
    runs: list[tuple[int, int]]  # old rows knn searches (ids of the train split)
    segments: list[list[int]]  # the old rows' coverage: [row_end, first added chunk for them]
    kth: Callable[[np.ndarray], np.ndarray]  # rows -> their current k-th distance (inf: short)
    content: Any  # chunk ids -> bool: blank chunks are never neighbours, so never queries here
    depth: int = DEPTH
    queries: int = 0
    pairs_found: int = 0
    _sel: Any = field(default=None, repr=False)

    def search(self, a: int, b: int) -> np.ndarray:
        """Pairs (row, chunk, true squared L2) for added chunks [a, b), as :data:`PAIR_DTYPE`."""
        from index_builder.embed.stage import read_rows
        from index_builder.knn.range_exclusion import search_params
        from index_builder.knn.rerank import take_rows, true_distances

        if self._sel is None:
            self._sel = selector_of_runs(self.runs)
        chunk = np.arange(a, b, dtype=np.int64)
        keep = np.asarray(self.content[chunk], dtype=bool)
        chunk = chunk[keep]
        if not len(chunk):
            return np.zeros(0, PAIR_DTYPE)
        q = np.ascontiguousarray(read_rows(self.emb, a, b)[keep], dtype=np.float32)
        self.queries += len(q)
        _, rows = self.index.search(q, self.depth, params=search_params(self.ivf_of, self._sel))
        rows = rows.astype(np.int64)
        # rows are the queries now: the distance is the same, read the other way round
        d = true_distances(q, rows, lambda ids: take_rows(self.emb, ids))
        row, col = np.nonzero(rows >= 0)
        r, j, dist = rows[row, col], chunk[row], d[row, col]
        ok = j >= self._first_added(r)  # chunks the row's list was not searched against
        r, j, dist = r[ok], j[ok], dist[ok]
        ok = dist <= self.kth(r) * SLACK
        out = np.zeros(int(ok.sum()), PAIR_DTYPE)
        out["row"], out["chunk"], out["dist"] = r[ok], j[ok], dist[ok]
        self.pairs_found += len(out)
        return out

    def _first_added(self, rows: np.ndarray) -> np.ndarray:
        """Per row, the first train chunk its list was not searched against (its segment's)."""
        ends = np.array([e for e, _ in self.segments], dtype=np.int64)
        firsts = np.array([t for _, t in self.segments], dtype=np.int64)
        seg = np.minimum(np.searchsorted(ends, rows, side="right"), len(ends) - 1)
        return firsts[seg]


def write_pairs(path: Path, pairs: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(path, pairs)


def pairs_done(path: Path) -> bool:
    """Whether a pairs file is there and whole (an atomic write: a file there is whole, unless
    damaged: then it is read again by the unit)."""
    try:
        np.load(path, mmap_mode="r")
        return True
    except (OSError, ValueError):
        return False


def wait_for(paths: Sequence[Path], say: Callable[[str], None], poll: float = 1.0) -> None:
    """Block until every pairs file is there: other ranks write theirs (torchrun ends this rank
    if another one dies)."""
    t0 = last = time.monotonic()
    while True:
        missing = [p for p in paths if not pairs_done(p)]
        if not missing:
            return
        if time.monotonic() - last > WAIT_LOG_SECONDS:
            say(f"knn: waiting for {len(missing)} reverse-search files from other ranks "
                f"({time.monotonic() - t0:.0f} s)")
            last = time.monotonic()
        time.sleep(poll)


def load_pairs(paths: Sequence[Path]) -> np.ndarray:
    """Every pair, sorted by (row, distance, chunk): a merge unit slices its rows out."""
    parts = [np.load(p) for p in paths]
    pairs = np.concatenate(parts) if parts else np.zeros(0, PAIR_DTYPE)
    return pairs[np.lexsort((pairs["chunk"], pairs["dist"], pairs["row"]))]


def candidates(pairs: np.ndarray, a: int, b: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows in [a, b) that gained a pair, their best ``c`` added chunks (n, c), -1 padded),
    from pairs sorted by :func:`load_pairs`."""
    lo, hi = np.searchsorted(pairs["row"], [a, b])
    sub = pairs[lo:hi]
    if not len(sub):
        return np.zeros(0, np.int64), np.full((0, c), -1, np.int64)
    rows, first, counts = np.unique(sub["row"], return_index=True, return_counts=True)
    rank = np.arange(len(sub)) - np.repeat(first, counts)
    out = np.full((len(rows), c), -1, np.int64)
    keep = rank < c
    out[np.repeat(np.arange(len(rows)), counts)[keep], rank[keep]] = sub["chunk"][keep]
    return rows, out


__all__ = ["DEPTH", "PAIR_DTYPE", "ReversePass", "candidates", "load_pairs", "pairs_done", "pairs_path",
           "selector_of_runs", "wait_for", "worth_it", "write_pairs"]
