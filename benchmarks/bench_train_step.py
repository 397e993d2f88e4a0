"""Training-step throughput of our RETRO vs lucidrains' RETRO-pytorch 0.3.9, same shape, one run.

For each precision (fp32, bf16 autocast) it times full training steps (forward, cross-entropy,
backward, AdamW) of:
  ours            RETRO(cfg)(tokens, neighbours)
  ours-noretr     the same model with neighbours=None (the plain-decoder baseline)
  ours+compile    torch.compile'd (on CUDA by default; --compile on CPU)
  retro-pytorch   RETRO-pytorch's RETRO with the same decoder/encoder shape
and prints tokens/s, peak memory and MFU, then replaces its own section of docs/BENCHMARKS.md.

MFU = model FLOPs/token (RetroConfig.flops_per_token, x3 for a training step, full attention
score matrices: the PaLM convention) x tokens/s / peak FLOP/s. The same model FLOPs are used for
both implementations (same shape: the useful work is the same). Peak FLOP/s: the datasheet's
dense figure on known GPUs (fp32 runs use TF32 matmuls), or, on CPU, a measured large matmul.

    python benchmarks/bench_train_step.py                       # CPU, configs/tiny.yaml
    python benchmarks/bench_train_step.py --device cuda --config configs/small.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import datetime as dt
import functools
import gc
import importlib
import importlib.util
import json
import sys
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retro import RETRO, RetroConfig  # noqa: E402
from report import machine, write_section  # noqa: E402  (benchmarks/report.py)

DOCS = REPO / "docs" / "BENCHMARKS.md"

# dense datasheet peaks (FLOP/s): bf16, tf32
GPU_PEAKS = {
    "H100": (989.4e12, 494.7e12),
    "H200": (989.4e12, 494.7e12),
    "A100": (312e12, 156e12),
    "L4": (121e12, 60e12),
    "A10": (125e12, 62.5e12),
}


@dataclass
class Result:
    name: str
    dtype: str
    tokens_per_s: float
    step_ms: float
    peak_mem: float  # bytes
    mfu: float
    loss: float


# --------------------------------------------------------------------------- the peer


def load_retro_pytorch() -> types.ModuleType:
    """retro_pytorch.retro_pytorch, without its package __init__ when that fails (it imports the
    faiss/autofaiss retrieval code at import time; the model module needs only BERT_VOCAB_SIZE)."""
    try:
        return importlib.import_module("retro_pytorch.retro_pytorch")
    except ImportError:
        spec = importlib.util.find_spec("retro_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("retro-pytorch is not installed: pip install --no-deps retro-pytorch==0.3.9")
        pkg = types.ModuleType("retro_pytorch")
        pkg.__path__ = list(spec.submodule_search_locations)
        retrieval = types.ModuleType("retro_pytorch.retrieval")
        retrieval.BERT_VOCAB_SIZE = 28996
        sys.modules.update({"retro_pytorch": pkg, "retro_pytorch.retrieval": retrieval})
        path = Path(spec.submodule_search_locations[0]) / "retro_pytorch.py"
        mspec = importlib.util.spec_from_file_location("retro_pytorch.retro_pytorch", path)
        module = importlib.util.module_from_spec(mspec)
        sys.modules["retro_pytorch.retro_pytorch"] = module
        mspec.loader.exec_module(module)
        return module


def build_peer(cfg: RetroConfig, seq_len: int) -> torch.nn.Module:
    """RETRO-pytorch at our shape. Its RETRO() does not pass `heads` on to its Encoder/Decoder
    (they default to 8), so we bind the head counts on the classes it instantiates."""
    rp = load_retro_pytorch()
    if cfg.enc_dim_head != cfg.dim_head:
        print("note: retro-pytorch uses one dim_head for encoder and decoder; using the decoder's")
    orig_enc, orig_dec = rp.Encoder, rp.Decoder
    rp.Encoder = functools.partial(orig_enc, heads=cfg.enc_heads)
    rp.Decoder = functools.partial(orig_dec, heads=cfg.heads)
    try:
        return rp.RETRO(
            num_tokens=cfg.vocab_size, max_seq_len=seq_len, enc_dim=cfg.enc_dim, enc_depth=cfg.enc_depth,
            dec_depth=cfg.depth, dec_cross_attn_layers=tuple(cfg.resolved_cca_layers), dec_dim=cfg.dim,
            dim_head=cfg.dim_head, chunk_size=cfg.chunk_size, pad_id=cfg.pad_id,
        )
    finally:
        rp.Encoder, rp.Decoder = orig_enc, orig_dec


# --------------------------------------------------------------------------- measurement


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


class PeakHostMemory:
    """CPU peak memory: bytes malloc'ed and still live (glibc mallinfo2: arena in use + mmapped
    blocks), sampled every millisecond above the baseline at entry. Unlike RSS this falls again
    when tensors are freed, so variants measured one after another do not hide each other."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        self._mallinfo = libc.mallinfo2
        self._mallinfo.restype = _MallInfo2
        self.base = self.peak = self._live()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _live(self) -> int:
        info = self._mallinfo()
        return int(info.uordblks + info.hblkhd)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._live())
            time.sleep(0.001)

    def __enter__(self) -> "PeakHostMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._live())

    @property
    def used(self) -> int:
        return self.peak - self.base


def cpu_peak_flops(dtype: torch.dtype, clock: str, size: int = 2048, reps: int = 3) -> float:
    """Measured matmul throughput on this CPU (the denominator of CPU MFU), on the same clock as
    the steps."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        a @ b
        sec = (time.process_time() - c) / torch.get_num_threads() if clock == "cpu" else time.perf_counter() - t
        best = min(best, sec)
    return 2 * size**3 / best


def gpu_peak_flops(device: torch.device, bf16: bool) -> float | None:
    name = torch.cuda.get_device_name(device)
    for key, (p_bf16, p_tf32) in GPU_PEAKS.items():
        if key in name:
            return p_bf16 if bf16 else p_tf32
    return None


def make_batch(cfg: RetroConfig, batch: int, seq_len: int, device: torch.device, seed: int = 0):
    """Random tokens (never pad) and neighbours; ~10% of continuations are padding."""
    g = torch.Generator().manual_seed(seed)
    low = cfg.pad_id + 1 if cfg.pad_id + 1 < cfg.vocab_size else 0
    tokens = torch.randint(low, cfg.vocab_size, (batch, seq_len + 1), generator=g)
    m = cfg.chunk_size
    nbrs = torch.randint(low, cfg.vocab_size, (batch, seq_len // m, cfg.num_neighbours, 2 * m), generator=g)
    ended = torch.rand(batch, seq_len // m, cfg.num_neighbours, generator=g) < 0.1
    nbrs[..., m:][ended] = cfg.pad_id
    return tokens.to(device), nbrs.to(device)


@dataclass
class Variant:
    name: str
    build: Callable[[], torch.nn.Module]
    loss: Callable[..., torch.Tensor]
    flops_per_token: float


@dataclass
class Prepared:
    variant: Variant
    step: Callable[[], float]
    peak_mem: int
    times: list[float]
    loss: float = float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(variant: Variant, tokens: torch.Tensor, nbrs: torch.Tensor, bf16: bool,
            device: torch.device, warmup: int) -> Prepared:
    """Build model + AdamW and run the warm-up steps, measuring peak memory over them (the first
    step allocates gradients and optimizer state, so the peak is that of a steady training step)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    meter = PeakHostMemory() if device.type == "cpu" else contextlib.nullcontext()
    with meter:
        torch.manual_seed(0)
        model = variant.build().to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

        def step() -> float:
            with autocast:
                loss = variant.loss(model, tokens, nbrs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        loss = float("nan")
        for _ in range(max(warmup, 1)):
            loss = step()
        sync(device)
    mem = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else meter.used
    return Prepared(variant, step, mem, [], loss)


def timed_step(p: Prepared, device: torch.device, clock: str) -> None:
    """Wall time, or (clock="cpu") this process's CPU seconds / torch threads: on a shared CPU
    the wall clock mostly measures the other processes; CPU time measures our work."""
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    p.loss = p.step()
    sync(device)
    if clock == "cpu":
        p.times.append((time.process_time() - c) / torch.get_num_threads())
    else:
        p.times.append(time.perf_counter() - t)


def result_of(p: Prepared, batch: int, seq_len: int, bf16: bool, peak: float | None) -> Result:
    times = sorted(p.times)
    sec = times[len(times) // 2]  # median
    tps = batch * seq_len / sec
    mfu = p.variant.flops_per_token * tps / peak if peak else float("nan")
    return Result(p.variant.name, "bf16" if bf16 else "fp32", tps, 1e3 * sec, p.peak_mem, mfu, p.loss)


def run_dtype(variants: list[Variant], cfg: RetroConfig, batch: int, seq_len: int, bf16: bool,
              device: torch.device, warmup: int, steps: int, peak: float | None, clock: str) -> list[Result]:
    """On CUDA one variant after the other (memory is per device, timings are stable). On a
    shared CPU the variants' timed steps are interleaved round-robin, so load from other
    processes hits every variant alike and the ratios hold."""
    tokens, nbrs = make_batch(cfg, batch, seq_len, device)
    results = []
    if device.type == "cuda":
        for v in variants:
            try:
                p = prepare(v, tokens, nbrs, bf16, device, warmup)
                for _ in range(steps):
                    timed_step(p, device, clock)
            except torch.OutOfMemoryError:
                print(f"  {v.name:22s}: out of memory")
                continue
            finally:
                torch._dynamo.reset()
            results.append(result_of(p, batch, seq_len, bf16, peak))
            del p
            report(results[-1])
        return results
    prepared = [prepare(v, tokens, nbrs, bf16, device, warmup) for v in variants]
    for _ in range(steps):
        for p in prepared:
            timed_step(p, device, clock)
    for p in prepared:
        results.append(result_of(p, batch, seq_len, bf16, peak))
        report(results[-1])
    return results


def report(r: Result) -> None:
    print(f"  {r.name:22s} {r.dtype}: {r.tokens_per_s:12,.0f} tokens/s  {r.step_ms:9.1f} ms/step  "
          f"{fmt_mem(r.peak_mem):>10s}  MFU {100 * r.mfu:5.1f}%  loss {r.loss:.3f}")


def ours_loss(model: RETRO, tokens: torch.Tensor, nbrs: torch.Tensor | None) -> torch.Tensor:
    logits = model(tokens[:, :-1], nbrs)
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def peer_loss(model: torch.nn.Module, tokens: torch.Tensor, nbrs: torch.Tensor) -> torch.Tensor:
    return model(tokens, nbrs, return_loss=True)


# --------------------------------------------------------------------------- report


def fmt_mem(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def table(results: list[Result]) -> str:
    lines = ["| model | dtype | tokens/s | step ms | peak memory | MFU | loss |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        mfu = "n/a" if r.mfu != r.mfu else f"{100 * r.mfu:.1f}%"
        lines.append(f"| {r.name} | {r.dtype} | {r.tokens_per_s:,.0f} | {r.step_ms:.1f} | "
                     f"{fmt_mem(r.peak_mem)} | {mfu} | {r.loss:.3f} |")
    return "\n".join(lines)


def ratios(results: list[Result]) -> list[str]:
    out = []
    by = {(r.name, r.dtype): r for r in results}
    for dtype in ("fp32", "bf16"):
        ours, peer, base = by.get(("ours", dtype)), by.get(("retro-pytorch", dtype)), by.get(("ours-noretr", dtype))
        comp, comp_base = by.get(("ours+compile", dtype)), by.get(("ours-noretr+compile", dtype))
        if ours and peer:
            out.append(f"- {dtype}: ours / retro-pytorch: {ours.tokens_per_s / peer.tokens_per_s:.2f}x tokens/s, "
                       f"{ours.peak_mem / max(peer.peak_mem, 1):.2f}x peak memory")
        if comp and peer:
            out.append(f"- {dtype}: ours+compile / retro-pytorch: {comp.tokens_per_s / peer.tokens_per_s:.2f}x "
                       f"tokens/s, {comp.peak_mem / max(peer.peak_mem, 1):.2f}x peak memory")
        if ours and base and ours.mfu == ours.mfu:
            out.append(f"- {dtype}: MFU with retrieval / without (same model, neighbours=None): "
                       f"{ours.mfu / base.mfu:.2f}")
        if comp and comp_base and comp.mfu == comp.mfu:
            out.append(f"- {dtype}: compiled MFU with retrieval / without: {comp.mfu / comp_base.mfu:.2f}")
    return out


def display_path(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)






def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: 8 on CUDA (the issue's small-shape measurement), else the config's micro_batch_size")
    p.add_argument("--seq-len", type=int, default=None, help="default: the config's seq_len")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--warmup", type=int, default=None, help="default 2 (CPU) / 5 (CUDA)")
    p.add_argument("--steps", type=int, default=None, help="default 5 (CPU) / 20 (CUDA)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="auto: on for CUDA")
    p.add_argument("--no-peer", action="store_true", help="skip retro-pytorch")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the MFU denominator")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/BENCHMARKS.md")
    p.add_argument("--json", type=Path, default=None, help="also write the results and ratios here")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on a CPU device: 1, so CPU time is not inflated by "
                        "OpenMP threads spinning while the shared machine deschedules their peers)")
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                   help="step time: wall clock, or process CPU seconds / threads (auto: cpu on a CPU device)")
    args = p.parse_args(argv)

    from retro.config import load_yaml

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # "fp32" = TF32 matmuls, as every GPU trainer runs it
        torch.backends.cudnn.allow_tf32 = True
    cfg = RetroConfig.from_yaml(args.config)
    raw = load_yaml(args.config)  # a derived config (extends:) with its parent's keys
    seq_len = args.seq_len or int(raw.get("seq_len", 2048))
    batch = args.batch_size or (8 if cuda else int(raw.get("micro_batch_size", raw.get("batch_size", 2))))
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    steps = args.steps if args.steps is not None else (20 if cuda else 5)
    use_compile = args.compile == "on" or (args.compile == "auto" and cuda)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    clock = args.clock if args.clock != "auto" else ("wall" if cuda else "cpu")
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)

    f_ret = cfg.flops_per_token(seq_len, with_retrieval=True)
    f_base = cfg.flops_per_token(seq_len, with_retrieval=False)
    print(f"config {args.config}: {cfg.num_params() / 1e6:.1f}M params, batch {batch} x {seq_len} tokens, "
          f"{f_ret / 1e9:.3f} GFLOP/token with retrieval ({f_ret / f_base:.2f}x without), device {device}")

    results: list[Result] = []
    for dtype in dtypes:
        bf16 = dtype == "bf16"
        if args.peak_tflops:
            peak = args.peak_tflops * 1e12
        elif cuda:
            peak = gpu_peak_flops(device, bf16)
        else:
            peak = cpu_peak_flops(torch.bfloat16 if bf16 else torch.float32, clock)
        print(f"{dtype}: peak {peak / 1e12 if peak else float('nan'):.2f} TFLOP/s "
              f"({'override' if args.peak_tflops else 'datasheet' if cuda else 'measured matmul'})")
        variants = [
            Variant("ours", lambda: RETRO(cfg), ours_loss, f_ret),
            Variant("ours-noretr", lambda: RETRO(cfg), lambda m, t, n: ours_loss(m, t, None), f_base),
        ]
        if use_compile:
            variants += [
                Variant("ours+compile", lambda: torch.compile(RETRO(cfg)), ours_loss, f_ret),
                Variant("ours-noretr+compile", lambda: torch.compile(RETRO(cfg)),
                        lambda m, t, n: ours_loss(m, t, None), f_base),
            ]
        if not args.no_peer:
            variants.append(Variant("retro-pytorch", lambda: build_peer(cfg, seq_len), peer_loss, f_ret))
        results += run_dtype(variants, cfg, batch, seq_len, bf16, device, warmup, steps, peak, clock)

    summary = ratios(results)
    print()
    print(table(results))
    print("\n".join(summary))
    if args.json:
        args.json.write_text(json.dumps({"results": [dataclasses.asdict(r) for r in results], "summary": summary}))
    if not args.no_docs:
        cfg_name = Path(args.config).stem
        cmd = "python benchmarks/bench_train_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
        body = "\n".join([
            f"## Training step: ours vs RETRO-pytorch 0.3.9 ({cfg_name}, {device.type})",
            "",
            f"- command: `{cmd.strip()}`",
            f"- machine: {machine(device)}",
            f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- shape: {display_path(args.config)} ({cfg.num_params() / 1e6:.1f}M params), batch {batch} x {seq_len} tokens, "
            f"k={cfg.num_neighbours}, chunk {cfg.chunk_size}; AdamW; bf16 = autocast with fp32 weights; "
            f"median of {steps} steps after {warmup} warm-up, "
            + ("wall clock" if clock == "wall" else
               "step time = process CPU seconds / torch threads (the shared machine's wall clock mostly "
               "measures the other users), variants interleaved step by step"),
            f"- MFU: model FLOPs {f_ret / 1e9:.3f} GFLOP/token with retrieval, {f_base / 1e9:.3f} without "
            f"(training step, full attention scores); peak = "
            f"{'datasheet dense TFLOP/s (fp32 = TF32)' if cuda else 'measured 2048^3 matmul on this CPU'}",
            "- memory: " + ("CUDA max_memory_allocated above the model-free baseline" if cuda else
                            "live malloc'ed bytes (glibc mallinfo2) above the baseline, sampled every 1 ms"),
            "",
            table(results),
            "",
            *summary,
        ])
        write_section(f"bench_train_step {cfg_name} {device.type}", body)
        print(f"\nwrote section to {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
