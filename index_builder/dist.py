"""torchrun awareness for the embed and knn stages, without requiring torch.distributed.

Work is split by shard index (shard i goes to rank i % world_size), so each rank needs only
RANK/WORLD_SIZE from the environment; a gloo process group is started lazily only for the
final barrier, after which rank 0 alone writes the manifest.
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    """Wait for every rank (no-op outside torchrun)."""
    if world_size() <= 1:
        return
    import torch.distributed as td

    if not td.is_initialized():
        td.init_process_group("gloo")
    td.barrier()
