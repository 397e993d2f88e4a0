"""Build a model on the meta device and give it real weights only where it runs (issue 22).

Why: an eager build puts a full copy of the weights in every rank's CPU memory before DDP or
FSDP2 sees them; a 150M-parameter model is 600 MB per rank, a 7B one does not fit. Built under
``torch.device("meta")`` the model holds shapes only. Under FSDP2 it is sharded first
(``fully_shard`` on the meta model) and :func:`materialize` then allocates each rank's shards
only; under DDP (or one process) it allocates the whole model once per rank, on its device.

The weights equal an eager build's for the same seed, bit for bit, on any world size: each
parameter is drawn in full on the CPU, in the order and with the draws the eager constructors
make (every ``reset_parameters`` of torch's layers, then the model's own init rule), and only
this rank's shard of it is kept. At most one full parameter exists at a time.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from retro.layers import Rotary


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` under the meta device: parameters and buffers without storage."""
    with torch.device("meta"):
        return build()


def _global_shape(p: torch.Tensor) -> torch.Size:
    return p.shape  # a DTensor's shape is the full (global) one


@torch.no_grad()
def _copy_full(p: torch.Tensor, full: torch.Tensor) -> None:
    """Write the full CPU tensor ``full`` into ``p``: all of it, or this rank's shard of a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        # src_data_rank=None: every rank slices its own copy, no communication
        local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
        p.to_local().copy_(local)
    else:
        p.copy_(full)


@contextlib.contextmanager
def _on_cpu_scratch(module: nn.Module) -> Iterator[None]:
    """Swap ``module``'s own parameters for full-size CPU tensors while the block runs (an init
    draws into them), then copy each into the real parameter (or its shard) and swap back."""
    own = {k: p for k, p in module._parameters.items() if p is not None}
    scratch = {k: torch.empty(_global_shape(p), dtype=p.dtype) for k, p in own.items()}
    for k, t in scratch.items():
        module._parameters[k] = nn.Parameter(t, requires_grad=False)
    try:
        yield
    finally:
        for k, p in own.items():
            module._parameters[k] = p
            _copy_full(p, scratch[k])


def _tied(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """Parameters registered under two names (tied embeddings): (module, name, first owner, name)."""
    first: dict[int, tuple[nn.Module, str]] = {}
    ties = []
    for module in model.modules():
        for k, p in module._parameters.items():
            if p is None:
                continue
            if id(p) in first:
                ties.append((module, k, *first[id(p)]))
            else:
                first[id(p)] = (module, k)
    return ties


def materialize(model: nn.Module, device: torch.device | str, seed: int) -> nn.Module:
    """Allocate a meta-built (and maybe ``fully_shard``-ed) ``model`` on ``device`` and initialise
    it as ``torch.manual_seed(seed)`` followed by the eager constructor would: the same values.

    The model's init rule is ``model.reset_parameters(modules)`` over (name, module) pairs (RETRO's);
    rotary frequency buffers (non-persistent, so never in a checkpoint) are recomputed.
    """
    ties = _tied(model)
    model.to_empty(device=device)
    for module, k, owner, owner_k in ties:  # to_empty may give each name its own new tensor
        if module._parameters[k] is not owner._parameters[owner_k]:
            module._parameters[k] = owner._parameters[owner_k]
    torch.manual_seed(seed)
    # 1. the draws of torch's layer constructors (nn.Linear's kaiming, nn.Embedding's normal), in
    #    construction order: overwritten below, they still advance the RNG as the eager build did
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters") and module._parameters:
            with _on_cpu_scratch(module):
                module.reset_parameters()
    # 2. the model's own init rule, module by module
    for name, module in model.named_modules():
        if any(p is not None for p in module._parameters.values()):
            with _on_cpu_scratch(module):
                model.reset_parameters([(name, module)])
    for module in model.modules():
        if isinstance(module, Rotary):
            module.reset_buffers()
    return model
