"""benchmarks/sweep_table.py: the per-config summary averages each seed's gain over its own baseline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import sweep_table  # noqa: E402


def _eval(path: Path, rows: dict[float, tuple[float, float, float]]) -> Path:
    overlap = [{"alpha": a, "tokens": 100, "bits_per_byte_retrieval": r, "bits_per_byte_no_retrieval": n,
                "bits_per_byte_baseline": b} for a, (r, n, b) in rows.items()]
    path.write_text(json.dumps({"step": 300, "k": 2, "overlap": overlap}))
    return path


def test_by_config_groups_seeds_and_reports_mean_and_range(tmp_path: Path) -> None:
    a = _eval(tmp_path / "k1-s0.json", {0.125: (1.0, 1.1, 1.2), 0.5: (1.0, 1.0, 1.0), 1.0: (0.8, 0.9, 0.85)})
    b = _eval(tmp_path / "k1-s1.json", {0.125: (1.1, 1.1, 1.0), 0.5: (1.0, 1.0, 1.0), 1.0: (0.8, 0.8, 0.9)})
    c = _eval(tmp_path / "tiny-s0.json", {0.125: (1.0, 1.0, 1.0), 0.5: (1.0, 1.0, 1.0), 1.0: (1.0, 1.0, 1.0)})
    lines = sweep_table.by_config([a, b, c])
    k1 = next(line for line in lines if line.startswith("| k1 |")).split(" | ")
    # gains over the baseline at 12.5%: +0.2 and -0.1 -> mean +0.05; overall +0.05 and +0.10
    assert k1[1] == "2"
    assert k1[2] == "+0.0500 [-0.1000, +0.2000]"
    assert k1[4] == "+0.0750 [+0.0500, +0.1000]"
    assert k1[5].startswith("+0.0500 [+0.0000, +0.1000]")  # vs the same weights without retrieval
    assert any(line.startswith("| tiny | 1 | +0.0000") for line in lines)
