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
