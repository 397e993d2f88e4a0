"""The names of a training run's folder, spelt here only (tests/test_house.py checks).

A run folder (``train.py --out RUN``) holds::

    RUN/config.yaml         the resolved config the run used (reloadable by load_config)
    RUN/metrics.jsonl       one JSON record per train / eval event
    RUN/tensorboard/        TensorBoard scalars (tensorboard: true)
    RUN/db.json             which database the run trained on (retro.export's card and tokenizer)
    RUN/hf_decoder/         a RETRO-fit's base decoder: its config.json and tokenizer files
    RUN/checkpoints/latest  the name of the newest checkpoint folder
    RUN/checkpoints/step_XXXXXXXX/{model.safetensors, optimizer.safetensors, state.json}
                            (a RETRO-fit's: only the trained tensors; state.json names its frozen base)
    RUN/checkpoints/step_XXXXXXXX/{dcp/, state.json}
                            a sharded checkpoint (checkpoint_format: sharded): dcp/ is a
                            torch.distributed.checkpoint folder, every rank's files and .metadata
    RUN/checkpoints/.partial-step_XXXXXXXX/  a checkpoint being written (never read; see retro.sharded_checkpoint)
    RUN/loss.png            retro.plot's loss curves (leakage.png: beside an evaluate JSON)
    RUN/retrieved/          per-epoch retrieved-tokens files (neighbour_reads: sequential_file)

Like ``chunk_store.layout`` for a database: one place to read what a folder holds, so that a
reader and a writer cannot disagree on a name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from chunk_store.framework.errors import UserError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
DB_RECORD = "db.json"
DECODER_DIR = "hf_decoder"
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
STEP_PREFIX = "step_"
WEIGHTS = "model.safetensors"  # also the name in an exported Hugging Face folder
WEIGHTS_PATTERN = "model{suffix}.safetensors"  # an export's shards: model-00001-of-00003.safetensors
WEIGHTS_INDEX = "model.safetensors.index.json"  # ... and their index (transformers' names)
OPTIMIZER = "optimizer.safetensors"
SHARDS_DIR = "dcp"  # a sharded checkpoint's torch.distributed.checkpoint folder
SHARDS_METADATA = ".metadata"  # DCP's global metadata, written last, by the coordinator rank
TMP_PREFIX = ".partial-"  # a checkpoint folder being written
STATE = "state.json"
LOSS_PLOT = "loss.png"
RETRIEVED_DIR = "retrieved"
LEAKAGE_PLOT = "leakage.png"


def step_dirname(step: int) -> str:
    """A checkpoint folder's name: zero-padded, so names sort by step."""
    return f"{STEP_PREFIX}{step:08d}"


def weights_file(ckpt: str | os.PathLike) -> Path:
    return Path(ckpt) / WEIGHTS


def optimizer_file(ckpt: str | os.PathLike) -> Path:
    return Path(ckpt) / OPTIMIZER


def state_file(ckpt: str | os.PathLike) -> Path:
    return Path(ckpt) / STATE


def shards_dir(ckpt: str | os.PathLike) -> Path:
    return Path(ckpt) / SHARDS_DIR


def is_sharded(ckpt: str | os.PathLike) -> bool:
    """Whether ``ckpt`` is a complete sharded checkpoint (DCP writes .metadata after every shard)."""
    return (shards_dir(ckpt) / SHARDS_METADATA).is_file()


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is itself a checkpoint folder (it holds the weights, full or sharded)."""
    return weights_file(path).is_file() or is_sharded(path)


def trained_db(run_dir: str | os.PathLike) -> Path | None:
    """The database the run trained with, as RUN/db.json names it; None without a record or
    when that folder is not on this machine."""
    record = RunLayout(run_dir).db_record
    if not record.is_file():
        return None
    path = Path(json.loads(record.read_text()).get("db", ""))
    return path if path.is_dir() else None


class RunLayout:
    """The paths of one run folder; properties only compute paths, they never touch the disk."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.root = Path(run_dir)

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def db_record(self) -> Path:
        return self.root / DB_RECORD

    @property
    def decoder_dir(self) -> Path:
        return self.root / DECODER_DIR

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def latest(self) -> Path:
        """The pointer file naming the newest checkpoint folder."""
        return self.checkpoints / LATEST

    @property
    def loss_plot(self) -> Path:
        return self.root / LOSS_PLOT

    @property
    def retrieved(self) -> Path:
        """Per-epoch retrieved-tokens files (retro.retrieved_file)."""
        return self.root / RETRIEVED_DIR

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / step_dirname(step)

    def tmp_step_dir(self, step: int) -> Path:
        """Where every rank writes step ``step``'s sharded checkpoint before rank 0 renames it."""
        return self.checkpoints / f"{TMP_PREFIX}{step_dirname(step)}"

    def step_dirs(self) -> list[Path]:
        """The checkpoint folders present, by step."""
        return sorted(self.checkpoints.glob(f"{STEP_PREFIX}*")) if self.checkpoints.is_dir() else []


def checkpoint_dir(run_dir: str | os.PathLike, step: int | None = None) -> Path:
    """The directory of checkpoint ``step`` (default: the one ``latest`` points to)."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    ckpts = layout.checkpoints
    if is_checkpoint(run_dir):  # already a checkpoint directory
        return run_dir
    if step is not None:
        path = layout.step_dir(step)
        if not path.is_dir():
            have = [p.name for p in layout.step_dirs()]
            raise UserError(f"no checkpoint for step {step} in {ckpts} (have: {', '.join(have) or 'none'})")
        return path
    pointer = layout.latest
    if not pointer.is_file():
        raise UserError(f"no checkpoint in {run_dir}: {pointer} is missing (did training save one?)")
    path = ckpts / pointer.read_text().strip()
    if not is_checkpoint(path):
        raise UserError(f"{pointer} points to {path.name}, which has no {weights_file(path).name} "
                        f"(nor complete {SHARDS_DIR}/)")
    return path
