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


def kill_self_if(env: str, count: int) -> None:
    """Test hook for crash/resume tests: SIGKILL this process once ``count`` units are written,
    if the environment variable ``env`` is set to a number <= count (a real kill -9)."""
    val = os.environ.get(env)
    if val and count >= int(val):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(*folders: "os.PathLike[str] | str", prefixes: tuple[str, ...] = ("",)) -> int:
    """Remove temporary files (``.NAME.tmp-PID``) left by a killed run; returns the count.

    Only files whose writer process is gone are removed, so concurrent torchrun ranks on this
    host never lose a file they are writing; ``prefixes`` limits which NAMEs are ours.
    """
    from pathlib import Path

    n = 0
    for folder in folders:
        d = Path(folder)
        if not d.is_dir():
            continue
        for p in d.iterdir():
            name = p.name
            if not (name.startswith(".") and ".tmp-" in name and p.is_file()):
                continue
            if not any(name[1:].startswith(pre) for pre in prefixes):
                continue
            pid = name.rsplit(".tmp-", 1)[1]
            if pid.isdigit() and _pid_alive(int(pid)):
                continue
            p.unlink(missing_ok=True)
            n += 1
    return n
