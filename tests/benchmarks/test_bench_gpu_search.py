"""benchmarks/bench_gpu_search.py at a tiny size: the torch IVF search and faiss's IVF search scan
the same lists (the same recall at every nprobe), and all lists probed is the exact pass's recall."""

from __future__ import annotations

import json

from tests.fixtures import benchmark_module


def test_tiny_run_same_recall_as_faiss(tmp_path):
    bench = benchmark_module("bench_gpu_search")
    out = tmp_path / "rows.json"
    assert bench.main(["--device", "cpu", "--n", "3000", "--dim", "16", "--nlist", "16", "--queries", "60",
                       "--nprobe", "1,4,16", "--clusters", "8", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    by = {(r["impl"].split(" ")[0], r["nprobe"]): r["recall"] for r in rows}
    for nprobe in (1, 4, 16):
        assert by[("torch", nprobe)] == by[("faiss", nprobe)]
    assert by[("torch", 16)] == 1.0 and by[("torch", 1)] < 1.0
