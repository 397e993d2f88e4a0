"""The torch IVF search (index_builder.index.torch_ivf_search) and the knn stage's choice of search
(index_builder.knn.search_choice): reference tests against exact search and faiss's own IVF search,
the CUDA default as a pure function, and the knn stage end to end with the torch search forced.
Same code as on CUDA (device passed through): tests/gpu/test_index_gpu.py runs it there, with the
helpers of tests/fixtures/ivf_search.py."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from chunk_store.framework.errors import UserError
from chunk_store.neighbour_shards import load_neighbours
from index_builder.index.exact_search import ExactSearchConfig, exact_search
from index_builder.index.torch_ivf_search import TorchIVFConfig, TorchIVFSearch, list_blocks, plan_groups
from index_builder.knn.search_choice import EXACT_MAX_NND, choose_search, exact_is_small
from tests.fixtures.ivf_search import data, ivf_flat, run_knn_torch_ivf

DEVICE = "cpu"


# small blocks and batches: several list blocks (streamed, not resident), many padded batches
SMALL = dict(device=DEVICE, block_rows=700, batch_elems=1 << 15, query_block=64)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cfg", [SMALL, dict(device=DEVICE)])
def test_all_lists_probed_equals_exact_search_with_exclusions(seed, cfg):
    """nprobe = nlist: every row is a candidate, so the result is exact search's, exclusions
    (a chunk range per query, blank rows) applied inside both."""
    shards, xf, q = data(seed)
    index = ivf_flat(xf, 16, seed)
    index.nprobe = 16
    rng = np.random.default_rng(seed + 10)
    a = rng.integers(0, len(xf), len(q))
    exclude = np.stack([a, a + rng.integers(0, 400, len(q))], axis=1)
    valid = rng.random(len(xf)) > 0.1
    k = 7
    got_i, got_d = TorchIVFSearch(index, shards, TorchIVFConfig(**cfg)).search(q, k, exclude=exclude, valid=valid)
    ref_i, ref_d = exact_search(q, shards, k, ExactSearchConfig(device=DEVICE), exclude=exclude, valid=valid)
    np.testing.assert_allclose(got_d, ref_d, rtol=1e-5, atol=1e-4)
    differ = got_i != ref_i  # ids equal except between rows at the same distance
    np.testing.assert_allclose(got_d[differ], ref_d[differ], rtol=1e-5, atol=1e-4)
    assert differ.mean() < 0.01
    assert not ((got_i >= exclude[:, :1]) & (got_i < exclude[:, 1:])).any()
    assert valid[got_i[got_i >= 0]].all()


@pytest.mark.parametrize("nprobe", [1, 2, 5])
@pytest.mark.parametrize("cfg", [SMALL, dict(device=DEVICE)])
def test_same_nprobe_gives_faiss_ivf_flat_results(nprobe, cfg):
    """A reference test: the same lists, the same nprobe => the same candidates as faiss's own IVF
    search (read from the index at each call, as the recall tuner sets it), the same neighbours."""
    shards, xf, q = data(7)
    index = ivf_flat(xf, 16)
    search = TorchIVFSearch(index, shards, TorchIVFConfig(**cfg))
    faiss.ParameterSpace().set_index_parameters(index, f"nprobe={nprobe}")
    got_i, got_d = search.search(q, 10)
    ref_d, ref_i = index.search(q, 10)
    ref_i = np.where(np.isfinite(ref_d) & (ref_i >= 0), ref_i, -1)
    ref_d = np.where(ref_i >= 0, ref_d, np.inf)
    np.testing.assert_allclose(got_d, ref_d, rtol=1e-5, atol=1e-4)
    assert (got_i == ref_i).mean() > 0.99


def test_half_precision_gemm_keeps_fp32_distances():
    """bf16 GEMM ranks the candidates; the distances returned are re-scored in fp32 (true ones)."""
    shards, xf, q = data(3)
    index = ivf_flat(xf, 8)
    index.nprobe = 8
    got_i, got_d = TorchIVFSearch(index, shards, TorchIVFConfig(device=DEVICE, dtype="bf16")).search(q, 5)
    true = ((xf[got_i] - q[:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(got_d, true, rtol=1e-4, atol=1e-3)
    _, ref_d = exact_search(q, shards, 5, ExactSearchConfig(device=DEVICE))
    assert (got_d[:, 0] <= ref_d[:, 0] * 1.05 + 1e-3).mean() > 0.95


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_rows_uploaded_in_pieces_give_the_same_result(monkeypatch, dtype):
    import index_builder.index.torch_ivf_search as mod

    shards, xf, q = data(6)
    index = ivf_flat(xf, 16)
    index.nprobe = 4
    whole = TorchIVFSearch(index, shards, TorchIVFConfig(device=DEVICE, dtype=dtype)).search(q, 9)
    monkeypatch.setattr(mod, "UPLOAD_ROWS", 333)
    pieces = TorchIVFSearch(index, shards, TorchIVFConfig(device=DEVICE, dtype=dtype)).search(q, 9)
    np.testing.assert_array_equal(whole[0], pieces[0])
    np.testing.assert_array_equal(whole[1], pieces[1])


def test_more_candidates_than_the_lists_hold_pads():
    shards, xf, q = data(4, n=300)
    index = ivf_flat(xf, 8)
    index.nprobe = 1
    got_i, got_d = TorchIVFSearch(index, shards, TorchIVFConfig(device=DEVICE)).search(q[:5], 200)
    ref_d, ref_i = index.search(q[:5], 200)
    assert ((got_i < 0) == (ref_i < 0)).all() and (got_i < 0).any()
    assert np.isinf(got_d[got_i < 0]).all()


def test_list_blocks_and_groups_cover_every_row_and_pair_once():
    offsets = np.array([0, 5, 5, 40, 41, 100, 100])
    blocks = list_blocks(offsets, 30)
    assert blocks[0][0] == 0 and blocks[-1][1] == 6
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert all(offsets[b] - offsets[a] <= 30 or b == a + 1 for a, b in blocks)
    sizes, counts = np.array([5, 0, 35, 1, 59]), np.array([3, 4, 100, 0, 9])
    pair_starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    groups = plan_groups(sizes, counts, offsets[:-2], pair_starts, dim=8, batch_elems=2000)
    covered = sorted(p for g in groups for it in g for p in range(it.p0, it.p1))
    expect = sorted(p for l in (0, 2, 4) for p in range(pair_starts[l], pair_starts[l] + counts[l]))
    assert covered == expect  # every pair of a non-empty list once; none of an empty list
    for g in groups:
        m, n = max(it.p1 - it.p0 for it in g), max(it.rows for it in g)
        assert len(g) == 1 or len(g) * (m * n + (m + n) * 8) <= 2000


@pytest.mark.parametrize("faiss_gpu", [False, True])
@pytest.mark.parametrize("has_ivf", [False, True])
@pytest.mark.parametrize("n", [10**5, 10**7, 10**9])
def test_cuda_default_never_runs_an_exact_pass_at_large_n(n, has_ivf, faiss_gpu):
    """The rule on CUDA: faiss-gpu with an IVF index; else exact only while N*N*dim is small;
    else the torch IVF search; else faiss on the CPU. Never exact at 1e7 or 1e9 by default."""
    got = choose_search(n, 384, "cuda", faiss_gpu, has_ivf)
    small = n == 10**5
    assert exact_is_small(n, 384) == small
    if faiss_gpu and has_ivf:
        assert got.method == "faiss-gpu"
    elif small:
        assert got.method == "exact"
    else:
        assert got.method == ("torch-ivf" if has_ivf else "index")
    assert (got.method == "exact") == (small and not (faiss_gpu and has_ivf))
    assert got.why
    # the CPU default is unchanged: the faiss index, whatever N
    assert choose_search(n, 384, "cpu", faiss_gpu, has_ivf).method == "index"
    # asked for: --exact always wins; --no-exact never runs the exact pass
    assert choose_search(n, 384, "cuda", faiss_gpu, has_ivf, exact=True).method == "exact"
    assert choose_search(n, 384, "cuda", faiss_gpu, has_ivf, exact=False).method != "exact"


def test_cuda_without_faiss_gpu_past_the_gpu_memory_takes_the_cpu_index():
    """The torch search would gather the embeddings again on every call past what the GPU holds."""
    assert choose_search(10**7, 384, "cuda", False, True, device_rows=5 * 10**7).method == "torch-ivf"
    got = choose_search(10**9, 384, "cuda", False, True, device_rows=5 * 10**7)
    assert got.method == "index" and "faiss-gpu" in got.why
    assert choose_search(10**9, 384, "cuda", True, True, device_rows=5 * 10**7).method == "faiss-gpu"
    assert choose_search(10**9, 384, "cuda", False, True, forced="torch-ivf", device_rows=5).method == "torch-ivf"


def test_the_exact_bound_is_about_a_minute_of_an_h100():
    assert 1e15 <= EXACT_MAX_NND <= 4e15  # 2 N^2 d flops at ~60 TFLOP/s fp32: about a minute
    assert exact_is_small(2_000_000, 384) and not exact_is_small(3_000_000, 384)


def test_forced_search_is_checked():
    assert choose_search(10, 8, "cpu", False, True, forced="torch-ivf").method == "torch-ivf"
    with pytest.raises(UserError, match="IVF"):
        choose_search(10, 8, "cpu", False, False, forced="torch-ivf")
    with pytest.raises(UserError, match="faiss-gpu"):
        choose_search(10, 8, "cpu", False, True, forced="faiss-gpu")
    with pytest.raises(UserError, match="--search"):
        choose_search(10, 8, "cpu", False, True, forced="magic")


def test_knn_stage_with_the_torch_ivf_search_reaches_the_target_recall(tmp_path, tmp_path_factory):
    run_knn_torch_ivf(tmp_path, tmp_path_factory, DEVICE)


def test_knn_stage_torch_ivf_equals_the_faiss_ivf_path(tmp_path, tmp_path_factory):
    """A reference test at the stage: with the index's own nprobe (3 of 16 lists, no tuning), the
    torch search (exclusions inside) and faiss's IVF search (exclusions after, short rows
    re-searched) keep the same final neighbours: each row's k nearest allowed chunks in the same
    probed lists."""
    import json
    import shutil

    from chunk_store.layout import DBLayout
    from chunk_store.manifest import load_manifest
    from tests.fixtures import build_index_db, run_cli, shared_tiny_bert

    bert = shared_tiny_bert(tmp_path_factory)
    db = build_index_db(tmp_path / "faiss", bert, n_docs=24, shard_size=128, index_key="IVF16,Flat",
                        stages=("embed", "index"))
    infos = DBLayout(db).index_infos  # the search parameter knn applies: a few of the lists
    infos.write_text(json.dumps({**json.loads(infos.read_text()), "index_param": "nprobe=3"}))
    ours = tmp_path / "torch"
    shutil.copytree(db, ours)
    common = ["--device", DEVICE, "--k", 3, "--shard-size", 128, "--target-recall", 0]
    assert run_cli(["knn", "--db", db, *common]) == 0
    assert run_cli(["knn", "--db", ours, *common, "--search", "torch-ivf"]) == 0
    assert load_manifest(db)["stages"]["knn"]["stats"]["search"]["method"] == "index"
    exact = tmp_path / "exact"  # and the lists matter: the exact pass finds nearer neighbours
    shutil.copytree(ours, exact, ignore=shutil.ignore_patterns("neighbour*"))
    assert run_cli(["knn", "--db", exact, *common, "--exact", "--refresh", "full"]) == 0
    assert (load_neighbours(exact, "train")[1] < load_neighbours(ours, "train")[1] - 1e-4).any()
    for split in ("train", "val"):
        (a_i, a_d), (b_i, b_d) = (load_neighbours(p, split) for p in (db, ours))
        np.testing.assert_allclose(a_d, b_d, rtol=1e-4, atol=1e-4)
        assert ((a_i == b_i) | np.isclose(a_d, b_d, rtol=1e-4, atol=1e-4)).all()


def test_faiss_gpu_search_follows_the_cpu_index_nprobe_or_falls_back(monkeypatch):
    """faiss-gpu: the GPU copy's nprobe follows the CPU index (where the tuner sets it); where
    faiss cannot copy the index (faiss-cpu here: no GPU resources), the torch IVF search runs."""
    from index_builder.knn.search_choice import device_search

    shards, xf, q = data(8)
    index = ivf_flat(xf, 16)
    said: list[str] = []
    fallback = device_search("faiss-gpu", index, shards, DEVICE, None, said.append)
    assert fallback.method == "torch-ivf" and "torch IVF search instead" in said[0]
    # a stand-in for faiss-gpu: the "GPU copy" is a CPU clone, set through the same calls
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, dev, idx: faiss.clone_index(idx), raising=False)
    monkeypatch.setattr(faiss, "GpuParameterSpace", faiss.ParameterSpace, raising=False)
    gpu = device_search("faiss-gpu", index, shards, DEVICE, None, said.append)
    assert gpu.method == "faiss-gpu" and gpu.range_search is None
    for nprobe in (1, 5):
        index.nprobe = nprobe
        ref_d, ref_i = index.search(q, 6)
        got_i, got_d = gpu.search(q, 6)
        np.testing.assert_array_equal(got_i, ref_i)
        np.testing.assert_allclose(got_d, ref_d)


def test_a_pre_transformed_index_probes_the_rotated_queries_lists():
    """OPQ + IVF-PQ: the lists come from the rotated queries (faiss's own quantizer), the
    distances from the raw stored vectors: exact search within the probed lists."""
    from index_builder.index.torch_ivf_search import ivf_of

    shards, xf, q = data(9)
    index = faiss.index_factory(xf.shape[1], "OPQ4,IVF16,PQ4x4")
    index.train(xf)
    index.add(xf)
    ivf = ivf_of(index)
    ivf.nprobe = 3
    got_i, got_d = TorchIVFSearch(index, shards, TorchIVFConfig(device=DEVICE)).search(q, 5)
    opq = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
    _, probed = ivf.quantizer.search(opq.apply(q), 3)
    invlists = ivf.invlists
    members = [faiss.rev_swig_ptr(invlists.get_ids(l), invlists.list_size(l)).copy() for l in range(16)]
    for row in range(len(q)):
        rows = np.concatenate([members[l] for l in probed[row]])
        d = ((xf[rows] - q[row]) ** 2).sum(1)
        np.testing.assert_allclose(got_d[row], np.sort(d)[:5], rtol=1e-4, atol=1e-3)
