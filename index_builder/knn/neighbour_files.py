"""The knn stage's output files: which rows a run may keep, and how its shards become them.

Why a module of its own: after ``add`` a knn run keeps the neighbours already found (the first
rows of ``neighbours.npy``) and searches only the new chunks; the assembly then writes the kept
rows and the new shards into the final files, atomically, streaming (memory flat in the rows).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from chunk_store.framework.errors import UserError
from chunk_store.layout import DBLayout, temp_path
from index_builder.embed.stage import npy_header_ok, shard_ranges


def kept_rows(db: Path, split: str, k: int, n: int) -> int:
    """Rows of ``split``'s finished neighbour files a run may keep: all of them when both files
    are whole, of width ``k``, and no longer than the split (else 0: search everything)."""
    paths = DBLayout(db)
    try:
        ids = np.load(paths.neighbours(split), mmap_mode="r")
        dist = np.load(paths.neighbour_distances(split), mmap_mode="r")
    except (OSError, ValueError):
        return 0
    ok = ids.ndim == 2 and ids.shape[1] == k and ids.shape == dist.shape and ids.shape[0] <= n
    return int(ids.shape[0]) if ok else 0


def assemble(db: Path, split: str, n: int, k: int, shard_size: int, old_rows: int = 0, merged_rows: int = 0,
             merged: Callable[[int], tuple[Path, Path]] | None = None) -> dict[str, Any]:
    """Concatenate the shards into neighbours.npy / neighbour_distances.npy (atomic), then
    delete the shards; rows [merged_rows, old_rows) come from the files being replaced (after
    ``add``: the neighbours found before it), the first ``merged_rows`` from the shards of old
    rows merged with the added chunks (``merged(i)``: shard i's paths; knn --refresh)."""
    paths = DBLayout(db)
    tmp_ids, tmp_d = temp_path(paths.neighbours(split)), temp_path(paths.neighbour_distances(split))
    out_i = np.lib.format.open_memmap(tmp_ids, mode="w+", dtype=np.int64, shape=(n, k))
    out_d = np.lib.format.open_memmap(tmp_d, mode="w+", dtype=np.float32, shape=(n, k))
    missing = 0
    for i, (a, b) in enumerate(shard_ranges(merged_rows, shard_size)):
        p_ids, p_dist = merged(i)  # type: ignore[misc]
        if not (npy_header_ok(p_ids, (b - a, k)) and npy_header_ok(p_dist, (b - a, k))):
            raise UserError(f"knn: shard {p_ids} is missing after every rank finished; re-run knn")
        ids = np.load(p_ids)
        out_i[a:b], out_d[a:b] = ids, np.load(p_dist)
        missing += int((ids < 0).sum())
    if old_rows > merged_rows:
        old_i = np.load(paths.neighbours(split), mmap_mode="r")
        old_d = np.load(paths.neighbour_distances(split), mmap_mode="r")
        for a in range(merged_rows, old_rows, 1 << 20):
            b = min(a + (1 << 20), old_rows)
            out_i[a:b], out_d[a:b] = old_i[a:b], old_d[a:b]
            missing += int((old_i[a:b] < 0).sum())
        del old_i, old_d
    for i, (a, b) in enumerate(shard_ranges(n, shard_size)):
        if b <= old_rows:
            continue
        a = max(a, old_rows)
        p_ids, p_dist = paths.knn_shard(split, i)
        if not (npy_header_ok(p_ids, (b - a, k)) and npy_header_ok(p_dist, (b - a, k))):
            raise UserError(f"knn: shard {p_ids} is missing after every rank finished; re-run knn")
        ids = np.load(p_ids)
        out_i[a:b] = ids
        out_d[a:b] = np.load(p_dist)
        missing += int((ids < 0).sum())
    out_i.flush()
    out_d.flush()
    del out_i, out_d
    os.replace(tmp_d, paths.neighbour_distances(split))
    os.replace(tmp_ids, paths.neighbours(split))
    shutil.rmtree(paths.knn_shards_dir(split), ignore_errors=True)
    return {"chunks": n, "missing_neighbours": missing}
