"""The DB directory's manifest.json: read, written, compared, each stage's record.

One retrieval database is one directory (see docs/DB_FORMAT.md). Every stage records what it
did in ``manifest.json`` under ``stages[<name>]`` (params, versions, start/end time, figures),
and refuses to run on artifacts made with other parameters. Every file is written to a
temporary name and renamed into place, so a crash never leaves a half-written file under its
final name.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from chunk_store.framework.errors import DBError, UserError  # noqa: F401 (DBError re-exported: older imports)
from chunk_store.framework.atomic import atomic_save_npy, atomic_write_bytes, atomic_write_json  # noqa: F401 (older imports)
from chunk_store.layout import MANIFEST

FORMAT_VERSION = 1


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def versions(*extra: str) -> dict[str, str]:
    """Versions of python, numpy and any other named packages (those importable)."""
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for name in extra:
        try:
            mod = __import__(name)
            out[name] = str(getattr(mod, "__version__", "unknown"))
        except Exception:  # an optional package that is absent is simply not recorded
            pass
    return out


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def open_npy(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """Open a .npy file memory-mapped, with a one-line UserError naming the file on any problem."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"missing file {path}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as e:  # truncated header, wrong magic, short data...
        raise UserError(f"corrupt array file {path}: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- the manifest


def manifest_path(db: str | os.PathLike) -> Path:
    return Path(db) / MANIFEST


def load_manifest(db: str | os.PathLike) -> dict[str, Any]:
    path = manifest_path(db)
    if not Path(db).is_dir():
        raise UserError(f"no database directory at {db}")
    if not path.exists():
        raise UserError(f"missing {path}: not a retro database (run `retro-build-index chunk` first)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"corrupt {path}: {e}") from None
    validate_manifest(manifest, path)
    return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_manifest(manifest: Any, path: str | os.PathLike) -> None:
    """Check the shape every reader relies on, so that a manifest that is valid JSON of the wrong
    shape is one line naming the field, never a TypeError/KeyError later (fills ``stages: {}``)."""

    def bad(what: str) -> UserError:
        return UserError(f"corrupt {path}: {what}")

    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise bad("no format_version")
    version = manifest["format_version"]
    if not _is_int(version) or version < 1:
        raise bad(f"format_version is {version!r}, not a version number")
    if version > FORMAT_VERSION:
        raise UserError(f"{path} has format version {version}, this code reads up to {FORMAT_VERSION}: "
                        f"upgrade retro")
    for key in ("chunk_size", "seq_len"):
        if not _is_int(manifest.get(key)) or manifest[key] <= 0:
            raise bad(f"{key} is {manifest.get(key)!r}, not a positive integer")
    stages = manifest.setdefault("stages", {})
    if not isinstance(stages, dict):
        raise bad(f"stages is a {type(stages).__name__}, not an object")
    for name, rec in stages.items():
        if not isinstance(rec, dict):
            raise bad(f"stages.{name} is a {type(rec).__name__}, not an object")
        for key, kind in (("params", dict), ("stats", dict), ("versions", dict)):
            if key in rec and not isinstance(rec[key], kind):
                raise bad(f"stages.{name}.{key} is a {type(rec[key]).__name__}, not an object")
        for key in ("started", "finished"):
            if rec.get(key) is not None and not isinstance(rec[key], str):
                raise bad(f"stages.{name}.{key} is {rec[key]!r}, not a time")
    for key, kind in (("tokenizer", dict), ("counts", dict), ("token_dtype", str), ("inputs", list),
                      ("skipped", list), ("repaired", list)):
        if key in manifest and not isinstance(manifest[key], kind):
            raise bad(f"{key} is a {type(manifest[key]).__name__}, the chunk stage writes a {kind.__name__}")
    if stage_done(manifest, "chunk") and "tokenizer" in manifest:
        tok = manifest["tokenizer"]
        for key in ("vocab_size", "pad_id", "eos_id"):
            if not _is_int(tok.get(key)):
                raise bad(f"tokenizer.{key} is {tok.get(key)!r}, not an integer")
        if not isinstance(tok.get("file", ""), str):
            raise bad(f"tokenizer.file is {tok['file']!r}, not a file name")
    for split, counts in manifest.get("counts", {}).items():
        if not isinstance(counts, dict) or not all(_is_int(v) for v in counts.values()):
            raise bad(f"counts.{split} is {counts!r}, not an object of counts")
    shards = manifest.get("shards")
    if shards is not None and not isinstance(shards, list):
        raise bad(f"shards is a {type(shards).__name__}, not a list")
    for i, rec in enumerate(shards or []):
        where = rec.get("dir") if isinstance(rec, dict) else None
        if not isinstance(where, str) or where.startswith("/") or ".." in where.split("/"):
            raise bad(f"shards[{i}] is {rec!r}, not a shard record with a folder inside the DB")
        counts = rec.get("counts", {})
        if not isinstance(counts, dict) or not all(
                isinstance(c, dict) and all(_is_int(v) for v in c.values()) for c in counts.values()):
            raise bad(f"shards[{i}].counts is {counts!r}, not an object of counts")


def save_manifest(db: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    atomic_write_json(manifest_path(db), dict(manifest))


def stage_done(manifest: Mapping[str, Any], stage: str) -> bool:
    rec = manifest.get("stages", {}).get(stage)
    return bool(rec and rec.get("finished"))


def require_stage(manifest: Mapping[str, Any], stage: str, needed_by: str) -> None:
    if not stage_done(manifest, stage):
        raise UserError(
            f"{needed_by} needs the '{stage}' stage first: run `retro-build-index {stage} --db DB`"
        )


def check_params(
    recorded: Mapping[str, Any] | None,
    requested: Mapping[str, Any],
    stage: str,
    keys: Iterable[str] | None = None,
) -> None:
    """Refuse to reuse artifacts made with other parameters; name the first value that differs.

    ``keys`` limits the comparison (e.g. parameters that do not change the result, such as a
    batch size or worker count, are left out by the caller).
    """
    if not recorded:
        return
    for key in keys if keys is not None else requested.keys():
        if key not in recorded or key not in requested:
            continue
        if recorded[key] != requested[key]:
            raise UserError(
                f"{stage}: {key} differs: the database was built with {key}={recorded[key]!r}, "
                f"this run asks for {key}={requested[key]!r} (use a new --out/--db, or the same value)"
            )


def record_stage(
    db: str | os.PathLike,
    stage: str,
    *,
    params: Mapping[str, Any],
    started: str,
    finished: str | None,
    stats: Mapping[str, Any] | None = None,
    versions_: Mapping[str, str] | None = None,
    manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``stages[stage]`` into the manifest (re-read from disk unless given) and save it."""
    manifest = manifest if manifest is not None else load_manifest(db)
    manifest.setdefault("stages", {})[stage] = {
        "params": dict(params),
        "versions": dict(versions_ or versions()),
        "started": started,
        "finished": finished,
        "stats": dict(stats or {}),
    }
    save_manifest(db, manifest)
    return manifest
