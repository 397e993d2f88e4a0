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
- ``*.jsonl`` files give one document per line, from the line's ``text`` field.
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import json
import os
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

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
            from chunk_store.errors import UserError

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


@dataclass
class Document:
    text: str
    source: str
    line: int | None = None  # 1-based line number for .jsonl documents

    def source_json(self) -> dict:
        return {"source": self.source} if self.line is None else {"source": self.source, "line": self.line}


@dataclass
class FileOutcome:
    """What reading one input file (or one byte range of a big .jsonl) gave."""

    path: str
    size: int  # bytes read
    sha256: str | None  # of the whole file; None when only a range was read
    documents: list[Document]
    skipped: list[dict]  # {"path", "reason"[, "line"]}
    invalid_bytes: int = 0


def _clean_surrogates(text: str) -> str:
    """JSON can carry lone surrogates (\\ud800), which no UTF-8 tokenizer accepts."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def read_documents(
    path: str, max_invalid_fraction: float = DEFAULT_MAX_INVALID_FRACTION,
    start: int = 0, end: int | None = None, first_line: int = 1,
) -> FileOutcome:
    """Read one input file into documents (one, or one per line for ``.jsonl``).

    ``start``/``end`` read a byte range only (big .jsonl files are split at line boundaries
    into several work units; ``first_line`` is the line number at ``start``).
    """
    try:
        with open(path, "rb") as f:
            if start:
                f.seek(start)
            data = f.read() if end is None else f.read(end - start)
    except OSError as e:
        return FileOutcome(path, 0, None, [], [{"path": path, "reason": UNREADABLE,
                                                 "detail": f"{type(e).__name__}: {e.strerror}"}])
    whole = start == 0 and end is None
    sha = hashlib.sha256(data).hexdigest() if whole else None
    size = len(data)
    jsonl = path.endswith(".jsonl")
    dec = decode_bytes(data, max_invalid_fraction, normalise=not jsonl)
    del data
    if dec.text is None:
        skip = {"path": path, "reason": dec.reason}
        if not whole:
            skip["line"] = first_line  # the range's first line: the whole range is skipped
        return FileOutcome(path, size, sha, [], [skip], dec.invalid_bytes)
    if not jsonl:
        return FileOutcome(path, size, sha, [Document(dec.text, path)], [], dec.invalid_bytes)
    docs: list[Document] = []
    skipped: list[dict] = []
    for lineno, line in enumerate(dec.text.split("\n"), start=first_line):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            skipped.append({"path": path, "line": lineno, "reason": JSONL_BAD_LINE})
            continue
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            skipped.append({"path": path, "line": lineno, "reason": JSONL_BAD_LINE})
            continue
        text = normalise_text(_clean_surrogates(text))
        if not text.strip():
            skipped.append({"path": path, "line": lineno, "reason": EMPTY})
            continue
        docs.append(Document(text, path, lineno))
    return FileOutcome(path, size, sha, docs, skipped, dec.invalid_bytes)


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


def _sample_end(path: str, size: int, limit: int) -> int | None:
    """A byte offset just after a LF near ``limit``: read a big file's head, never all of it."""
    if size <= limit:
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(limit)
    except OSError:  # unreadable or gone: read_documents skips it, counted, reading at most limit
        return limit
    nl = head.rfind(b"\n")
    return nl + 1 if nl > 0 else limit


def iter_sample_text(files: Sequence[InputFile], budget_bytes: int, per_file_bytes: int = 1 << 20,
                     max_invalid_fraction: float = DEFAULT_MAX_INVALID_FRACTION,
                     skipped: list[dict] | None = None) -> Iterator[str]:
    """A deterministic, bounded sample of the corpus's text for tokenizer training.

    Files are visited in the order of a stable hash of their path (so the sample spreads over
    the whole corpus rather than its first folder) and read until ``budget_bytes`` of text;
    at most about ``per_file_bytes`` of each file is read.
    """
    order = sorted(files, key=lambda f: hashlib.sha256(os.fsencode(f.path)).digest())  # any OS path
    used = 0
    for f in order:
        if used >= budget_bytes:
            return
        end = _sample_end(f.path, f.size, per_file_bytes)
        out = read_documents(f.path, max_invalid_fraction, 0, end)
        if skipped is not None and not out.documents:
            skipped.extend(out.skipped[:1])
        for doc in out.documents:
            text = doc.text[:per_file_bytes]
            used += len(text.encode("utf-8", errors="replace"))
            yield text
            if used >= budget_bytes:
                return
