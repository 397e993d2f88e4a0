"""benchmarks/bench_serve_generate.py: its percentiles and row, and the script end to end at a tiny
size (a real retro-serve subprocess per batching setting, on the tests' DB and a random run)."""

from __future__ import annotations


import pytest

from tests.fixtures import benchmark_module, shared_db
from tests.fixtures.served_run import make_run

@pytest.fixture(scope="module")
def bench():
    return benchmark_module("bench_serve_generate")


def test_row_percentiles(bench) -> None:
    cfg = bench.LoadConfig(max_batch=8, clients=4, requests_per_client=25, new_tokens=4)
    point = bench.Point(cfg, [i / 1000 for i in range(1, 101)], tokens=400, wall_s=2.0, batch_rows=[2, 4],
                        errors=0)
    assert point.row() == "| on (8) | 4 | 100 | 50 | 99 | 200.0 | 3.00 | 0 |"
    assert bench.Point(bench.LoadConfig(1, 1, 1, 4), [0.25], 4, 1.0, [1], 0).row().startswith("| off (1) | 1 | 1 | 250 | 250 |")


@pytest.mark.slow  # 19 s on a 2-core CPU; /v1/generate itself is tested in the default run
def test_end_to_end_prints_the_table(bench, tmp_path, tmp_path_factory, capsys) -> None:
    db = shared_db(tmp_path_factory)
    run = make_run(tmp_path / "run", db)
    out = tmp_path / "table.md"
    assert bench.main(["--db", str(db), "--run", str(run), "--clients", "1", "2", "--requests", "1",
                       "--new", "2", "--threads", "1", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| on") or line.startswith("| off")]
    assert len(rows) == 4 and all(line.endswith("| 0 |") for line in rows)  # no errors
