"""The IVF index as parts on disk (index_builder.index.parts): a parts index answers as the same
index built in one piece, ``add`` writes a new part and leaves the existing ones' bytes alone,
a crash mid-add leaves the DB whole, and the opened lists are memory-mapped, not in RAM."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest

from chunk_store.framework.errors import UserError
from chunk_store.framework.stage import CRASH_ENV
from chunk_store.layout import DBLayout
from chunk_store.manifest import load_manifest
from index_builder.embed.stage import open_embeddings, read_rows
from index_builder.index import parts as index_parts
from index_builder.index.parts import PartRecord, fill_part, open_parts, plan_parts
from index_builder.index.stage import load_index
from tests.fixtures import clustered_db, run_cli
from tests.fixtures.ivf_parts import DIM, NPROBE, clustered_shards, grow, index_argv, one_piece, search, trained


def test_parts_answer_as_one_piece_and_are_mapped_read_only(tmp_path):
    shards = clustered_shards(tmp_path / "emb", [1300, 1700])
    paths = trained(tmp_path, shards)
    parts = [PartRecord(0, 0, 1100), PartRecord(1, 1100, 1900)]  # not on shard boundaries
    for p in parts:
        fill_part(paths, shards, p, progress=False)
    opened = open_parts(paths, parts)
    q = read_rows(shards, 0, 3000)[::7] + 0.01
    d_ref, i_ref = search(one_piece(paths, shards, 3000), q)
    d, i = search(opened, q)
    assert opened.ntotal == 3000
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_array_equal(d, d_ref)
    # the lists are the parts' files mapped read-only, stacked: nothing of the codes copied in
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(opened).invlists)
    assert isinstance(lists, faiss.HStackInvertedLists)
    on_disk = opened.referenced_objects[0]
    assert all(isinstance(o, faiss.OnDiskInvertedLists) and o.read_only for o in on_disk)
    assert [o.filename for o in on_disk] == [str(paths.index_part_data(p.part)) for p in parts]


def test_two_parts_then_an_added_third_equal_one_build_and_leave_the_first_untouched(tmp_path):
    shards = clustered_shards(tmp_path / "emb", [1000, 1000, 1000], seed=1)
    paths = trained(tmp_path, shards)
    first = plan_parts(0, 2000, 0, min_parts=2)
    assert first == [PartRecord(0, 0, 1000), PartRecord(1, 1000, 1000)]
    for p in first:
        fill_part(paths, shards, p, progress=False)
    files = index_parts.part_files(paths, first)
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files}
    added = plan_parts(2000, 3000, 2)
    assert added == [PartRecord(2, 2000, 1000)]
    fill_part(paths, shards, added[0], progress=False)
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files} == before
    q = read_rows(shards, 0, 3000)[::5] + 0.01
    np.testing.assert_array_equal(search(open_parts(paths, first + added), q)[1],
                                  search(one_piece(paths, shards, 3000), q)[1])


def test_plan_parts_covers_the_range_in_bounded_parts():
    for start, stop, min_parts, cap in [(0, 10, 1, 4), (5, 1000, 3, 100), (0, 7, 16, 1 << 22), (9, 9, 2, 5)]:
        got = plan_parts(start, stop, 4, min_parts=min_parts, max_vectors=cap)
        assert [p.part for p in got] == list(range(4, 4 + len(got)))
        assert sum(p.count for p in got) == stop - start and all(0 < p.count <= cap for p in got)
        assert all(a.stop == b.first for a, b in zip(got, got[1:]))
        assert not got or (got[0].first, got[-1].stop) == (start, stop)
        assert len(got) >= min(min_parts, stop - start)


def test_a_missing_part_file_is_a_clear_error(tmp_path):
    shards = clustered_shards(tmp_path / "emb", [600])
    paths = trained(tmp_path, shards)
    fill_part(paths, shards, PartRecord(0, 0, 600), progress=False)
    paths.index_part_data(0).unlink()
    with pytest.raises(UserError, match="part-00000"):
        open_parts(paths, [PartRecord(0, 0, 600)])


# ----------------------------------------------------------------------------- the stage


def test_stage_add_writes_a_new_part_and_a_crash_mid_add_leaves_the_db_whole(tmp_path):
    db = clustered_db(tmp_path / "db", n_docs=40, dim=DIM)
    paths = DBLayout(db)
    assert run_cli(index_argv(db)) == 0
    first = index_parts.listed_parts(paths)
    n_old = sum(p.count for p in first)
    assert first and not paths.index.exists()  # the IVF plan is kept as parts, no knn.index
    files = index_parts.part_files(paths, first)
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files}
    n_new = grow(db, 8, seed=3)
    assert n_new > n_old
    # killed after the new part is written, before the parts list names it: the DB is whole
    cmd = [sys.executable, "-m", "index_builder", *index_argv(db)]
    p = subprocess.run(cmd, env=dict(os.environ, **{CRASH_ENV: "index:1"}), capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]
    assert index_parts.listed_parts(paths) == first and load_index(db).ntotal == n_old
    assert paths.index_part_record(len(first)).exists()
    assert run_cli(index_argv(db)) == 0
    grown = index_parts.listed_parts(paths)
    assert grown[:len(first)] == first and len(grown) == len(first) + 1
    assert (grown[-1].first, grown[-1].stop) == (n_old, n_new)
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files} == before
    stats = load_manifest(db)["stages"]["index"]["stats"]
    assert stats["ntotal"] == n_new and stats["added_without_training"] == n_new - n_old
    assert set(stats["added_codec_check"]) == {"old_rows_error", "added_rows_error", "ratio", "rebuild_advised"}
    assert stats["parts"] == len(grown)
    # the grown index answers as the trained index filled in one piece over every row
    shards = open_embeddings(db, "train")
    q = read_rows(shards, 0, n_new)[::3]
    loaded = load_index(db)
    assert json.loads(paths.index_infos.read_text())["layout"] == "parts"
    np.testing.assert_array_equal(search(loaded, q)[1], search(one_piece(paths, shards, n_new), q)[1])


@pytest.mark.slow
def test_two_ranks_fill_a_part_each(tmp_path):
    """Under torchrun with 2 ranks rank 0 trains, each rank fills one part, rank 0 merges them
    into one (--merge-parts auto) once both are whole, and the index equals the trained index
    filled in one piece (more than 20 s: two interpreters start on 2 cores)."""
    from tests.fixtures.ranks import torchrun

    db = clustered_db(tmp_path / "db", n_docs=30, dim=DIM)
    p = torchrun(2, index_argv(db))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 1 of 2 filled 1 part(s)" in p.stdout + p.stderr
    paths = DBLayout(db)
    shards = open_embeddings(db, "train")
    n = sum(s.shape[0] for s in shards)
    assert index_parts.listed_parts(paths) == [PartRecord(2, 0, n)]
    assert load_manifest(db)["stages"]["index"]["stats"]["merge"]["parts"] == [0, 1]
    assert {f.name for f in paths.index_dir.glob("part-*")} == {f"part-00002.{x}" for x in ("ivfdata", "ivflists", "json")}
    q = read_rows(shards, 0, n)[::3]
    np.testing.assert_array_equal(search(load_index(db), q)[1], search(one_piece(paths, shards, n), q)[1])


def test_the_torch_ivf_search_reads_a_parts_index_as_one_piece(tmp_path):
    """CUDA's bounded search (index_builder.index.torch_ivf_search) takes each list's ids from the
    stacked parts: the same candidates, so the same neighbours, as from the one-piece index."""
    from index_builder.index.torch_ivf_search import TorchIVFSearch

    shards = clustered_shards(tmp_path / "emb", [900, 1100], seed=3)
    paths = trained(tmp_path, shards)
    parts = [PartRecord(0, 0, 700), PartRecord(1, 700, 1300)]
    for p in parts:
        fill_part(paths, shards, p, progress=False)
    q = read_rows(shards, 0, 2000)[::9] + 0.01
    results = []
    for index in (open_parts(paths, parts), one_piece(paths, shards, 2000)):
        faiss.extract_index_ivf(index).nprobe = NPROBE
        results.append(TorchIVFSearch(index, shards).search(q, 5))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_knn_refresh_after_a_new_part_merges_the_added_chunks_only(tmp_path):
    """The whole growth path on a parts index: index, knn, add, index (a new part), knn --refresh.
    The refresh takes the incremental path (its IVF over the added vectors is cloned from the
    stacked, memory-mapped parts index), searches only the added chunks, and agrees with a full
    re-search of the grown index up to the index's recall."""
    import shutil

    from chunk_store.neighbour_shards import load_neighbours

    db = clustered_db(tmp_path / "db", n_docs=40, dim=DIM)
    knn = ["knn", "--db", db, "--k", 2, "--shard-size", 128, "--device", "cpu"]
    assert run_cli(index_argv(db)) == 0 and run_cli(knn) == 0
    n_old = load_manifest(db)["counts"]["train"]["chunks"]
    n_new = grow(db, 8, seed=4)
    assert run_cli(index_argv(db)) == 0
    assert len(index_parts.listed_parts(DBLayout(db))) >= 2  # the added chunks are a part of their own
    full = shutil.copytree(db, tmp_path / "full")
    exact = shutil.copytree(db, tmp_path / "exact")
    assert run_cli([*knn, "--refresh", "incremental"]) == 0
    assert run_cli([*knn[:2], full, *knn[3:], "--refresh", "full"]) == 0
    assert run_cli([*knn[:2], exact, *knn[3:], "--refresh", "full", "--exact"]) == 0
    # the codes trained before the add hold the added rows far worse (their residuals clip): said
    check = load_manifest(db)["stages"]["index"]["stats"]["added_codec_check"]
    assert check["added_rows_error"] > 10 * check["old_rows_error"] and check["rebuild_advised"]
    refresh = load_manifest(db)["stages"]["knn"]["stats"]["refresh"]
    assert refresh["mode"] == "incremental" and refresh["added_chunks"]["train"] == n_new - n_old
    (inc, inc_d), (ful, ful_d), (ref, ref_d) = (load_neighbours(x, "train") for x in (db, full, exact))
    assert inc.shape == ful.shape == ref.shape == (n_new, 2)

    def recall(d: np.ndarray) -> float:  # the k-th exact distance reached (ties are not misses)
        return float((d <= ref_d[:, -1:] + 1e-4).mean())

    # as good as the full re-search (this tiny grown DB's SQ8 codes, trained before the add,
    # cap both: about 0.84 here)
    assert recall(inc_d) >= recall(ful_d) - 0.03 and recall(inc_d) > 0.5


def test_the_codec_check_tells_rows_the_codes_hold_from_rows_they_clip(tmp_path):
    """added_codec_check: rows from the training distribution score about the old rows' error;
    rows far outside the ranges the SQ8 codec learnt score far worse and advise a rebuild."""
    shards = clustered_shards(tmp_path / "emb", [2000])
    paths = trained(tmp_path, shards)
    rng = np.random.default_rng(5)
    x = read_rows(shards, 0, 2000)
    same = x[rng.permutation(2000)[:500]] + 0.01 * rng.standard_normal((500, DIM)).astype(np.float32)
    far = 4.0 * x[:500]  # residuals several times any the codec trained on
    for name, extra, advised in (("same", same, False), ("far", far, True)):
        path = tmp_path / f"grown-{name}.npy"  # the old rows, then the added ones, as embed stores them
        np.save(path, np.concatenate([x, extra]).astype(np.float16))
        grown = [np.load(path, mmap_mode="r")]
        check = index_parts.added_codec_check(paths, grown, [PartRecord(1, 2000, 500)])
        assert check["rebuild_advised"] == advised, check
    assert index_parts.added_codec_check(paths, shards, []) is None

