"""Where this process runs: its rank among torchrun's processes, and its torch device.

Stages split their work by unit index (unit i goes to rank i % world_size), so each rank needs
only RANK / WORLD_SIZE / LOCAL_RANK from the environment; a gloo process group is started lazily,
only for a barrier. torch is imported only where a function needs it, so the chunk stage and
``info`` never pay for it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from chunk_store.framework.errors import UserError

if TYPE_CHECKING:
    import torch


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    """Wait for every rank (no-op outside torchrun); starts a gloo group if none is running."""
    if world_size() <= 1:
        return
    import torch.distributed as td

    if not td.is_initialized():
        td.init_process_group("gloo")
    td.barrier()


def resolve_device(name: str | None = "auto", local_rank_: int | None = None) -> "torch.device":
    """'auto' (or None / '') -> cuda when torch sees a GPU, else cpu; a bare 'cuda' -> this
    process's GPU (LOCAL_RANK under torchrun, modulo the GPUs present). 'cuda:N' is kept.

    The one device resolver of the project: the stages, train.py, evaluate and generate.
    """
    import torch

    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but torch sees no CUDA device")
        if dev.index is None:
            lr = local_rank() if local_rank_ is None else local_rank_
            dev = torch.device("cuda", lr % torch.cuda.device_count())
    return dev
