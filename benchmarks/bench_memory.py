"""Peak memory and step time per rank: activation checkpointing off/on, FSDP2 CPU offload off/on.

Runs train.py's own setup and step (``setup_trainer``, ``train_step``) under torchrun, 2 ranks
(gloo on CPU, NCCL on CUDA), at a model config's shape (default configs/small.yaml: 768 x 12
layers, encoder 2 x 896, chunk 64, k 2; the tiny DB's 512-token vocabulary), on a tiny synthetic
database built the way the tests build one (tests/fixtures/train_db.py). Each variant is its own
torchrun launch, so each rank's peak is its own: peak RSS (``resource.getrusage``'s ru_maxrss,
a process's high-water mark) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA; both after
setup (model built and sharded or replicated, optimizer) and after the steps. Step time is the
median of the timed steps after one warm-up step. Losses are printed too: checkpointing and
offload change memory and time, never the numbers.

    python benchmarks/bench_memory.py                     # CPU, 2 gloo ranks, a few minutes
    python benchmarks/bench_memory.py --device cuda       # the same on 2 GPUs (NCCL), seq 2048 x 8 per rank
    python benchmarks/bench_memory.py --variants fsdp,fsdp+ac --steps 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# variant name -> train.py --set overrides
VARIANTS: dict[str, list[str]] = {
    "ddp": ["fsdp=false", "activation_checkpointing=false"],
    "ddp+ac": ["fsdp=false", "activation_checkpointing=true"],
    "fsdp": ["fsdp=true", "activation_checkpointing=false"],
    "fsdp+ac": ["fsdp=true", "activation_checkpointing=true"],
    "fsdp+offload": ["fsdp=true", "fsdp_cpu_offload=true", "activation_checkpointing=false"],
    "fsdp+offload+ac": ["fsdp=true", "fsdp_cpu_offload=true", "activation_checkpointing=true"],
}
DEFAULT_VARIANTS = "ddp,ddp+ac,fsdp,fsdp+ac,fsdp+offload"


@dataclass
class RankResult:
    """One rank's numbers for one variant."""

    variant: str
    rank: int
    setup_peak_mib: float  # peak after the model and optimizer exist (before any step)
    peak_mib: float  # peak after the steps
    step_s: float  # median step time after the warm-up step
    losses: list[float]


def peak_mib(device: str) -> float:
    """This process's memory high-water mark in MiB: CUDA allocations on a GPU, RSS on CPU."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args: argparse.Namespace) -> int:
    """One rank: build the trainer as train.py does, run warm-up + timed steps, write its row."""
    import torch

    import train
    from retro.distributed import exit_process, teardown

    def body() -> int:
        try:
            argv = ["--config", args.config, "--db", args.db, "--out", args.out]
            for s in args.set:
                argv += ["--set", s]
            t = train.setup_trainer(train.parse_args(argv))
            state = train.start_state(t, resume=False)
            _, batches = train.data_stream(t, 0)
            setup_peak = peak_mib(args.device)
            t.model.train()
            times, losses = [], []
            for _ in range(1 + args.steps):
                before = float(state.window_loss)
                t0 = time.perf_counter()
                train.train_step(t, state, batches)
                if t.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                losses.append(float(state.window_loss) - before)
            row = RankResult(args.worker, t.info.rank, setup_peak, peak_mib(args.device),
                             statistics.median(times[1:]), losses)
            Path(args.result).with_suffix(f".rank{t.info.rank}.json").write_text(json.dumps(asdict(row)))
            del batches
        finally:
            teardown()
        return 0

    exit_process(body)


def run_variant(variant: str, nproc: int, config: str, db: Path, out: Path, sets: Sequence[str],
                steps: int, device: str) -> list[RankResult]:
    """One torchrun launch of ``nproc`` ranks; every rank's row comes back in its own file."""
    result = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           __file__, "--worker", variant, "--result", str(result), "--config", config, "--db", str(db),
           "--out", str(out), "--steps", str(steps), "--device", device,
           *[a for s in [*sets, *VARIANTS[variant]] for a in ("--set", s)]]
    subprocess.run(cmd, check=True, cwd=REPO)
    return [RankResult(**json.loads(result.with_suffix(f".rank{r}.json").read_text())) for r in range(nproc)]


def table(rows: Sequence[list[RankResult]], device: str) -> str:
    """One line per variant: the largest rank's peaks, the slowest rank's median step."""
    what = "CUDA max allocated" if device.startswith("cuda") else "peak RSS"
    lines = [f"| variant | {what} after setup, MiB (max rank) | {what} after steps, MiB (max rank) "
             f"| step s (median, slowest rank) | losses (rank 0) |", "|---|---:|---:|---:|---|"]
    for ranks in rows:
        lines.append(f"| {ranks[0].variant} | {max(r.setup_peak_mib for r in ranks):,.0f} "
                     f"| {max(r.peak_mib for r in ranks):,.0f} | {max(r.step_s for r in ranks):.2f} "
                     f"| {', '.join(f'{x:.4f}' for x in ranks[0].losses)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "small.yaml"))
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--seq-len", type=int, default=None, help="the DB's sequence length (default: 256 on CPU, 2048 on CUDA)")
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences per rank per step (default: 1 on CPU, 8 on CUDA)")
    ap.add_argument("--chunk", type=int, default=64, help="the DB's chunk size (the config's)")
    ap.add_argument("--nproc", type=int, default=None,
                    help="ranks (torchrun; default 2, on CUDA at most the GPU count: NCCL needs a GPU per rank)")
    ap.add_argument("--keep", default=None, help="a folder to keep the DB and runs in (default: a temp folder)")
    ap.add_argument("--json", default=None, help="also write every rank's row here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one rank: the variant
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--db", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    cuda = args.device.startswith("cuda")
    if args.nproc is None:
        import torch

        args.nproc = max(1, min(2, torch.cuda.device_count())) if cuda else 2
        if args.nproc == 1:
            print("bench_memory: one GPU, one rank: the fsdp variants run without FSDP2 (nothing to shard over)")
    seq = args.seq_len or (2048 if cuda else 256)
    micro = args.micro_batch or (8 if cuda else 1)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-memory-"))
    root.mkdir(parents=True, exist_ok=True)
    sets = ["model.vocab_size=512", "model.pad_id=3", f"model.chunk_size={args.chunk}", f"seq_len={seq}",
            f"batch_size={micro * args.nproc}", f"micro_batch_size={micro}", f"max_steps={args.steps + 1}",
            "warmup_steps=1", "eval_every=0", "checkpoint_every=0", "num_workers=0", "compile=false",
            f"device={args.device}", "dtype=" + ("bfloat16" if cuda else "float32")]
    rows: list[list[RankResult]] = []
    try:
        from tests.fixtures.train_db import chunk_db_with_neighbours

        db = root / "db"
        if not (db / "manifest.json").exists():
            chunk_db_with_neighbours(db, args.chunk, seq, 512)
        for variant in variants:
            out = root / f"run-{variant}"
            shutil.rmtree(out, ignore_errors=True)
            rows.append(run_variant(variant, args.nproc, args.config, db, out, sets, args.steps, args.device))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [[asdict(r) for r in ranks] for ranks in rows],
                                               "seq_len": seq, "micro_batch_size": micro, "nproc": args.nproc}))
    from report import machine

    cmd = "python benchmarks/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"`{cmd.strip()}` on {machine(args.device)}, {dt.date.today()}, {Path(args.config).name} shape, "
          f"seq_len {seq}, {args.nproc} ranks x micro-batch {micro}, 1 warm-up + {args.steps} timed steps "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})\n")
    print(table(rows, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
