"""Every input format as a stream of documents: plain text, JSONL, Parquet, gzip and zstd.

Formats, by file name (compression by its last suffix):
- ``*.jsonl``, ``*.jsonl.gz``, ``*.jsonl.zst``, ``*.json.gz``, ``*.json.zst``: one document per
  line, the string under ``text_field`` (``--text-field``, default ``text``);
- ``*.parquet``: one document per row, the string column ``text_field``;
- anything else, compressed (``*.txt.gz``, ``*.txt.zst``...) or not: one plain-text document.

Why streamed: corpora ship as multi-GB compressed shards, and one plain-text file can be a single
document of any size. Nothing here holds a file whole: plain text is decoded block by block (an
incremental UTF-8 decoder, CRLF folded across block seams), JSONL is read line by line, Parquet
batch by batch; what a reader holds is one block, one line or one batch. The normalisation is
chunk_store.chunk.text_files's (BOM, CRLF, invalid bytes), so a streamed document is the same text as
the whole file decoded at once. Corrupt or truncated archives, a missing text field and
non-string values are counted skips with a reason, never an exception out of a reader.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import os
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Sequence

import zstandard

from chunk_store.chunk.text_files import (BINARY, DEFAULT_MAX_INVALID_FRACTION, EMPTY, JSONL_BAD_LINE, UNDECODABLE,
                                    UNREADABLE, InputFile, _InvalidCounter, clean_surrogates, normalise_text)

CORRUPT = "corrupt_archive"  # a compressed stream or Parquet file that cannot be read to its end
MISSING_FIELD = "missing_text_field"  # a record (or a Parquet file) without the text field
NOT_STRING = "non_string_text"  # a text field that is not a string (a number, a list, null)

DEFAULT_TEXT_FIELD = "text"
BLOCK_BYTES = 1 << 20  # raw bytes a plain-text reader decodes at a time
PARQUET_BATCH_ROWS = 1024
# what a damaged stream raises (gzip.BadGzipFile is an OSError)
_STREAM_ERRORS = (OSError, EOFError, zlib.error, ValueError, zstandard.ZstdError)


@dataclass(frozen=True)
class InputFormat:
    kind: str  # "text" | "jsonl" | "parquet"
    compression: str | None  # None | "gz" | "zst"

    @property
    def byte_ranges(self) -> bool:
        """Whether a big file can be cut into byte ranges (uncompressed JSONL only)."""
        return self.kind == "jsonl" and self.compression is None


def input_format(path: str) -> InputFormat:
    """The format of an input file, from its name (see the module docstring)."""
    name = os.path.basename(path).lower()
    compression = None
    for suffix, comp in ((".gz", "gz"), (".zst", "zst"), (".zstd", "zst")):
        if name.endswith(suffix):
            name, compression = name[: -len(suffix)], comp
            break
    if name.endswith(".jsonl") or (compression and name.endswith(".json")):
        return InputFormat("jsonl", compression)
    if name.endswith(".parquet") and compression is None:
        return InputFormat("parquet", None)
    return InputFormat("text", compression)


class HashingReader(io.RawIOBase):
    """A file's bytes, hashed as they are read; ``drain`` reads the rest (a corrupt stream's
    file still gets its sha256, which a re-run compares)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = self.f.readinto(b)
        if n:
            self.sha.update(memoryview(b)[:n])
            self.nbytes += n
        return n or 0

    def drain(self) -> str:
        while self.f.read(BLOCK_BYTES):
            pass
        return self.sha.hexdigest()


def open_decompressed(raw: BinaryIO, compression: str | None) -> BinaryIO:
    """A binary stream of the decompressed bytes (multi-member gzip, multi-frame zstd)."""
    if compression == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression == "zst":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)  # type: ignore[return-value]
    return raw


def _error_reason(e: BaseException, compression: str | None) -> str:
    return CORRUPT if compression or type(e).__name__ in ("ZstdError", "ArrowInvalid") else UNREADABLE


def _detail(e: BaseException) -> str:
    return f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"


# ----------------------------------------------------------------------------- plain text


class TextStream:
    """One plain-text document, read block by block: iterate for its normalised text.

    After iteration: ``reason`` (a skip reason, or None for a document), ``invalid_bytes``,
    ``size`` (bytes read from the file), ``sha256`` (of the file's bytes; None when unreadable)
    and ``text_digest`` (sha256 of the normalised UTF-8 text: the split and duplicate key).
    ``limit`` reads at most about that many decompressed bytes (a sample: then ``sha256`` is None).
    The skip rules are ``decode_bytes``'s: all-whitespace bytes, a NUL byte, too many invalid bytes
    (a fraction of the decompressed size), whitespace-only text.
    """

    def __init__(self, path: str, max_invalid_fraction: float = DEFAULT_MAX_INVALID_FRACTION,
                 limit: int | None = None, block: int = BLOCK_BYTES) -> None:
        self.path, self.max_invalid_fraction, self.limit, self.block = path, max_invalid_fraction, limit, block
        self.compression = input_format(path).compression
        self.reason: str | None = None
        self.detail: str | None = None
        self.invalid_bytes = 0
        self.size = 0
        self.sha256: str | None = None
        self.text_digest: bytes = b""

    def __iter__(self) -> Iterator[str]:
        try:
            raw_file = open(self.path, "rb")
        except OSError as e:
            self.reason, self.detail = UNREADABLE, _detail(e)
            return
        with raw_file:
            raw = HashingReader(raw_file)
            yield from self._read(raw)
            if self.limit is None and self.reason != UNREADABLE:
                try:
                    self.sha256 = raw.drain()
                except OSError:
                    self.reason = UNREADABLE
            self.size = raw.nbytes

    def _read(self, raw: HashingReader) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="retro_count_invalid")
        text_sha = hashlib.sha256()
        _InvalidCounter.count = 0
        raw_size, has_bytes, has_text, started, cr = 0, False, False, False, False
        try:
            stream = open_decompressed(raw, self.compression)
            while self.limit is None or raw_size < self.limit:
                data = stream.read(self.block)
                if not data:
                    break
                raw_size += len(data)
                has_bytes = has_bytes or bool(data.strip())
                if b"\x00" in data:
                    self.reason = BINARY
                    return
                text = decoder.decode(data)
                if not started and text:
                    text, started = text.removeprefix("\ufeff"), True
                text, cr = _fold_cr(text, cr)
                if text:
                    has_text = has_text or bool(text.strip())
                    text_sha.update(text.encode("utf-8", "surrogatepass"))
                    yield text
            tail = decoder.decode(b"", final=True)
            if not started:
                tail = tail.removeprefix("\ufeff")
            tail = normalise_text(("\r" if cr else "") + tail) if (tail or cr) else ""
            if tail:
                has_text = has_text or bool(tail.strip())
                text_sha.update(tail.encode("utf-8", "surrogatepass"))
                yield tail
        except _STREAM_ERRORS as e:
            self.reason, self.detail = _error_reason(e, self.compression), _detail(e)
            return
        finally:
            self.invalid_bytes = _InvalidCounter.count
        if not has_bytes:
            self.reason = EMPTY
        elif self.invalid_bytes > self.max_invalid_fraction * raw_size:
            self.reason = UNDECODABLE
        elif not has_text:
            self.reason = EMPTY
        self.text_digest = text_sha.digest()


def _fold_cr(text: str, cr: bool) -> tuple[str, bool]:
    """CRLF and lone CR -> LF across block seams: a CR ending a block waits for the next one."""
    if cr:
        text = "\r" + text
    cr = text.endswith("\r")
    if cr:
        text = text[:-1]
    return (text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text), cr


# ----------------------------------------------------------------------------- records


@dataclass
class Record:
    """One document of a JSONL or Parquet file, or (``text`` None) one skipped record."""

    text: str | None
    line: int  # 1-based line (JSONL) or row (Parquet)
    reason: str | None = None
    invalid_bytes: int = 0


@dataclass
class RecordReport:
    """What reading a record file gave, besides its records (filled as they are read)."""

    size: int = 0
    sha256: str | None = None
    file_skip: dict | None = None  # a skip of the whole file (or the rest of it)


def _text_of(obj: object, text_field: str) -> tuple[str | None, str | None]:
    if not isinstance(obj, dict):
        return None, JSONL_BAD_LINE
    if text_field not in obj:
        return None, MISSING_FIELD
    value = obj[text_field]
    if not isinstance(value, str):
        return None, NOT_STRING
    text = normalise_text(clean_surrogates(value))
    return (text, None) if text.strip() else (None, EMPTY)


def _decode_line(line: bytes, max_invalid_fraction: float) -> tuple[str | None, int]:
    try:
        return line.decode("utf-8"), 0
    except UnicodeDecodeError:
        _InvalidCounter.count = 0
        text = line.decode("utf-8", errors="retro_count_invalid")
        n = _InvalidCounter.count
        return (None, n) if n > max_invalid_fraction * len(line) else (text, n)


def iter_jsonl(path: str, report: RecordReport, text_field: str = DEFAULT_TEXT_FIELD,
               start: int = 0, end: int | None = None, first_line: int = 1,
               max_invalid_fraction: float = DEFAULT_MAX_INVALID_FRACTION) -> Iterator[Record]:
    """The records of a JSONL file (or of the byte range [start, end) of a plain one), line by line.

    Blank lines are ignored; a line that is not JSON, has no ``text_field``, a non-string one,
    only whitespace, or too many invalid UTF-8 bytes is a skipped record. A read error ends the
    file with ``report.file_skip`` set; the records read before it stand.
    """
    fmt = input_format(path)
    try:
        raw_file = open(path, "rb")
    except OSError as e:
        report.file_skip = {"path": path, "reason": UNREADABLE, "detail": _detail(e)}
        return
    whole = start == 0 and end is None
    with raw_file:
        if start:
            raw_file.seek(start)
        raw = HashingReader(raw_file)
        lineno, pos = first_line, start
        try:
            for line in _lines(open_decompressed(raw, fmt.compression), None if end is None else end - start):
                pos += len(line)
                if lineno == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")
                if line.strip():
                    yield _record(line, lineno, text_field, max_invalid_fraction)
                lineno += 1
        except _STREAM_ERRORS as e:
            report.file_skip = {"path": path, "reason": _error_reason(e, fmt.compression), "line": lineno,
                                "detail": _detail(e)}
        report.size = pos - start if not whole or report.file_skip else raw.nbytes
        if whole:
            try:
                report.sha256 = raw.drain()
                report.size = raw.nbytes
            except OSError:
                pass


def _lines(stream: BinaryIO, limit: int | None, block: int = 64 << 10) -> Iterator[bytes]:
    """The lines of a stream (LF kept), at most ``limit`` bytes of it, read a block at a time with
    ``read1``: a damaged stream raises only after every line before the damage was handed out."""
    read = getattr(stream, "read1", stream.read)
    buf = bytearray()
    left = limit
    while left is None or left > 0:
        data = read(block if left is None else min(block, left))
        if not data:
            break
        if left is not None:
            left -= len(data)
        scan = len(buf)
        buf += data
        start = 0
        while (nl := buf.find(b"\n", scan)) >= 0:
            yield bytes(buf[start:nl + 1])
            start = scan = nl + 1
        del buf[:start]
    if buf:
        yield bytes(buf)


def _record(line: bytes, lineno: int, text_field: str, max_invalid_fraction: float) -> Record:
    decoded, invalid = _decode_line(line, max_invalid_fraction)
    if decoded is None:
        return Record(None, lineno, UNDECODABLE, invalid)
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError:
        return Record(None, lineno, JSONL_BAD_LINE)
    except RecursionError:  # a line of 100k nested brackets
        return Record(None, lineno, JSONL_BAD_LINE)
    text, reason = _text_of(obj, text_field)
    return Record(text, lineno, reason, invalid)


def parquet_row_groups(path: str) -> list[tuple[int, int]]:
    """(rows, compressed bytes) of each row group of a Parquet file (its footer only)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    return [(meta.row_group(i).num_rows, meta.row_group(i).total_compressed_size or 1)
            for i in range(meta.num_row_groups)]


def iter_parquet(path: str, report: RecordReport, text_field: str = DEFAULT_TEXT_FIELD,
                 start: int = 0, end: int | None = None, first_row: int = 1,
                 with_sha: bool = True) -> Iterator[Record]:
    """The records of row groups [start, end) of a Parquet file, one batch at a time."""
    yield from _parquet_records(path, report, text_field, start, end, first_row)
    if with_sha:
        try:
            report.size, report.sha256 = _file_sha256(path)
        except OSError:
            pass


def _parquet_records(path: str, report: RecordReport, text_field: str, start: int, end: int | None,
                     first_row: int) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = first_row
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        if text_field not in schema.names:
            report.file_skip = {"path": path, "reason": MISSING_FIELD}
            return
        ftype = schema.field(text_field).type
        if not (pa.types.is_string(ftype) or pa.types.is_large_string(ftype)):
            report.file_skip = {"path": path, "reason": NOT_STRING, "detail": str(ftype)}
            return
        groups = list(range(start, pf.metadata.num_row_groups if end is None else end))
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                if value is None:
                    yield Record(None, row, NOT_STRING)
                else:
                    text = normalise_text(clean_surrogates(value))
                    yield Record(text, row) if text.strip() else Record(None, row, EMPTY)
                row += 1
    except (OSError, pa.ArrowException, ValueError) as e:
        missing = isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError))
        report.file_skip = {"path": path, "reason": UNREADABLE if missing else CORRUPT, "line": row,
                            "detail": _detail(e)}


def _file_sha256(path: str) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while data := f.read(BLOCK_BYTES):
            h.update(data)
            n += len(data)
    return n, h.hexdigest()


def iter_records(path: str, report: RecordReport, text_field: str = DEFAULT_TEXT_FIELD,
                 start: int = 0, end: int | None = None, first_line: int = 1,
                 max_invalid_fraction: float = DEFAULT_MAX_INVALID_FRACTION) -> Iterator[Record]:
    """JSONL or Parquet records (``start``/``end``: bytes of a JSONL file, row groups of a Parquet one)."""
    if input_format(path).kind == "parquet":
        return iter_parquet(path, report, text_field, start, end, first_line, with_sha=(start == 0 and end is None))
    return iter_jsonl(path, report, text_field, start, end, first_line, max_invalid_fraction)


# ----------------------------------------------------------------------------- the tokenizer's sample


def iter_sample_text(files: Sequence[InputFile], budget_bytes: int, per_file_bytes: int = 1 << 20,
                     max_invalid_fraction: float = DEFAULT_MAX_INVALID_FRACTION,
                     skipped: list[dict] | None = None,
                     text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    """A deterministic, bounded sample of the corpus's text for tokenizer training.

    Files are visited in the order of a stable hash of their path (so the sample spreads over
    the whole corpus rather than its first folder) and read until ``budget_bytes`` of text; at
    most about ``per_file_bytes`` of each file is read (a plain-text head is cut after its last
    newline). A file that gives no text adds its first skip to ``skipped``.
    """
    order = sorted(files, key=lambda f: hashlib.sha256(os.fsencode(f.path)).digest())  # any OS path
    used = 0
    for f in order:
        if used >= budget_bytes:
            return
        for text in _file_sample(f.path, per_file_bytes, max_invalid_fraction, skipped, text_field):
            used += len(text.encode("utf-8", errors="replace"))
            yield text
            if used >= budget_bytes:
                return


def _file_sample(path: str, limit: int, max_invalid_fraction: float, skipped: list[dict] | None,
                 text_field: str) -> Iterator[str]:
    if input_format(path).kind == "text":
        stream = TextStream(path, max_invalid_fraction, limit=limit)
        text = "".join(stream)
        if stream.reason is None and stream.size >= limit and "\n" in text:
            text = text[: text.rindex("\n") + 1]
        if stream.reason is None and text:
            yield text[:limit]
        elif skipped is not None:
            skipped.append({"path": path, "reason": stream.reason or EMPTY})
        return
    report = RecordReport()
    read, first_skip = 0, None
    for rec in iter_records(path, report, text_field, max_invalid_fraction=max_invalid_fraction):
        if rec.text is None:
            first_skip = first_skip or {"path": path, "reason": rec.reason, "line": rec.line}
            continue
        text = rec.text[:limit]
        read += len(text)
        yield text
        if read >= limit:
            return
    if read == 0 and skipped is not None:
        skipped.append(report.file_skip or first_skip or {"path": path, "reason": EMPTY})
