"""The index key chooser (bounded training past the HNSW range), the IVF builder and its torch
k-means, and the recall-tuned search of the knn stage on a clustered DB with near-duplicate
chunks inside documents."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunk_store.framework.errors import UserError
from chunk_store.manifest import load_manifest
from chunk_store.neighbour_shards import load_neighbours
from index_builder.embed.stage import open_embeddings
from index_builder.index.plan import KMEANS_SAMPLE_MAX, NLIST_MAX, choose_index, hnsw_bytes, parse_memory
from index_builder.index.ivf_build import build_ivf, gather_rows, sample_ids, torch_kmeans
from index_builder.knn.tuning import PLATEAU, PLATEAU_AFTER, neighbour_recall, tune_search
from tests.fixtures import clustered_db, float16_shards, run_cli

GB = 2 ** 30


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 2 * 10 ** 10), dim=st.sampled_from([32, 128, 384, 768, 1024]),
       mem=st.floats(0.25, 512), cur=st.floats(1, 256), hnsw_max=st.integers(0, 4 * 10 ** 6),
       per_centroid=st.integers(39, 256), fast_scan=st.booleans())
def test_chooser_rule(n, dim, mem, cur, hnsw_max, per_centroid, fast_scan):
    plan = choose_index(n, dim, mem * GB, cur * GB, hnsw_max=hnsw_max, per_centroid=per_centroid,
                        fast_scan=fast_scan)
    if n <= hnsw_max and hnsw_bytes(n, dim) <= mem * GB:
        assert plan.builder == "autofaiss" and plan.key is None  # HNSW range: no training at all
        return
    assert plan.builder == "ivf" and f"IVF{plan.nlist}_HNSW32," in plan.key
    # bounded training: the k-means sample never exceeds per_centroid a list, whatever n is, and
    # faiss's 39 a list is met where the DB has them
    assert plan.nlist <= NLIST_MAX and plan.train_size <= min(plan.nlist * per_centroid, KMEANS_SAMPLE_MAX)
    assert plan.train_size == min(n, plan.train_size)
    assert plan.train_size >= min(n, 39 * plan.nlist, KMEANS_SAMPLE_MAX)
    assert plan.kmeans == ("two-level" if plan.nlist >= 65536 else "flat")
    assert f"nlist {plan.nlist}" in plan.reason and f"on {plan.train_size} sampled vectors" in plan.reason
    fast_fits = n * (dim / 16 + 8) + plan.nlist * (4 * dim + 256) <= mem * GB
    # 4-bit fast-scan codes wherever they fit (dim / 8 sub-quantizers after OPQ), unless turned off
    assert (plan.codec == f"PQ{dim // 8}x4") == (fast_scan and fast_fits)
    if plan.codec.endswith("x4"):
        assert plan.opq and plan.key == f"OPQ{dim // 8}_{dim},IVF{plan.nlist}_HNSW32,PQ{dim // 8}x4np"
        assert plan.bytes_per_vector == dim / 16 + 8 and "fast scan" in plan.reason
    elif plan.codec == "SQ8":
        assert not plan.opq and plan.key.endswith(",SQ8")
    else:
        m = int(plan.codec.removeprefix("PQ").removesuffix("x8"))
        assert dim % m == 0 and plan.key.endswith(f"PQ{m}x8np")
        # OPQ only where it pays (>= 8 dims a sub-quantizer), and it never widens the vectors
        assert plan.opq == (dim // m >= 8)
        assert plan.key.startswith(f"OPQ{m}_{dim},") == plan.opq
        # the codes fit the memory budget whenever any code >= 4 bytes could
        if n * (4 + 8) + plan.nlist * (4 * dim + 256) <= mem * GB:
            assert n * plan.bytes_per_vector + plan.nlist * (4 * dim + 256) <= mem * GB * 1.0001


@pytest.mark.parametrize("n, nlist, train_size, kmeans", [
    (10 ** 6, 2048, 2048 * 64, "flat"),  # ~2 sqrt(N): 2000
    (10 ** 8, 16384, 16384 * 64, "flat"),  # 20000
    (10 ** 9, 65536, 65536 * 64, "two-level"),  # 63246: the most a flat CPU k-means is given
    (5 * 10 ** 9, 1 << 18, (64 << 30) // 4 // (4 * 384), "two-level"),  # ~4 sqrt(N): 282843
    (2 * 10 ** 10, 1 << 19, KMEANS_SAMPLE_MAX, "two-level"),  # 565685; the sample's cap binds
])
def test_nlist_follows_n_past_65536_with_a_bounded_sample(n, nlist, train_size, kmeans):
    """The rule at the issue's sizes (arithmetic only): lists grow with N beyond the old 65,536
    cap, the k-means sample does not grow past KMEANS_SAMPLE_MAX (nor past a quarter of
    --current-memory while that leaves 39 a list), and the plan says why."""
    plan = choose_index(n, 384, parse_memory("512G"), parse_memory("64G"), hnsw_max=0)
    assert (plan.nlist, plan.train_size, plan.kmeans) == (nlist, train_size, kmeans)
    assert plan.key.split(",")[-2 if plan.opq else 0].startswith(f"IVF{nlist}_HNSW32")
    assert f"nlist {nlist} ~ {2 if n <= 2 ** 30 else 4} sqrt(N)" in plan.reason
    assert f"{kmeans} k-means on {train_size} sampled vectors" in plan.reason
    assert plan.train_size >= 39 * nlist or plan.train_size == KMEANS_SAMPLE_MAX


def test_two_level_kmeans_trains_the_coarse_centroids():
    """The CPU's k-means past 2^16 lists (faiss's two-level one), run tiny: nlist centroids that
    quantize the sample about as well as the flat k-means'."""
    from index_builder.index.ivf_build import train_coarse

    x = np.random.default_rng(0).standard_normal((6400, 16)).astype(np.float32)
    flat, _ = train_coarse(x, 64, "cpu", False)
    two, how = train_coarse(x, 64, "cpu", False, two_level=True)
    assert how == "faiss-kmeans-two-level-cpu" and two.shape == (64, 16)

    def err(c: np.ndarray) -> float:
        return float(faiss.knn(x, c, 1)[0].mean())

    assert err(two) < 1.15 * err(flat)


def test_chooser_on_the_issues_sizes():
    """4M and 16M chunks of 384 dims with --max-index-memory 2G: no OPQ256_512, no HNSW."""
    four = choose_index(4_000_000, 384, parse_memory("2G"), parse_memory("8G"), fast_scan=False)
    assert four.key == "IVF4096_HNSW32,SQ8" and four.train_size == 4096 * 64
    sixteen = choose_index(16_000_000, 384, parse_memory("2G"), parse_memory("8G"), fast_scan=False)
    assert sixteen.key.startswith("IVF8192_HNSW32,PQ") and not sixteen.opq
    # the default: 4-bit codes searched by fast scan (index_builder.index.fast_scan), 32 B a vector
    assert choose_index(4_000_000, 384, parse_memory("2G"), parse_memory("8G")).key == \
        "OPQ48_384,IVF4096_HNSW32,PQ48x4np"
    assert choose_index(16_000_000, 384, parse_memory("2G"), parse_memory("8G")).key == \
        "OPQ48_384,IVF8192_HNSW32,PQ48x4np"
    assert choose_index(1_000_000, 384, parse_memory("2G"), parse_memory("8G")).builder == "autofaiss"
    with pytest.raises(UserError, match="not a memory size"):
        parse_memory("lots")


def test_chooser_picks_fast_scan_codes_on_the_real_text_db_and_falls_back():
    """The Linux sweep's largest DB (1,458,375 MiniLM chunks, --max-index-memory 4G) built
    IVF2048_HNSW32,SQ8 and knn ran at a fifth of the speed 4-bit fast-scan codes reach at the same
    recall (docs/BENCHMARKS.md, "Index keys on real text"): the chooser now picks those; SQ8 stays
    where fast scan cannot pack the codes (dim not a multiple of 16), 8-bit PQ where even 4-bit
    codes over dim / 8 sub-quantizers exceed the budget."""
    real = choose_index(1_458_375, 384, parse_memory("4G"), parse_memory("16G"))
    assert real.key == "OPQ48_384,IVF2048_HNSW32,PQ48x4np" and real.codec == "PQ48x4" and real.opq
    assert "fast scan" in real.reason and real.bytes_per_vector == 32
    assert choose_index(1_458_375, 100, parse_memory("4G"), parse_memory("16G")).key == "IVF2048_HNSW32,SQ8"
    tight = choose_index(1_458_375, 384, 1_458_375 * 30 + 2048 * (4 * 384 + 256), parse_memory("16G"))
    assert tight.codec.endswith("x8") and tight.key.endswith("x8np")  # 24 + 8 B do not fit: 8-bit PQ
    assert choose_index(1_458_375, 384, parse_memory("4G"), parse_memory("16G"), fast_scan=False).key == \
        "IVF2048_HNSW32,SQ8"


def planted(n: int = 3000, k: int = 12, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32) * 10
    labels = rng.integers(0, k, n)
    return (centres[labels] + rng.standard_normal((n, d)).astype(np.float32)), labels


def test_torch_kmeans_on_cpu_matches_faiss_objective():
    """The CUDA fallback's k-means, run on the CPU: as good as faiss's on planted clusters."""
    x, labels = planted()
    ours = torch_kmeans(x, 12, niter=20, seed=0, device="cpu")
    km = faiss.Kmeans(x.shape[1], 12, niter=20, seed=1)
    km.train(x)

    def objective(c: np.ndarray) -> float:
        return float(((x[:, None, :] - c[None]) ** 2).sum(-1).min(1).sum())

    assert ours.shape == (12, 16) and np.isfinite(ours).all()
    assert objective(ours) <= 1.5 * objective(km.centroids)
    assign = ((x[:, None, :] - ours[None]) ** 2).sum(-1).argmin(1)
    purity = sum(np.bincount(assign[labels == c]).max() for c in range(12)) / len(x)
    assert purity >= 0.8


def test_bf16_assignment_and_kmeans_match_fp32_on_planted_clusters():
    """The bf16 GEMM's nearest centroid is the exact one on all but a rounding sliver of points,
    and the k-means whose assignment uses it is as good as faiss's (the CPU path where the CPU
    has native bf16; runs anywhere: torch emulates bf16 where it has no instructions)."""
    from index_builder.index.centroid_assign import Bf16Assigner

    x, labels = planted(3000, 12, 16)
    ours = torch_kmeans(x, 12, niter=20, seed=0, device="cpu", bf16=True)
    km = faiss.Kmeans(x.shape[1], 12, niter=20, seed=1)
    km.train(x)

    def objective(c: np.ndarray) -> float:
        return float(((x[:, None, :] - c[None]) ** 2).sum(-1).min(1).sum())

    assert objective(ours) <= 1.5 * objective(km.centroids)
    rng = np.random.default_rng(3)
    cent = rng.standard_normal((300, 64)).astype(np.float32)
    pts = (cent[rng.integers(0, 300, 5000)] + 0.3 * rng.standard_normal((5000, 64))).astype(np.float32)
    exact = ((pts[:, None, :] - cent[None]) ** 2).sum(-1).argmin(1)
    _, got = Bf16Assigner(cent, block=1000).search(pts, 1)
    assert got.shape == (5000, 1) and (got[:, 0] == exact).mean() >= 0.99


def test_build_ivf_reaches_exact_neighbours_with_every_list_probed():
    """SQ8 and OPQ+PQ plans built from float16 shards: probing every list, SQ8 finds the exact
    nearest neighbour almost always, and the random training sample spans all shards."""
    from index_builder.index.plan import IndexPlan

    x, _ = planted(4000, 40, 32)
    shards = [x[:1500].astype(np.float16), x[1500:].astype(np.float16)]
    ids = sample_ids(4000, 1000, seed=0)
    assert (ids >= 1500).any() and (ids < 1500).any()
    assert np.array_equal(gather_rows(shards, ids), np.concatenate(shards)[ids].astype(np.float32))
    flat = faiss.IndexFlatL2(32)
    xb = np.concatenate(shards).astype(np.float32)
    flat.add(xb)
    _, truth = flat.search(xb[:300], 1)
    for plan, need, bf16 in ((IndexPlan("ivf", "IVF32_HNSW32,SQ8", 32, 2048, "SQ8"), 0.95, False),
                             (IndexPlan("ivf", "IVF32_HNSW32,SQ8", 32, 2048, "SQ8"), 0.95, True),
                             (IndexPlan("ivf", "OPQ4_32,IVF32_HNSW32,PQ4x8np", 32, 2048, "PQ4x8", True), 0.3, False)):
        index, stats = build_ivf(shards, plan, progress=False, bf16=bf16)
        assert stats["assign"] == ("torch-bf16" if bf16 else "faiss-flat-cpu")
        assert index.ntotal == 4000 and stats["train_vectors"] == 2048
        faiss.ParameterSpace().set_index_parameters(index, "nprobe=32")
        _, got = index.search(xb[:300], 1)
        assert (got[:, 0] == truth[:, 0]).mean() >= need


def test_neighbour_recall_and_tuner_by_hand():
    exact_d = np.array([[1.0, 2.0], [1.0, np.inf]], dtype=np.float32)
    assert neighbour_recall(exact_d.copy(), exact_d) == 1.0
    assert neighbour_recall(np.array([[1.0, 5.0], [9.0, np.inf]]), exact_d) == pytest.approx(1 / 3)
    got = {"a": np.array([[5.0, 5.0], [5.0, 5.0]]), "b": np.array([[1.0, 2.0], [9.0, 9.0]]),
           "c": exact_d.copy()}
    t = tune_search(["a", "b", "c"], lambda p: got[p], exact_d, lambda d: d, target=0.6)
    assert t.param == "b" and t.reached and [p for p, _ in t.tried] == ["a", "b"]
    t = tune_search(["a", "b"], lambda p: got[p], exact_d, lambda d: d, target=0.9)
    assert t.param == "b" and not t.reached  # the best when none reaches it


@pytest.mark.parametrize("curve, tried, kept", [
    # the codes cap recall near 0.72: two doublings gain < PLATEAU, the search stops, and the
    # cheapest setting within PLATEAU of the best is kept (not the dearest, 0.0015 higher)
    ([0.30, 0.55, 0.70, 0.716, 0.718, 0.7195, 0.72, 0.72], 6, 3),
    # still rising by more than PLATEAU every two doublings: every setting is tried, the best kept
    ([0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.85, 0.90], 8, 7),
    # flat from the start: the first PLATEAU_AFTER settings are tried before giving up
    ([0.50] * 8, PLATEAU_AFTER, 0),
])
def test_tuner_stops_at_a_plateau_and_keeps_the_cheapest_near_the_best(curve, tried, kept):
    """Recall is a fraction of the 1,000 rows of one column below; setting i finds curve[i] of them."""
    rows = 1000
    exact_d = np.ones((rows, 1), dtype=np.float32)
    names = [f"nprobe={2 ** i}" for i in range(len(curve))]

    def final(param: str) -> np.ndarray:
        hits = round(curve[names.index(param)] * rows)
        return np.where(np.arange(rows) < hits, 1.0, 9.0)[:, None]

    t = tune_search(names, final, exact_d, lambda d: d, target=0.95)
    assert not t.reached and len(t.tried) == tried
    assert t.param == names[kept] and t.recall == pytest.approx(curve[kept])
    assert t.recall >= max(r for _, r in t.tried) - PLATEAU


def test_index_stage_chooser_and_recall_tuned_knn(tmp_path, capsys):
    """Past --hnsw-max the stage builds the chooser's IVF key (recorded in the manifest); knn
    tunes nprobe until its FINAL neighbours (sequence exclusion applied) reach recall 0.95,
    where the cheapest setting does not; over every train chunk, the neighbours agree with the
    same stage run with exact search; `info --brief` shows the tuned parameters."""
    db = clustered_db(tmp_path / "db")
    assert run_cli(["index", "--db", db, "--hnsw-max", 0, "--recall-sample", 200, "--threads", 2]) == 0
    stats = load_manifest(db)["stages"]["index"]["stats"]
    assert stats["plan"]["builder"] == "ivf" and stats["index_key"] == stats["plan"]["key"]
    assert stats["index_key"] == f"OPQ4_32,IVF{stats['plan']['nlist']}_HNSW32,PQ4x4np"  # 4-bit: fast scan
    exact_db = tmp_path / "exact"
    shutil.copytree(db, exact_db)
    assert run_cli(["knn", "--db", db, "--k", 2, "--device", "cpu", "--target-recall", 0.95]) == 0
    knn = load_manifest(db)["stages"]["knn"]["stats"]
    assert knn["recall"]["reached"] and knn["recall"]["recall@2"] >= 0.95
    assert knn["tuning"][0][1] < 0.95  # the cheapest setting misses: the tuning did something
    assert knn["search_params"] == knn["tuning"][-1][0]
    assert knn["search"]["method"].endswith("(fast scan)") and knn["rerank"] == 16  # 4-bit codes
    assert 0 <= knn["exclusion_search"]["short_share"] <= 1  # decides range-first (range_exclusion)
    assert run_cli(["knn", "--db", exact_db, "--k", 2, "--device", "cpu", "--exact"]) == 0
    # the index's distances are the codes' approximations: judge its neighbours by their true distances
    emb = np.concatenate(open_embeddings(db, "train")).astype(np.float32)
    ids = load_neighbours(db, "train")[0]
    got = np.where(ids >= 0, ((emb[np.clip(ids, 0, None)] - emb[:, None, :]) ** 2).sum(-1), np.inf)
    ref = load_neighbours(exact_db, "train")[1]
    assert neighbour_recall(got, ref) >= 0.95
    capsys.readouterr()
    assert run_cli(["info", "--db", db, "--brief"]) == 0
    brief = json.loads(capsys.readouterr().out)
    assert brief["manifest"]["stages"]["knn"]["search_params"] == knn["search_params"]
    assert brief["manifest"]["stages"]["index"]["plan"]["key"] == stats["index_key"]


def test_forced_key_overrides_the_chooser(tmp_path):
    db = clustered_db(tmp_path / "db", n_docs=20)
    assert run_cli(["index", "--db", db, "--hnsw-max", 0, "--index-key", "Flat", "--recall-sample", 100]) == 0
    stats = load_manifest(db)["stages"]["index"]["stats"]
    assert stats["index_key"] == "Flat" and stats["plan"]["builder"] == "autofaiss"


def test_deterministic_ivf_build_is_byte_identical(tmp_path):
    """--deterministic keeps its promise on the chooser's IVF build: same bytes twice."""
    db = clustered_db(tmp_path / "a", n_docs=30)
    other = tmp_path / "b"
    shutil.copytree(db, other)
    for d in (db, other):
        assert run_cli(["index", "--db", d, "--hnsw-max", 0, "--deterministic", "--recall-sample", 100]) == 0
    assert load_manifest(db)["stages"]["index"]["stats"]["plan"]["builder"] == "ivf"
    names = sorted(p.name for p in (db / "index").iterdir())
    assert "trained.index" in names and "part-00000.ivfdata" in names  # the IVF is kept as parts
    assert names == sorted(p.name for p in (other / "index").iterdir())
    for name in names:
        assert (db / "index" / name).read_bytes() == (other / "index" / name).read_bytes()


def test_gather_rows_from_memmaps_equals_fancy_indexing(tmp_path):
    """The sample is read through the files (bounded RSS) and equals plain indexing."""
    from index_builder.index.ivf_build import read_block

    shards, whole = float16_shards(tmp_path, (5000, 1, 7000), 8, seed=1)
    for size in (1, 50, 3000, 12001):
        ids = sample_ids(12001, size, seed=size)
        assert np.array_equal(gather_rows(shards, ids, run=97), whole[ids])
    assert np.array_equal(read_block(shards[2], 10, 20), whole[5011:5021])
    sliced = shards[2][100:200]  # a memmap slice keeps its parent's offset: read by indexing
    assert np.array_equal(read_block(sliced, 0, 5), whole[5101:5106])
