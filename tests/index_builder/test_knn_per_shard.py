"""knn's finished neighbours per shard: after ``add`` only changed shards are written, a DB from
before shards converts, every crash point resumes, and no rank reads a DB-wide array."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import chunk_store.store
from chunk_store.framework.atomic import atomic_save_npy
from chunk_store.layout import SPLITS, DBLayout
from chunk_store.manifest import load_manifest
from chunk_store.neighbour_shards import load_neighbours, read_index
from tests.fixtures import run_cli
from tests.fixtures.knn_grown import SHARD, copy_db as _copy, grown_db, kill_at, knn_argv as _knn

@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> tuple[Path, int]:
    """A knn'd DB, then data added, embedded and indexed; the old train size."""
    return grown_db(tmp_path_factory)


def _files(db: Path) -> dict[str, tuple[bytes, int]]:
    """Every neighbour shard file of both splits: its bytes and mtime."""
    out = {}
    for s in SPLITS:
        folder = DBLayout(db).neighbours_dir(s)
        for shard in read_index(db, s).shards:
            for name in (shard.ids, shard.dist):
                p = folder / name
                out[f"{s}/{name}"] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def test_after_add_only_the_shards_with_new_rows_are_written(grown, tmp_path) -> None:
    db, n_old = grown
    inc = _copy(db, tmp_path / "inc")
    before = _files(inc)
    old_index = {s: read_index(inc, s) for s in SPLITS}
    old = {s: load_neighbours(inc, s) for s in SPLITS}
    assert run_cli(_knn(inc)) == 0  # no --refresh: the new rows only
    stats = load_manifest(inc)["stages"]["knn"]["stats"]
    after = _files(inc)
    counts = load_manifest(inc)["counts"]
    for s in SPLITS:
        untouched = [sh for sh in old_index[s].shards if sh.stop % SHARD == 0 or sh.stop == counts[s]["chunks"]]
        new_index = read_index(inc, s)
        assert new_index.shards[:len(untouched)] == untouched  # same rows, same files
        for sh in untouched:
            for name in (sh.ids, sh.dist):
                assert after[f"{s}/{name}"] == before[f"{s}/{name}"]  # bytes and mtime unchanged
        rewritten = len(new_index.shards) - len(untouched)
        assert stats[s]["shards_written"] == rewritten and stats[s]["shards_kept"] == len(untouched)
        ids, dists = load_neighbours(inc, s)
        n = len(old[s][0])
        np.testing.assert_array_equal(ids[:n], old[s][0])  # the kept rows, as they were
        np.testing.assert_array_equal(dists[:n], old[s][1])
        assert ids.shape == (counts[s]["chunks"], 3)
        assert stats[s]["missing_neighbours"] == int((ids < 0).sum())
    assert stats["train"]["shards_written"] >= 1 and n_old < counts["train"]["chunks"]
    # nothing but the index's files is left in the folder
    for s in SPLITS:
        listed = {n for sh in read_index(inc, s).shards for n in (sh.ids, sh.dist)}
        assert {p.name for p in DBLayout(inc).neighbours_dir(s).glob("*.npy")} == listed
        assert not DBLayout(inc).knn_shards_dir(s).exists()


def test_a_refresh_rewrites_only_the_shards_where_an_added_chunk_entered_a_row(grown, tmp_path) -> None:
    """--refresh merges every old row with the added chunks; a shard none of whose rows took one
    keeps its files, every other shard is written anew."""
    db, _ = grown
    inc = _copy(db, tmp_path / "inc")
    before, old_index = _files(inc), {s: read_index(inc, s) for s in SPLITS}
    old = {s: load_neighbours(inc, s)[0] for s in SPLITS}
    assert run_cli(_knn(inc, "--refresh")) == 0
    assert load_manifest(inc)["stages"]["knn"]["params"]["refresh"] == "incremental"
    after, kept, rewritten = _files(inc), 0, 0
    for s in SPLITS:
        ids = load_neighbours(inc, s)[0]
        new_shards = {(sh.start, sh.stop): sh for sh in read_index(inc, s).shards}
        for sh in old_index[s].shards:
            same_rows = np.array_equal(ids[sh.start:sh.stop], old[s][sh.start:sh.stop])
            if new_shards.get((sh.start, sh.stop)) == sh:  # kept: bytes and mtime as they were
                assert same_rows
                kept += 1
                for name in (sh.ids, sh.dist):
                    assert after[f"{s}/{name}"] == before[f"{s}/{name}"]
            else:
                assert not same_rows or (sh.start, sh.stop) not in new_shards  # a changed row, or grown rows
                rewritten += 1
    assert rewritten >= 1
    print(f"refresh: {kept} old shards kept, {rewritten} rewritten")


def test_assemble_writes_exactly_the_shards_with_a_changed_row(tmp_path) -> None:
    """Old rows [0, 20) in shards of 5; a refresh merged rows [0, 20): shard 1's ids changed,
    the others' did not (their distances did: a re-scored merge); rows [20, 23) are new. Shards
    0, 2, 3 keep their files; shard 1 and the new shard 4 are written; the result is the merge."""
    from chunk_store.neighbour_shards import write_neighbours
    from index_builder.knn.neighbour_files import assemble

    rng = np.random.default_rng(0)
    old_ids, old_d = rng.integers(0, 50, (20, 2)), rng.random((20, 2)).astype(np.float32)
    write_neighbours(tmp_path, "train", old_ids, old_d, 5)
    before = _files_of(tmp_path, "train")
    merged_ids, merged_d = old_ids.copy(), old_d + 1
    merged_ids[7, 1] = 99  # an added chunk entered row 7 (shard 1)
    paths = DBLayout(tmp_path)
    for i in range(4):
        p_ids, p_dist = paths.knn_merged_shard("train", i)
        atomic_save_npy(p_ids, merged_ids[5 * i:5 * i + 5])
        atomic_save_npy(p_dist, merged_d[5 * i:5 * i + 5])
    new_ids, new_d = rng.integers(0, 50, (3, 2)), rng.random((3, 2)).astype(np.float32)
    atomic_save_npy(paths.knn_shard("train", 4)[0], new_ids)
    atomic_save_npy(paths.knn_shard("train", 4)[1], new_d)
    stats = assemble(tmp_path, "train", 23, 2, 5, old_rows=20, merged_rows=20,
                     merged=lambda i: paths.knn_merged_shard("train", i))
    assert stats["shards_written"] == 2 and stats["shards_kept"] == 3
    after = _files_of(tmp_path, "train")
    index = read_index(tmp_path, "train")
    for i, sh in enumerate(index.shards):
        assert (sh.ids in before and after[sh.ids] == before[sh.ids]) == (i in (0, 2, 3))
    ids, dists = load_neighbours(tmp_path, "train")
    np.testing.assert_array_equal(ids, np.concatenate([merged_ids, new_ids]))
    np.testing.assert_array_equal(dists[5:10], merged_d[5:10])  # the written shard: the merge's distances
    np.testing.assert_array_equal(dists[:5], old_d[:5])  # a kept shard: its first distances
    assert not paths.knn_shards_dir("train").exists()
    assert sorted(p.name for p in paths.neighbours_dir("train").glob("*.npy")) == \
        sorted(n for sh in index.shards for n in (sh.ids, sh.dist))


def _files_of(db: Path, split: str) -> dict[str, tuple[bytes, int]]:
    folder = DBLayout(db).neighbours_dir(split)
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.glob("*.npy")}


def test_a_db_from_before_shards_is_kept_and_converted(grown, tmp_path) -> None:
    """One neighbours.npy per split (every DB before shards): a knn run after add keeps its
    rows, writes shards, and leaves the same neighbours as a per-shard DB."""
    db, _ = grown
    legacy, ref = _copy(db, tmp_path / "legacy"), _copy(db, tmp_path / "ref")
    paths = DBLayout(legacy)
    for s in SPLITS:
        ids, dists = load_neighbours(legacy, s)
        atomic_save_npy(paths.neighbours(s), ids)
        atomic_save_npy(paths.neighbour_distances(s), dists)
        for p in paths.neighbours_dir(s).iterdir():
            p.unlink()
        paths.neighbours_dir(s).rmdir()
    assert run_cli(_knn(legacy)) == 0 and run_cli(_knn(ref)) == 0
    searched = load_manifest(legacy)["stages"]["knn"]["stats"]["refresh"]["searched_queries"]
    assert searched == load_manifest(ref)["stages"]["knn"]["stats"]["refresh"]["searched_queries"]
    for s in SPLITS:
        for got, want in zip(load_neighbours(legacy, s), load_neighbours(ref, s)):
            np.testing.assert_array_equal(got, want)
        assert not paths.neighbours(s).exists() and read_index(legacy, s) is not None


@pytest.mark.parametrize("point", ["neighbour_shards", "neighbour_index"])
def test_refresh_killed_while_writing_the_shards_resumes_to_the_same_neighbours(grown, tmp_path, point) -> None:
    """Killed after the new shards are written (the old index in force) or after the new index
    (the old files not yet removed): the re-run ends with the uninterrupted run's neighbours,
    and no old row takes an added chunk twice."""
    db, _ = grown
    ref, crashed = _copy(db, tmp_path / "ref"), _copy(db, tmp_path / "crashed")
    assert run_cli(_knn(ref, "--refresh")) == 0
    cmd = kill_at(_knn(crashed, "--refresh"), f"knn:{point}")
    written = read_index(crashed, "train").generation > read_index(db, "train").generation
    assert written == (point == "neighbour_index")
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert load_manifest(crashed)["stages"]["knn"]["params"]["refresh"] == "incremental"
    for s in SPLITS:
        for got, want in zip(load_neighbours(crashed, s), load_neighbours(ref, s)):
            np.testing.assert_array_equal(got, want)
        ids = load_neighbours(crashed, s)[0]
        srt = np.sort(np.where(ids < 0, -np.arange(1, ids.shape[1] + 1), ids), axis=1)
        assert not (np.diff(srt, axis=1) == 0).any()  # no id twice in a row
    assert load_manifest(crashed)["stages"]["knn"]["stats"]["coverage"] == \
        load_manifest(ref)["stages"]["knn"]["stats"]["coverage"]


class _Guarded:
    """A memmapped DB array that refuses a whole read (np.asarray) and any slice longer than
    ``limit`` rows; fancy indexing (candidate batches) and binary search pass through."""

    def __init__(self, arr: np.ndarray, limit: int) -> None:
        self.arr, self.limit = arr, limit
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, arr.ndim

    def __len__(self) -> int:
        return len(self.arr)

    def __getitem__(self, key: Any) -> Any:
        rows = key[0] if isinstance(key, tuple) else key
        if isinstance(rows, slice) and len(range(*rows.indices(len(self.arr)))) > self.limit:
            raise AssertionError(f"knn read {len(range(*rows.indices(len(self.arr))))} rows of a DB array at once")
        return self.arr[key]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise AssertionError(f"knn read a whole DB array ({self.shape})")

    def searchsorted(self, values: Any, side: str = "left", sorter: Any = None) -> np.ndarray:
        return self.arr.searchsorted(values, side=side)


@pytest.mark.parametrize("refresh", ["incremental", "full"])
def test_no_rank_reads_a_db_wide_array(grown, tmp_path, monkeypatch, refresh) -> None:
    """Doc ids, sequence starts and chunk tokens (the content mask) are read per range or per
    candidate batch: a read of more than one shard's rows at once, on a DB of ~10 shards, fails."""
    db, _ = grown
    work = _copy(db, tmp_path / "work")
    n_train = load_manifest(work)["counts"]["train"]["chunks"]
    assert n_train >= 9 * SHARD  # ~10 shards of queries
    real = chunk_store.store.open_npy
    monkeypatch.setattr(chunk_store.store, "open_npy", lambda path, *a, **kw: _Guarded(real(path, *a, **kw), SHARD))
    argv = _knn(work, "--refresh", refresh)
    with pytest.raises(AssertionError):  # the guard bites: the whole doc ids through it
        np.asarray(chunk_store.store.ChunkStore.open(work, "train").doc_ids)
    assert run_cli(argv) == 0
    monkeypatch.undo()
    knn = load_manifest(work)["stages"]["knn"]
    assert knn["params"]["refresh"] == refresh and knn["stats"]["refresh"]["searched_queries"] > 0
