"""``python -m retro.plot RUN [--out FILE]``: train loss and val loss with / without retrieval.

Two panels from RUN/metrics.jsonl: losses (nats/token) over steps, and val bits per byte with
and without retrieval, whose gap is what retrieval buys. Writes RUN/loss.png by default.

``python -m retro.plot --leakage EVAL.json [--out FILE]`` draws the paper's Figure 6 from the JSON
of ``retro.evaluate --overlap``: bits per byte and RETRO's gain against alpha (the chunks whose
overlap with their neighbours is <= alpha). Writes EVAL's folder/leakage.png by default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from chunk_store.framework.errors import UserError, run_main
from retro.metrics import read_metrics
from retro.run_layout import LEAKAGE_PLOT, RunLayout


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
        raise UserError(f"no metrics in {RunLayout(run).metrics}: train first (python train.py ... --out {run})")
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
    out = Path(out) if out else RunLayout(run).loss_plot
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def plot_leakage(eval_json: str | Path, out: str | Path | None = None) -> Path:
    """Figure 6: bits per byte of each scored variant and RETRO's gains, against alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eval_json = Path(eval_json)
    try:
        rows = json.loads(eval_json.read_text())["overlap"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{eval_json}: not the JSON of `python -m retro.evaluate --overlap`") from None
    alphas = [100 * r["alpha"] for r in rows]
    fig, (ax_bpb, ax_gain) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label, style in [("bits_per_byte_retrieval", "RETRO", "o-"),
                              ("bits_per_byte_no_retrieval", "RETRO without retrieval", "s--"),
                              ("bits_per_byte_baseline", "trained baseline", "^-")]:
        if key in rows[0]:
            ax_bpb.plot(alphas, [r[key] for r in rows], style, label=label)
    for key, label, style in [("gain_over_baseline", "over the trained baseline", "o-"),
                              ("gain_over_no_retrieval", "over the same weights without retrieval", "s--")]:
        if key in rows[0]:
            ax_gain.plot(alphas, [r[key] for r in rows], style, label=label)
    ax_gain.axhline(0.0, color="grey", lw=0.8)
    ax_bpb.set(xlabel="max overlap alpha (% of chunk)", ylabel="bits per byte", title="chunks with overlap <= alpha")
    ax_gain.set(xlabel="max overlap alpha (% of chunk)", ylabel="bits per byte saved by RETRO", title="retrieval gain")
    for ax in (ax_bpb, ax_gain):
        ax.set_xscale("log", base=2)
        ax.set_xticks(alphas, [f"{a:g}%" for a in alphas])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    out = Path(out) if out else eval_json.with_name(LEAKAGE_PLOT)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m retro.plot", description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", help="training run directory")
    p.add_argument("--leakage", default=None, metavar="EVAL_JSON",
                   help="draw the leakage figure from `retro.evaluate --overlap`'s JSON instead")
    p.add_argument("--out", default=None, help="PNG path (default RUN/loss.png, or leakage.png beside EVAL_JSON)")
    args = p.parse_args(argv)
    if args.leakage:
        return run_main("retro.plot", lambda: print(plot_leakage(args.leakage, args.out)))
    if not args.run:
        p.error("give RUN, or --leakage EVAL_JSON")
    return run_main("retro.plot", lambda: print(plot(args.run, args.out)))


if __name__ == "__main__":
    sys.exit(main())
