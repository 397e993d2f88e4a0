"""Train RETRO on one CPU, one GPU, or many GPUs across nodes, with the same command.

    python train.py --config configs/tiny.yaml --db DB --out RUN [--resume] [--set key=value ...]
    torchrun --nproc_per_node 8 train.py --config configs/small.yaml --db DB --out RUN
    torchrun --nnodes 2 --rdzv_id JOB --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        --nproc_per_node 8 train.py ...        # on every node (SLURM: README, "Many nodes")

Read top to bottom: the pieces, then the loop that calls them in nanoGPT's order. Setup
(``setup_trainer`` -> ``Trainer``): config, database checks, process group, model, optimizer;
every clear error (config/DB mismatch, a DB without neighbours, a batch that cannot split over
the ranks) comes before any compute. Resume (``start_state`` -> ``TrainState``) and data. Then
one iteration: ``train_step`` (warmup + cosine lr, grad accumulation, clipping), ``log_train``,
``log_eval`` (with and without retrieval), ``save`` (a checkpoint); ``train()`` is the loop.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from chunk_store import ChunkStore
from chunk_store.framework import runtime
from chunk_store.framework.errors import UserError, run_main
from chunk_store.framework.atomic import atomic_write_json
from retro import RETRO, RetroConfig
from retro import materialize
from retro.build import model_from_config
from retro.checkpoint import checkpoint_dir, init_from, load_checkpoint, save_checkpoint
from retro.run_layout import is_sharded
from retro.sharded_checkpoint import ShardedCheckpointer, load_sharded
from retro.dataset import RetroDataset, check_compatible
from retro.distributed import DistInfo, ShardedBatchSampler, all_reduce_sum, exit_process, setup, teardown, wrap_model
from retro.evaluate import autocast_for, compute_dtype, evaluate
from retro.frozen_base import FrozenBase, freeze_decoder, identify_base
from retro.metrics import MetricsLogger, lm_loss, peak_flops
from retro.retrieved_file import train_loader
from retro.run_layout import RunLayout
from retro.train_config import TrainConfig, load_config, load_yaml, merged, save_resolved


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train RETRO (python or torchrun; CPU, one or many GPUs).")
    p.add_argument("--config", help="configs/*.yaml (optional with --resume: RUN/config.yaml is used)")
    p.add_argument("--db", required=True, help="retrieval database directory (retro-build-index)")
    p.add_argument("--out", required=True, help="run directory: config.yaml, metrics.jsonl, checkpoints/")
    p.add_argument("--resume", action="store_true", help="continue RUN from its latest checkpoint")
    p.add_argument("--base", default=None, metavar="PATH",
                   help="with --resume of a RETRO-fit: its frozen base (init_from's checkpoint, or the "
                        "model.hf_decoder folder) moved here; checked against the recorded hash")
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
    if cfg.retrieval_dropout <= 0.0 or cfg.retrieval_dropout_unit != "step":
        return False
    return bool(np.random.default_rng([cfg.seed, step]).random() < cfg.retrieval_dropout)


def drop_chunk_neighbours(neighbours: torch.Tensor, cfg: TrainConfig, pad_id: int, step: int, rank: int,
                          micro: int) -> torch.Tensor:
    """``retrieval_dropout_unit: chunk``: each chunk's neighbours (b, l, k, r) become padding with
    probability retrieval_dropout, so CCA gives that chunk only its null slot and the decoder learns
    to predict it unaided, while the sequence's other chunks still train copying. A pure function
    of (seed, step, rank, micro-step): a resumed run drops the same chunks."""
    if cfg.retrieval_dropout <= 0.0 or cfg.retrieval_dropout_unit != "chunk":
        return neighbours
    rng = np.random.default_rng([cfg.seed, step, rank, micro])
    drop = torch.from_numpy(rng.random(neighbours.shape[:2]) < cfg.retrieval_dropout)
    return neighbours.masked_fill(drop[:, :, None, None].to(neighbours.device), pad_id)


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


def log(info: DistInfo, msg: str) -> None:
    """A line on stderr from rank 0 only, above the progress bar."""
    if info.is_main:
        tqdm.write(f"[train] {msg}", file=sys.stderr)


def every(interval: int, step: int) -> bool:
    """Whether ``step`` falls on an interval of ``interval`` steps; 0 means never."""
    return bool(interval) and step % interval == 0


# ----------------------------------------------------------------------------- setup


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, RetroConfig, dict[str, Any]]:
    """(training config, model config, model mapping) from --config and --set; with --resume from
    RUN/config.yaml, whose model settings a resume may not change."""
    run = Path(args.out)
    layout = RunLayout(run)
    saved = layout.config
    if run.exists() and not run.is_dir():
        raise UserError(f"--out {run} is a file, not a run directory")
    if getattr(args, "base", None) and not args.resume:
        raise UserError("--base is for --resume of a RETRO-fit whose base moved (a new run names its base "
                        "with init_from or model.hf_decoder)")
    if args.resume:
        if not saved.is_file() or not layout.latest.is_file():
            raise UserError(f"--resume: {run} has no {saved.name} and checkpoint to resume from")
        base = load_yaml(saved)
        if args.config:
            # the command that started the run, repeated: its --set model.* overrides count too
            requested = RetroConfig.from_dict(load_config(args.config, args.set)[1]).to_dict()
            saved_model = RetroConfig.from_dict(base.get("model") or {}).to_dict()  # new keys at defaults
            if requested != saved_model:
                diff = sorted(k for k in requested if requested[k] != saved_model[k])
                raise UserError(f"--resume: {args.config} has other model settings than {saved} ({diff})")
        tcfg, mdict = load_config(None, args.set, base=base)
        mcfg = RetroConfig.from_dict(mdict)
        if mcfg.to_dict() != RetroConfig.from_dict(base.get("model") or {}).to_dict():
            raise UserError("--resume cannot change model.* settings: start a new --out (or --set init_from=RUN)")
    else:
        if not args.config:
            raise UserError("--config is required (except with --resume)")
        if layout.latest.is_file():
            raise UserError(f"{run} already holds a run with checkpoints: pass --resume to continue it, or a new --out")
        tcfg, mdict = load_config(args.config, args.set)
        mcfg = RetroConfig.from_dict(mdict)
    return tcfg, mcfg, mcfg.to_dict()


def open_datasets(db: str, tcfg: TrainConfig, mcfg: RetroConfig) -> tuple[RetroDataset, RetroDataset | None, bool]:
    """The train and val splits, checked against the config before any compute.

    Returns (train, val or None when the val split has no sequences, whether to retrieve): a
    decoder-only run (retrieval_dropout=1, or no CCA layers) needs no neighbours in the DB.
    """
    train_store = ChunkStore.open(db, "train")
    val_store = ChunkStore.open(db, "val")
    for store in (train_store, val_store):
        check_compatible(store, mcfg, tcfg.seq_len)
    use_retrieval = tcfg.retrieval_dropout < 1.0 and bool(mcfg.resolved_cca_layers)
    reads = "random" if tcfg.neighbour_reads == "random" else "batched"  # the file itself is written batched
    train_ds = RetroDataset.for_model(train_store, "train", mcfg, retrieval=use_retrieval, reads=reads)
    val_ds = RetroDataset.for_model(val_store, "val", mcfg, retrieval=use_retrieval, reads=reads) \
        if len(val_store.seq_starts) else None
    return train_ds, val_ds, use_retrieval


def build_model(tcfg: TrainConfig, mcfg: RetroConfig, info: DistInfo, *, use_retrieval: bool,
                fresh: bool) -> tuple[RETRO, torch.nn.Module, torch.optim.Optimizer, FrozenBase | None]:
    """(model, wrapped, optimizer, frozen base): RETRO with the same initial weights on every rank
    (or init_from's, when ``fresh``), its decoder frozen when RETRO-fitting, wrapped for DDP /
    FSDP2 / torch.compile; AdamW over the parameters that train. The frozen base's identity
    (hashed here, once) when ``fresh``; a resume takes it from the checkpoint."""
    device = info.device
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # RETRO-fitting a pretrained HF decoder: frozen, it is held in bf16 on GPU
    frozen_bf16 = bool(mcfg.hf_decoder) and device.type == "cuda" and tcfg.freeze_decoder
    # a native RETRO is built on the meta device (no rank holds weights it does not need) and
    # materialised with the eager build's exact weights (retro.materialize): under FSDP2 after
    # fully_shard, each rank its shards only, unless init_from loads full weights into it first;
    # else once per rank, on its device. A RETRO-fit stays eager: from_pretrained loads its decoder.
    on_meta = not mcfg.hf_decoder
    shard_first = on_meta and tcfg.fsdp and info.distributed and not (tcfg.init_from and fresh)
    build = functools.partial(model_from_config, mcfg, dtype=torch.bfloat16 if frozen_bf16 else None,
                              activation_checkpointing=tcfg.activation_checkpointing)
    model = materialize.on_meta(build) if on_meta else build()
    if on_meta and not shard_first:
        materialize.materialize(model, device, tcfg.seed)
    if tcfg.init_from and fresh:
        got = init_from(model, tcfg.init_from)
        log(info, f"init_from {tcfg.init_from}: {got['loaded']} tensors loaded, {got['new']} new")
    if tcfg.freeze_decoder:
        n = freeze_decoder(model)
        log(info, f"freeze_decoder: training {n:,} encoder/CCA parameters only")
    frozen_base = identify_base(model, tcfg, mcfg) if fresh else None
    if not shard_first:
        model.to(device)
    wrapped: torch.nn.Module = model
    if tcfg.compile and not tcfg.fsdp:
        wrapped = torch.compile(model)
    # a step without neighbours leaves encoder/CCA unused (every step when retrieval_dropout=1,
    # the RETRO-fitting recipe's first stage): DDP must be told, or its second step fails
    wrapped = wrap_model(wrapped, info, fsdp=tcfg.fsdp, cpu_offload=tcfg.fsdp_cpu_offload,
                         find_unused_parameters=bool(mcfg.resolved_cca_layers) and tcfg.retrieval_dropout > 0)
    if shard_first:
        materialize.materialize(model, device, tcfg.seed)
    if tcfg.fsdp_cpu_offload and not info.distributed:
        log(info, "fsdp_cpu_offload: one process runs without FSDP2, so nothing is offloaded")
    if tcfg.compile and tcfg.fsdp:
        wrapped = torch.compile(wrapped)
    return model, wrapped, build_optimizer(model, tcfg, device), frozen_base


@dataclass
class Trainer:
    """What setup builds once and the loop only reads."""

    run: Path
    tcfg: TrainConfig
    mcfg: RetroConfig
    info: DistInfo  # this rank, the world size, the device
    grad_accum: int  # micro-steps per optimizer step on each rank
    train_ds: RetroDataset
    val_ds: RetroDataset | None  # None: the val split has no sequences, evaluation is skipped
    use_retrieval: bool
    model: RETRO  # the plain module: state dicts, optimizer groups, evaluation
    wrapped: torch.nn.Module  # what a training step calls (DDP, FSDP2 or compiled; else model)
    optimizer: torch.optim.Optimizer
    trainable: list[torch.nn.Parameter]  # what gradient clipping sees
    peak_flops: float | None  # MFU's denominator per rank; None where unknown (CPU)
    flops_per_token: dict[bool, float]  # a training step's, with (True) and without retrieval
    # a RETRO-fit's frozen base: its checkpoints then hold only what trains (retro.frozen_base)
    frozen_base: FrozenBase | None = None
    # checkpoint_format: sharded (retro.sharded_checkpoint); None: full checkpoints
    checkpointer: ShardedCheckpointer | None = None

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def last_step(self) -> int:
        """Where this invocation stops: max_steps, or stop_at if earlier (the schedule still
        ends at max_steps)."""
        return self.tcfg.max_steps if self.tcfg.stop_at is None else min(self.tcfg.max_steps, self.tcfg.stop_at)

    @property
    def tokens_per_step(self) -> int:
        return self.tcfg.batch_size * self.tcfg.seq_len


def setup_trainer(args: argparse.Namespace) -> Trainer:
    """Config, database, process group, model and optimizer. Every clear error (config/DB
    mismatch, a DB without neighbours, a batch that cannot split over the ranks) comes before the
    process group starts or any weight is built."""
    run = Path(args.out)
    tcfg, mcfg, mdict = resolve_config(args)
    if mcfg.hf_decoder:  # shape and vocabulary from the decoder and the DB's tokenizer (checked)
        from retro.hf_decoder import retrofit_config

        if args.resume and getattr(args, "base", None):  # the base decoder moved: the checkpoint's hash says it is the same
            mcfg = dataclasses.replace(mcfg, hf_decoder=getattr(args, "base", None))
        mcfg = retrofit_config(mcfg, ChunkStore.open(args.db, "train").tokenizer)
        mdict = mcfg.to_dict()
    grad_accum = tcfg.grad_accum_steps(runtime.world_size())
    train_ds, val_ds, use_retrieval = open_datasets(args.db, tcfg, mcfg)
    info = setup(tcfg.device)  # the process group (torchrun) and this rank's device
    if val_ds is None:
        log(info, "the val split has no sequences: evaluation is skipped")
    if tcfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError("tensorboard=true needs the tensorboard package: pip install '.[tensorboard]'")
    model, wrapped, optimizer, frozen_base = build_model(tcfg, mcfg, info, use_retrieval=use_retrieval, fresh=not args.resume)
    if info.is_main:  # after every refusal (init_from, tensorboard): a failed start leaves no RUN behind
        run.mkdir(parents=True, exist_ok=True)
        layout = RunLayout(run)
        save_resolved(layout.config, tcfg, mdict)
        # which database trained this run (retro.export's model card and tokenizer)
        atomic_write_json(layout.db_record, {"db": str(Path(args.db).resolve())})
        if mcfg.hf_decoder:
            from retro.hf_decoder import save_decoder_files

            save_decoder_files(mcfg, layout.decoder_dir)
    return Trainer(
        run=run, tcfg=tcfg, mcfg=mcfg, info=info, grad_accum=grad_accum, train_ds=train_ds, val_ds=val_ds,
        use_retrieval=use_retrieval, model=model, wrapped=wrapped, optimizer=optimizer,
        trainable=[p for p in model.parameters() if p.requires_grad],
        peak_flops=peak_flops(info.device, compute_dtype(info.device, tcfg.dtype)),
        flops_per_token={r: mcfg.flops_per_token(tcfg.seq_len, with_retrieval=r, frozen_decoder=tcfg.freeze_decoder)
                         for r in (True, False)},
        frozen_base=frozen_base,
        checkpointer=ShardedCheckpointer(run, async_save=tcfg.checkpoint_async)
        if tcfg.checkpoint_format == "sharded" else None,
    )


@dataclass
class TrainState:
    """What the loop advances: the step, the data position, and the current logging window."""

    step: int = 0  # optimizer steps taken
    position: int = 0  # micro-batches this rank has consumed: where a resumed sampler starts
    # the logging window: the steps since the last train_loss record
    window_steps: int = 0
    window_retrieval_steps: int = 0  # of which with neighbours (their FLOPs differ, for MFU)
    window_loss: torch.Tensor | float = 0.0  # summed on the device: no sync between log steps
    window_start: float = field(default_factory=time.perf_counter)
    last_record: dict[str, Any] = field(default_factory=dict)  # the latest metrics (the summary)

    def count_step(self, loss: torch.Tensor, with_neighbours: bool) -> None:
        self.step += 1
        self.window_steps += 1
        self.window_retrieval_steps += int(with_neighbours)
        self.window_loss += loss

    def restart_clock(self) -> None:
        """Evaluation and checkpoint time is not training throughput."""
        self.window_start = time.perf_counter()

    def new_window(self) -> None:
        self.window_steps, self.window_retrieval_steps, self.window_loss = 0, 0, 0.0
        self.restart_clock()


def resumed_position(data: dict[str, Any], info: DistInfo, micro_batch_size: int) -> int:
    """The checkpoint's data position, rescaled to sequences when the world size or micro-batch
    size changed (then the data order continues approximately, not exactly)."""
    position = int(data.get("position", 0))
    old = (data.get("world_size"), data.get("micro_batch_size"))
    if old != (info.world_size, micro_batch_size):
        seqs = position * (old[0] or 1) * (old[1] or micro_batch_size)
        position = seqs // (info.world_size * micro_batch_size)
        log(info, f"resuming with {info.world_size} rank(s) x {micro_batch_size} instead of "
                  f"{old[0]} x {old[1]}: data order continues approximately, not exactly")
    return position


def start_state(t: Trainer, resume: bool, base: str | None = None) -> TrainState:
    """Seed this rank's RNG streams (dropout); with ``resume``, load weights (a RETRO-fit's
    frozen base from its record, or ``base``), optimizer, RNG states, step and data position from
    RUN's latest checkpoint."""
    torch.manual_seed(t.tcfg.seed + t.info.rank)  # per-rank streams (dropout)
    np.random.seed((t.tcfg.seed + t.info.rank) % 2**32)
    if not resume:
        return TrainState()
    ckpt = checkpoint_dir(t.run)
    load = load_sharded if is_sharded(ckpt) else load_checkpoint  # either kind, whatever this run writes
    meta = load(ckpt, t.model, t.optimizer, base=base)
    if "frozen_base" in meta:  # a checkpoint with the full state (older RETRO-fits too) stays full
        t.frozen_base = FrozenBase.from_json(meta["frozen_base"], str(ckpt))
    state = TrainState(step=int(meta["step"]),
                       position=resumed_position(meta.get("data", {}), t.info, t.tcfg.micro_batch_size))
    log(t.info, f"resumed from {ckpt} at step {state.step}")
    return state


def data_stream(t: Trainer, position: int) -> tuple[ShardedBatchSampler, Iterator[dict[str, torch.Tensor]]]:
    """This rank's shard of the train split, reshuffled each epoch from the seed, from micro-batch
    ``position`` on (exact resume)."""
    tcfg = t.tcfg
    sampler = ShardedBatchSampler(len(t.train_ds), tcfg.micro_batch_size, t.info.rank, t.info.world_size,
                                  seed=tcfg.seed, start=position)
    loader = train_loader(t.train_ds, sampler, mode=tcfg.neighbour_reads, device=t.device,
                          num_workers=tcfg.num_workers, prefetch_factor=tcfg.prefetch_factor,
                          persistent_workers=tcfg.persistent_workers, seed=tcfg.seed,
                          directory=tcfg.retrieved_dir or RunLayout(t.run).retrieved)
    return sampler, iter(loader)


# ----------------------------------------------------------------------------- step, log, eval, checkpoint


def forward_backward(t: Trainer, batch: dict[str, torch.Tensor], with_neighbours: bool, sync: bool,
                     scale: float) -> torch.Tensor:
    """One micro-batch: forward under autocast, summed loss x ``scale``, backward. Gradients are
    reduced across ranks only when ``sync`` (the last micro-step). Returns the scaled loss."""
    tokens = batch["tokens"].to(t.device, non_blocking=True)
    nbrs = batch["neighbours"].to(t.device, non_blocking=True) if with_neighbours else None
    if t.tcfg.fsdp and t.info.distributed:  # FSDP2: reduce-scatter only on the last micro-step
        t.model.set_requires_gradient_sync(sync)
    ddp = t.info.distributed and not t.tcfg.fsdp
    with t.wrapped.no_sync() if ddp and not sync else contextlib.nullcontext():
        with autocast_for(t.device, t.tcfg.dtype):
            logits = t.wrapped(tokens[:, :-1], nbrs)
        loss = lm_loss(logits, tokens[:, 1:], t.mcfg.pad_id, reduction="sum") * scale
        loss.backward()
    return loss.detach()


def loss_scale(t: Trainer, micro_batches: list[dict[str, torch.Tensor]]) -> float:
    """world_size / (non-pad target tokens of the whole optimizer step, every micro-batch of every
    rank): summed losses times this give, after DDP's / FSDP's mean over ranks, the mean over all
    the step's tokens, so how padded sequences are grouped into micro-batches and ranks does not
    change the gradient (a mean of per-micro-batch means would). One small all-reduce per step."""
    local = sum(int((b["tokens"][:, 1:] != t.mcfg.pad_id).sum()) for b in micro_batches)
    total = all_reduce_sum([float(local)], t.device)[0]
    return t.info.world_size / max(total, 1.0)


def train_step(t: Trainer, state: TrainState, batches: Iterator[dict[str, torch.Tensor]]) -> float:
    """One optimizer step: the scheduled lr, grad_accum micro-batches (all with neighbours or,
    under retrieval dropout, all without), clipping, AdamW. Returns the step's lr."""
    lr = lr_at(state.step, t.tcfg)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    with_nbrs = t.use_retrieval and not drops_retrieval(state.step, t.tcfg)
    step_loss = torch.zeros((), device=t.device)
    micro_batches = [next(batches) for _ in range(t.grad_accum)]
    state.position += t.grad_accum
    scale = loss_scale(t, micro_batches)
    for micro, batch in enumerate(micro_batches):
        if with_nbrs:
            batch = {**batch, "neighbours": drop_chunk_neighbours(batch["neighbours"], t.tcfg, t.mcfg.pad_id,
                                                                  state.step, t.info.rank, micro)}
        step_loss += forward_backward(t, batch, with_nbrs, sync=micro == t.grad_accum - 1, scale=scale)
    if t.tcfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(t.trainable, t.tcfg.grad_clip)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    state.count_step(step_loss, with_nbrs)
    return lr


def log_train(t: Trainer, state: TrainState, lr: float, metrics: MetricsLogger, pbar: tqdm | None) -> None:
    """Close the logging window: its mean train loss over every rank, tokens/s and MFU."""
    steps, ret_steps = state.window_steps, state.window_retrieval_steps
    mean_loss = all_reduce_sum([float(state.window_loss) / steps], t.device)[0] / t.info.world_size
    tok_s = t.tokens_per_step * steps / (time.perf_counter() - state.window_start)
    flops = (ret_steps * t.flops_per_token[True] + (steps - ret_steps) * t.flops_per_token[False]) / steps
    mfu = flops * tok_s / (t.peak_flops * t.info.world_size) if t.peak_flops else None
    state.last_record = {"step": state.step, "train_loss": mean_loss, "lr": lr, "tokens_per_s": tok_s,
                         "mfu": mfu, "tokens": state.step * t.tokens_per_step}
    metrics.log(state.last_record)
    if pbar is not None:
        pbar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tok_s:,.0f}",
                         mfu=f"{100 * mfu:.1f}%" if mfu is not None else "n/a", refresh=False)
    state.new_window()


def evaluate_val(t: Trainer) -> dict[str, Any]:
    """Val loss and bits per byte with and without retrieval, every rank its shard ({} without a
    val split); eval_batches micro-batches per rank, 0 for the whole split."""
    if t.val_ds is None:
        return {}
    mb, world = t.tcfg.micro_batch_size, t.info.world_size
    res = evaluate(t.model, t.val_ds, device=t.device, micro_batch_size=mb,
                   max_sequences=t.tcfg.eval_batches * mb * world or None, rank=t.info.rank, world_size=world,
                   dtype=t.tcfg.dtype, retrieval=t.use_retrieval)
    return {"val_loss": res.loss, "val_bpb": res.bits_per_byte,
            "val_loss_no_retrieval": res.loss_no_retrieval, "val_bpb_no_retrieval": res.bits_per_byte_no_retrieval,
            "val_tokens": res.tokens}


def log_eval(t: Trainer, state: TrainState, metrics: MetricsLogger) -> None:
    """Evaluate, record the numbers (also in the run's summary) and say them on stderr."""
    ev = evaluate_val(t)
    if ev:
        metrics.log({"step": state.step, **ev})
        state.last_record.update(ev)
        with_ = f"{ev['val_bpb']:.4f} with retrieval, " if t.use_retrieval else ""
        log(t.info, f"step {state.step}: val bpb {with_}{ev['val_bpb_no_retrieval']:.4f} without")
    state.restart_clock()


def save(t: Trainer, state: TrainState, sampler: ShardedBatchSampler) -> None:
    """A checkpoint with all an exact resume needs: weights, optimizer, every rank's RNG (in
    save_checkpoint), the schedule, the data position and the resolved config."""
    extra = {"data": {"position": state.position, "epoch": sampler.epoch_of(state.position),
                      "world_size": t.info.world_size, "micro_batch_size": t.tcfg.micro_batch_size},
             "scheduler": {"kind": "warmup_cosine", "step": state.step, "lr": lr_at(state.step, t.tcfg)},
             "config": merged(t.tcfg, t.mcfg.to_dict())}
    if t.checkpointer is not None:  # sharded: every rank writes its part (async: in a thread)
        path: Path | None = t.checkpointer.save(state.step, t.model, t.optimizer, extra, frozen_base=t.frozen_base)
        log(t.info, f"checkpoint {path}{' (being written)' if t.checkpointer.pending else ''}")
    else:
        path = save_checkpoint(t.run, state.step, t.model, t.optimizer, extra, frozen_base=t.frozen_base)
        if path is not None:
            log(t.info, f"checkpoint {path}")
    state.restart_clock()


def finish_checkpoints(t: Trainer, failed: bool) -> None:
    """Wait for an asynchronous checkpoint still being written (and join its thread), so that
    training never ends with a save lost or a writer thread alive at exit. After a failure, the
    first error is the one that propagates."""
    if t.checkpointer is None:
        return
    if failed:
        with contextlib.suppress(Exception):
            t.checkpointer.close()
        return
    path = t.checkpointer.close()
    if path is not None:
        log(t.info, f"checkpoint {path} written")


# ----------------------------------------------------------------------------- the loop


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or resume) one run; returns the last metrics record on rank 0, {} elsewhere."""
    t = setup_trainer(args)
    tcfg, info = t.tcfg, t.info
    state = start_state(t, resume=args.resume, base=getattr(args, "base", None))
    metrics = MetricsLogger(t.run, enabled=info.is_main, resume_step=state.step if args.resume else None,
                            tensorboard=tcfg.tensorboard)
    sampler, batches = data_stream(t, state.position)
    log(info, f"{t.model.num_params():,} parameters, {info.world_size} rank(s) on {t.device}, "
              f"grad_accum={t.grad_accum}, {len(t.train_ds)} train / {len(t.val_ds) if t.val_ds else 0} val "
              f"sequences, retrieval={t.use_retrieval}")
    last_step = t.last_step
    pbar = tqdm(total=last_step, initial=state.step, desc="train", dynamic_ncols=True,
                file=sys.stderr) if info.is_main else None
    t.model.train()
    state.restart_clock()
    try:
        while state.step < last_step:
            lr = train_step(t, state, batches)
            final = state.step == last_step
            if every(tcfg.log_every, state.step) or final:
                log_train(t, state, lr, metrics, pbar)
            if pbar is not None:
                pbar.update(1)
            if every(tcfg.eval_every, state.step) or state.step == tcfg.max_steps:
                log_eval(t, state, metrics)
            if every(tcfg.checkpoint_every, state.step) or final:
                save(t, state, sampler)
    except BaseException:
        finish_checkpoints(t, failed=True)
        raise
    finish_checkpoints(t, failed=False)
    if pbar is not None:
        pbar.close()
    del batches  # stops the DataLoader's workers
    metrics.close()
    return {"step": state.step, **state.last_record} if info.is_main else {}


def print_summary(summary: dict[str, Any]) -> None:
    """The last record as one JSON line on stdout (rank 0 only: other ranks return {})."""
    if summary:
        print(json.dumps(summary, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main("train.py", lambda: print_summary(train(args)), cleanup=teardown,
                    interrupted="interrupted; re-run with --resume to continue from the last checkpoint")


if __name__ == "__main__":
    exit_process(main)  # os._exit after a process group: see there (issue 22's crash at exit)
