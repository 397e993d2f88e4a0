"""The one routine every database stage runs through: chunk, embed, index, knn.

A stage is three things: a frozen config dataclass built from its own arguments (defaults in one
place), :meth:`Stage.compute` that does one unit of work and writes its result atomically, and
:meth:`Stage.finalize` that assembles the units' results once every rank is done. Everything
else is owned here, once:

- the manifest record: ``stages[<name>]`` with params, package versions, start and end;
- parameter comparison: a re-run with other parameters is refused, naming the value that differs;
- skipping a finished stage (when its outputs are whole) and resuming an unfinished one (a unit
  whose result is on disk is not redone, so a re-run after kill -9 or Ctrl-C ends byte-identical);
- sharing units over torchrun ranks (unit i -> rank i % world_size) and the barrier before rank 0
  finalizes and records the end;
- removing the temporary files (``.NAME.tmp-PID``) that a killed writer left behind;
- the crash hook for tests (:data:`CRASH_ENV`).
"""

from __future__ import annotations

import errno
import logging
import multiprocessing as mp
import os
import shutil
import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Generic, Iterable, Sequence, TypeVar

from chunk_store.framework import registry, runtime
from chunk_store.framework.errors import UserError
from chunk_store.layout import DBLayout, temp_owner
from chunk_store.manifest import (check_params, load_manifest, now_iso, record_stage, require_stage, save_manifest,
                                  versions)

log = logging.getLogger("chunk_store.framework.stage")

# The test hook, documented here and nowhere else: RETRO_TEST_CRASH="STAGE:POINT[:sigint][@RANK]".
# POINT is a number N (after this process has written its N-th unit) or a name a stage passes
# to crash_point() (chunk: "merge", after the first split's arrays of a shard; index:
# "merge-written" / "merge-listed", a parts merge before its list switch / its deletions; every stage:
# "finalize", on rank 0 once every rank is done, before the stage is assembled and recorded). At
# that point the process kills itself and its worker processes with SIGKILL (a real kill -9), or
# with ":sigint" sends SIGINT to its process group, exactly what Ctrl-C in a terminal does.
# "@RANK" limits the crash to that torchrun rank (one machine of many dies, the others do not).
# RETRO_TEST_CRASH_AFTER=PATH makes the crashing process first wait (up to 300 s) until PATH exists:
# a test that wants another rank's work whole before this one dies says so, rather than hoping
# torchrun's monitor is slower than that rank (on a loaded 2-core CI machine it was not).
CRASH_ENV = "RETRO_TEST_CRASH"
CRASH_AFTER_ENV = "RETRO_TEST_CRASH_AFTER"


def crash_point(stage: str, point: int | str) -> None:
    """The test hook: crash here if :data:`CRASH_ENV` names this stage and point."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    spec, _, only = spec.partition("@")
    name, _, rest = spec.partition(":")
    where, _, how = rest.partition(":")
    if name != stage or where != str(point) or (only and int(only) != runtime.rank()):
        return
    after = os.environ.get(CRASH_AFTER_ENV)
    deadline = time.monotonic() + 300
    while after and not Path(after).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if how == "sigint":
        os.killpg(os.getpgid(0), signal.SIGINT)
        return
    for child in mp.active_children():  # worker processes die with us, as under kill -9 of a group
        try:
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        except ProcessLookupError:
            pass
    os.kill(os.getpid(), signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(folders: Iterable[str | os.PathLike], prefixes: Sequence[str] = ("",)) -> int:
    """Remove temporary files and folders (``.NAME.tmp-PID``) whose writer is gone; the count.

    A live writer's files stay, so concurrent torchrun ranks on one host never lose a file they
    are writing; ``prefixes`` limits which NAMEs are the stage's.
    """
    n = 0
    for folder in folders:
        d = Path(folder)
        if not d.is_dir():
            continue
        for p in d.iterdir():
            owner = temp_owner(p.name)
            if owner is None or not any(owner[0].startswith(pre) for pre in prefixes):
                continue
            if _pid_alive(owner[1]) and owner[1] != 0:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
    return n


@dataclass(frozen=True)
class Unit:
    """One piece of a stage's work: ``index`` decides its rank, ``size`` its share of the bar."""

    index: int
    size: int
    payload: Any = None


@dataclass(frozen=True)
class RunInfo:
    """What the routine measured of this process's run, handed to :meth:`Stage.finalize`."""

    seconds: float
    units_done: int
    units_reused: int
    rank: int
    world_size: int


C = TypeVar("C")


class Stage(ABC, Generic[C]):
    """One database stage; :func:`run_stage` calls the methods in the order they appear here."""

    name: ClassVar[str]  # the registry's name of the stage (chunk_store.framework.registry)
    packages: ClassVar[tuple[str, ...]] = ()  # versions recorded in the manifest
    result_keys: ClassVar[tuple[str, ...] | None] = None  # params compared on a re-run (None: all)
    progress_unit: ClassVar[str] = "unit"
    progress_scale: ClassVar[bool] = False
    advances_bar: ClassVar[bool] = False  # compute() moves ``self.bar`` itself (else: per unit)

    @property
    def requires(self) -> str | None:
        """The stage that must have finished first: the registry's word, said once there."""
        return registry.requires(self.name)

    def __init__(self, db: str | os.PathLike, cfg: C) -> None:
        self.db = Path(db)
        self.paths = DBLayout(self.db)
        self.cfg = cfg
        self.bar: Any = None  # the routine's progress bar while units run

    # -- before any work
    def open_manifest(self) -> dict[str, Any]:
        """The manifest this stage builds on (the chunk stage may start a new database)."""
        manifest = load_manifest(self.db)
        if self.requires:
            require_stage(manifest, self.requires, self.name)
        return manifest

    @abstractmethod
    def params(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """What the result depends on, recorded in the manifest and compared on a re-run."""

    def check(self, recorded: dict[str, Any], params: dict[str, Any], manifest: dict[str, Any]) -> None:
        """Refuse a re-run whose parameters differ from the recorded ones."""
        check_params(recorded.get("params"), params, self.name, keys=self.result_keys)

    def complete(self, manifest: dict[str, Any]) -> bool:
        """A finished stage's outputs are all there (else the stage runs again, resuming)."""
        return True

    def skip_message(self, stats: dict[str, Any]) -> str:
        return f"{self.name}: already done"

    def outputs(self, manifest: dict[str, Any]) -> list[Path]:
        """The files this stage leaves: their sizes are recorded when it finishes and verified
        (with .npy headers) before a re-run says "already done" (a damaged one is rebuilt)."""
        return []

    def preflight(self, manifest: dict[str, Any]) -> None:
        """Refuse a run that cannot succeed before anything is written (e.g. no inputs)."""

    # -- the work
    def begin(self, manifest: dict[str, Any]) -> None:
        """Once the start is recorded and before the units are listed (e.g. a tokenizer, a plan)."""

    @abstractmethod
    def units(self, manifest: dict[str, Any]) -> list[Unit]:
        """Every unit of the stage, all ranks together, in order."""

    @abstractmethod
    def unit_done(self, unit: Unit) -> bool:
        """The unit's result is on disk and whole."""

    def temp_folders(self) -> list[tuple[Path, tuple[str, ...]]]:
        """(folder, name prefixes) where a killed run of this stage may have left temporary files."""
        return []

    def setup(self) -> None:
        """Expensive resources (a model, an index), made only when this rank has work."""

    @abstractmethod
    def compute(self, unit: Unit) -> None:
        """Do one unit and write its result atomically."""

    def run_units(self, todo: list[Unit], done: Callable[[Unit], None]) -> None:
        """Compute ``todo`` in order, calling ``done`` after each (stages with pools override)."""
        for unit in todo:
            self.compute(unit)
            done(unit)

    def finish_rank(self, manifest: dict[str, Any], run: RunInfo) -> None:
        """Every rank, once all units are done and before rank 0's finalize: work that ranks
        share after the units (the chunk stage: each rank writes its own shard)."""

    @abstractmethod
    def finalize(self, manifest: dict[str, Any], run: RunInfo) -> dict[str, Any]:
        """Rank 0, after every rank's units: assemble, verify, update ``manifest``; the stats."""

    def report(self, stats: dict[str, Any], run: RunInfo) -> str:
        """The line printed at the end of a run."""
        return f"{self.name}: done in {run.seconds:.1f}s"

    def close(self) -> None:
        """Release what setup() made (always called)."""

    def say(self, line: str) -> None:
        print(line)

    def space_needed(self) -> int | None:
        """About how many bytes the stage writes in all (named when the disk fills), if known."""
        return None

    def rank_units(self, units: list[Unit], rank: int, world: int) -> list[Unit]:
        return [u for u in units if u.index % world == rank]


def run_stage(stage: Stage[Any]) -> dict[str, Any]:
    """Run (or resume, or skip when done) one stage; its stats (``skipped`` when it was done).

    A full disk (ENOSPC, EDQUOT) anywhere in the stage is one line naming the path and the space,
    not an OSError traceback; what was written stays, so the same command resumes once space is
    freed."""
    try:
        try:
            return _run_stage(stage)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise UserError(no_space_message(stage, e)) from None
    except BaseException:  # an error, Ctrl-C: ranks on other nodes would wait at a barrier forever
        runtime.fail()
        raise


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def no_space_message(stage: Stage[Any], e: OSError) -> str:
    """'STAGE: no space left on the device writing PATH (F free, about N needed): ...'."""
    path = Path(os.fsdecode(e.filename)) if e.filename else stage.db
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    try:
        needed = stage.space_needed()
    except Exception:  # an estimate only: never hide the real message behind a second error
        needed = None
    need = f", about {_human(needed)} needed in all" if needed else ""
    return (f"{stage.name}: no space left on the device writing {path} ({_human(free)} free{need}): "
            f"free some space and re-run the same command (it resumes)")


def _run_stage(stage: Stage[Any]) -> dict[str, Any]:
    from tqdm.auto import tqdm

    manifest = stage.open_manifest()
    params = stage.params(manifest)
    recorded = manifest.get("stages", {}).get(stage.name)
    if recorded:
        stage.check(recorded, params, manifest)
        damaged = damaged_outputs(stage.db, recorded.get("files")) if recorded.get("finished") else []
        for path, why in damaged:  # removed: the stage's resume rebuilds what is missing
            log.warning("%s: %s is damaged (%s): rebuilding it", stage.name, path, why)
            path.unlink(missing_ok=True)
        if recorded.get("finished") and not damaged and stage.complete(manifest):
            stats = dict(recorded.get("stats", {}))
            stage.say(stage.skip_message(stats))
            return {"skipped": True, **stats}
    stage.preflight(manifest)
    rank, world = runtime.rank(), runtime.world_size()
    started = (recorded or {}).get("started") or now_iso()
    # every rank has read the manifest and planned from it before rank 0 records this run in it:
    # a rank that read it after would plan from this run's record (knn --refresh: another
    # decision, other work units, shards that no rank writes)
    runtime.barrier()
    if rank == 0:
        stage.db.mkdir(parents=True, exist_ok=True)
        manifest = record_stage(stage.db, stage.name, params=params, started=started, finished=None,
                                versions_=versions(*stage.packages), manifest=manifest)
    if rank == 0:  # before any rank writes: a writer on another machine has a PID unknown here
        for folder, prefixes in stage.temp_folders():
            clean_stale_tmp([folder], prefixes)
    runtime.barrier()
    if rank != 0:  # plan the units from this run's record, as rank 0 does (its generations_before)
        manifest = load_manifest(stage.db)
    try:
        stage.begin(manifest)
        mine = stage.rank_units(stage.units(manifest), rank, world)
        todo = [u for u in mine if not stage.unit_done(u)]
        if len(todo) < len(mine):
            log.warning("%s: resuming: %d of %d work units already done", stage.name,
                        len(mine) - len(todo), len(mine))
        written = 0

        def done(unit: Unit) -> None:
            nonlocal written
            if not stage.advances_bar:
                bar.update(unit.size)
            written += 1
            crash_point(stage.name, written)

        t0 = time.time()
        done_size = sum(u.size for u in mine) - sum(u.size for u in todo)
        desc = f"{stage.name}[{rank}/{world}]" if world > 1 else stage.name
        with tqdm(total=sum(u.size for u in mine), initial=done_size, unit=stage.progress_unit,
                  unit_scale=stage.progress_scale, desc=desc, disable=not todo, dynamic_ncols=True,
                  smoothing=0.1) as bar:
            stage.bar = bar
            if todo:
                stage.setup()
                stage.run_units(todo, done)
        run = RunInfo(seconds=time.time() - t0, units_done=written, units_reused=len(mine) - len(todo),
                      rank=rank, world_size=world)
        runtime.barrier()
        stage.finish_rank(load_manifest(stage.db), run)
        runtime.barrier()
        stats: dict[str, Any] = {}
        if rank == 0:
            crash_point(stage.name, "finalize")
            manifest = load_manifest(stage.db)
            stats = stage.finalize(manifest, run)
            manifest = record_stage(stage.db, stage.name, params=params, started=started, finished=now_iso(),
                                    stats=stats, versions_=versions(*stage.packages), manifest=manifest)
            manifest["stages"][stage.name]["files"] = {
                p.relative_to(stage.db).as_posix(): p.stat().st_size for p in stage.outputs(manifest)}
            save_manifest(stage.db, manifest)
        # every rank returns once the stage is recorded: the next stage of ``all`` (or a caller)
        # reads the manifest at once, and another rank ahead of rank 0 would find this stage
        # unfinished ("needs the 'chunk' stage first")
        runtime.barrier()
        stage.say(stage.report(stats, run))
        return stats
    finally:
        stage.close()


def damaged_outputs(db: Path, files: Any) -> list[tuple[Path, str]]:
    """(path, why) of each recorded output that is missing, of another size, or (.npy) whose
    header does not parse or disagrees with the size: cheap, no data is read."""
    import numpy as np

    out: list[tuple[Path, str]] = []
    if not isinstance(files, dict):
        return out  # a database from before outputs were recorded: trust complete()
    for rel, size in files.items():
        path = db / rel
        if not path.is_file():
            out.append((path, "missing"))
            continue
        have = path.stat().st_size
        if have != size:
            out.append((path, f"{have} bytes, {size} when written"))
            continue
        if path.suffix == ".npy":
            try:
                with open(path, "rb") as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                    expect = f.tell() + int(np.prod(shape)) * dtype.itemsize
            except Exception as e:
                out.append((path, f"bad header: {type(e).__name__}"))
                continue
            if expect != have:
                out.append((path, f"header says {expect} bytes, the file has {have}"))
    return out


def config_from_args(cls: type[C], args: Any) -> C:
    """A stage's frozen config from parsed arguments: one attribute per field, no defaults here
    (the parser's defaults are the dataclass's own)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})  # type: ignore[misc]


def positive(value: int | float, flag: str) -> None:
    """One-line refusal of a non-positive count or size given on the command line."""
    if value <= 0:
        raise UserError(f"{flag} must be positive, not {value}")


__all__ = ["CRASH_ENV", "RunInfo", "Stage", "Unit", "clean_stale_tmp", "config_from_args", "crash_point",
           "positive", "run_stage"]
