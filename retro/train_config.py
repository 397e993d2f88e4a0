"""Training settings: the top-level keys of configs/*.yaml, and `--set key=value` overrides.

A config file holds training keys at the top level and the model's keys under ``model:``
(read by ``RetroConfig``). Training keys live in one dataclass so that a typo in a YAML file
or a ``--set`` fails before any compute, naming the key, instead of being silently ignored.
"""

from __future__ import annotations

import copy
import math
import dataclasses
import os
import re
import typing
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import yaml

from chunk_store.framework.errors import UserError
from chunk_store.framework.atomic import atomic_write_bytes
from retro.config import load_yaml


@dataclass
class TrainConfig:
    """Every training setting; the defaults are a sane small CPU run."""

    seq_len: int = 512
    batch_size: int = 16  # sequences per optimizer step, summed over all ranks
    micro_batch_size: int = 8  # sequences per forward pass on one rank (grad accumulation fills the rest)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    max_steps: int = 1000  # the cosine schedule ends here
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    betas: tuple[float, float] = (0.9, 0.95)
    eval_every: int = 200  # 0: evaluate only at the end
    eval_batches: int = 8  # micro-batches per rank at each evaluation (0: the whole val split)
    checkpoint_every: int = 200  # 0: checkpoint only at the end
    checkpoint_format: str = "full"  # full: rank 0 writes safetensors | sharded: every rank its DCP shards
    checkpoint_async: bool = False  # sharded only: write in a thread while training goes on
    log_every: int = 10
    seed: int = 1337
    compile: bool = False
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    num_workers: int | None = None  # DataLoader worker processes per rank (0: the main process; null: 2 on CUDA, 0 on CPU)
    prefetch_factor: int = 4  # micro-batches each worker reads ahead
    persistent_workers: bool = True  # keep the workers (and their open memmaps) between epochs
    neighbour_reads: str = "batched"  # random | batched | sequential_file (Lustre/Ceph: docs/BENCHMARKS.md, bench_loader)
    retrieved_dir: str | None = None  # sequential_file's per-epoch files (null: RUN/retrieved)
    freeze_decoder: bool = False  # RETRO-fitting: train only the neighbour encoder and CCA
    init_from: str | None = None  # RUN dir or checkpoint dir whose weights start this run
    fsdp: bool = False  # FSDP2 fully_shard instead of DDP (models that do not fit one GPU)
    fsdp_cpu_offload: bool = False  # fsdp only: parameters, gradients and optimizer state live in CPU memory (FSDP2 CPUOffloadPolicy)
    activation_checkpointing: bool = False  # recompute each decoder block's and the encoder's activations in backward
    tensorboard: bool = False  # also write RUN/tensorboard/ (needs the tensorboard package)
    retrieval_dropout: float = 0.0  # probability that a whole optimizer step (or a chunk) trains without neighbours
    retrieval_dropout_unit: str = "step"  # step: whole optimizer steps; chunk: each chunk of each sequence on its own
    stop_at: int | None = None  # stop (with a checkpoint) after this step; the schedule still ends at max_steps
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun, cuda means cuda:LOCAL_RANK)

    def __post_init__(self) -> None:
        try:  # YAML gives a list
            self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        except (TypeError, ValueError):
            raise UserError(f"config: betas must be two numbers in [0, 1), got {self.betas!r}") from None
        self.validate()

    def validate(self) -> None:
        """One-line errors for values that could only fail later, mid-run."""
        floats = ("lr", "min_lr", "weight_decay", "grad_clip", "retrieval_dropout")
        for name in floats:  # NaN and inf compare False/True in ways the checks below miss
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"config: {name} must be a finite number, not {getattr(self, name)}")
        checks = [
            (self.seq_len > 0, "seq_len must be > 0"),
            (self.batch_size > 0, "batch_size must be > 0"),
            (self.micro_batch_size > 0, "micro_batch_size must be > 0"),
            (self.lr > 0 and self.min_lr >= 0, "lr must be > 0 and min_lr >= 0"),
            (self.min_lr <= self.lr, f"min_lr={self.min_lr} must be <= lr={self.lr}"),
            (self.max_steps > 0, "max_steps must be > 0"),
            (0 <= self.warmup_steps <= self.max_steps, f"warmup_steps={self.warmup_steps} must be in [0, max_steps={self.max_steps}]"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas must be two numbers in [0, 1)"),
            (self.grad_clip >= 0, "grad_clip must be >= 0"),
            (self.eval_every >= 0 and self.checkpoint_every >= 0, "eval_every/checkpoint_every must be >= 0"),
            (self.eval_batches >= 0, "eval_batches must be >= 0"),
            (self.log_every > 0, "log_every must be > 0"),
            (self.num_workers is None or self.num_workers >= 0, "num_workers must be >= 0 or null"),
            (self.prefetch_factor > 0, "prefetch_factor must be > 0"),
            (self.neighbour_reads in ("random", "batched", "sequential_file"),
             f"neighbour_reads must be random, batched or sequential_file, not {self.neighbour_reads!r}"),
            (self.dtype in ("auto", "float32", "bfloat16"), f"dtype must be auto, float32 or bfloat16, not {self.dtype!r}"),
            (0.0 <= self.retrieval_dropout <= 1.0, "retrieval_dropout must be in [0, 1]"),
            (self.retrieval_dropout_unit in ("step", "chunk"),
             f"retrieval_dropout_unit must be step or chunk, not {self.retrieval_dropout_unit!r}"),
            (not (self.freeze_decoder and self.retrieval_dropout > 0),
             "retrieval_dropout needs a decoder that trains: with freeze_decoder a step without neighbours "
             "has nothing to train (set retrieval_dropout: 0)"),
            (self.stop_at is None or self.stop_at > 0, "stop_at must be > 0 or null"),
            (self.checkpoint_format in ("full", "sharded"),
             f"checkpoint_format must be full or sharded, not {self.checkpoint_format!r}"),
            (not self.checkpoint_async or self.checkpoint_format == "sharded",
             "checkpoint_async needs checkpoint_format: sharded"),
            (not self.fsdp_cpu_offload or self.fsdp, "fsdp_cpu_offload needs fsdp: true (it is FSDP2's CPU offload)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"config: {msg}")

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step; refuses a batch that cannot split over the ranks."""
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise UserError(
                f"config: batch_size={self.batch_size} cannot split over {world_size} rank(s) x "
                f"micro_batch_size={self.micro_batch_size}: it must be a multiple of {per_step}"
            )
        return self.batch_size // per_step

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_TYPES = typing.get_type_hints(TrainConfig)


def _coerce(key: str, value: Any) -> Any:
    """Numbers written as strings in YAML files ('3e-4') become numbers; wrong types are errors."""
    kind = _TYPES[key]
    if value is None or kind is Any:
        return value
    if kind is float or float in typing.get_args(kind):
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    if kind is int or int in typing.get_args(kind):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if kind is bool and isinstance(value, bool):
        return value
    if kind is str or str in typing.get_args(kind):
        if isinstance(value, str):
            return value
    if key == "betas" and isinstance(value, (list, tuple)):
        return value
    raise UserError(f"config: {key}={value!r} has the wrong type (expected {kind})")


def parse_override(item: str) -> tuple[list[str], Any]:
    """'model.dim=256' -> (['model', 'dim'], 256); values are parsed as YAML scalars/lists."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise UserError(f"--set {key}: cannot parse value {raw!r}: {' '.join(str(e).split())}") from None
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads '2e-3' (no dot) as a string
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key.sub=value`` applied (nested mappings created)."""
    out = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise UserError(f"--set {item}: {part!r} is not a mapping")
            node = nxt
        node[path[-1]] = value
    return out


def split_config(data: Mapping[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """A full config mapping -> (TrainConfig, model mapping); unknown top-level keys are errors."""
    data = dict(data)
    model = data.pop("model", None) or {}
    if not isinstance(model, dict):
        raise UserError("config: 'model' must be a mapping")
    unknown = sorted(set(data) - TRAIN_KEYS)
    if unknown:
        raise UserError(
            f"config: unknown training key(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(TRAIN_KEYS))}; model keys go under 'model:')"
        )
    data = {k: _coerce(k, v) for k, v in data.items()}
    try:
        train = TrainConfig(**data)
    except TypeError as e:
        raise UserError(f"config: {e}") from None
    return train, dict(model)


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """Read a YAML file (or start from ``base``), apply ``--set`` overrides, validate."""
    data = dict(base) if base is not None else load_yaml(path) if path is not None else {}
    return split_config(apply_overrides(data, overrides))


def merged(train: TrainConfig, model: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config as one mapping, the layout of configs/*.yaml."""
    return {**train.to_dict(), "model": dict(model)}


def save_resolved(path: str | os.PathLike, train: TrainConfig, model: Mapping[str, Any]) -> None:
    """Write RUN/config.yaml atomically: what the run actually used, reloadable by load_config."""
    text = yaml.safe_dump(merged(train, model), sort_keys=False)
    atomic_write_bytes(path, text.encode())
