"""benchmarks/bench_scale.py at a tiny size: the script runs end to end (real chunk and index
stages, the knn stage's code beside raw faiss), past the HNSW range at the larger size."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from tests.fixtures import bench_scale_module


@pytest.mark.slow  # 45 s on a 2-core CPU; bench_scale's stages under 2 ranks: test_bench_scale_parallel.py
def test_bench_scale_tiny(tmp_path, capsys, monkeypatch):
    bench = bench_scale_module()
    out = tmp_path / "rows.json"
    corpus = Path(sysconfig.get_paths()["stdlib"]) / "json"  # 5 files, ~100 KB: ~700 chunks a copy
    assert bench.main(["--sizes", "500,2000", "--tiny", "--corpus", str(corpus), "--hnsw-max", "1000",
                       "--work", str(tmp_path / "work"), "--threads", "2", "--no-write",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["n"] >= r["n_target"] for r in rows] == [True, True]
    small, large = rows
    assert small["index_stats"]["plan"]["builder"] == "autofaiss"
    assert large["index_stats"]["plan"]["builder"] == "ivf"
    assert ",IVF" in large["index_stats"]["index_key"] and large["index_stats"]["index_key"].endswith("x4np")
    for r in rows:
        assert r["chunk"]["peak_mb"] > 0 and r["index"]["cpu"] > 0
        assert r["knn"]["queries"] == r["n"] and r["knn"]["missing"] == 0
        assert 0 < r["knn"]["anon_mb"] <= r["knn"]["peak_mb"]  # private memory, measured apart from mapped files
        stage = r["knn_stage"]  # the whole stage, as a user runs it (--tiny: at every size)
        assert stage["wall"] > 0 and 0 < stage["anon_mb"] <= stage["peak_mb"]
        assert stage["rerank"] == (1 if r is small else 16)  # the chooser's 4-bit codes: re-ranked x16
    assert small["knn"]["tuning"] is None  # autofaiss's Flat at this size: nothing to tune
    assert large["knn"]["tuning"]["reached"] and large["knn"]["tuning"]["recall"] >= 0.95
    assert 0 <= large["knn"]["short_share"] <= 1 and isinstance(large["knn"]["range_first"], bool)
    text = capsys.readouterr().out
    assert "| knn (" in text and "| knn stage (every chunk) |" in text and "### Projection" not in text and "days on 64 machines" in text
    # --real-only: a knn row for each given DB (here the IVF one just built; on a real run MiniLM-embedded
    # DBs of several sizes), in its own section: the synthetic section is not rewritten
    written = {}
    monkeypatch.setattr(bench, "write_section", lambda section, text: written.update({section: text}))
    real_json = tmp_path / "real.json"
    db = tmp_path / "work" / f"db-{large['n_target']}"
    assert bench.main(["--real-only", "--real-db", str(db), "--real-db", str(db), "--work", str(tmp_path / "work"),
                       "--threads", "2", "--real-repeat", "2", "--json", str(real_json)]) == 0
    real = json.loads(real_json.read_text())["real"]
    assert len(real) == 2 and list(written) == ["bench_scale_real"]
    for r in real:
        assert r["chunks"] == large["n"] and r["queries"] == 2 * large["n"] and r["missing"] == 0
        assert r["tuning"]["reached"] and ",IVF" in r["index"]["index_key"]
    table = [line for line in written["bench_scale_real"].splitlines() if line.startswith(f"| work/{db.name} |")]
    assert len(table) == 2 and f"| {large['n']:,} |" in table[0]
    assert str(tmp_path) not in written["bench_scale_real"]  # no machine's path in the docs
