"""One process or many: torchrun's env vars, DDP / FSDP2 wrapping, and a resumable sharded sampler.

The same train.py runs as ``python train.py`` (world size 1, no process group) and under
``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set; NCCL on CUDA, gloo on CPU), single- or
multi-node: torchrun's rendezvous flags are all a multi-node run needs.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Iterator, NoReturn

import torch
import torch.distributed as dist

from chunk_store.framework import runtime
from chunk_store.framework.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Read torchrun's env vars, pick the device, start the process group when world size > 1."""
    world, rank, local_rank = runtime.world_size(), runtime.rank(), runtime.local_rank()
    dev = runtime.resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=30), **kwargs)
        _ran_process_group.append(True)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


# whether this process started a process group (setup): then it ends with exit_process's os._exit
_ran_process_group: list[bool] = []


def teardown() -> None:
    """Destroy the process group. Its C++ object (with its gloo threads) may live on: see
    :func:`exit_process` for why and how a rank still ends cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(main: Callable[[], int | None]) -> NoReturn:
    """Run a command line's ``main`` and end the process with its exit status (1 and the traceback
    for an unexpected error); after a process group ran in this process, with ``os._exit`` once
    stdout, stderr and logging are flushed, so that interpreter finalization never runs.

    Why (issue 22, "terminate called without an active exception", SIGABRT at a rank's exit after
    all its work was done): torch keeps the process group alive after ``destroy_process_group``
    (``torch.distributed.nn.functional`` binds ``group.WORLD`` as a default argument when it is
    first imported after ``init_process_group``, as FSDP2 and torch.distributed.checkpoint do;
    DTensor's caches hold FSDP2's device mesh, which holds the group). It is then destroyed during
    finalization, which releases the GIL and joins the gloo worker threads; a worker that needs
    the GIL at that point (to drop the last reference to a tensor Python let go while the
    collective still held it, or to run a Python future callback) is ended by CPython with
    ``pthread_exit``, whose unwinding through a C++ ``noexcept`` frame calls ``std::terminate``.
    A worker gets there late only when starved of CPU, hence a crash seen only under heavy load.
    Every file a run writes is closed (metrics) or fsynced and renamed (checkpoints) before this.
    """
    try:
        status = main()
    except SystemExit as e:
        status = e.code
    except KeyboardInterrupt:
        status = 130
    except BaseException:  # noqa: BLE001 - what the interpreter would print, then status 1
        traceback.print_exc()
        status = 1
    if status is not None and not isinstance(status, int):
        print(status, file=sys.stderr)
        status = 1
    if _ran_process_group:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status or 0)
    sys.exit(status)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few float64 numbers over ranks (identity in one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def wrap_model(model: torch.nn.Module, info: DistInfo, *, fsdp: bool,
               find_unused_parameters: bool = False, cpu_offload: bool = False) -> torch.nn.Module:
    """DDP across ranks (or FSDP2 ``fully_shard`` per block, then the root); as is in one process.

    FSDP2 shards every sub-module listed by ``model.fsdp_units()`` when the model provides it, else
    those of :func:`fsdp_units`, then the root module. ``model`` may still be on the meta device
    (retro.materialize then allocates each rank's shards only). ``cpu_offload``: FSDP2's
    ``CPUOffloadPolicy``, parameters, gradients and optimizer state kept in CPU memory between
    uses (pinned when the device is CUDA), all-gathered to the device for each unit's compute.
    """
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        if not info.distributed:
            return model
        mesh = init_device_mesh(info.device.type, (info.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if info.device.type == "cuda" else MixedPrecisionPolicy()
        offload = CPUOffloadPolicy(pin_memory=info.device.type == "cuda") if cpu_offload else OffloadPolicy()
        units = model.fsdp_units() if hasattr(model, "fsdp_units") else fsdp_units(model)
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=mp, offload_policy=offload)
        fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
        return model
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of every ModuleList, as FSDP2 units: FSDP2 gathers a unit's weights in a hook on
    its ``forward``, so a block whose parts are called as methods (RETRO's DecoderBlock runs
    attention, CCA and MLP separately, the encoder in between) is split into its parameterised
    children, whose ``forward`` is what actually runs."""
    units: list[torch.nn.Module] = []
    for mlist in [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]:
        for block in mlist:
            if type(block).forward is not torch.nn.Module.forward:
                units.append(block)
            else:
                units.extend(c for c in block.children() if any(True for _ in c.parameters()))
    return units


class ShardedBatchSampler:
    """DistributedSampler semantics, batched and resumable.

    Each epoch the indices are shuffled with ``torch.Generator().manual_seed(seed + epoch)``
    (the same permutation on every rank), padded by wrapping around to a multiple of the world
    size (as ``DistributedSampler(drop_last=False)``), and rank r takes every world-th index.
    It yields micro-batches of that shard forever (epoch after epoch). A DataLoader prefetches,
    so the *consumer* counts the micro-batches it has used (the data position saved in a
    checkpoint); a sampler built with ``start`` = that count continues exactly there.
    The trailing incomplete micro-batch of an epoch is dropped so every batch has one shape.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, start: int = 0) -> None:
        if num_samples < micro_batch_size * world_size:
            raise UserError(f"only {num_samples} training sequences: fewer than one micro-batch "
                            f"({micro_batch_size}) for each of {world_size} rank(s)")
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.start = start
        self.per_rank = math.ceil(num_samples / world_size)
        self.batches_per_epoch = self.per_rank // micro_batch_size

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            idx = torch.randperm(self.num_samples, generator=g)
        else:
            idx = torch.arange(self.num_samples)
        total = self.per_rank * self.world_size
        if total > self.num_samples:
            idx = torch.cat([idx, idx[: total - self.num_samples]])
        return idx[self.rank:total:self.world_size]

    def epoch_of(self, position: int) -> int:
        return position // self.batches_per_epoch

    def positions(self) -> Iterator[tuple[int, int, list[int]]]:
        """(epoch, micro-batch of the epoch, its sample indices) from ``start`` on, forever: where
        a batch lies in an epoch's order (the retrieved-tokens file is laid out in it)."""
        position = self.start
        while True:
            epoch, b = divmod(position, self.batches_per_epoch)
            shard = self.epoch_indices(epoch)
            for i in range(b, self.batches_per_epoch):
                position += 1
                yield epoch, i, shard[i * self.micro_batch_size:(i + 1) * self.micro_batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for _, _, batch in self.positions():
            yield batch
