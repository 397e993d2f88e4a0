"""benchmarks/bench_scale_parallel.py (issue 24): the projection's arithmetic against figures worked
by hand, the report's bookkeeping from a cached run, and `--ranks 1,2` at a tiny size (the
real index and knn stages, 2 ranks under torchrun): the same final neighbours either way."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import benchmark_module


def bench():
    return benchmark_module("bench_scale_parallel")


def test_projection_matches_the_figures_worked_by_hand():
    """Fixed inputs at 1/1000 of 15.6B chunks: every row's total and days, computed apart."""
    b = bench()
    inputs = b.ProjectionInputs(n=15_625_000, index_cpu=3000.0, train_cpu=1000.0, nlist=8192, index_exponent=1.0,
                                knn_cpu_query=0.001, knn_query_exponent=0.5, cores=2, merge_wall=10.0,
                                add_ratio=0.5)
    rows = {(r["stage"], r["device"]): r for r in b.projection(inputs, machines=(1, 64, 1024))}
    expect = {  # (stage, device): (total seconds, days on 1, 64, 1024 machines)
        ("index: train the IVF (rank 0)", "CPU"): (1_024_000, 5.925926, 5.925926, 5.925926),  # x 32^2, serial
        ("index: fill the parts", "CPU"): (2_000_000, 11.574074, 0.180845, 0.011303),  # (3000 - 1000) x 1000
        ("index: merge the parts on disk", "CPU"): (10_000, 0.115741, 0.115741, 0.115741),  # serial, linear
        ("knn: every chunk", "CPU"): (494_105_884.4, 2859.409053, 44.678267, 2.792392),  # 1e-3 x 1000^0.5 x N
        ("add 25% + knn --refresh", "CPU"): (248_564_942.2, 1438.454527, 22.475852, 1.404741),
        ("index: train the IVF (one GPU)", "GPU"): (7256.776743, 0.083990, 0.083990, 0.083990),
        ("index: fill the parts (brute-force assignment)", "GPU"): (675_840.0, 0.977778, 0.015278, 0.00095486),
        ("knn: every chunk", "GPU"): (42_690_748.41, 61.763236, 0.965051, 0.060316),  # 48 GPU-h x 15.625^1.5 x 4
    }
    assert set(rows) == set(expect) | {("add 25% + knn --refresh", "GPU")}
    for key, (total, *days) in expect.items():
        assert rows[key]["total"] == pytest.approx(total, rel=1e-6), key
        assert rows[key]["days"] == pytest.approx(days, rel=1e-4), key
    gpu_rebuild = sum(expect[k][0] for k in expect if k[1] == "GPU")
    assert rows[("add 25% + knn --refresh", "GPU")]["total"] == pytest.approx(0.5 * gpu_rebuild)
    assert "anchor" in rows[("knn: every chunk", "GPU")]["source"]
    assert "measured" in rows[("knn: every chunk", "CPU")]["source"]


def figures(wall, cpu, ranks, **more):
    return {"wall": wall, "cpu": cpu, "peak_mb": 900.0, "anon_mb": 500.0, "rank_anon_mb": ranks, **more}


def test_report_only_tabulates_the_cached_steps(tmp_path):
    """--report-only: the three sections from the cached figures, into the file given, a memory
    column a rank, the add path's totals and ratio, the exponents from the two sizes measured."""
    b = bench()
    work = tmp_path / "work"
    work.mkdir()
    index = {"index_key": "IVF4096_HNSW32,SQ8", "recall": {"recall@2": 0.99}, "ntotal": 16_000,
             "build": {"sample_seconds": 1.0, "kmeans_seconds": 4.0, "codec_seconds": 1.0}, "merge": None}
    knn = {"mode": "stage", "queries": 16_000, "final_recall": 0.97}
    add_steps = {"base index": figures(50, 80, {"0": 300}, bytes_written=10),
                 "base knn": figures(40, 64, {"0": 200}, bytes_written=20),
                 "add": figures(5, 6, {"0": 100}, bytes_written=1000),
                 "embeddings": {"wall": 2.0, "bytes_written": 2000, "synthetic": True},
                 "index add": figures(10, 12, {"0": 300}, bytes_written=3000),
                 "knn refresh": figures(20, 28, {"0": 300}, bytes_written=4000),
                 "index rebuild": figures(60, 90, {"0": 300}, bytes_written=9000),
                 "knn full": figures(50, 70, {"0": 300}, bytes_written=8000)}
    cache = {
        "ranks-16000-1/index": figures(100, 180, {"0": 700}, parts=1, threads_per_rank=2, **index),
        "ranks-16000-1/knn": figures(200, 320, {"0": 400}, **knn),
        "ranks-16000-2/index": figures(70, 190, {"0": 400, "1": 380, "launcher": 290}, parts=1,  # merged
                                       threads_per_rank=1, **{**index, "merge": {"parts": [0, 1], "into": 2,
                                                                                 "seconds": 3.0, "bytes_written": 100}}),
        "ranks-16000-2/knn": figures(120, 330, {"0": 400, "1": 390, "launcher": 290}, **knn),
        "add-4000-1000/result": {"n_base": 4000, "n_added": 1000, "steps": add_steps,
                                 "index_base": {"index_key": "IVF1024_HNSW32,SQ8"},
                                 "index_grown": {"index_key": "IVF1024_HNSW32,SQ8", "parts": 2},
                                 "index_full": {"index_key": "IVF1024_HNSW32,SQ8", "parts": 1},
                                 "recall": {"incremental": 0.96, "full": 0.97}},
    }
    (work / "scale-parallel.json").write_text(json.dumps(cache))
    docs = tmp_path / "BENCHMARKS.md"
    docs.write_text("# Benchmarks\n\n<!-- BEGIN other -->\nkept\n<!-- END other -->\n")
    out = tmp_path / "out.json"
    assert b.main(["--report-only", "--work", str(work), "--size", "16000", "--ranks", "1,2", "--add-to", "4000",
                   "--added", "1000", "--docs", str(docs), "--json", str(out)]) == 0
    text = docs.read_text()
    assert "kept" in text and all(f"<!-- BEGIN {s} -->" in text for s in b.SECTIONS)
    assert str(tmp_path) not in text  # no machine's path in the docs
    rows = [line for line in text.splitlines() if line.startswith("| 16,000 |")]
    assert len(rows) == 2
    assert "| 1 x 2 |" in rows[0] and "r0 700" in rows[0] and "r1" not in rows[0]
    assert "| 1 (2 merged in 3 s) |" in rows[1] and "| 1 |" in rows[0]
    assert "| 2 x 1 |" in rows[1] and "r0 400, r1 380 (launcher 290)" in rows[1] and "| 0.97 |" in rows[1]
    # add + refresh: index add + refresh 40 CPU s vs rebuild 160: ratio 0.25; bytes 7,000 vs 17,000
    assert "40 CPU s, 7,000 bytes written" in text and "160 CPU s, 17,000 bytes written" in text
    assert "CPU ratio 0.25" in text and "add + refresh 0.96, full rebuild 0.97" in text
    assert "| add + refresh | embeddings (synthetic) | 2 | - | - | 2,000 |" in text
    # the exponents between the add base (4,000: 80 CPU s; 64 / 4000 a query) and 16,000 (180; 320 / 16000)
    inputs = json.loads(out.read_text())["sections"]["bench_scale_parallel_projection"]
    assert '"index_exponent": 0.584963' in inputs and '"knn_query_exponent": 0.160964' in inputs
    assert '"add_ratio": 0.25' in inputs and '"merge_wall": 3.0' in inputs and "measured 4,000 -> 16,000" in inputs


# slow: tests/index_builder/test_knn.py and test_index_parts.py check two ranks against one by default
@pytest.mark.slow
def test_two_ranks_end_with_the_neighbours_of_one(tmp_path):
    """`--ranks 1,2` at a tiny size: the real index stage (1 rank: one part; 2 ranks under
    torchrun: a part each) and the whole knn stage under the same ranks end with the same final
    neighbours, so the same recall against exact search; private memory is reported a rank."""
    from chunk_store.neighbour_shards import load_neighbours

    b = bench()
    out = tmp_path / "rows.json"
    corpus = Path(sysconfig.get_paths()["stdlib"]) / "json"  # 5 files, ~700 chunks a copy
    work = tmp_path / "work"
    assert b.main(["--tiny", "--work", str(work), "--corpus", str(corpus), "--size", "1200", "--ranks", "1,2",
                   "--add-to", "", "--hnsw-max", "500", "--threads", "2", "--no-write", "--json", str(out)]) == 0
    one, two = json.loads(out.read_text())["ranks"]
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert "IVF" in one["index"]["index_key"] and one["index"]["index_key"] == two["index"]["index_key"]
    assert one["index"]["parts"] == 1 and one["index"].get("merge") is None
    merge = two["index"].get("merge")
    if merge:  # `index --merge-parts auto`, where the CLI has it: the ranks' parts merged into one
        assert len(merge["parts"]) == 2 and two["index"]["parts"] == 1
    else:
        assert two["index"]["parts"] == 2
    assert set(one["index"]["rank_anon_mb"]) == {"0"} and {"0", "1"} <= set(two["index"]["rank_anon_mb"])
    assert set(two["knn"]["rank_anon_mb"]) >= {"0", "1"}
    for r in (one, two):
        assert r["index"]["cpu"] > 0 and r["knn"]["mode"] == "stage" and r["knn"]["queries"] == r["n"]
    assert one["knn"]["final_recall"] == two["knn"]["final_recall"] >= 0.9
    ids = [load_neighbours(work / f"db-1200-r{r}", "train")[0] for r in (1, 2)]
    np.testing.assert_array_equal(ids[0], ids[1])
    # cached: a re-run runs nothing and reports the same rows
    again = tmp_path / "again.json"
    assert b.main(["--report-only", "--work", str(work), "--size", "1200", "--ranks", "1,2", "--add-to", "",
                   "--no-write", "--json", str(again)]) == 0
    assert [r["knn"]["final_recall"] for r in json.loads(again.read_text())["ranks"]] == [
        one["knn"]["final_recall"], two["knn"]["final_recall"]]


@pytest.mark.slow
def test_add_path_at_a_tiny_size(tmp_path):
    """`--add-to` at a tiny size (over 20 s: seven stage runs): every step measured, the added
    chunks in a new part, the refresh writing less than the full rebuild, both recalls measured."""
    b = bench()
    out = tmp_path / "rows.json"
    corpus = Path(sysconfig.get_paths()["stdlib"]) / "json"
    assert b.main(["--tiny", "--work", str(tmp_path / "work"), "--corpus", str(corpus), "--ranks", "",
                   "--add-to", "1500", "--added", "500", "--hnsw-max", "500", "--threads", "2", "--no-write",
                   "--json", str(out)]) == 0
    add = json.loads(out.read_text())["add"]
    assert add["n_added"] > 0 and add["index_grown"]["parts"] == 2 and add["index_full"]["parts"] == 1
    assert all(add["steps"][s]["wall"] > 0 for s in b.ADD_STEPS + b.FULL_STEPS + b.BASE_STEPS)
    written = {s: add["steps"][s]["bytes_written"] for s in b.ADD_STEPS + b.FULL_STEPS}
    assert written["index add"] < written["index rebuild"]
    assert 0 <= add["recall"]["incremental"] <= 1 and add["recall"]["full"] >= 0.9
    # the refresh's own choice (the reverse pass on this IVF) beside the forward merge
    assert add["added_search"]["knn refresh"].startswith("reverse"), add["added_search"]
    assert not add["added_search"]["knn refresh forward"].startswith("reverse")
    assert add["steps"]["knn refresh forward"]["wall"] > 0 and 0 <= add["recall"]["forward"] <= 1
