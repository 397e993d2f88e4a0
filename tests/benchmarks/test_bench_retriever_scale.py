"""benchmarks/bench_retriever_scale.py at a tiny size: the script runs end to end (bench_scale's
builders, the cheap IVF index, start-up in fresh processes, locked vs unlocked lookups)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from tests.fixtures import benchmark_module


@pytest.mark.slow
def test_bench_retriever_scale_tiny(tmp_path, capsys):
    bench = benchmark_module("bench_retriever_scale")
    out, md = tmp_path / "rows.json", tmp_path / "section.md"
    corpus = Path(sysconfig.get_paths()["stdlib"]) / "json"
    assert bench.main(["--sizes", "1500", "--tiny", "--corpus", str(corpus), "--work", str(tmp_path / "work"),
                       "--build-threads", "1", "--threads", "1,4", "--queries", "16",
                       "--json", str(out), "--md", str(md)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["n"] >= 1500 and row["index_stats"]["index_key"] == "IVF16,SQ8"
    first, again = row["open"]
    assert first["n"] == again["n"] == row["n"] and again["old_extra_s"] >= 0
    assert again["rss"]["RssAnon"] <= again["rss"]["VmRSS"]
    assert row["serve"]["chunks"] == row["n"] and row["serve"]["serve_ready_s"] > 0  # retro-serve answered
    assert [(x["threads"], x["lock"]) for x in row["load"]] == [(1, True), (1, False), (4, True), (4, False)]
    assert all(x["qps"] > 0 and x["p50_ms"] <= x["p99_ms"] for x in row["load"])
    assert "| none (new) |" in capsys.readouterr().out and "## Retriever at scale" in md.read_text()
