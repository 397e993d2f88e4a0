"""The per-shard neighbour files and their one reader (chunk_store.neighbour_shards)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunk_store.framework.atomic import atomic_save_npy
from chunk_store.framework.errors import UserError
from chunk_store.layout import DBLayout
from chunk_store.manifest import record_stage
from chunk_store.neighbour_shards import (load_neighbours, open_neighbours, read_index, whole_rows,
                                          write_neighbours)
from chunk_store.store import ChunkStore


def _arrays(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(-1, 1000, size=(n, k)).astype(np.int64)
    return ids, np.where(ids >= 0, rng.random((n, k)), np.inf).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(1, 4), shard_rows=st.integers(1, 25), seed=st.integers(0, 99))
def test_shards_index_like_the_whole_array(tmp_path_factory, n, k, shard_rows, seed) -> None:
    """Every indexing the readers use (int, negative int, slice, stepped slice, a 2-D integer
    array, a row and column pair) answers as the (n, k) array the shards were cut from."""
    db = tmp_path_factory.mktemp("nb")
    ids, dists = _arrays(n, k, seed)
    write_neighbours(db, "train", ids, dists, shard_rows)
    got_i, got_d = open_neighbours(db, "train")
    assert got_i.shape == ids.shape and got_i.dtype == np.int64 and got_d.dtype == np.float32
    assert len(read_index(db, "train").shards) == -(-n // shard_rows)
    rng = np.random.default_rng(seed)
    fancy = rng.integers(0, n, size=(3, 5))
    for key in (0, n - 1, -1, slice(None), slice(n // 3, n), slice(1, n, 3), fancy, (fancy, slice(0, 1))):
        np.testing.assert_array_equal(got_i[key], ids[key])
        np.testing.assert_array_equal(got_d[key], dists[key])
    np.testing.assert_array_equal(np.asarray(got_i), ids)
    assert whole_rows(db, "train", k) == n and whole_rows(db, "train", k + 1) == 0


def test_a_db_from_before_shards_still_reads(tmp_path: Path) -> None:
    """One neighbours.npy (+ distances) per split, as every DB before per-shard files."""
    ids, dists = _arrays(30, 2)
    paths = DBLayout(tmp_path)
    atomic_save_npy(paths.neighbours("val"), ids)
    atomic_save_npy(paths.neighbour_distances("val"), dists)
    got_i, got_d = open_neighbours(tmp_path, "val")
    np.testing.assert_array_equal(got_i[3:9], ids[3:9])
    np.testing.assert_array_equal(got_d[[4, 1]], dists[[4, 1]])
    assert whole_rows(tmp_path, "val", 2) == 30 and open_neighbours(tmp_path, "train") is None
    # written per shard: the old pair of files goes, the reader follows the index
    write_neighbours(tmp_path, "val", ids, dists, 7)
    assert not paths.neighbours("val").exists() and not paths.neighbour_distances("val").exists()
    np.testing.assert_array_equal(load_neighbours(tmp_path, "val")[0], ids)


def test_chunk_store_reads_both_layouts(tiny_db_path: Path, tmp_path: Path) -> None:
    import shutil

    for layout in ("single file", "shards"):
        db = tmp_path / layout.replace(" ", "_")
        shutil.copytree(tiny_db_path, db)
        for split in ("train", "val"):
            n = ChunkStore.open(db, split).num_chunks
            ids, dists = _arrays(n, 2, seed=len(split))
            if layout == "shards":
                write_neighbours(db, split, ids, dists, 50)
            else:
                atomic_save_npy(DBLayout(db).neighbours(split), ids)
                atomic_save_npy(DBLayout(db).neighbour_distances(split), dists)
        record_stage(db, "knn", params={"k": 2}, started="x", finished="y")
        s = ChunkStore.open(db, "val")
        ids, dists = _arrays(s.num_chunks, 2, seed=3)
        assert s.neighbours.shape == (s.num_chunks, 2) and s.neighbour_distances.dtype == np.float32
        np.testing.assert_array_equal(s.neighbours[[0, 5, 2]], ids[[0, 5, 2]])


def test_a_damaged_shard_ends_the_whole_rows_and_a_bad_index_is_one_line(tmp_path: Path) -> None:
    ids, dists = _arrays(40, 3)
    index = write_neighbours(tmp_path, "train", ids, dists, 10)
    folder = DBLayout(tmp_path).neighbours_dir("train")
    (folder / index.shards[2].dist).write_bytes(b"\x93NUMPY garbage")
    assert whole_rows(tmp_path, "train", 3) == 20  # the shards before it are kept
    with pytest.raises(UserError, match="corrupt"):
        open_neighbours(tmp_path, "train")
    DBLayout(tmp_path).neighbour_index("train").write_text("{not json")
    with pytest.raises(UserError, match=r"corrupt .*index\.json"):
        open_neighbours(tmp_path, "train")
    assert whole_rows(tmp_path, "train", 3) == 0


@pytest.fixture
def tiny_db_path(tmp_path: Path) -> Path:
    from tests.fixtures import build_tiny_db

    return build_tiny_db(tmp_path / "base", n_docs=10, seed=1)
