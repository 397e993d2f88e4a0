"""knn's finished neighbours of a split: one pair of .npy files a shard of rows, and the one reader.

Why per shard: after ``add`` a knn run changes only some rows (the new chunks' rows, and with
``--refresh`` the old rows merged with the added chunks). One ``neighbours.npy`` per split had to
be rewritten whole by rank 0 every time, a cost that grows with the database; here a run rewrites
only the shards whose rows changed, and an untouched shard's files are left as they are.

Layout (chunk_store.layout.DBLayout.neighbours_dir)::

    DB/<split>/neighbours/index.json             {"version", "k", "generation", "shards": [...]}
    DB/<split>/neighbours/ids_NNNNNN.gG.npy       (rows, k) int64 train chunk ids, -1 where none
    DB/<split>/neighbours/dist_NNNNNN.gG.npy      (rows, k) float32 squared L2, inf where none

Each shard entry holds its rows ``[start, stop)``, its two file names and its count of missing
neighbours. A rewritten shard gets the writing run's generation ``G`` in its names, so the
files the current index names are never overwritten: the index (written atomically, last)
switches every shard of a run at once, and a crash before it leaves the old index and its files
whole. Readers call :func:`open_neighbours`, which also opens a database from before shards
(one ``DB/<split>/neighbours.npy`` + ``neighbour_distances.npy``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chunk_store.framework.atomic import atomic_write_json
from chunk_store.framework.errors import UserError
from chunk_store.layout import DBLayout
from chunk_store.manifest import open_npy
from chunk_store.sharded_array import concat

INDEX_VERSION = 1


@dataclass(frozen=True)
class NeighbourShard:
    """One shard of rows: [start, stop), its file names (in the split's neighbours folder)."""

    start: int
    stop: int
    ids: str
    dist: str
    missing: int = 0  # -1 entries: the stage's "missing_neighbours" without reading the files


@dataclass
class NeighbourIndex:
    """What ``index.json`` holds: the shards in row order, their width k, the writing run."""

    k: int
    generation: int = 0
    shards: list[NeighbourShard] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.shards[-1].stop if self.shards else 0


def read_index(db: str | os.PathLike, split: str) -> NeighbourIndex | None:
    """The split's neighbour index; None where there is none (no knn yet, or a pre-shard DB)."""
    path = DBLayout(db).neighbour_index(split)
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        index = NeighbourIndex(int(raw["k"]), int(raw["generation"]),
                               [NeighbourShard(**s) for s in raw["shards"]])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"corrupt {path}: {type(e).__name__}: {e}; re-run `retro-build-index knn`") from None
    start = 0
    for s in index.shards:
        if s.start != start or s.stop <= s.start:
            raise UserError(f"corrupt {path}: shard rows [{s.start}, {s.stop}) do not follow row {start}")
        start = s.stop
    return index


def write_index(db: str | os.PathLike, split: str, index: NeighbourIndex) -> None:
    """Atomic: readers see the old index (and its files) or the whole new one."""
    atomic_write_json(DBLayout(db).neighbour_index(split),
                      {"version": INDEX_VERSION, "k": index.k, "generation": index.generation,
                       "shards": [asdict(s) for s in index.shards]})


def shard_files(db: str | os.PathLike, split: str, index: NeighbourIndex) -> list[Path]:
    """Every file ``index`` names (ids and distances of each shard)."""
    folder = DBLayout(db).neighbours_dir(split)
    return [folder / name for s in index.shards for name in (s.ids, s.dist)]


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of a .npy from its header alone; None where unreadable."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:
        return None
    return arr.shape, arr.dtype


def whole_rows(db: str | os.PathLike, split: str, k: int) -> int:
    """Rows of the split's neighbour files a run may build on: the shards, in order, up to the
    first missing or damaged one (headers only, nothing read), all of width ``k``; a pre-shard
    DB's single pair of files counts whole or not at all."""
    paths = DBLayout(db)
    try:
        index = read_index(db, split)
    except UserError:
        return 0
    if index is None:
        ids, dist = _header(paths.neighbours(split)), _header(paths.neighbour_distances(split))
        ok = ids is not None and dist is not None and len(ids[0]) == 2 and ids[0][1] == k and ids[0] == dist[0]
        return int(ids[0][0]) if ok else 0  # type: ignore[index]
    if index.k != k:
        return 0
    folder, rows = paths.neighbours_dir(split), 0
    for s in index.shards:
        want = (s.stop - s.start, k)
        ids, dist = _header(folder / s.ids), _header(folder / s.dist)
        if ids != (want, np.dtype(np.int64)) or dist != (want, np.dtype(np.float32)):
            break
        rows = s.stop
    return rows


def open_neighbours(db: str | os.PathLike, split: str) -> tuple[Any, Any] | None:
    """(ids, distances) of a split as (num_chunks, k) array-likes, None before knn.

    Indexed like the 2-D memmaps they replace (an int, a slice, an integer array; ``shape``,
    ``dtype``, ``np.asarray``): one memmap where the split has one shard, else a
    chunk_store.sharded_array.ShardedArray over the shards' memmaps; nothing is read on open.
    A database from before shards (one neighbours.npy) opens as its two memmaps; its distance
    file may be missing (distances None)."""
    paths = DBLayout(db)
    index = read_index(db, split)
    if index is None:
        if not paths.neighbours(split).exists():
            return None
        dist = paths.neighbour_distances(split)
        return open_npy(paths.neighbours(split)), open_npy(dist) if dist.exists() else None
    folder = paths.neighbours_dir(split)
    if not index.shards:
        return np.zeros((0, index.k), np.int64), np.zeros((0, index.k), np.float32)
    ids, dists = [], []
    for s in index.shards:
        for name, out in ((s.ids, ids), (s.dist, dists)):
            arr = open_npy(folder / name)
            if arr.shape != (s.stop - s.start, index.k):
                raise UserError(f"corrupt {folder / name}: shape {arr.shape}, the index says "
                                f"({s.stop - s.start}, {index.k}); re-run `retro-build-index knn`")
            out.append(arr)
    return concat(ids), concat(dists)


def write_neighbours(db: str | os.PathLike, split: str, ids: np.ndarray, dists: np.ndarray,
                     shard_rows: int, generation: int = 1) -> NeighbourIndex:
    """Write whole (n, k) arrays as shards of ``shard_rows`` rows plus their index, and drop a
    pre-shard pair of files (fixtures, benchmarks, conversions; knn writes shard by shard)."""
    from chunk_store.framework.atomic import atomic_save_npy

    paths = DBLayout(db)
    n, k = ids.shape
    shards = []
    for i, a in enumerate(range(0, n, shard_rows)):
        b = min(a + shard_rows, n)
        p_ids, p_dist = paths.neighbour_shard(split, i, generation)
        atomic_save_npy(p_dist, np.asarray(dists[a:b], np.float32))
        atomic_save_npy(p_ids, np.asarray(ids[a:b], np.int64))
        shards.append(NeighbourShard(a, b, p_ids.name, p_dist.name, int((ids[a:b] < 0).sum())))
    index = NeighbourIndex(int(k), generation, shards)
    paths.neighbours_dir(split).mkdir(parents=True, exist_ok=True)
    write_index(db, split, index)
    remove_unlisted(db, split, index)
    return index


def remove_unlisted(db: str | os.PathLike, split: str, index: NeighbourIndex) -> None:
    """After the index switched: the files it no longer names (older generations, a crashed
    run's shards) and a pre-shard DB's single pair of files go."""
    paths = DBLayout(db)
    keep = {p.name for p in shard_files(db, split, index)} | {paths.neighbour_index(split).name}
    for p in paths.neighbours_dir(split).glob("*.npy"):
        if p.name not in keep:
            p.unlink(missing_ok=True)
    paths.neighbour_distances(split).unlink(missing_ok=True)
    paths.neighbours(split).unlink(missing_ok=True)


def load_neighbours(db: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, distances) of a split read whole into memory: for tests and small tools only."""
    opened = open_neighbours(db, split)
    if opened is None:
        raise UserError(f"{db}: the {split} split has no neighbours: run `retro-build-index knn`")
    return np.asarray(opened[0]), np.asarray(opened[1])


__all__ = ["INDEX_VERSION", "NeighbourIndex", "NeighbourShard", "load_neighbours", "open_neighbours",
           "read_index", "remove_unlisted", "shard_files", "whole_rows", "write_index", "write_neighbours"]


def generation_of(db: Path, split: str) -> int:
    """The generation of ``split``'s neighbour index (0 where none or unreadable)."""
    try:
        index = read_index(db, split)
    except UserError:
        return 0
    return index.generation if index is not None else 0
