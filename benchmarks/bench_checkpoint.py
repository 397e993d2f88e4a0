"""Training time blocked per checkpoint: full vs sharded (synchronous) vs sharded + asynchronous.

Runs train.py's own loop (in this process, one rank) on a tiny synthetic database built the way
the tests build one (``index_builder chunk`` over a few standard-library folders, fake
neighbours), at a model config's shape (default configs/small.yaml, ~125M parameters at the
DB's 512-token vocabulary), for a few steps with a checkpoint every ``--every`` steps, once per
checkpoint mode. It times what the loop waits for: ``train.save`` (a full save: gather + write;
sharded: state dicts + write; async: the copy to CPU memory, plus waiting for the previous save
still in flight) and ``train.finish_checkpoints`` (waiting for the last async save at the end),
and prints a markdown table with the checkpoint's size on disk.

    python benchmarks/bench_checkpoint.py                           # CPU, configs/small.yaml
    python benchmarks/bench_checkpoint.py --device cuda             # the same on a GPU
    python benchmarks/bench_checkpoint.py --nproc 2                 # 2 ranks (torchrun, DDP): rank 0's times
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402  (the script at the repository root)
from report import machine  # noqa: E402  (benchmarks/report.py)

MODES = {"full": ["checkpoint_format=full"],
         "sharded-sync": ["checkpoint_format=sharded", "checkpoint_async=false"],
         "sharded-async": ["checkpoint_format=sharded", "checkpoint_async=true"]}


@dataclass
class Timings:
    """Seconds the training loop spent blocked in each call of a checkpointing function."""

    save: list[float] = field(default_factory=list)
    finish: list[float] = field(default_factory=list)


@contextmanager
def timed(name: str, into: list[float]) -> Iterator[None]:
    """Wrap ``train.<name>`` so each call's wall time is appended to ``into``."""
    real: Callable[..., Any] = getattr(train, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t0)

    setattr(train, name, wrapper)
    try:
        yield
    finally:
        setattr(train, name, real)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_mode(mode: str, config: str, db: Path, out: Path, sets: Sequence[str]) -> dict[str, Any]:
    timings = Timings()
    argv = ["--config", config, "--db", str(db), "--out", str(out)]
    for s in [*sets, *MODES[mode]]:
        argv += ["--set", s]
    t0 = time.perf_counter()
    with timed("save", timings.save), timed("finish_checkpoints", timings.finish):
        train.train(train.parse_args(argv))
    wall = time.perf_counter() - t0
    last = train.checkpoint_dir(out)
    saves = len(timings.save)
    blocked = sum(timings.save) + sum(timings.finish)
    return {"mode": mode, "saves": saves, "in_save": sum(timings.save) / saves, "end_wait": sum(timings.finish),
            "blocked": blocked / saves, "wall": wall, "bytes": dir_bytes(last),
            "files": sum(1 for p in last.rglob("*") if p.is_file())}


def run_ranks(mode: str, nproc: int, config: str, db: Path, out: Path, sets: Sequence[str]) -> dict[str, Any]:
    """``run_mode`` under torchrun with ``nproc`` ranks (DDP); rank 0's timings come back in a file."""
    result = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           __file__, "--worker", mode, "--result", str(result), "--config", config, "--db", str(db),
           "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads(result.read_text())


def worker(args: argparse.Namespace) -> int:
    """One rank of a --nproc run: train, time, and (rank 0) write the row; exits as train.py does."""
    from retro.distributed import exit_process, teardown

    def body() -> int:
        try:
            row = run_mode(args.worker, args.config, Path(args.db), Path(args.out), args.set)
            if int(os.environ.get("RANK", "0")) == 0:
                Path(args.result).write_text(json.dumps(row))
        finally:
            teardown()
        return 0

    exit_process(body)


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| mode | saves | blocked in save() per ckpt (s) | end-of-run wait (s) | blocked per ckpt, all in (s) "
             "| run wall (s) | checkpoint MB | files |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['saves']} | {r['in_save']:.2f} | {r['end_wait']:.2f} | {r['blocked']:.2f} "
                     f"| {r['wall']:.1f} | {r['bytes'] / 1e6:.1f} | {r['files']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "small.yaml"))
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--every", type=int, default=2, help="steps between checkpoints")
    ap.add_argument("--saves", type=int, default=3, help="checkpoints per mode")
    ap.add_argument("--seq-len", type=int, default=128, help="the DB's sequence length (short: CPU)")
    ap.add_argument("--chunk", type=int, default=64, help="the DB's chunk size (the config's)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    ap.add_argument("--keep", default=None, help="a folder to keep the DB and runs in (default: a temp folder)")
    ap.add_argument("--nproc", type=int, default=1, help="ranks (torchrun, DDP; gloo on CPU)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one rank of --nproc: the mode
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--db", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    root.mkdir(parents=True, exist_ok=True)
    from tests.fixtures.train_db import chunk_db_with_neighbours

    db = chunk_db_with_neighbours(root / "db", args.chunk, args.seq_len, 512)
    steps = args.every * args.saves
    sets = ["model.vocab_size=512", "model.pad_id=3", f"model.chunk_size={args.chunk}", f"seq_len={args.seq_len}",
            f"batch_size={args.nproc}", "micro_batch_size=1", f"max_steps={steps}", "warmup_steps=1", "eval_every=0",
            "eval_batches=1", f"checkpoint_every={args.every}", f"log_every={steps}", "num_workers=0",
            "compile=false", f"device={args.device}", "dtype=" + ("bfloat16" if args.device.startswith("cuda") else "float32")]
    rows = []
    try:
        for mode in args.modes.split(","):
            rows.append(run_mode(mode, args.config, db, root / mode, sets) if args.nproc == 1
                        else run_ranks(mode, args.nproc, args.config, db, root / mode, sets))
            if not args.keep:
                shutil.rmtree(root / mode, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    cmd = "python benchmarks/bench_checkpoint.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"`{cmd.strip()}` on {machine(args.device)}, {dt.date.today()}, {Path(args.config).name}, "
          f"seq_len {args.seq_len}, {steps} steps, a checkpoint every {args.every} ({args.nproc} rank(s), OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')})\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
