"""The demo sweep's tables (docs/BENCHMARKS.md): one row per OUT/NAME.json of benchmarks/sweep_demo.sh,
then one row per config over its seeds (files named CONFIG-sSEED.json).

    python benchmarks/sweep_table.py /tmp/sweep/out/*.json

Each cell of the first table is bits per byte "RETRO / same weights without retrieval / trained
baseline" over the val chunks with overlap <= alpha, then RETRO's gain over the baseline. The
second gives, per config, RETRO's gain over its own seed's baseline, mean over seeds and the
seeds' range: two runs of one config can differ by more than two configs do.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ALPHAS = (0.125, 0.5, 1.0)


def gains(r: dict) -> dict[float, tuple[float, float, float, int]]:
    """alpha -> (RETRO, no retrieval, baseline bpb, tokens)."""
    out = {}
    for o in r.get("overlap") or []:
        out[round(o["alpha"], 3)] = tuple(o.get(f"bits_per_byte_{v}") for v in ("retrieval", "no_retrieval",
                                                                                  "baseline")) + (o["tokens"],)
    return out


def row(path: Path) -> str:
    r = json.loads(path.read_text())
    cells = [path.stem, str(r.get("step")), str(r.get("k"))]
    by_alpha = gains(r)
    for a in ALPHAS:
        if round(a, 3) not in by_alpha:
            cells.append("-")
            continue
        ret, no, base, tok = by_alpha[round(a, 3)]
        cells.append(f"{ret:.4f} / {no:.4f} / {base:.4f} ({base - ret:+.4f}; {tok:,} tok)")
    ctrl = r.get("bits_per_byte_other_neighbours")
    cells.append(f"{ctrl:.4f}" if ctrl is not None else "-")
    return "| " + " | ".join(cells) + " |"


def by_config(paths: list[Path]) -> list[str]:
    """Per config (name without its -sN suffix): gain over the baseline per alpha, mean [min, max]."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for p in paths:
        groups[re.sub(r"-s\d+$", "", p.stem)].append(gains(json.loads(p.read_text())))
    lines = ["| config | seeds | " + " | ".join(f"gain at alpha {a:.1%}: mean [min, max]" for a in ALPHAS)
             + " | gain over the same weights without retrieval, all |", "|---|---:|" + "---|" * (len(ALPHAS) + 1)]
    for name, runs in groups.items():
        cells = [name, str(len(runs))]
        for a in ALPHAS + (None,):
            key = round(a if a is not None else 1.0, 3)
            vals = [(g[key][2] - g[key][0]) if a is not None else (g[key][1] - g[key][0])
                    for g in runs if key in g]
            cells.append(f"{sum(vals) / len(vals):+.4f} [{min(vals):+.4f}, {max(vals):+.4f}]" if vals else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]]
    head = ["config", "step", "k"] + [f"alpha {a:.1%}: RETRO / no retr. / baseline (gain)" for a in ALPHAS]
    head.append("control (other seqs' neighbours)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for p in paths:
        print(row(p))
    print()
    print("\n".join(by_config(paths)))


if __name__ == "__main__":
    main()
