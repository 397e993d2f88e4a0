"""knn --refresh after add, incremental: old rows search only the added chunks and merge them in.

With an exact (Flat) index the merged rows equal a full re-search (up to ties at equal distance),
the exclusion rule holds for every row, a crash mid-way then resume gives the same bytes, and the
work recorded is the added data's (old rows x added chunks), not the database's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from chunk_store.layout import SPLITS
from chunk_store.manifest import load_manifest
from chunk_store.neighbour_shards import load_neighbours, write_neighbours
from index_builder.knn.exclusion import exclusion_args, select_neighbours
from index_builder.knn.incremental import coverage_after, merge_prefix, sort_candidates
from tests.fixtures import build_index_db, run_cli, shared_tiny_bert
from tests.fixtures.knn_grown import (SHARD, copy_db as _copy, grow as _grow, grown_db, grown_ivf_db, kill_at,
                                      knn_argv as _knn)

def _arrays(db: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {s: load_neighbours(db, s) for s in SPLITS}


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> tuple[Path, int]:
    return grown_db(tmp_path_factory)


def test_incremental_equals_full_refresh_and_counts_the_added_data(grown, tmp_path) -> None:
    db, n_old = grown
    inc, full = _copy(db, tmp_path / "inc"), _copy(db, tmp_path / "full")
    assert run_cli(_knn(inc, "--refresh")) == 0
    assert run_cli(_knn(full, "--refresh", "full")) == 0
    m_inc, m_full = load_manifest(inc)["stages"]["knn"], load_manifest(full)["stages"]["knn"]
    assert m_inc["params"]["refresh"] == "incremental" and m_full["params"]["refresh"] == "full"
    a, b = _arrays(inc), _arrays(full)
    for s in SPLITS:
        (ai, ad), (bi, bd) = a[s], b[s]
        assert ai.shape == bi.shape
        np.testing.assert_allclose(ad, bd, rtol=1e-4, atol=1e-5)
        differ = ai != bi  # identical ids except where distances tie
        assert np.allclose(ad[differ], bd[differ], rtol=1e-4, atol=1e-5)
        assert differ.mean() < 0.1
    old_rows = a["train"][0][:n_old]
    assert (old_rows >= n_old).any(), "no old row took an added chunk: the test proves nothing"
    print("incremental refresh:", m_inc["stats"]["refresh"], "id differences:",
          {s: float((a[s][0] != b[s][0]).mean()) for s in SPLITS}, "old train rows with an added chunk:",
          float((old_rows >= n_old).any(axis=1).mean()))
    # the work: the full refresh searched every row; the incremental one only the new rows, and
    # its old rows scanned the added train chunks alone
    counts = load_manifest(db)["counts"]
    n_train, n_val = counts["train"]["chunks"], counts["val"]["chunks"]
    r_inc, r_full = m_inc["stats"]["refresh"], m_full["stats"]["refresh"]
    assert r_full["searched_queries"] == n_train + n_val and r_full["merged_queries"] == 0
    old_val = r_inc["merged_rows"]["val"]
    assert r_inc["merged_rows"]["train"] == n_old
    assert r_inc["searched_queries"] == (n_train - n_old) + (n_val - old_val)
    assert r_inc["merged_queries"] == n_old + old_val
    added = n_train - n_old
    assert r_inc["added_chunks"] == {"train": added, "val": added}
    # one exact pass over the added chunks a query (rows short of k after the exclusions scan again)
    scanned = r_inc["added_vectors_scanned"]
    assert (n_old + old_val) * added <= scanned <= 2 * (n_old + old_val) * added
    assert m_inc["stats"]["coverage"] == {"train": [[n_train, n_train]], "val": [[n_val, n_train]]}
    # and nothing is left to do: a second --refresh is 'already done'
    before = _arrays(inc)
    assert run_cli(_knn(inc, "--refresh")) == 0
    assert load_manifest(inc)["stages"]["knn"]["finished"] == m_inc["finished"]
    for s in SPLITS:
        assert np.array_equal(before[s][0], _arrays(inc)[s][0])


def test_exclusions_hold_after_the_merge(grown, tmp_path) -> None:
    """No row, old or new, gets itself, a chunk of its training sequence's documents or a blank chunk.

    New data cannot hold a document of an old row's sequence (added documents get new doc ids, and
    sequences end at a shard), so a rule-breaking old list is planted instead."""
    from chunk_store import ChunkStore

    db, _ = grown
    inc, full = _copy(db, tmp_path / "inc"), _copy(db, tmp_path / "full")
    # an old row whose stored list breaks the rule (itself, then a chunk of its own document):
    # the merge must not keep it, and searches that row again in full
    old, old_d = load_neighbours(inc, "train")
    docs0 = np.asarray(ChunkStore.open(inc, "train").doc_ids)
    old[5, 0], old[5, 1] = 5, np.flatnonzero(docs0 == docs0[5])[0]
    write_neighbours(inc, "train", old, old_d, SHARD)
    assert run_cli(_knn(inc, "--refresh", "incremental")) == 0
    assert load_manifest(inc)["stages"]["knn"]["stats"]["refresh"]["stale_rows"] == 1
    assert run_cli(_knn(full, "--refresh", "full")) == 0
    got, want = load_neighbours(inc, "train")[0][5], load_neighbours(full, "train")[0][5]
    np.testing.assert_allclose(load_neighbours(inc, "train")[1][5], load_neighbours(full, "train")[1][5],
                               rtol=1e-4, atol=1e-5)
    assert got[0] == want[0]
    store = ChunkStore.open(inc, "train")
    docs, starts = np.asarray(store.doc_ids), np.asarray(store.seq_starts)
    nb = load_neighbours(inc, "train")[0]
    content = store.content_mask()
    n = len(docs)
    valid = nb >= 0
    assert valid.mean() > 0.95 and content[nb[valid]].all()
    assert not (nb == np.arange(n)[:, None]).any()
    cps = store.seq_len // store.chunk_size
    rule = exclusion_args(True, 0, n, docs, docs, starts, cps, content)
    lo, hi = rule["doc_ranges"][:, :1], rule["doc_ranges"][:, 1:]
    got = docs[np.where(valid, nb, 0)]
    assert not (((got >= lo) & (got <= hi)) & valid).any()


def test_the_merge_applies_the_exclusion_to_the_added_candidates() -> None:
    """A new candidate from an excluded document is dropped in the merge, however near, and ties
    at equal distance keep the lower chunk id."""
    old_i, old_d = np.array([[1, 4]]), np.array([[0.5, 0.9]], np.float32)
    new_i, new_d = np.array([[7, 6]]), np.array([[0.1, 0.5]], np.float32)
    cand = sort_candidates(np.concatenate([old_i, new_i], 1), np.concatenate([old_d, new_d], 1))
    assert cand[0].tolist() == [[7, 1, 6, 4]]
    db_docs = np.array([0, 1, 1, 2, 2, 3, 4, 5])  # chunk 7: doc 5, excluded below
    ids, d, _ = select_neighbours(*cand, 2, query_ids=np.array([0]), db_docs=db_docs,
                                  doc_ranges=np.array([[5, 5]]))
    assert ids.tolist() == [[1, 6]] and d.tolist() == [[0.5, 0.5]]


def test_the_refresh_decision() -> None:
    """auto merges only what was made under the same rule by the same trained index."""
    from chunk_store.framework.errors import UserError
    from index_builder.knn.incremental import decide

    params = {"k": 2, "extra": 10, "method": "index", "index_id": "Flat@2", "exclusion": "sequence"}
    keys = ("k", "extra", "method", "index_id", "exclusion")
    done = {"params": dict(params, index_id="Flat@1"), "finished": "t",
            "stats": {"coverage": {"train": [[10, 10]]}, "index_trained": "Flat@0"}}
    assert decide("auto", done, params, keys, "Flat@0").mode == "incremental"
    assert decide(None, done, params, keys, "Flat@0").mode == "new_rows"
    assert decide("full", done, params, keys, "Flat@0").mode == "full"
    rebuilt = decide("auto", done, params, keys, "Flat@5")
    assert rebuilt.mode == "full" and "rebuilt" in rebuilt.reason
    other_k = decide("auto", done, dict(params, k=3), keys, "Flat@0")
    assert other_k.mode == "full" and "k differs" in other_k.reason
    older = {**done, "stats": {}}  # a database from before coverage was recorded
    assert decide("auto", older, params, keys, "Flat@0").mode == "full"
    with pytest.raises(UserError, match="incremental: not possible"):
        decide("incremental", older, params, keys, "Flat@0")
    # an interrupted run: its recorded plan, not the (cleared) stats, decides
    running = {"params": dict(params, refresh="incremental", rows_before=done["stats"]), "finished": None}
    assert decide("auto", running, params, keys, "Flat@0").before == done["stats"]
    assert decide("auto", {"params": dict(params, refresh="full"), "finished": None}, params, keys,
                  "Flat@0").mode == "full"


def test_coverage_bookkeeping() -> None:
    # a plain knn after add appends a segment; the refresh merges the rows short of the train size
    cov = coverage_after("new_rows", {"train": [[10, 10]]}, "train", 10, 15, 15)
    assert cov == [[10, 10], [15, 15]]
    assert merge_prefix(cov, 15, 20) == (15, [[10, 10], [15, 15]])
    assert merge_prefix(cov, 15, 15) == (10, [[10, 10]])  # rows from before the add: not yet
    assert merge_prefix([[15, 15]], 15, 15) == (0, [])
    assert merge_prefix(cov, 12, 20) == (0, [])  # the file disagrees with the record: search again
    assert coverage_after("new_rows", None, "val", 4, 6, 15) == [[4, None], [6, 15]]
    assert coverage_after("incremental", {"val": [[4, 10]]}, "val", 4, 6, 15) == [[6, 15]]
    assert coverage_after("new_rows", {"val": [[3, 8], [5, 10]]}, "val", 4, 6, 15) == [[3, 8], [4, None], [6, 15]]


@pytest.mark.parametrize("point", ["1", "finalize"])
def test_kill9_mid_merge_then_resume_gives_the_same_bytes(grown, tmp_path, point) -> None:
    """Killed after the first merged shard, or with every shard written but nothing assembled:
    the re-run keeps what was written, plans the same merge and ends byte-identical."""
    db, _ = grown
    ref, crashed = _copy(db, tmp_path / "ref"), _copy(db, tmp_path / "crashed")
    assert run_cli(_knn(ref, "--refresh")) == 0
    cmd = kill_at(_knn(crashed, "--refresh"), f"knn:{point}")
    merged = len(list((crashed / "train" / "knn_shards").glob("merged_ids_*.npy")))
    assert merged == 1 if point == "1" else merged > 1
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert ("(1 shards reused" if point == "1" else "shards reused, 0 rows with") in p.stdout
    assert "incremental refresh" in p.stdout
    assert load_manifest(crashed)["stages"]["knn"]["params"]["refresh"] == "incremental"
    for s in SPLITS:
        for got, want in zip(load_neighbours(crashed, s), load_neighbours(ref, s)):
            np.testing.assert_array_equal(got, want)


def test_plain_knn_after_add_then_refresh_merges_only_the_old_rows(grown, tmp_path) -> None:
    """knn (new rows only) after add, then --refresh: only the rows from before the add merge,
    and the result is the full refresh's; a rebuilt index makes auto re-search everything."""
    db, n_old = grown
    inc, full = _copy(db, tmp_path / "inc"), _copy(db, tmp_path / "full")
    assert run_cli(_knn(inc)) == 0
    n_train = load_manifest(inc)["counts"]["train"]["chunks"]
    assert load_manifest(inc)["stages"]["knn"]["stats"]["coverage"]["train"] == [[n_old, n_old], [n_train, n_train]]
    assert run_cli(_knn(inc, "--refresh")) == 0
    r = load_manifest(inc)["stages"]["knn"]["stats"]["refresh"]
    assert r["mode"] == "incremental" and r["merged_rows"]["train"] == n_old
    assert r["searched_queries"] == 0  # the new rows were searched by the plain knn
    assert run_cli(_knn(full, "--refresh", "full")) == 0
    a, b = _arrays(inc), _arrays(full)
    for s in SPLITS:
        np.testing.assert_allclose(a[s][1], b[s][1], rtol=1e-4, atol=1e-5)
    # a rebuilt index: auto searches every row again, 'incremental' is refused
    assert run_cli(["index", "--db", full, "--recall-sample", 50, "--index-key", "Flat", "--rebuild"]) == 0
    assert run_cli(_knn(full, "--refresh", "incremental")) == 2
    assert run_cli(_knn(full, "--refresh")) == 0
    r = load_manifest(full)["stages"]["knn"]["stats"]["refresh"]
    assert r["mode"] == "full" and "rebuilt" in r["why"]


def test_an_ivf_over_the_added_vectors_returns_the_grown_index_s_own_candidates(tmp_path) -> None:
    """The IVF copy over the added vectors alone (same quantizer, codes, nprobe) answers what the
    grown index answers when restricted to the added ids."""
    import faiss

    from index_builder.knn.added_search import AddedChunks, ivf_over_added
    from index_builder.knn.range_exclusion import search_params
    from tests.fixtures import float16_shards

    shards, x = float16_shards(tmp_path, [700, 500], 16, seed=3)
    index = faiss.index_factory(16, "IVF16,SQ8")
    index.train(x)
    index.add(x)
    faiss.extract_index_ivf(index).nprobe = 3
    start, q = 900, x[:50]
    sub = ivf_over_added(index, shards, start, len(x))
    assert sub.ntotal == len(x) - start and index.ntotal == len(x)  # the grown index is untouched
    d, i = sub.search(q, 5)
    sel = faiss.IDSelectorRange(start, len(x))
    d_ref, i_ref = index.search(q, 5, params=search_params(index, sel))
    np.testing.assert_array_equal(np.where(i >= 0, i + start, -1), i_ref)
    np.testing.assert_allclose(d, d_ref)
    added = AddedChunks(shards, len(x), index=index)
    ids, _ = added.search(start)(q, 5)
    assert added.how == "ivf nprobe=3/nlist=16" and set(ids.ravel()) <= set(range(start, len(x))) | {-1}
    assert added.vectors_scanned == 50 * -(-300 * 3 // 16)


def test_the_ivf_over_added_4_bit_codes_is_a_fast_scan_copy_with_the_same_lists(tmp_path) -> None:
    """4-bit PQ: the added chunks' IVF is searched by fast scan (as knn searches the grown index);
    its candidates are the plain codes' up to fast scan's 8-bit lookup tables."""
    import faiss

    from index_builder.knn.added_search import ivf_over_added
    from index_builder.knn.range_exclusion import search_params
    from tests.fixtures import float16_shards

    shards, x = float16_shards(tmp_path, [1500, 1500], 32, seed=4)
    index = faiss.index_factory(32, "OPQ8_32,IVF16,PQ8x4np")
    index.train(x)
    index.add(x)
    faiss.extract_index_ivf(index).nprobe = 4
    start, q = 2000, x[:100]
    sub = ivf_over_added(index, shards, start, len(x))
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(sub)), faiss.IndexIVFPQFastScan)
    assert sub.ntotal == len(x) - start and faiss.extract_index_ivf(sub).nprobe == 4
    _, i = sub.search(q, 10)
    _, i_ref = index.search(q, 10, params=search_params(index, faiss.IDSelectorRange(start, len(x))))
    got = np.where(i >= 0, i + start, -1)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, i_ref)])
    assert overlap > 0.8, overlap


@pytest.mark.parametrize("depth", [0, 100000])
def test_ivf_index_incremental_equals_full_refresh(tmp_path, tmp_path_factory, depth) -> None:
    """With an IVF (nprobe fixed), the old rows' lists and the added chunks' IVF are searched in
    the same lists as the grown index: the merged rows equal a full refresh's (up to ties).
    Forward (--reverse-depth 0): each old row searches the added chunks' IVF. Reverse, deep enough
    to reach every old row of a list: with nprobe 1 chunk j finds row i exactly when both fall in
    one list, as row i finds chunk j forward: the same rows, the same merge."""
    db, n_old = grown_ivf_db(tmp_path, shared_tiny_bert(tmp_path_factory))
    ivf = ["--target-recall", 0]
    full = _copy(db, tmp_path / "full")
    assert run_cli(_knn(db, *ivf, "--refresh", "--reverse-depth", depth)) == 0
    assert run_cli(_knn(full, *ivf, "--refresh", "full")) == 0
    r = load_manifest(db)["stages"]["knn"]["stats"]["refresh"]
    assert r["mode"] == "incremental" and r["added_search"].startswith("reverse" if depth else "ivf"), r
    added = load_manifest(db)["counts"]["train"]["chunks"] - n_old
    if depth:  # the queries are the added chunks (their blank ones apart), not the old rows
        assert 0 < r["reverse_queries"] <= added and r["reverse_pairs"] > 0, r
        assert r["merged_rows_rescored"] < r["merged_queries"], r  # rows no pair names: untouched
    a, b = _arrays(db), _arrays(full)
    for s in SPLITS:
        (ai, ad), (bi, bd) = a[s], b[s]
        np.testing.assert_allclose(ad, bd, rtol=1e-4, atol=1e-5)
        assert np.allclose(ad[ai != bi], bd[ai != bi], rtol=1e-4, atol=1e-5)
        print(s, "ids differing (ties):", float((ai != bi).mean()))
    assert (a["train"][0][:n_old] >= n_old).any()


def test_the_merge_leaves_retrieval_only_old_rows_unread_and_merges_the_others_as_before(
        tmp_path, tmp_path_factory, monkeypatch) -> None:
    """A DB grown twice by --retrieval-only data: the second refresh's merge units hold old rows
    that trains read and old retrieval-only rows. The retrieval-only ones stay -1 (never read or
    searched, not counted); every other row equals the merge that reads every row."""
    import index_builder.knn.stage as knn_stage
    from chunk_store.shards import retrieval_only_ranges

    bert = shared_tiny_bert(tmp_path_factory)
    db = build_index_db(tmp_path / "db", bert, n_docs=10, shard_size=SHARD, index_key="Flat",
                        stages=("embed", "index"))
    _grow(db, bert, 4, 5, "--retrieval-only")
    assert run_cli(_knn(db)) == 0
    _grow(db, bert, 3, 6, "--retrieval-only")
    unread = retrieval_only_ranges(load_manifest(db), "train")
    n_old = load_manifest(db)["stages"]["knn"]["stats"]["coverage"]["train"][0][0]
    first = [(lo, min(hi, n_old)) for lo, hi in unread if lo < n_old]  # old retrieval-only rows
    assert first and first[0][0] % SHARD, "no merge unit mixes read and retrieval-only rows"
    ref = _copy(db, tmp_path / "ref")
    assert run_cli(_knn(db, "--refresh", "incremental")) == 0
    with monkeypatch.context() as m:  # the reference: every old row merged
        m.setattr(knn_stage, "retrieval_only_ranges", lambda manifest, split: [])
        assert run_cli(_knn(ref, "--refresh", "incremental")) == 0
    got, want = _arrays(db)["train"], _arrays(ref)["train"]
    read = np.ones(len(got[0]), dtype=bool)
    for lo, hi in unread:
        read[lo:hi] = False
    assert (got[0][~read] == -1).all() and np.isinf(got[1][~read]).all()
    assert np.array_equal(got[0][read], want[0][read])
    np.testing.assert_allclose(got[1][read], want[1][read], rtol=1e-5)
    r_got = load_manifest(db)["stages"]["knn"]["stats"]["refresh"]
    r_ref = load_manifest(ref)["stages"]["knn"]["stats"]["refresh"]
    unread_old = sum(hi - lo for lo, hi in first)
    assert r_ref["merged_queries"] - r_got["merged_queries"] == unread_old
    # and none of them was searched against the added chunks, in mixed units too
    added = len(got[0]) - n_old
    assert r_ref["added_vectors_scanned"] - r_got["added_vectors_scanned"] >= unread_old * added


def test_a_few_added_chunks_over_many_lists_are_searched_exactly(tmp_path) -> None:
    """Fewer added chunks in the probed lists than twice a query's candidates: exact, not the IVF."""
    import faiss

    from index_builder.knn.added_search import AddedChunks
    from tests.fixtures import float16_shards

    shards, x = float16_shards(tmp_path, [700, 500], 16, seed=3)
    index = faiss.index_factory(16, "IVF64,Flat")
    index.train(x)
    index.add(x)
    faiss.extract_index_ivf(index).nprobe = 4
    few, many = AddedChunks(shards, len(x), index=index, want=12), AddedChunks(shards, len(x), index=index, want=2)
    few.search(1100)
    many.search(1100)
    assert few.how == "exact" and many.how == "ivf nprobe=4/nlist=64"  # 100 x 4 / 64 = 6.25 a query
