"""The demo sweep's table (docs/BENCHMARKS.md): one row per OUT/NAME.json of benchmarks/sweep_demo.sh.

    python benchmarks/sweep_table.py sweep/r0-tiny.json sweep/r1-cca-all.json ...

Each cell is bits per byte "RETRO / same weights without retrieval / trained baseline" over the
val chunks with overlap <= alpha, then RETRO's gain over the baseline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ALPHAS = (0.125, 0.5, 1.0)


def row(path: Path) -> str:
    r = json.loads(path.read_text())
    cells = [path.stem, str(r.get("step")), str(r.get("k"))]
    by_alpha = {round(o["alpha"], 3): o for o in r.get("overlap") or []}
    for a in ALPHAS:
        o = by_alpha.get(round(a, 3))
        if o is None:
            cells.append("-")
            continue
        ret, no, base = (o.get(f"bits_per_byte_{v}") for v in ("retrieval", "no_retrieval", "baseline"))
        cells.append(f"{ret:.4f} / {no:.4f} / {base:.4f} ({base - ret:+.4f}; {o['tokens']:,} tok)")
    ctrl = r.get("bits_per_byte_other_neighbours")
    cells.append(f"{ctrl:.4f}" if ctrl is not None else "-")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    head = ["config", "step", "k"] + [f"alpha {a:.1%}: RETRO / no retr. / baseline (gain)" for a in ALPHAS]
    head.append("control (other seqs' neighbours)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for p in sys.argv[1:]:
        print(row(Path(p)))


if __name__ == "__main__":
    main()
