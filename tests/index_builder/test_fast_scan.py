"""The fast-scan copy of a 4-bit IVF-PQ index (index_builder.index.fast_scan): what knn and the
Retriever search where the key chooser built 4-bit codes."""

from __future__ import annotations

import gc

import faiss
import numpy as np
import pytest

from chunk_store.framework.errors import UserError
from index_builder.index.faiss_params import apply_search_params
from index_builder.index.fast_scan import fast_scan_view, in_memory_copy, is_four_bit_pq
from index_builder.knn.range_exclusion import faiss_range_search, supports_selector
from index_builder.knn.tuning import tune_index


def filled(key: str, n: int = 6000, d: int = 32, seed: int = 0) -> tuple[faiss.Index, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, d)).astype(np.float32) * 4
    x = (centres[rng.integers(0, 20, n)] + rng.standard_normal((n, d))).astype(np.float32)
    index = faiss.index_factory(d, key)
    index.train(x)
    index.add(x)
    return index, x


@pytest.mark.parametrize("key", ["OPQ4_32,IVF16_HNSW32,PQ4x4np", "IVF16,PQ8x4", "IVF16_HNSW32,PQ16x4np"])
def test_view_finds_what_the_plain_index_finds_and_owns_its_parts(key):
    """The same lists and codes: the copy's top 10 are among the plain index's nearest (fast
    scan's 8-bit lookup tables reorder near ties); the parameters set on the plain index
    are copied; the copy still searches after the plain index is gone; it takes ID selectors (the
    knn stage's range exclusion)."""
    index, x = filled(key)
    apply_search_params(index, "nprobe=16")
    q = x[:300]
    _, plain = index.search(q, 30)
    view = fast_scan_view(index)
    assert view is not None and is_four_bit_pq(view) and view.ntotal == index.ntotal
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(view)), faiss.IndexIVFPQFastScan)
    assert faiss.extract_index_ivf(view).nprobe == 16
    del index
    gc.collect()
    _, fast = view.search(q, 10)
    within = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(plain, fast)])
    assert within >= 0.97  # the copy's top 10 among the plain codes' top 30 (many codes tie here)
    assert supports_selector(view)
    ids, _ = faiss_range_search(view)(q[:4], np.array([[0, 3000]] * 4), 5)
    assert (ids >= 3000).all()  # the range [0, 3000) skipped inside the search


@pytest.mark.parametrize("key", ["IVF16,SQ8", "IVF16,PQ4x8np", "Flat", "HNSW8"])
def test_no_view_for_codes_fast_scan_cannot_search(key):
    index, _ = filled(key, n=2000)
    assert fast_scan_view(index) is None and not is_four_bit_pq(index)


def test_in_memory_copy_of_mapped_lists_leaves_the_original_whole(tmp_path):
    """A parts index's lists are on disk, mapped read-only (faiss's fast-scan converter crashed on
    them): the copy holds the same ids and codes a list, the original still searches."""
    index, x = filled("IVF16,PQ8x4")
    ivf = faiss.extract_index_ivf(index)
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(tmp_path / "lists.data"))
    held = faiss.InvertedListsPtrVector()
    held.push_back(ivf.invlists)
    ondisk.merge_from_multiple(held.data(), held.size(), False)
    before = index.search(x[:50], 5)[1]
    ivf.replace_invlists(ondisk, False)
    copy = in_memory_copy(ivf)
    for l in range(ivf.nlist):
        n = ondisk.list_size(l)
        assert copy.invlists.list_size(l) == n
        if n:
            assert np.array_equal(faiss.rev_swig_ptr(copy.invlists.get_ids(l), n),
                                  faiss.rev_swig_ptr(ondisk.get_ids(l), n))
            assert np.array_equal(faiss.rev_swig_ptr(copy.invlists.get_codes(l), n * ivf.code_size),
                                  faiss.rev_swig_ptr(ondisk.get_codes(l), n * ivf.code_size))
    assert np.array_equal(index.search(x[:50], 5)[1], before)
    assert fast_scan_view(index) is not None


def test_tuning_sets_the_copy_too():
    """knn tunes on the fast-scan copy it searches; the plain index (which the added-chunks search
    reads its nprobe from) gets the chosen setting as well."""
    index, x = filled("IVF16_HNSW32,PQ8x4np")
    view = fast_scan_view(index)
    seen = []

    def final() -> np.ndarray:
        seen.append((faiss.extract_index_ivf(index).nprobe, faiss.extract_index_ivf(view).nprobe))
        return view.search(x[:20], 2)[1]

    exact_d = faiss.knn(x[:20], x, 2)[0]
    tuning = tune_index(index, final, exact_d, x[:20], lambda u: x[u], 0.5, also=[view])
    assert all(a == b for a, b in seen) and len(seen) == len(tuning.tried)
    assert faiss.extract_index_ivf(index).nprobe == faiss.extract_index_ivf(view).nprobe


def test_no_copy_past_the_memory_budget(monkeypatch, caplog):
    """The copy is RAM where the stored lists are mapped: past its budget none is made (the
    caller searches the stored codes), and RETRO_FAST_SCAN_MAX_GB sets the budget."""
    from index_builder.index.fast_scan import fast_scan_budget, fast_scan_bytes, four_bit_ivfpq

    index, _ = filled("IVF16,PQ8x4", n=2000)
    need = fast_scan_bytes(four_bit_ivfpq(index))
    assert need == 2 * 2000 * (4 + 8)
    assert fast_scan_view(index, max_bytes=need) is not None
    with caplog.at_level("WARNING"):
        assert fast_scan_view(index, max_bytes=need - 1) is None
    assert "budget" in caplog.text
    monkeypatch.setenv("RETRO_FAST_SCAN_MAX_GB", "0")
    assert fast_scan_budget() == 0 and fast_scan_view(index) is None
    monkeypatch.setenv("RETRO_FAST_SCAN_MAX_GB", "lots")
    with pytest.raises(UserError, match="RETRO_FAST_SCAN_MAX_GB"):
        fast_scan_budget()


def test_the_index_stage_recall_check_searches_the_fast_scan_copy(tmp_path, monkeypatch):
    """The index stage's recall check measures the 4-bit codes as knn searches them (the
    fast-scan copy), not the plain codes' slower path."""
    from index_builder.embed.stage import open_embeddings
    from index_builder.index import fast_scan
    from index_builder.index.recall import measure_recall
    from tests.fixtures import clustered_db

    db = clustered_db(tmp_path / "db", n_docs=40, dim=32)
    x = np.concatenate([np.asarray(s, np.float32) for s in open_embeddings(db, "train")])
    index = faiss.index_factory(32, "OPQ4_32,IVF16_HNSW32,PQ4x4np")
    index.train(x)
    index.add(x)
    apply_search_params(index, "nprobe=16")
    searched = []
    real_view = fast_scan.fast_scan_view

    def spy(ix, *a, **kw):
        view = real_view(ix, *a, **kw)
        searched.append(view)
        return view
    monkeypatch.setattr(fast_scan, "fast_scan_view", spy)
    recall = measure_recall(db, index, sample=100, rerank=16)
    assert len(searched) == 1 and searched[0] is not None
    assert recall["recall@2"] >= 0.9 and recall["raw_recall@2"] <= recall["recall@2"]


@pytest.mark.parametrize("key", ["OPQ4_32,IVF16_HNSW32,PQ4x4np", "IVF16,PQ8x4"])
def test_searches_are_split_to_bound_the_lookup_tables(key, monkeypatch):
    """faiss 1.13's single-thread fast scan packs every query's lookup tables of a call with 32-bit
    offsets and reads out of bounds past 2 GiB (fast_scan.LUT_BYTES_PER_CALL says where it
    crashed): a search of the copy takes at most queries_per_call queries a faiss call, at the
    nprobe of that search, and returns what one call returns; so does knn's range exclusion
    (a bare IVF's preassigned path, an OPQ view's selector search)."""
    from index_builder.index import fast_scan

    index, x = filled(key)
    apply_search_params(index, "nprobe=8")
    q, ranges = x[:333], np.array([[0, 3000], [3000, 6000], [1000, 1500]])[np.arange(333) % 3]
    view = fast_scan_view(index)
    whole = view.search(q, 10)
    excluded = faiss_range_search(view)(q, ranges, 7)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(view))
    per_probe = int(ivf.M2) * int(ivf.ksub)
    monkeypatch.setattr(fast_scan, "LUT_BYTES_PER_CALL", 4 * per_probe * 8 + 5)  # 4 queries at nprobe 8
    assert fast_scan.queries_per_call(ivf) == 4 and fast_scan.queries_per_call(ivf, nprobe=2) == 16
    assert fast_scan.queries_per_call(ivf, nprobe=10_000) == 2  # nprobe counts at most nlist (16)
    calls = []
    real = faiss.IndexIVFPQFastScan.search_preassigned_c

    def spy_preassigned(self, n, *a):
        calls.append(n)
        return real(self, n, *a)
    monkeypatch.setattr(faiss.IndexIVFPQFastScan, "search_preassigned_c", spy_preassigned)
    base = type(view).__mro__[1]  # the faiss class whose search the bounded one calls
    sizes, real_search = [], base.search

    def spy_search(self, x, k, **kw):
        sizes.append(len(x))
        return real_search(self, x, k, **kw)
    monkeypatch.setattr(base, "search", spy_search)
    sliced = view.search(q, 10)
    assert sizes == [4] * 83 + [1]  # 333 queries, 4 a call
    assert np.array_equal(sliced[1], whole[1]) and np.allclose(sliced[0], whole[0])
    p = faiss.SearchParametersIVF(nprobe=2)
    sizes.clear()
    assert np.array_equal(view.search(q, 10, params=p)[1], fast_scan_view(index).search(q, 10, params=p)[1])
    assert max(sizes) == 16  # the params' nprobe sets the bound
    got = faiss_range_search(view)(q, ranges, 7)
    assert np.array_equal(got[0], excluded[0]) and np.allclose(got[1], excluded[1])  # ids, distances
    if "OPQ" not in key:  # the bare IVF: range exclusion's preassigned calls
        assert calls and max(calls) <= 4
    for (a, b), row in zip(ranges, got[0]):
        assert not ((row >= a) & (row < b)).any()
    assert fast_scan.queries_per_call(faiss.extract_index_ivf(index)) is None  # the plain codes: no bound


LUT_OVERFLOW = """
import numpy as np, faiss
from index_builder.index import fast_scan
from index_builder.index.faiss_params import apply_search_params
faiss.omp_set_num_threads(1)
x = np.random.default_rng(0).standard_normal((40_000, 64)).astype(np.float32)
index = faiss.index_factory(64, "IVF1024,PQ32x4np")
index.train(x)
index.add(x)
apply_search_params(index, "nprobe=1024")
_, ids = fast_scan.fast_scan_view(index).search(x[:4200], 10)
print((ids[:, 0] == np.arange(4200)).mean())
"""


@pytest.mark.slow
def test_a_search_past_two_gib_of_lookup_tables_runs_in_bounded_calls():
    """The size that crashed: 4,200 queries at nprobe 1,024 and 32 sub-quantizers are 2.2 GB of
    tables in one single-thread faiss call, which died of SIGSEGV at 10.9 GB peak (measured with
    LUT_BYTES_PER_CALL lifted); in calls of 128 queries the search ends and every query finds
    itself. The default run checks the slicing itself (test_searches_are_split_to_bound_the_lookup_tables)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", LUT_OVERFLOW], cwd=repo, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) == 1.0
