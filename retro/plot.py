"""``python -m retro.plot RUN [--out FILE]``: train loss and val loss with / without retrieval.

Two panels from RUN/metrics.jsonl: losses (nats/token) over steps, and val bits per byte with
and without retrieval, whose gap is what retrieval buys. Writes RUN/loss.png by default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from chunk_store.errors import UserError, run_main
from retro.metrics import read_metrics


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(run: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    run = Path(run)
    records = read_metrics(run)
    if not records:
        raise UserError(f"no metrics in {run / 'metrics.jsonl'}: train first (python train.py ... --out {run})")
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label, style in [("train_loss", "train", "-"), ("val_loss", "val, with retrieval", "o-"),
                              ("val_loss_no_retrieval", "val, without retrieval", "s--")]:
        x, y = series(records, key)
        if x:
            ax_loss.plot(x, y, style, label=label, markersize=3, alpha=0.6 if key == "train_loss" else 1.0)
    ax_loss.set(xlabel="step", ylabel="loss (nats / token)", title=f"{run.name}: loss")
    for key, label, style in [("val_bpb", "with retrieval", "o-"), ("val_bpb_no_retrieval", "without retrieval", "s--")]:
        x, y = series(records, key)
        if x:
            ax_bpb.plot(x, y, style, label=label, markersize=3)
    ax_bpb.set(xlabel="step", ylabel="bits per byte", title="val bits per byte")
    for ax in (ax_loss, ax_bpb):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    out = Path(out) if out else run / "loss.png"
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m retro.plot", description=__doc__.splitlines()[0])
    p.add_argument("run", help="training run directory")
    p.add_argument("--out", default=None, help="PNG path (default RUN/loss.png)")
    args = p.parse_args(argv)
    return run_main("retro.plot", lambda: print(plot(args.run, args.out)))


if __name__ == "__main__":
    sys.exit(main())
