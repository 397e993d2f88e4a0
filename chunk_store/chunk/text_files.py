"""Walking input folders and decoding their files into documents.

Why a module of its own: the walk must be deterministic (sorted, so ``--workers N`` and a
resumed run see the same file order), must never loop on symlinks, and every file it does not
turn into a document must be counted with a reason, never silently dropped.

Decoding rules (the documented normalisation every stage sees):
- UTF-8; a leading BOM is stripped; CRLF and lone CR become LF.
- A file with NUL bytes is binary; a file whose undecodable bytes exceed ``max_invalid_fraction``
  of its size is undecodable; both are skipped. Below that fraction each invalid byte becomes
  U+FFFD and the file is kept (and counted as repaired).
- An empty (or whitespace-only) file is skipped.
- What a file holds (one document, one per JSONL line, one per Parquet row) and how it is
  streamed (compressed, any size): chunk_store.chunk.input_formats.
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import os
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

# skip reasons (also the keys of the summary's "skipped" counts)
EMPTY = "empty"
BINARY = "binary"
UNDECODABLE = "undecodable"
UNREADABLE = "unreadable"
NOT_REGULAR = "not_regular_file"
BROKEN_LINK = "broken_symlink"
SYMLINK_LOOP = "symlink_loop"
JSONL_BAD_LINE = "jsonl_bad_line"
DUPLICATE_INPUT = "duplicate_input"

DEFAULT_MAX_INVALID_FRACTION = 0.01


@dataclass(frozen=True)
class InputFile:
    """One regular file found by the walk: where it is, what to call it, how big it is."""

    path: str  # absolute path as reached by the walk (through symlinked folders, not resolved)
    size: int
    mtime_ns: int

    def to_json(self) -> list:
        return [self.path, self.size, self.mtime_ns]

    @classmethod
    def from_json(cls, row: Sequence) -> "InputFile":
        return cls(str(row[0]), int(row[1]), int(row[2]))


@dataclass
class WalkResult:
    files: list[InputFile] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}


def _matches(patterns: Sequence[str], rel: str, name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(rel, p) for p in patterns)


def walk_inputs(
    inputs: Sequence[str | os.PathLike],
    globs: Sequence[str] = (),
    excludes: Sequence[str] = (),
    progress: bool = False,
    never: Sequence[str | os.PathLike] = (),
) -> WalkResult:
    """Every candidate file under ``inputs``, in a deterministic order.

    ``globs`` (if any) keep files whose name or path relative to their input matches one of
    them; ``excludes`` drop files (and prune folders) whose relative path matches. Hidden files
    and folders (name starting with ".") are ignored, and so are the folders in ``never``. Symlinked folders are followed once; a
    folder reached a second time (a loop, or a second link to it) is skipped and recorded.
    """
    result = WalkResult()
    pruned = {os.path.realpath(p) for p in never}  # e.g. the database being built (--out inside --input)
    bar = tqdm(desc="walk", unit=" files", disable=not progress, leave=False)
    visited_dirs: set[tuple[int, int]] = set()
    for inp in inputs:
        root = Path(inp).expanduser().resolve()
        if root.is_file():
            st = root.stat()
            result.files.append(InputFile(str(root), st.st_size, st.st_mtime_ns))
            continue
        if not root.is_dir():
            from chunk_store.framework.errors import UserError

            raise UserError(f"input {inp} is not a folder or a file")
        rst = root.stat()
        if (rst.st_dev, rst.st_ino) in visited_dirs:  # the same folder given twice, or nested
            result.skipped.append({"path": str(root), "reason": DUPLICATE_INPUT})
            continue
        visited_dirs.add((rst.st_dev, rst.st_ino))
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel_dir = os.path.relpath(dirpath, root)
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            keep = []
            for d in sorted(dirnames):
                if d.startswith("."):
                    continue
                rel = rel_dir + d
                if excludes and any(fnmatch.fnmatchcase(rel + "/", p) or fnmatch.fnmatchcase(rel, p)
                                    for p in excludes):
                    continue
                full = os.path.join(dirpath, d)
                if pruned and os.path.realpath(full) in pruned:
                    continue
                try:
                    st = os.stat(full)
                except OSError:
                    result.skipped.append({"path": full, "reason": BROKEN_LINK})
                    continue
                key = (st.st_dev, st.st_ino)
                if key in visited_dirs:
                    result.skipped.append({"path": full, "reason": SYMLINK_LOOP})
                    continue
                visited_dirs.add(key)
                keep.append(d)
            dirnames[:] = keep
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                rel = rel_dir + name
                if globs and not _matches(globs, rel, name):
                    continue
                if excludes and any(fnmatch.fnmatchcase(rel, p) for p in excludes):
                    continue
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except OSError:
                    result.skipped.append({"path": full, "reason": BROKEN_LINK})
                    continue
                if not stat.S_ISREG(st.st_mode):
                    result.skipped.append({"path": full, "reason": NOT_REGULAR})
                    continue
                result.files.append(InputFile(full, st.st_size, st.st_mtime_ns))
                bar.update()
    bar.close()
    return result


# ----------------------------------------------------------------------------- decoding


class _InvalidCounter:
    """A codecs error handler that counts undecodable bytes and replaces them with U+FFFD."""

    count = 0

    @classmethod
    def handler(cls, exc: UnicodeDecodeError) -> tuple[str, int]:
        cls.count += exc.end - exc.start
        return "\ufffd" * (exc.end - exc.start), exc.end


codecs.register_error("retro_count_invalid", _InvalidCounter.handler)


def visible(text: str) -> bool:
    """Whether ``text`` has a character that is not whitespace, a control or a format character
    (U+200B, ZWJ, BOM, NUL...): text of only those embeds like empty text."""
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Cn", "Co")
               for ch in text)


def normalise_text(text: str) -> str:
    """The document normalisation: strip one leading BOM, CRLF / lone CR -> LF."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


@dataclass
class Decoded:
    text: str | None  # None when skipped
    reason: str | None = None  # skip reason
    invalid_bytes: int = 0


def decode_bytes(data: bytes, max_invalid_fraction: float = DEFAULT_MAX_INVALID_FRACTION,
                 normalise: bool = True) -> Decoded:
    """Bytes -> normalised text, or a skip reason (see the module docstring).

    ``normalise=False`` only strips the BOM (jsonl: lines are split on raw LF first, so line
    numbers count the file's LF bytes, and each line's ``text`` is normalised on its own).
    """
    if not data.strip():
        return Decoded(None, EMPTY)
    if b"\x00" in data:
        return Decoded(None, BINARY)
    try:
        text = data.decode("utf-8")
        invalid = 0
    except UnicodeDecodeError:
        _InvalidCounter.count = 0
        text = data.decode("utf-8", errors="retro_count_invalid")
        invalid = _InvalidCounter.count
        if invalid > max_invalid_fraction * len(data):
            return Decoded(None, UNDECODABLE, invalid)
    text = normalise_text(text) if normalise else text.removeprefix("\ufeff")
    if not text.strip():
        return Decoded(None, EMPTY)
    return Decoded(text, None, invalid)


def clean_surrogates(text: str) -> str:
    """JSON can carry lone surrogates (\\ud800), which no UTF-8 tokenizer accepts."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def split_jsonl(path: str, unit_bytes: int, block: int = 8 << 20) -> tuple[str, list[tuple[int, int, int]]]:
    """One streaming pass over a big .jsonl: its sha256 and line-aligned byte ranges.

    Returns ``(sha256, [(start, end, first_line), ...])`` with ranges of about ``unit_bytes``
    each, cut just after a LF, so that a worker decodes whole lines and knows their numbers.
    """
    h = hashlib.sha256()
    ranges: list[tuple[int, int, int]] = []
    start, start_line = 0, 1
    pos, newlines_before = 0, 0  # at the current block's start
    target = unit_bytes
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
            search = 0
            while pos + len(data) > target:
                nl = data.find(b"\n", max(target - pos, search))
                if nl < 0:
                    break  # the cut falls in a later block
                boundary = pos + nl + 1
                ranges.append((start, boundary, start_line))
                start = boundary
                start_line = newlines_before + data.count(b"\n", 0, nl + 1) + 1
                target = boundary + unit_bytes
                search = nl + 1
            newlines_before += data.count(b"\n")
            pos += len(data)
    if start < pos or not ranges:
        ranges.append((start, pos, start_line))
    return h.hexdigest(), ranges
