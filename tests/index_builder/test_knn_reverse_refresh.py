"""knn --refresh, incremental, reversed: the added chunks search the old rows they should enter.

A reference test against brute force (exact when the pass is deep and the IVF exhaustive; the
recall at the default depth measured), the selector and pair bookkeeping as properties, and the
stage killed mid-pass then resumed to the same bytes."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from chunk_store.layout import SPLITS
from chunk_store.manifest import load_manifest
from chunk_store.neighbour_shards import load_neighbours
from index_builder.knn import reverse_refresh as rev
from tests.fixtures import run_cli, shared_tiny_bert
from tests.fixtures.knn_grown import copy_db, grown_ivf_db, kill_at, knn_argv


def test_the_selector_accepts_exactly_the_runs() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        cuts = np.sort(rng.choice(200, size=2 * rng.integers(1, 5), replace=False))
        runs = [(int(a), int(b)) for a, b in cuts.reshape(-1, 2)]
        sel = rev.selector_of_runs(runs)
        want = np.zeros(200, bool)
        for a, b in runs:
            want[a:b] = True
        assert [bool(sel.is_member(i)) for i in range(200)] == want.tolist()
    assert not rev.selector_of_runs([]).is_member(0)


def test_candidates_keep_each_row_s_best_in_order(tmp_path) -> None:
    pairs = np.zeros(6, rev.PAIR_DTYPE)
    pairs["row"] = [5, 3, 5, 5, 9, 3]
    pairs["chunk"] = [70, 71, 72, 73, 74, 75]
    pairs["dist"] = [0.3, 0.2, 0.1, 0.3, 0.5, 0.2]
    rev.write_pairs(tmp_path / "a.npy", pairs[:3])
    rev.write_pairs(tmp_path / "b.npy", pairs[3:])
    srt = rev.load_pairs([tmp_path / "a.npy", tmp_path / "b.npy"])
    assert srt["row"].tolist() == [3, 3, 5, 5, 5, 9]
    rows, cand = rev.candidates(srt, 3, 9, 2)
    assert rows.tolist() == [3, 5]  # row 9 is outside [3, 9)
    assert cand.tolist() == [[71, 75], [72, 70]]  # by distance, ties by the lower chunk id
    rows, cand = rev.candidates(srt, 0, 3, 2)
    assert len(rows) == 0 and cand.shape == (0, 2)


def _reference(old: np.ndarray, added: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each old row's k nearest among old (itself excluded) and added, by brute force."""
    both = np.concatenate([old, added])
    d = ((old[:, None, :] - both[None, :, :]) ** 2).sum(-1)
    d[np.arange(len(old)), np.arange(len(old))] = np.inf
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(d, ids, axis=1)


def _merge(old_ids: np.ndarray, old_d: np.ndarray, pairs: np.ndarray, k: int) -> np.ndarray:
    out = old_ids.copy()
    srt = pairs[np.lexsort((pairs["chunk"], pairs["dist"], pairs["row"]))]
    rows, cand = rev.candidates(srt, 0, len(old_ids), k)
    for r, c in zip(rows, cand):
        c = c[c >= 0]
        dist = np.concatenate([old_d[r], srt["dist"][srt["row"] == r][:len(c)]])
        ids = np.concatenate([old_ids[r], c])
        out[r] = ids[np.lexsort((ids, dist))][:k]
    return out


@pytest.mark.parametrize("depth", [rev.DEPTH, 10_000])
def test_reverse_pass_against_brute_force(depth) -> None:
    """Clustered vectors, an exhaustive IVF (nprobe = nlist): deep enough, the merged lists are the
    brute-force ones exactly; at the default depth only hubs past it can miss (recall printed)."""
    import faiss

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((20, 16)).astype(np.float32) * 3
    x = (centres[rng.integers(0, 20, 1500)] + rng.standard_normal((1500, 16))).astype(np.float32)
    n_old, k = 1200, 2
    old, added = x[:n_old], x[n_old:]
    index = faiss.index_factory(16, "IVF8,Flat")
    index.train(x)
    index.add(x)
    faiss.extract_index_ivf(index).nprobe = 8
    # the old rows' lists: their k nearest among the old rows
    old_ids, old_d = _reference(old, old[:0], k)
    p = rev.ReversePass(index, index, [x], [(0, n_old)], [[n_old, n_old]],
                        lambda rows: old_d[rows, -1], np.ones(len(x), bool), depth)
    pairs = np.concatenate([p.search(a, min(a + 100, len(x))) for a in range(n_old, len(x), 100)])
    assert p.queries == len(added) and p.pairs_found == len(pairs) > 0
    got = _merge(old_ids, old_d, pairs, k)
    want, _ = _reference(old, added, k)
    recall = float(np.mean([len(set(g) & set(w)) / k for g, w in zip(got, want)]))
    changed = float((want >= n_old).any(axis=1).mean())
    print(f"depth {depth}: recall@{k} {recall:.4f}, rows that gained an added chunk {changed:.3f}")
    assert changed > 0.05, "too few rows gain an added chunk: the test proves nothing"
    if depth >= n_old:
        np.testing.assert_array_equal(got, want)
    else:
        assert recall >= 0.99


def test_the_pass_skips_blank_chunks_and_rows_outside_the_runs() -> None:
    import faiss

    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    index = faiss.IndexFlatL2(8)
    index.add(x)
    content = np.ones(300, bool)
    content[250:260] = False  # blank added chunks: never neighbours, so never queries
    p = rev.ReversePass(index, index, [x], [(0, 50), (100, 200)], [[200, 200]],
                        lambda rows: np.full(len(rows), np.inf, np.float32), content, 8)
    pairs = p.search(200, 300)
    assert p.queries == 90
    assert not np.isin(pairs["chunk"], np.arange(250, 260)).any()
    assert ((pairs["row"] < 50) | ((pairs["row"] >= 100) & (pairs["row"] < 200))).all()
    d = ((x[pairs["row"]] - x[pairs["chunk"]]) ** 2).sum(-1)
    np.testing.assert_allclose(pairs["dist"], d, rtol=1e-5)


def test_worth_it() -> None:
    assert rev.worth_it(10, 100, 16, "OPQ48_384,IVF2048_HNSW32,PQ48x4np")
    assert not rev.worth_it(100, 100, 16, "IVF4,Flat")  # as many added as old rows: forward
    assert not rev.worth_it(10, 100, 0, "IVF4,Flat")  # --reverse-depth 0
    assert not rev.worth_it(10, 100, 16, "HNSW32")  # a selector costs HNSW a long walk
    assert not rev.worth_it(10, 100, 16, None)


@pytest.fixture(scope="module")
def grown_ivf(tmp_path_factory):
    return grown_ivf_db(tmp_path_factory.mktemp("rev"), shared_tiny_bert(tmp_path_factory))


@pytest.mark.parametrize("point", ["1", "finalize"])
def test_kill9_mid_reverse_pass_then_resume_gives_the_same_bytes(grown_ivf, tmp_path, point) -> None:
    """Killed after the first unit (a pairs file of the reverse pass), or with everything written
    but nothing assembled: the re-run keeps what was written and ends byte-identical."""
    db, _ = grown_ivf
    argv = ["--target-recall", 0, "--refresh"]
    ref, crashed = copy_db(db, tmp_path / "ref"), copy_db(db, tmp_path / "crashed")
    assert run_cli(knn_argv(ref, *argv)) == 0
    assert load_manifest(ref)["stages"]["knn"]["stats"]["refresh"]["added_search"].startswith("reverse")
    cmd = kill_at(knn_argv(crashed, *argv), f"knn:{point}")
    shards = crashed / "train" / "knn_shards"
    if point == "1":
        assert len(list(shards.glob("reverse_*.npy"))) == 1 and not list(shards.glob("merged_ids_*.npy"))
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "incremental refresh" in p.stdout
    for s in SPLITS:
        for got, want in zip(load_neighbours(crashed, s), load_neighbours(ref, s)):
            np.testing.assert_array_equal(got, want)
    assert not list(shards.glob("reverse_*.npy")) if shards.exists() else True  # temp files gone


def test_a_merge_waits_for_the_pairs_other_ranks_write(tmp_path) -> None:
    """wait_for returns once every pairs file is whole (written by another rank meanwhile)."""
    import threading

    paths = [tmp_path / "reverse_000000.npy", tmp_path / "reverse_000001.npy"]
    rev.write_pairs(paths[0], np.zeros(2, rev.PAIR_DTYPE))
    paths[1].write_bytes(b"not yet")  # a damaged or foreign file is not taken as whole
    said: list[str] = []
    later = threading.Timer(0.3, lambda: rev.write_pairs(paths[1], np.zeros(1, rev.PAIR_DTYPE)))
    later.start()
    rev.wait_for(paths, said.append, poll=0.05)
    later.join()
    assert len(rev.load_pairs(paths)) == 3


@pytest.mark.parametrize("depth", [64, 0], ids=["reverse", "forward"])
def test_torchrun_two_ranks_refresh_equals_one_process(grown_ivf, tmp_path, depth) -> None:
    """The refresh's units spread over 2 ranks (reverse: each merge unit waits for the other
    rank's pairs) give the same bytes as one process. Until 2026-12-07 rank 1 planned from the
    manifest as it was before rank 0 recorded the run, took every split as already written by
    this run and did nothing: the forward merge failed on a missing shard, the reverse pass hung."""
    from tests.fixtures.ranks import torchrun

    db, _ = grown_ivf
    one, two = copy_db(db, tmp_path / "one"), copy_db(db, tmp_path / "two")
    flags = ("--target-recall", 0, "--refresh", "--reverse-depth", depth)
    assert run_cli(knn_argv(one, *flags)) == 0
    p = torchrun(2, knn_argv(two, *flags), timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    stats = load_manifest(two)["stages"]["knn"]["stats"]
    assert stats["world_size"] == 2, stats
    assert stats["refresh"]["added_search"].startswith("reverse") == (depth > 0), stats["refresh"]
    for s in SPLITS:
        for got, want in zip(load_neighbours(two, s), load_neighbours(one, s)):
            np.testing.assert_array_equal(got, want)
