"""The database stages, registered once: the one place that says which stages exist, in what
order, which module implements each and which stage must have finished first.

Every reader takes it from here: ``retro-build-index`` makes one subcommand per entry (and runs
the ``in_all`` ones in order for ``all``), ``info`` reports their status in this order, the
manifest's stage order is this order, and :class:`chunk_store.framework.stage.Stage` reads its
prerequisite from here. Adding a stage is one :func:`register` call (or one line in
:data:`BUILT_IN`); its module provides ``add_arguments(parser)``, ``SHARED_OPTIONS`` and
``run(args) -> dict``, and its :class:`Stage` subclass has ``name`` equal to the entry's name.

Modules are named, not imported: ``retro-build-index info`` must not import torch or faiss.
"""

from __future__ import annotations

from dataclasses import dataclass

from chunk_store.framework.errors import UserError


@dataclass(frozen=True)
class StageEntry:
    """One database stage: its subcommand and manifest key, where it lives, what it needs."""

    name: str
    module: str  # add_arguments(parser), SHARED_OPTIONS, run(args)
    requires: str | None = None  # the stage that must have finished first
    in_all: bool = True  # a step of `retro-build-index all` (add runs there only when inputs grew)
    db_flags: tuple[str, ...] = ("--db",)  # the database option and its aliases, first is shown
    db_help: str = "database directory"


BUILT_IN: tuple[StageEntry, ...] = (
    StageEntry("chunk", "chunk_store.chunk.stage", db_flags=("--out", "--db")),
    StageEntry("add", "chunk_store.add", requires="chunk", in_all=False, db_flags=("--db", "--out"),
               db_help="the database to grow"),
    StageEntry("embed", "index_builder.embed.stage", requires="chunk"),
    StageEntry("index", "index_builder.index.stage", requires="embed"),
    StageEntry("knn", "index_builder.knn.stage", requires="index"),
)

_entries: dict[str, StageEntry] = {e.name: e for e in BUILT_IN}


def register(entry: StageEntry) -> StageEntry:
    """Add a stage after the registered ones (a name registered twice is refused)."""
    if entry.name in _entries:
        raise UserError(f"stage {entry.name!r} is already registered (by {_entries[entry.name].module})")
    if entry.requires is not None and entry.requires not in _entries:
        raise UserError(f"stage {entry.name!r} requires {entry.requires!r}, which is not registered")
    _entries[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove a stage registered with :func:`register` (the built-in ones stay)."""
    if name in {e.name for e in BUILT_IN}:
        raise UserError(f"stage {name!r} is built in and cannot be unregistered")
    _entries.pop(name, None)


def stages() -> tuple[StageEntry, ...]:
    """Every registered stage, in pipeline order."""
    return tuple(_entries.values())


def stage_names() -> tuple[str, ...]:
    """The manifest's stage order."""
    return tuple(_entries)


def entry(name: str) -> StageEntry:
    try:
        return _entries[name]
    except KeyError:
        raise UserError(f"no stage named {name!r}; the stages are {', '.join(_entries)}") from None


def requires(name: str) -> str | None:
    """The stage that must have finished before ``name`` (None for a stage not registered)."""
    found = _entries.get(name)
    return found.requires if found else None


__all__ = ["BUILT_IN", "StageEntry", "entry", "register", "requires", "stage_names", "stages", "unregister"]
