"""Sharded, asynchronous, atomic checkpoints (``checkpoint_format: sharded``) with
torch.distributed.checkpoint (DCP).

Why: a full checkpoint (retro.checkpoint) gathers the whole state on rank 0, one process writes
it while every rank waits, and every rank reads the whole files on resume. Here each rank writes
and reads only its own shards (DCP's planner also splits DDP's replicated tensors between the
ranks), and with ``checkpoint_async: true`` training goes on while they are written.

Layout of ``RUN/checkpoints/step_XXXXXXXX/``:

- ``dcp/``        a DCP folder of ``{"model": ..., "optim": ...}``, the name-keyed state dicts of
                  ``torch.distributed.checkpoint.state_dict.get_state_dict`` (a RETRO-fit's model
                  part: only the trainable tensors, as in a full checkpoint)
- ``state.json``  as in a full checkpoint (step, every rank's RNG, data position, config, the
                  frozen base's identity), plus ``"format": "sharded"``

Atomic: every rank writes into ``checkpoints/.partial-step_XXXXXXXX/``; rank 0 renames it into place
and replaces ``latest`` only once DCP's save has finished there, which is after every rank's
writes returned (rank 0 is DCP's coordinator: it writes ``.metadata`` last, from all ranks' write
results). A crash mid-save leaves the temporary folder, which nothing reads (readers follow
``latest``; ``step_dirs`` lists ``step_*``) and the next save removes.

Asynchronous: ``dcp.async_save`` copies the state to CPU memory (FileSystemWriter's staging),
then writes from a thread while training continues. At most one save is in flight: the next save,
the end of training and an error path all wait for it first (:meth:`ShardedCheckpointer.wait`),
which also joins DCP's writer thread. The writer thread runs its collectives on a gloo group of
its own, so they never interleave with training's collectives on the default group.

Trust: DCP's ``.metadata`` is a pickle, so unlike a full checkpoint, a sharded one must come
from a trusted source.

Loading (:func:`load_sharded`) goes through DCP's resharding: a checkpoint written by N ranks
under DDP loads on M ranks under DDP or FSDP2, and the other way round.
"""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from chunk_store.framework.atomic import atomic_write_bytes, atomic_write_json
from chunk_store.framework.errors import UserError
from chunk_store.manifest import now_iso
from retro.checkpoint import (MODEL_KEY, OPTIM_KEY, STATE_VERSION, _dist, _to_json, checkpoint_weights,
                              read_state, rng_state, set_rng_state)
from retro.frozen_base import FrozenBase, trainable_names
from retro.run_layout import TMP_PREFIX, RunLayout, shards_dir, state_file, step_dirname

WRITER_THREAD = "AsyncCheckpointExecutor"  # the name prefix of dcp.async_save's writer thread
# one rank without a process group passes no_dist=True on purpose; DCP warns at every save anyway
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized, "
                        r"assuming the intent is to (save|load) in a single process")


def _file_system_writer(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemWriter

    return FileSystemWriter(str(path))


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 trainable_only: bool) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` as this rank holds them (DTensor shards under FSDP2),
    keyed by parameter name; with ``trainable_only`` (a RETRO-fit) the model part holds only
    what trains."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer if optimizer is not None else [])
    if trainable_only:
        keep = trainable_names(model)
        msd = {k: v for k, v in msd.items() if k in keep}
    return {MODEL_KEY: msd, OPTIM_KEY: osd} if optimizer is not None else {MODEL_KEY: msd}


def _fsync_tree(root: Path) -> None:
    """Make every file under ``root`` durable before a rename publishes it."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(Path(dirpath) / name, "rb") as fh:
                os.fsync(fh.fileno())


def _publish(tmp: Path, final: Path, latest: Path) -> None:
    """Rename a finished temporary folder into place and point ``latest`` at it (rank 0)."""
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    atomic_write_bytes(latest, (final.name + "\n").encode())


class CheckpointWriteError(RuntimeError):
    """A sharded checkpoint was not written; the previous one stays the latest. (DCP raises a
    ``CheckpointException``, a BaseException that ``except Exception`` would let through.)"""


def _write_error(step: int, e: BaseException) -> CheckpointWriteError:
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException):
        rank, (exc, _) = next(iter(e.failures.items()))
        what = f"rank {rank}: {type(exc).__name__}: {exc}"
    else:
        what = f"{type(e).__name__}: {e}"
    return CheckpointWriteError(f"checkpoint {step_dirname(step)} was not written ({what}); "
                                f"the previous checkpoint stays the latest")


def join_writer_threads() -> None:
    """Join DCP's writer threads that finished their save: ``async_save`` shuts its executor down
    without waiting, so its thread may outlive the future by a moment; a thread alive at the
    process's exit is what issue 22's "terminate called without an active exception" needs."""
    for th in threading.enumerate():
        if th.name.startswith(WRITER_THREAD) and th is not threading.current_thread():
            th.join()


class ShardedCheckpointer:
    """Writes one run's sharded checkpoints; every rank holds one and calls :meth:`save` at the
    same steps (it is collective). ``writer`` builds DCP's storage writer for a folder
    (default: ``_file_system_writer``, a FileSystemWriter; tests inject slow or failing ones)."""

    def __init__(self, run_dir: str | os.PathLike, *, async_save: bool = False,
                 writer: Callable[[Path], Any] | None = None) -> None:
        self.layout = RunLayout(run_dir)
        self.async_save = async_save
        self.writer = writer
        self.pending: Future | None = None  # the save in flight: its folder once published
        self._group: Any = None

    def _process_group(self) -> Any:
        """A gloo group for DCP's collectives (async: they run in the writer thread and must not
        interleave with training's on the default group; gloo: DCP's staged state is on CPU)."""
        import torch.distributed as dist

        if self._group is None and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        return self._group

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is written and published, and its writer
        thread ended; re-raise its error. Returns its folder (None: nothing was in flight)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        try:
            return pending.result()
        finally:
            join_writer_threads()

    close = wait

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             state: Mapping[str, Any], frozen_base: FrozenBase | None = None) -> Path:
        """Write ``step_XXXXXXXX`` (collective). Synchronous: returns once it is published.
        Asynchronous: returns once the state is copied to CPU memory; :attr:`pending` completes
        when it is published. ``state`` as for ``save_checkpoint``. Returns the final folder."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        self.wait()  # at most one save in flight
        rank, world = _dist()
        group = self._process_group()
        solo = world == 1 and group is None  # no process group: say so (DCP warns otherwise)
        sd = _state_dicts(model, optimizer, trainable_only=frozen_base is not None)
        rngs: list[Any] = [rng_state()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        tmp, final = self.layout.tmp_step_dir(step), self.layout.step_dir(step)
        if rank == 0:
            for stale in self.layout.checkpoints.glob(f"{TMP_PREFIX}*"):  # a crashed save's leftovers
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
            meta: dict[str, Any] = {"version": STATE_VERSION, "format": "sharded", "step": step, "saved": now_iso(),
                                    "world_size": world, "rng": rngs, "has_optimizer": optimizer is not None,
                                    **{k: _to_json(v) for k, v in state.items()}}
            if frozen_base is not None:
                meta["frozen_base"] = frozen_base.to_json()
            atomic_write_json(state_file(tmp), meta)
        if world > 1:
            dist.barrier()  # the folder exists, empty of stale shards, before any rank writes
        writer = (self.writer or _file_system_writer)(shards_dir(tmp))
        done: Future = Future()
        if self.async_save:
            upload = dcp.async_save(sd, storage_writer=writer, process_group=group, no_dist=solo)
            upload = getattr(upload, "upload_completion", upload)  # an AsyncSaveResponse with some stagers

            def finish(f: Future) -> None:
                try:
                    f.result()
                    if rank == 0:
                        _publish(tmp, final, self.layout.latest)
                    done.set_result(final)
                except BaseException as e:  # noqa: BLE001 - handed to wait()
                    done.set_exception(_write_error(step, e))

            upload.add_done_callback(finish)
            self.pending = done
        else:
            try:
                dcp.save(sd, storage_writer=writer, process_group=group, no_dist=solo)
            except BaseException as e:  # CheckpointException: every rank gets it (DCP broadcasts it)
                from torch.distributed.checkpoint.api import CheckpointException

                if isinstance(e, CheckpointException):
                    raise _write_error(step, e) from None
                raise
            if rank == 0:
                _publish(tmp, final, self.layout.latest)
            if world > 1:
                dist.barrier()  # every rank returns with the checkpoint in place, as save_checkpoint
        return final


def load_sharded(ckpt: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 base: str | None = None) -> dict[str, Any]:
    """Load a sharded checkpoint into a plain/DDP/FSDP2 model (any world size): each rank reads
    the parts of the shards it holds. A RETRO-fit's frozen base is rebuilt and hash-checked
    (``checkpoint_weights``) before its trained part and optimizer are read. Restores this rank's
    RNG when the world size is the one saved. Returns state.json (a moved base's new path in it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_state_dict)

    ckpt = Path(ckpt)
    meta = read_state(ckpt)
    record = meta.get("frozen_base")
    if record is not None:
        weights = checkpoint_weights(ckpt, getattr(model, "cfg", None), base)  # raises on another base
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        if base:
            meta["frozen_base"] = FrozenBase.from_json(record, str(ckpt)).moved(base).to_json()
    if optimizer is not None and not meta.get("has_optimizer", True):
        raise UserError(f"{ckpt} has no optimizer state: cannot resume from it")
    sd = _state_dicts(model, optimizer, trainable_only=record is not None)
    _check_shapes(ckpt, sd[MODEL_KEY])
    try:
        dcp.load(sd, checkpoint_id=str(shards_dir(ckpt)), no_dist=_dist()[1] == 1)
    except Exception as e:  # a missing key (another optimizer) or a truncated shard
        raise UserError(f"{shards_dir(ckpt)} does not load into this model and optimizer: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=sd[MODEL_KEY],
                   optim_state_dict=sd.get(OPTIM_KEY, {}), options=StateDictOptions(strict=record is None))
    rank, world = _dist()
    rngs = meta.get("rng") or []
    if rank < len(rngs) and len(rngs) == world:
        set_rng_state(rngs[rank])
    return meta


def _check_shapes(ckpt: Path, msd: Mapping[str, Any]) -> None:
    """One line naming the first tensor whose global shape differs (DCP's own error is long)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = FileSystemReader(str(shards_dir(ckpt))).read_metadata().state_dict_metadata
    for name, tensor in msd.items():
        entry = saved.get(f"{MODEL_KEY}.{name}")
        if entry is None:
            raise UserError(f"{shards_dir(ckpt)} does not fit the model: it lacks {name}")
        if isinstance(entry, TensorStorageMetadata) and tuple(entry.size) != tuple(tensor.shape):
            raise UserError(f"{shards_dir(ckpt)} does not fit the model: {name} has shape {tuple(entry.size)} "
                            f"in the checkpoint, {tuple(tensor.shape)} in the model (another model config?)")
