"""Train RETRO on one CPU, one GPU, or many GPUs across nodes, with the same command.

    python train.py --config configs/tiny.yaml --db DB --out RUN [--resume] [--set key=value ...]
    torchrun --nproc_per_node 8 train.py --config configs/small.yaml --db DB --out RUN
    torchrun --nnodes 2 --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        --nproc_per_node 8 train.py ...

Read top to bottom (as nanoGPT): config -> process group -> database checks -> model ->
optimizer -> resume -> data -> loop (grad accumulation, clipping, warmup + cosine) -> logging,
evaluation with and without retrieval, checkpoints. Every clear error (config/DB mismatch, a DB
without neighbours, a batch that cannot split over the ranks) comes before any compute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from chunk_store import ChunkStore, runtime
from chunk_store.errors import UserError, run_main
from retro import RETRO, RetroConfig
from retro.checkpoint import (CKPT_DIR, LATEST, checkpoint_dir, load_checkpoint, load_weights,
                              save_checkpoint)
from retro.dataset import RetroDataset, check_compatible, collate
from retro.distributed import DistInfo, ShardedBatchSampler, all_reduce_sum, setup, teardown, wrap_model
from retro.evaluate import autocast_for, evaluate
from retro.metrics import MetricsLogger, lm_loss, peak_flops
from retro.train_config import TrainConfig, load_config, load_yaml, save_resolved

# parameter-name components that belong to retrieval (trained when RETRO-fitting)
RETRIEVAL_PARTS = frozenset({"encoder", "enc_in", "cca", "cca_norm"})


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train RETRO (python or torchrun; CPU, one or many GPUs).")
    p.add_argument("--config", help="configs/*.yaml (optional with --resume: RUN/config.yaml is used)")
    p.add_argument("--db", required=True, help="retrieval database directory (retro-build-index)")
    p.add_argument("--out", required=True, help="run directory: config.yaml, metrics.jsonl, checkpoints/")
    p.add_argument("--resume", action="store_true", help="continue RUN from its latest checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, nested with dots (repeatable): --set model.dim=256")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- helpers


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step >= cfg.max_steps:
        return cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def drops_retrieval(step: int, cfg: TrainConfig) -> bool:
    """Whether optimizer step ``step`` trains without neighbours: a pure function of (seed, step),
    so every rank and every micro-step agree and a resumed run makes the same choices."""
    if cfg.retrieval_dropout <= 0.0:
        return False
    return bool(np.random.default_rng([cfg.seed, step]).random() < cfg.retrieval_dropout)


def is_retrieval_param(name: str) -> bool:
    return bool(RETRIEVAL_PARTS.intersection(name.split(".")))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases (ndim < 2) and embeddings (tied output head included)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embedding_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda" and not cfg.fsdp
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def init_from(model: torch.nn.Module, path: str) -> dict[str, int]:
    """Load a (decoder-only) checkpoint's weights; only retrieval parameters may be missing."""
    weights = load_weights(checkpoint_dir(path))
    own = model.state_dict()
    unexpected = sorted(set(weights) - set(own))
    if unexpected:
        raise UserError(f"init_from {path}: weights the model does not have: {unexpected[:5]}")
    bad = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in weights if weights[k].shape != own[k].shape]
    if bad:
        raise UserError(f"init_from {path}: shape mismatch (checkpoint vs model): {bad[:3]}")
    missing = sorted(k for k in set(own) - set(weights) if not is_retrieval_param(k))
    if missing:
        raise UserError(f"init_from {path}: the checkpoint lacks decoder weights {missing[:5]}")
    model.load_state_dict(weights, strict=False)
    return {"loaded": len(weights), "new": len(set(own) - set(weights))}


def freeze_decoder(model: torch.nn.Module) -> int:
    """RETRO-fitting (paper section 4.4): train only the neighbour encoder and CCA blocks."""
    trainable = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_retrieval_param(name))
        trainable += p.numel() if p.requires_grad else 0
    if trainable == 0:
        raise UserError("freeze_decoder=true but the model has no encoder/CCA parameters to train")
    return trainable


def log(info: DistInfo, msg: str) -> None:
    if info.is_main:
        from tqdm import tqdm

        tqdm.write(f"[train] {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------- main


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, RetroConfig, dict[str, Any]]:
    run = Path(args.out)
    saved = run / "config.yaml"
    if args.resume:
        if not saved.is_file() or not (run / CKPT_DIR / LATEST).is_file():
            raise UserError(f"--resume: {run} has no config.yaml and checkpoint to resume from")
        base = load_yaml(saved)
        if args.config:
            requested = RetroConfig.from_dict(load_yaml(args.config)).to_dict()
            if requested != base.get("model"):
                diff = sorted(k for k in requested if requested[k] != base["model"].get(k))
                raise UserError(f"--resume: {args.config} has other model settings than {saved} ({diff})")
        tcfg, mdict = load_config(None, args.set, base=base)
        mcfg = RetroConfig.from_dict(mdict)
        if mcfg.to_dict() != base.get("model"):
            raise UserError("--resume cannot change model.* settings: start a new --out (or --set init_from=RUN)")
    else:
        if not args.config:
            raise UserError("--config is required (except with --resume)")
        if (run / CKPT_DIR / LATEST).is_file():
            raise UserError(f"{run} already holds a run with checkpoints: pass --resume to continue it, or a new --out")
        tcfg, mdict = load_config(args.config, args.set)
        mcfg = RetroConfig.from_dict(mdict)
    return tcfg, mcfg, mcfg.to_dict()


def train(args: argparse.Namespace) -> dict[str, Any]:
    run = Path(args.out)
    tcfg, mcfg, mdict = resolve_config(args)
    grad_accum = tcfg.grad_accum_steps(runtime.world_size())

    # --- the database, checked before any compute
    train_store = ChunkStore.open(args.db, "train")
    val_store = ChunkStore.open(args.db, "val")
    for store in (train_store, val_store):
        check_compatible(store, mcfg, tcfg.seq_len)
    use_retrieval = tcfg.retrieval_dropout < 1.0 and bool(mcfg.resolved_cca_layers)
    k = mcfg.num_neighbours
    train_ds = RetroDataset(train_store, "train", k=k, retrieval=use_retrieval)
    val_ds = RetroDataset(val_store, "val", k=k, retrieval=use_retrieval) if len(val_store.seq_starts) else None
    info = setup(tcfg.device)  # the process group (torchrun) and this rank's device
    device = info.device
    if val_ds is None:
        log(info, "the val split has no sequences: evaluation is skipped")
    if info.is_main:
        run.mkdir(parents=True, exist_ok=True)
        save_resolved(run / "config.yaml", tcfg, mdict)

    # --- model and optimizer
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = RETRO(mcfg)
    if tcfg.init_from and not args.resume:
        got = init_from(model, tcfg.init_from)
        log(info, f"init_from {tcfg.init_from}: {got['loaded']} tensors loaded, {got['new']} new")
    if tcfg.freeze_decoder:
        n = freeze_decoder(model)
        log(info, f"freeze_decoder: training {n:,} encoder/CCA parameters only")
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    wrapped = model
    if tcfg.compile and not tcfg.fsdp:
        wrapped = torch.compile(model)
    # a step without neighbours leaves encoder/CCA unused: DDP must be told
    wrapped = wrap_model(wrapped, info, fsdp=tcfg.fsdp,
                         find_unused_parameters=use_retrieval and tcfg.retrieval_dropout > 0)
    if tcfg.compile and tcfg.fsdp:
        wrapped = torch.compile(wrapped)
    optimizer = build_optimizer(model, tcfg, device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # --- resume: weights, optimizer, RNG, step, data position
    step, position = 0, 0
    torch.manual_seed(tcfg.seed + info.rank)  # per-rank streams (dropout)
    np.random.seed((tcfg.seed + info.rank) % 2**32)
    if args.resume:
        ckpt = checkpoint_dir(run)
        meta = load_checkpoint(ckpt, model, optimizer)
        step = int(meta["step"])
        data = meta.get("data", {})
        position = int(data.get("position", 0))
        old = (data.get("world_size"), data.get("micro_batch_size"))
        if old != (info.world_size, tcfg.micro_batch_size):
            seqs = position * (old[0] or 1) * (old[1] or tcfg.micro_batch_size)
            position = seqs // (info.world_size * tcfg.micro_batch_size)
            log(info, f"resuming with {info.world_size} rank(s) x {tcfg.micro_batch_size} instead of "
                      f"{old[0]} x {old[1]}: data order continues approximately, not exactly")
        log(info, f"resumed from {ckpt} at step {step}")
    metrics = MetricsLogger(run, enabled=info.is_main, resume_step=step if args.resume else None,
                            tensorboard=tcfg.tensorboard)

    # --- data: each rank its shard, reshuffled each epoch from the seed, resumable
    sampler = ShardedBatchSampler(len(train_ds), tcfg.micro_batch_size, info.rank, info.world_size,
                                  seed=tcfg.seed, start=position)
    loader = torch.utils.data.DataLoader(
        train_ds, batch_sampler=sampler, num_workers=tcfg.num_workers, collate_fn=collate,
        pin_memory=device.type == "cuda", prefetch_factor=4 if tcfg.num_workers else None,
        generator=torch.Generator().manual_seed(tcfg.seed))  # keeps the global RNG untouched
    batches = iter(loader)

    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    peak = peak_flops(device)
    fpt = {r: mcfg.flops_per_token(tcfg.seq_len, with_retrieval=r) for r in (True, False)}
    log(info, f"{n_params:,} parameters, {info.world_size} rank(s) on {device}, grad_accum={grad_accum}, "
              f"{len(train_ds)} train / {len(val_ds) if val_ds else 0} val sequences, retrieval={use_retrieval}")

    def run_eval() -> dict[str, Any]:
        if val_ds is None:
            return {}
        max_seq = tcfg.eval_batches * tcfg.micro_batch_size * info.world_size or None
        res = evaluate(model, val_ds, device=device, micro_batch_size=tcfg.micro_batch_size,
                       max_sequences=max_seq, rank=info.rank, world_size=info.world_size, dtype=tcfg.dtype,
                       retrieval=use_retrieval)
        return {"val_loss": res.loss, "val_bpb": res.bits_per_byte,
                "val_loss_no_retrieval": res.loss_no_retrieval, "val_bpb_no_retrieval": res.bits_per_byte_no_retrieval,
                "val_tokens": res.tokens}

    def checkpoint() -> None:
        state = {"data": {"position": position, "epoch": sampler.epoch_of(position),
                          "world_size": info.world_size, "micro_batch_size": tcfg.micro_batch_size},
                 "scheduler": {"kind": "warmup_cosine", "step": step, "lr": lr_at(step, tcfg)},
                 "config": {**tcfg.to_dict(), "model": mdict}}
        path = save_checkpoint(run, step, model, optimizer, state)
        if path is not None:
            log(info, f"checkpoint {path}")

    last_step = tcfg.max_steps if tcfg.stop_at is None else min(tcfg.max_steps, tcfg.stop_at)
    pbar = None
    if info.is_main:
        from tqdm import tqdm

        pbar = tqdm(total=last_step, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)
    ddp = info.distributed and not tcfg.fsdp
    model.train()
    t_last, steps_since, loss_since, ret_steps = time.perf_counter(), 0, 0.0, 0
    last_record: dict[str, Any] = {}
    while step < last_step:
        lr = lr_at(step, tcfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with_nbrs = use_retrieval and not drops_retrieval(step, tcfg)
        step_loss = torch.zeros((), device=device)
        for micro in range(grad_accum):
            batch = next(batches)
            position += 1
            tokens = batch["tokens"].to(device, non_blocking=True)
            nbrs = batch["neighbours"].to(device, non_blocking=True) if with_nbrs else None
            last_micro = micro == grad_accum - 1
            if tcfg.fsdp and info.distributed:  # FSDP2: reduce-scatter only on the last micro-step
                model.set_requires_gradient_sync(last_micro)
            sync = wrapped.no_sync() if ddp and not last_micro else contextlib.nullcontext()
            with sync:
                with autocast_for(device, tcfg.dtype):
                    logits = wrapped(tokens[:, :-1], nbrs)
                loss = lm_loss(logits, tokens[:, 1:], mcfg.pad_id) / grad_accum
                loss.backward()
            step_loss += loss.detach()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, tcfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_since += 1
        ret_steps += int(with_nbrs)
        loss_since += step_loss  # stays on device: no sync between log steps

        final = step == last_step
        if step % tcfg.log_every == 0 or final:
            mean_loss = all_reduce_sum([float(loss_since) / steps_since], device)[0] / info.world_size
            dt = time.perf_counter() - t_last
            tok_s = tokens_per_step * steps_since / dt
            flops = (ret_steps * fpt[True] + (steps_since - ret_steps) * fpt[False]) / steps_since
            mfu = flops * tok_s / (peak * info.world_size) if peak else None
            last_record = {"step": step, "train_loss": mean_loss, "lr": lr, "tokens_per_s": tok_s,
                           "mfu": mfu, "tokens": step * tokens_per_step}
            metrics.log(last_record)
            if pbar is not None:
                pbar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tok_s:,.0f}",
                                 mfu=f"{100 * mfu:.1f}%" if mfu is not None else "n/a", refresh=False)
            t_last, steps_since, loss_since, ret_steps = time.perf_counter(), 0, 0.0, 0
        if pbar is not None:
            pbar.update(1)
        if (tcfg.eval_every and step % tcfg.eval_every == 0) or step == tcfg.max_steps:
            ev = run_eval()
            if ev:
                metrics.log({"step": step, **ev})
                last_record.update(ev)
                log(info, f"step {step}: val bpb {ev['val_bpb']:.4f} with retrieval, "
                          f"{ev['val_bpb_no_retrieval']:.4f} without")
            t_last = time.perf_counter()  # evaluation time is not training throughput
        if (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0) or final:
            checkpoint()
            t_last = time.perf_counter()
    if pbar is not None:
        pbar.close()
    del batches
    metrics.close()
    return {"step": step, **last_record} if info.is_main else {}


def print_summary(summary: dict[str, Any]) -> None:
    """The last record as one JSON line on stdout (rank 0 only: other ranks return {})."""
    if summary:
        print(json.dumps(summary, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main("train.py", lambda: print_summary(train(args)), cleanup=teardown,
                    interrupted="interrupted; re-run with --resume to continue from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
