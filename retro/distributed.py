"""One process or many: torchrun's env vars, DDP / FSDP2 wrapping, and a resumable sharded sampler.

The same train.py runs as ``python train.py`` (world size 1, no process group) and under
``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set; NCCL on CUDA, gloo on CPU), single- or
multi-node: torchrun's rendezvous flags are all a multi-node run needs.
"""

from __future__ import annotations

import datetime as _dt
import gc
import math
from dataclasses import dataclass
from typing import Iterator

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
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def teardown() -> None:
    """Destroy the process group, after collecting garbage: DDP's reducer and FSDP's state sit in
    reference cycles that hold gloo work objects; freed only during interpreter finalization, they
    can abort a rank at exit ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few float64 numbers over ranks (identity in one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def wrap_model(model: torch.nn.Module, info: DistInfo, *, fsdp: bool,
               find_unused_parameters: bool = False) -> torch.nn.Module:
    """DDP across ranks (or FSDP2 ``fully_shard`` per block, then the root); as is in one process.

    FSDP2 shards every sub-module listed by ``model.fsdp_units()`` when the model provides it, else
    those of :func:`fsdp_units`, then the root module.
    """
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not info.distributed:
            return model
        mesh = init_device_mesh(info.device.type, (info.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if info.device.type == "cuda" else MixedPrecisionPolicy()
        units = model.fsdp_units() if hasattr(model, "fsdp_units") else fsdp_units(model)
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
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

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        while True:
            epoch, b = divmod(position, self.batches_per_epoch)
            shard = self.epoch_indices(epoch)
            for i in range(b, self.batches_per_epoch):
                position += 1
                yield shard[i * self.micro_batch_size:(i + 1) * self.micro_batch_size].tolist()
