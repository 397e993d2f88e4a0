"""The knn stage's output files: which rows a run may keep, and how its shards become them.

Why a module of its own: after ``add`` a knn run keeps the neighbours already found and searches
only the new chunks (``--refresh``: also merges the added chunks into old rows). The finished
neighbours are one pair of files a shard of rows (chunk_store.neighbour_shards); :func:`assemble`
rewrites only the shards holding a row this run changed, each from three sources (merged old
rows, kept old rows, newly searched rows), one shard in memory at a time, and leaves every other
shard's files untouched: a shard of old rows whose merge (``--refresh``) listed the same ids in
every row is one of them (its rows keep the distances first stored). The new index is written last (atomic): a crash before it leaves the
old neighbours whole, and the re-run rewrites the same shards.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from chunk_store.framework.atomic import atomic_save_npy
from chunk_store.framework.errors import UserError
from chunk_store.framework.stage import crash_point
from chunk_store.layout import DBLayout
from chunk_store.neighbour_shards import (NeighbourIndex, NeighbourShard, open_neighbours, read_index,
                                          remove_unlisted, whole_rows, write_index)
from index_builder.embed.stage import npy_header_ok, shard_ranges


def kept_rows(db: Path, split: str, k: int, n: int) -> int:
    """Rows of ``split``'s finished neighbour files a run may keep: the whole shards of width
    ``k`` in order (or a pre-shard DB's whole file), none when they run past the split."""
    rows = whole_rows(db, split, k)
    return rows if rows <= n else 0


def _load_shard(paths: tuple[Path, Path], rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    p_ids, p_dist = paths
    if not (npy_header_ok(p_ids, (rows, k)) and npy_header_ok(p_dist, (rows, k))):
        raise UserError(f"knn: shard {p_ids} is missing after every rank finished; re-run knn")
    return np.load(p_ids), np.load(p_dist)


def assemble(db: Path, split: str, n: int, k: int, shard_size: int, old_rows: int = 0, merged_rows: int = 0,
             merged: Callable[[int], tuple[Path, Path]] | None = None) -> dict[str, Any]:
    """Write the shards of rows [0, n) that this run changed, then the index, then drop the work
    shards. Rows [0, merged_rows) come from the merged work shards (``merged(i)``: shard i's
    paths; knn --refresh), [merged_rows, old_rows) from the neighbours being replaced, and
    [old_rows, n) from the searched work shards. A shard of only old rows whose range the old
    index already holds keeps its files (not written) where no row's ids changed. The index's
    generation grows by one: a resumed run sees that this split's files are already its own
    (KnnStage.begin)."""
    paths = DBLayout(db)
    try:
        old_index = read_index(db, split)
    except UserError:
        old_index = None
    old = open_neighbours(db, split) if old_rows else None
    reusable = {(s.start, s.stop): s for s in old_index.shards} if old_index and old_index.k == k else {}
    generation = (old_index.generation if old_index else 0) + 1
    shards: list[NeighbourShard] = []
    written = 0
    for i, (a, b) in enumerate(shard_ranges(n, shard_size)):
        same = reusable.get((a, b)) if b <= old_rows else None  # a shard of old rows only, as before
        merged_part = None
        if a < merged_rows:  # old rows merged with the added chunks: shard i of the same grid
            merged_part = _load_shard(merged(i), min(b, merged_rows) - a, k)  # type: ignore[misc]
            if same is not None and not np.array_equal(merged_part[0], old[0][a:a + len(merged_part[0])]):  # type: ignore[index]
                same = None  # an added chunk entered a row: the shard changes
        if same is not None:  # no row changed: its files stay (merged rows keep their first distances)
            shards.append(same)
            continue
        ids, dists = np.full((b - a, k), -1, np.int64), np.full((b - a, k), np.inf, np.float32)
        if merged_part is not None:
            ids[:len(merged_part[0])], dists[:len(merged_part[0])] = merged_part
        lo, hi = max(a, merged_rows), min(b, old_rows)
        if lo < hi:  # kept old rows of a shard that changes
            ids[lo - a:hi - a], dists[lo - a:hi - a] = old[0][lo:hi], old[1][lo:hi]  # type: ignore[index]
        if b > old_rows:  # newly searched rows: work shard i holds [max(a, old_rows), b)
            lo = max(a, old_rows)
            ids[lo - a:], dists[lo - a:] = _load_shard(paths.knn_shard(split, i), b - lo, k)
        p_ids, p_dist = paths.neighbour_shard(split, i, generation)
        atomic_save_npy(p_dist, dists)
        atomic_save_npy(p_ids, ids)
        written += 1
        shards.append(NeighbourShard(a, b, p_ids.name, p_dist.name, int((ids < 0).sum())))
    del old
    paths.neighbours_dir(split).mkdir(parents=True, exist_ok=True)
    crash_point("knn", "neighbour_shards")  # the new shards written, the old index still in force
    index = NeighbourIndex(k, generation, shards)
    write_index(db, split, index)
    crash_point("knn", "neighbour_index")  # the new index in force, the old files not yet gone
    remove_unlisted(db, split, index)
    shutil.rmtree(paths.knn_shards_dir(split), ignore_errors=True)
    return {"chunks": n, "missing_neighbours": sum(s.missing for s in shards),
            "shards_written": written, "shards_kept": len(shards) - written}
