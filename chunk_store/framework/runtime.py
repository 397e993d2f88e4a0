"""Where this process runs: its rank among torchrun's processes, and its torch device.

Stages split their work by unit index (unit i goes to rank i % world_size), so each rank needs
only RANK / WORLD_SIZE / LOCAL_RANK from the environment, and a barrier. torch is imported only
where a function needs it, so the chunk stage and ``info`` never pay for it.

Why the barrier is not gloo's: a gloo barrier fails once it has waited the process group's timeout
(30 minutes by default), and the ranks of a stage wait at one for as long as the slowest rank's
units take (a big input, an unlucky share, rank 0 alone training the tokenizer and planning the
work), hours on a large corpus. So the barrier counts arrivals in torchrun's key-value store
(the TCPStore of the ``env://`` rendezvous) and polls it, with no deadline: a rank that dies is
torchrun's to notice, and it stops the others of its node. Across nodes torchrun does not stop
the other nodes' ranks, so a rank ending with an error says so in the store (:func:`fail`) and a
waiting rank stops at once; one killed outright is the scheduler's (``srun --kill-on-bad-exit``).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from chunk_store.framework.errors import UserError

if TYPE_CHECKING:
    import torch


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


_store: Any = None  # the rendezvous store, made at the first barrier
_barriers = 0  # barriers passed by this process: every rank passes the same ones, in order
POLL_MAX_S = 1.0  # the longest pause between two looks at the count


def _rendezvous_store() -> Any:
    """torchrun's store: the default process group's when one is running, else env:// (torchrun's
    agent store, or one hosted by rank 0 from MASTER_ADDR / MASTER_PORT)."""
    global _store
    if _store is None:
        import torch.distributed as td

        if td.is_initialized():
            from torch.distributed.distributed_c10d import _get_default_store

            _store = _get_default_store()
        else:
            _store = next(td.rendezvous("env://", rank=rank(), world_size=world_size()))[0]
    return _store


def barrier() -> None:
    """Wait for every rank, however long (no-op outside torchrun): see the module's docstring."""
    global _barriers
    if world_size() <= 1:
        return
    store = _rendezvous_store()
    _barriers += 1
    key = f"retro/barrier/{_barriers}"
    store.add(key, 1)
    _wait_count(store, key)
    store.add(f"{key}/seen", 1)
    if rank() == 0:  # without torchrun's agent the store lives in rank 0: stay till all have read it
        _wait_count(store, f"{key}/seen")


FAILED_KEY = "retro/failed"  # how many ranks gave up with an error (set by :func:`fail`)


def fail() -> None:
    """Tell the other ranks this one is ending with an error, so that they stop at their next
    barrier instead of waiting for it for ever (no-op outside torchrun).

    Why: on one node torchrun stops every rank when one dies, but across nodes it does not: the
    failed node's agent exits, and a rank on another node that waits in :func:`barrier` (which
    has no deadline, see the module's docstring) would wait forever. A rank killed outright
    (kill -9, out of memory) cannot say so: ``srun --kill-on-bad-exit=1`` (or the scheduler)
    ends those jobs."""
    if world_size() <= 1 or (_store is None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"):
        return  # no store yet, and making one would wait for rank 0's, which may be gone
    try:
        store = _rendezvous_store()
        # only the first is named: a waiting rank that stops on its word comes here too
        if store.add(FAILED_KEY, 1) == 1:
            store.set(f"{FAILED_KEY}/rank", str(rank()))
    except Exception:  # the store (rank 0's, without torchrun's agent) may be gone already
        pass


def _wait_count(store: Any, key: str) -> None:
    pause = 0.005
    while store.add(key, 0) < world_size():
        if store.add(FAILED_KEY, 0) > 0:
            who = store.get(f"{FAILED_KEY}/rank").decode()  # waits the moment till it is set
            raise UserError(f"rank {who} of {world_size()} ended with an error (its message is in its "
                            f"node's log): rank {rank()} stops too; re-run the same command to resume")
        time.sleep(pause)
        pause = min(2 * pause, POLL_MAX_S)


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
