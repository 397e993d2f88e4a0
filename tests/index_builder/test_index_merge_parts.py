"""Merging a parts index into one on-disk part (index_builder.index.merge_parts): the merged part
answers as the stacked parts and as the index filled in one piece; ``add`` after a merge leaves
the merged part's files alone; auto / never / always; a crash at each point of a merge loses
nothing and the re-run finishes it; a build resumed with another number of parts leaves no part
file the list does not name; the single-file add gets the same codec check as a new part."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pytest

from chunk_store.framework.stage import CRASH_ENV
from chunk_store.layout import DBLayout
from chunk_store.manifest import load_manifest
from index_builder.embed.stage import open_embeddings, read_rows
from index_builder.index import merge_parts as merging
from index_builder.index import parts as index_parts
from index_builder.index.merge_parts import MergeConfig, merge_parts, plan_merge
from index_builder.index.parts import PartRecord, fill_part, open_parts, plan_parts, write_parts_list
from index_builder.index.stage import load_index
from index_builder.index.update import add_new_vectors
from tests.fixtures import clustered_db, run_cli, shared_db
from tests.fixtures.ivf_parts import DIM, clustered_shards, grow, index_argv, one_piece, search, trained

ROOT = Path(__file__).resolve().parents[2]


def index_files(paths: DBLayout) -> set[str]:
    """The names in DB/index (the index's files and nothing else may be there)."""
    return {f.name for f in paths.index_dir.iterdir()}


def expected_files(paths: DBLayout) -> set[str]:
    """What the list names: trained.index, index_infos.json and each listed part's three files."""
    listed = index_parts.listed_parts(paths) or []
    return {f.name for f in index_parts.part_files(paths, listed)} | {paths.index_infos.name}


def queries(db: Path) -> tuple[np.ndarray, int]:
    shards = open_embeddings(db, "train")
    n = sum(s.shape[0] for s in shards)
    return read_rows(shards, 0, n)[::3], n


def few_rows_a_part(monkeypatch: pytest.MonkeyPatch, db: Path, parts: int) -> None:
    """One process fills ``parts`` parts from scratch, as that many ranks (or a DB past
    PART_MAX_VECTORS) would."""
    n = sum(s.shape[0] for s in open_embeddings(db, "train"))
    monkeypatch.setattr(index_parts, "PART_MAX_VECTORS", -(-n // parts))


# ----------------------------------------------------------------------------- the merge itself


def test_a_merged_part_answers_as_the_stacked_parts_and_as_one_piece(tmp_path):
    shards = clustered_shards(tmp_path / "emb", [1300, 1700])
    paths = trained(tmp_path, shards)
    parts = plan_parts(0, 3000, 0, min_parts=3)
    for p in parts:
        fill_part(paths, shards, p, progress=False)
    write_parts_list(paths, {}, parts)
    q = read_rows(shards, 0, 3000)[::7] + 0.01
    d_stacked, i_stacked = search(open_parts(paths, parts), q)
    record = merge_parts(paths, parts, progress=False)
    merged = index_parts.listed_parts(paths)
    assert merged == [PartRecord(3, 0, 3000)] and record["parts"] == [0, 1, 2] and record["into"] == 3
    assert record["bytes_written"] == merging.part_bytes(paths, merged) > 0
    assert index_files(paths) == expected_files(paths)  # the merged parts' files are gone
    opened = open_parts(paths, merged)
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(opened).invlists),
                      faiss.OnDiskInvertedLists)  # one part: nothing stacked
    d, i = search(opened, q)
    np.testing.assert_array_equal(i, i_stacked)
    np.testing.assert_array_equal(d, d_stacked)
    d_one, i_one = search(one_piece(paths, shards, 3000), q)
    np.testing.assert_array_equal(i, i_one)
    np.testing.assert_array_equal(d, d_one)


def test_too_little_disk_skips_the_merge_with_one_warning_and_keeps_the_parts(tmp_path, monkeypatch, caplog):
    shards = clustered_shards(tmp_path / "emb", [1200])
    paths = trained(tmp_path, shards)
    parts = plan_parts(0, 1200, 0, min_parts=2)
    for p in parts:
        fill_part(paths, shards, p, progress=False)
    write_parts_list(paths, merging.with_pending({}, parts), parts)
    monkeypatch.setattr(merging.shutil, "disk_usage", lambda _: SimpleNamespace(total=1, used=1, free=1))
    with caplog.at_level(logging.WARNING):
        record = merge_parts(paths, parts, progress=False)
    assert "too little free disk" in record["skipped"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "free disk" in warnings[0]
    assert index_parts.listed_parts(paths) == parts and index_files(paths) == expected_files(paths)
    assert merging.PENDING_KEY not in index_parts.read_infos(paths)  # not retried by the next add


def test_plan_merge_auto_never_always():
    def parts(n: int, first: int = 0) -> list[PartRecord]:
        return [PartRecord(first + j, 10 * (first + j), 10) for j in range(n)]

    auto, never, always = (MergeConfig(m) for m in ("auto", "never", "always"))
    assert plan_merge(auto, [], parts(2), {}) == (parts(2), None)  # filled from scratch: merged
    assert plan_merge(auto, [], parts(1), {}) == ([], None)
    todo, why = plan_merge(auto, parts(3), parts(1, 3), {})  # an add: its part kept separate
    assert todo == [] and "add keeps" in why
    assert plan_merge(auto, parts(16), parts(1, 16), {})[0] == parts(17)  # past 16 parts: all of them
    assert plan_merge(always, parts(1), parts(1, 1), {})[0] == parts(2)
    assert plan_merge(always, parts(1), [], {}) == ([], None)
    assert plan_merge(never, [], parts(4), {}) == ([], "--merge-parts never")
    pending = merging.with_pending({}, parts(2))  # a committed decision a crashed run left
    assert plan_merge(auto, parts(3), [], pending)[0] == parts(2)
    assert plan_merge(never, parts(3), [], pending)[0] == []


# ----------------------------------------------------------------------------- the stage


def test_auto_merges_parts_filled_from_scratch_and_an_add_then_writes_a_part_beside_it(tmp_path, monkeypatch,
                                                                                       capsys):
    db = clustered_db(tmp_path / "db", n_docs=40, dim=DIM)
    paths = DBLayout(db)
    few_rows_a_part(monkeypatch, db, 3)
    assert run_cli(index_argv(db)) == 0
    q, n = queries(db)
    assert index_parts.listed_parts(paths) == [PartRecord(3, 0, n)]
    assert index_files(paths) == expected_files(paths)
    merge = load_manifest(db)["stages"]["index"]["stats"]["merge"]
    assert merge["parts"] == [0, 1, 2] and merge["into"] == 3 and merge["bytes_written"] > 0
    said = capsys.readouterr()
    assert "merged parts 0-2 into part 3" in said.out + said.err  # the stage's summary line
    d_one, i_one = search(one_piece(paths, open_embeddings(db, "train"), n), q)
    d, i = search(load_index(db), q)
    np.testing.assert_array_equal(i, i_one)
    np.testing.assert_allclose(d, d_one, rtol=1e-5)  # the chooser's OPQ+PQ key: float rounding
    files = index_parts.part_files(paths, index_parts.listed_parts(paths))
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files}
    n_new = grow(db, 8, seed=3)
    assert run_cli(index_argv(db)) == 0  # auto after an add: a new part beside the merged one
    assert index_parts.listed_parts(paths) == [PartRecord(3, 0, n), PartRecord(4, n, n_new - n)]
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files} == before
    assert "add keeps" in load_manifest(db)["stages"]["index"]["stats"]["merge"]["skipped"]
    # always: the finished index of 2 parts is merged by the next run
    assert run_cli([*index_argv(db), "--merge-parts", "always"]) == 0
    assert index_parts.listed_parts(paths) == [PartRecord(5, 0, n_new)]
    assert index_files(paths) == expected_files(paths)
    q, _ = queries(db)
    np.testing.assert_array_equal(search(load_index(db), q)[1],
                                  search(one_piece(paths, open_embeddings(db, "train"), n_new), q)[1])


def test_never_keeps_the_parts_and_auto_past_the_limit_merges_after_an_add(tmp_path, monkeypatch):
    db = clustered_db(tmp_path / "db", n_docs=40, dim=DIM)
    paths = DBLayout(db)
    few_rows_a_part(monkeypatch, db, 2)
    assert run_cli([*index_argv(db), "--merge-parts", "never"]) == 0
    assert [p.part for p in index_parts.listed_parts(paths)] == [0, 1]
    assert load_manifest(db)["stages"]["index"]["stats"]["merge"] == {"skipped": "--merge-parts never"}
    n_new = grow(db, 8, seed=3)
    monkeypatch.setattr(merging, "AUTO_MAX_PARTS", 2)
    assert run_cli(index_argv(db)) == 0  # 3 parts listed after the add: past the limit, all merged
    assert index_parts.listed_parts(paths) == [PartRecord(3, 0, n_new)]
    assert index_files(paths) == expected_files(paths)


@pytest.mark.parametrize("point", ["merge-written", "merge-listed"])
def test_a_crash_at_each_point_of_a_merge_loses_nothing_and_the_rerun_finishes_it(tmp_path, point):
    """Killed after the merged part is written (the old parts still listed) or after the list
    names it (the old parts' files still there): the index searches as before, and a plain re-run
    (auto: the committed decision carries on) ends with the merged part alone."""
    db = clustered_db(tmp_path / "db", n_docs=40, dim=DIM)
    paths = DBLayout(db)
    assert run_cli(index_argv(db)) == 0
    grow(db, 8, seed=3)
    assert run_cli(index_argv(db)) == 0
    old = index_parts.listed_parts(paths)
    assert len(old) == 2
    q, n = queries(db)
    d_before, i_before = search(load_index(db), q)
    cmd = [sys.executable, "-m", "index_builder", *index_argv(db), "--merge-parts", "always"]
    p = subprocess.run(cmd, env=dict(os.environ, **{CRASH_ENV: f"index:{point}"}), capture_output=True,
                       text=True, cwd=ROOT)
    assert p.returncode == -9, p.stderr[-2000:]
    merged = PartRecord(2, 0, n)
    assert index_parts.listed_parts(paths) == (old if point == "merge-written" else [merged])
    assert index_parts.part_done(paths, merged)
    d, i = search(load_index(db), q)
    np.testing.assert_array_equal(i, i_before)
    np.testing.assert_array_equal(d, d_before)
    assert run_cli(index_argv(db)) == 0
    assert index_parts.listed_parts(paths) == [merged]
    assert index_files(paths) == expected_files(paths)
    assert merging.PENDING_KEY not in index_parts.read_infos(paths)
    d, i = search(load_index(db), q)
    np.testing.assert_array_equal(i, i_before)
    np.testing.assert_array_equal(d, d_before)


def crashed_two_part_build(db: Path) -> None:
    """What a 2-rank build killed before its list leaves: both parts whole, nothing listed (one
    process with PART_MAX_VECTORS at half the rows writes the same files, killed at finalize)."""
    n = sum(s.shape[0] for s in open_embeddings(db, "train"))
    code = ("import sys; from index_builder.index import parts; from index_builder.cli import main; "
            f"parts.PART_MAX_VECTORS = {-(-n // 2)}; sys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, *index_argv(db)], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, **{CRASH_ENV: "index:finalize"}))
    assert p.returncode == -9, p.stderr[-2000:]
    paths = DBLayout(db)
    assert index_parts.listed_parts(paths) is None
    assert all(index_parts.part_done(paths, r) for r in plan_parts(0, n, 0, min_parts=2))


@pytest.mark.parametrize("resumed_parts", [1, 3])
def test_a_build_resumed_with_another_part_count_leaves_no_unlisted_part_file(tmp_path, monkeypatch, resumed_parts):
    """2 -> 1 leaves part-00001 behind, 2 -> 3 rewrites parts 0, 1 and adds 2: whatever the
    list does not name is removed, and the index answers as a clean build's."""
    clean = clustered_db(tmp_path / "clean", n_docs=40, dim=DIM)
    db = shutil.copytree(clean, tmp_path / "db")
    assert run_cli(index_argv(clean)) == 0
    crashed_two_part_build(db)
    few_rows_a_part(monkeypatch, db, resumed_parts)
    assert run_cli(index_argv(db)) == 0
    paths = DBLayout(db)
    assert len(index_parts.listed_parts(paths)) == 1  # 1 part, or 3 merged into one
    assert index_files(paths) == expected_files(paths)
    assert_same_answers(db, clean)


def assert_same_answers(db: Path, clean: Path) -> None:
    """``db``'s index answers the queries as the clean build's (distances up to float rounding)."""
    q, _ = queries(db)
    d, i = search(load_index(db), q)
    d_ref, i_ref = search(load_index(clean), q)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(d, d_ref, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("resumed_world", [1, 3])
def test_a_two_rank_build_killed_and_resumed_with_another_world_size(tmp_path, resumed_world):
    """torchrun 2 killed before the list (rank 1 dies after its part), resumed with 1 process or
    3 ranks: no part file the list does not name, one part, and a clean build's answers (more
    than 20 s: torchrun starts its ranks twice on 2 cores)."""
    from tests.fixtures.ranks import torchrun

    clean = clustered_db(tmp_path / "clean", n_docs=40, dim=DIM)
    db = shutil.copytree(clean, tmp_path / "db")
    assert run_cli(index_argv(clean)) == 0
    p = torchrun(2, index_argv(db), crash="index:finalize", monitor_interval=1)
    assert p.returncode != 0
    paths = DBLayout(db)
    assert index_parts.listed_parts(paths) is None and paths.index_part_record(1).exists()
    if resumed_world == 1:
        assert run_cli(index_argv(db)) == 0
    else:
        p = torchrun(resumed_world, index_argv(db))
        assert p.returncode == 0, p.stderr[-3000:]
    assert len(index_parts.listed_parts(paths)) == 1
    assert index_files(paths) == expected_files(paths)
    assert_same_answers(db, clean)


def test_knn_finds_the_same_neighbours_in_the_merged_index_as_in_the_stacked_one(tmp_path, monkeypatch):
    """The same DB's index as 2 stacked parts (never), then merged by ``--merge-parts always``:
    knn's neighbours and distances do not change."""
    from chunk_store.neighbour_shards import load_neighbours

    db = clustered_db(tmp_path / "db", n_docs=40, dim=DIM)
    few_rows_a_part(monkeypatch, db, 2)
    found = []
    for mode in ("never", "always"):
        assert run_cli([*index_argv(db), "--merge-parts", mode]) == 0
        assert run_cli(["knn", "--db", db, "--k", 2, "--device", "cpu", "--refresh", "full"]) == 0
        found.append((load_neighbours(db, "train"), [p.part for p in index_parts.listed_parts(DBLayout(db))]))
    assert (found[0][1], found[1][1]) == ([0, 1], [2])
    for a, b in zip(found[0][0], found[1][0]):
        np.testing.assert_array_equal(a, b)


def test_the_retriever_answers_from_a_merged_index_as_from_the_stacked_one(tmp_path_factory, tmp_path, monkeypatch):
    from index_builder import Retriever

    db = shutil.copytree(shared_db(tmp_path_factory), tmp_path / "db")
    few_rows_a_part(monkeypatch, db, 2)
    emb = read_rows(open_embeddings(db, "train"), 0, 40)
    found = []
    for argv in (["--rebuild", "--merge-parts", "never"], ["--merge-parts", "always"]):
        assert run_cli(["index", "--db", db, "--hnsw-max", "0", "--recall-sample", "50", "--deterministic",
                        *argv]) == 0
        found.append(Retriever(db, device="cpu").search_embeddings(emb, k=3))
    assert [p.part for p in index_parts.listed_parts(DBLayout(db))] == [2]
    for a, b in zip(*found):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- the single file's add


def test_a_single_file_add_checks_the_added_rows_codes_as_a_new_part_does(tmp_path, capsys):
    """update.add_new_vectors measures the codec's error on the added rows (codec_check, the
    function a parts add uses): rows from the trained distribution pass, rows far outside the
    SQ8 ranges advise --rebuild."""
    for name, scale, advised in (("same", 1.0, False), ("far", 4.0, True)):
        paths = DBLayout(tmp_path / name)
        shards = clustered_shards(paths.embeddings_dir("train"), [2000])
        trained(tmp_path / name / "t", shards)
        index = faiss.read_index(str(DBLayout(tmp_path / name / "t" / "db").index_trained))
        index.add(read_rows(shards, 0, 2000))
        paths.index_dir.mkdir(parents=True)
        faiss.write_index(index, str(paths.index))
        rng = np.random.default_rng(1)
        extra = scale * read_rows(shards, 0, 2000)[rng.permutation(2000)[:500]]
        np.save(paths.embedding_shard("train", 1), (extra + 0.01).astype(np.float16))
        grown = add_new_vectors(paths.root)
        assert grown["added"] == 500 and grown["codec_check"]["rebuild_advised"] == advised, grown
        assert ("--rebuild" in capsys.readouterr().err) == advised


def test_the_stage_records_the_single_file_adds_codec_check(tmp_path):
    db = clustered_db(tmp_path / "db", n_docs=40, dim=DIM)
    argv = ["index", "--db", db, "--index-key", "IVF16,Flat", "--recall-sample", "50", "--deterministic"]
    assert run_cli(argv) == 0
    assert DBLayout(db).index.exists()  # a single file: grown in place by update.add_new_vectors
    grow(db, 8, seed=3)
    assert run_cli(argv) == 0
    stats = load_manifest(db)["stages"]["index"]["stats"]
    assert stats["added_without_training"] > 0
    assert set(stats["added_codec_check"]) == {"old_rows_error", "added_rows_error", "ratio", "rebuild_advised"}
