"""One unit of the chunk stage: read files, split documents, tokenise, pack into chunks.

A unit is a contiguous run of input files, about 2 MB (a big plain .jsonl is cut into line-aligned
byte ranges, a big Parquet file into runs of row groups; a compressed file is one unit, read as
a stream); :func:`process_unit` turns it into one part (chunk_store.chunk.part_files) renamed into
place when whole, so a killed run redoes only the units whose part is missing. Worker processes
run it with their own copy of the tokenizer. Pure helpers (the split rule, sequence starts, the
unit plan) live here too, so they can be tested without a database.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from chunk_store.framework.errors import UserError
from chunk_store.chunk.input_formats import (DEFAULT_TEXT_FIELD, Record, RecordReport, TextStream, input_format,
                                       iter_records, parquet_row_groups)
from chunk_store.layout import CHUNK_PART_PREFIX, TOKENIZER, temp_path
from chunk_store.manifest import sha256_file
from chunk_store.framework.atomic import atomic_write_json
from chunk_store.chunk.part_files import PartWriter
from chunk_store.chunk.text_files import InputFile, normalise_text, split_jsonl
from chunk_store.tokenization.sentencepiece import ENCODE_PIECE_CHARS, Tokenizer, iter_pieces

log = logging.getLogger("chunk_store.chunk.packing")

UNIT_BYTES = 2 << 20

# ----------------------------------------------------------------------------- pure helpers


def val_digest(digest: bytes, val_fraction: float) -> bool:
    """The stable split rule on a document's sha256 (of its normalised UTF-8 text): its first
    8 bytes as a fraction of 2**64 below ``val_fraction`` -> val."""
    if val_fraction <= 0.0:
        return False
    return int.from_bytes(digest[:8], "big") < val_fraction * 2.0**64


def is_val(text: str, val_fraction: float) -> bool:
    """:func:`val_digest` of a document held whole."""
    return val_digest(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest(), val_fraction)


def sequence_starts(num_chunks: int, chunks_per_seq: int) -> np.ndarray:
    """Non-overlapping sequence starts over the chunk stream; the last partial run dropped."""
    return np.arange(0, num_chunks - chunks_per_seq + 1, chunks_per_seq, dtype=np.int64)


# An item of the plan: [file_index, start, end, first_line, nbytes]. start/end: a byte range of a
# plain .jsonl, or row groups of a Parquet file; end None: the whole file.
PLAN_VERSION = 2


def plan_units(files: Sequence[InputFile], unit_bytes: int | None = None,
               ranges: dict[int, list[tuple[int, int, int, int]]] | None = None) -> list[list[list]]:
    """Group the work into units of about ``unit_bytes`` (default 2 MB), at most 4096 items each.

    A big plain .jsonl or Parquet file contributes one item per range (``ranges``: start, end,
    first line, bytes). A fixed size, not a fraction of the corpus, so a worker's memory does not
    grow with the corpus; small enough to balance the workers, large enough that per-part
    overhead is noise.
    """
    target = unit_bytes if unit_bytes else UNIT_BYTES
    ranges = ranges or {}
    units: list[list[list]] = []
    cur: list[list] = []
    acc = 0
    for i, f in enumerate(files):
        items = [[i, s, e, line, n] for s, e, line, n in ranges[i]] if i in ranges else [[i, 0, None, 1, f.size]]
        for item in items:
            cur.append(item)
            acc += item[4]
            if acc >= target or len(cur) >= 4096:
                units.append(cur)
                cur, acc = [], 0
    if cur:
        units.append(cur)
    return units


def _row_group_ranges(path: str, target: int) -> list[tuple[int, int, int, int]]:
    """Runs of a Parquet file's row groups of about ``target`` compressed bytes each."""
    out: list[tuple[int, int, int, int]] = []
    start, row, acc, first_row = 0, 1, 0, 1
    groups = parquet_row_groups(path)
    for g, (rows, nbytes) in enumerate(groups):
        acc += nbytes
        row += rows
        if acc >= target or g == len(groups) - 1:
            out.append((start, g + 1, first_row, acc))
            start, first_row, acc = g + 1, row, 0
    return out


SCAN_PREFIX = "scan_"  # DB/.chunk_work/scan_NNNNNNNN.json: one big file's hash and cuts


def big_files(files: Sequence[InputFile], target: int) -> list[int]:
    """The files the plan reads whole first (hash, cuts): big plain .jsonl and Parquet files."""
    return [i for i, f in enumerate(files) if f.size > target
            and (input_format(f.path).byte_ranges or input_format(f.path).kind == "parquet")]


def _scan(path: str, target: int) -> tuple[str, list[tuple[int, int, int, int]]] | None:
    """A big file's sha256 and its cuts (start, end, first line, bytes); None: one unit as it is."""
    try:
        if input_format(path).kind == "parquet":
            return sha256_file(Path(path)), _row_group_ranges(path, target)
        digest, cuts = split_jsonl(path, target)
        return digest, [(s, e, line, e - s) for s, e, line in cuts]
    except Exception as e:  # unreadable or not Parquet after all: the worker reports it
        log.info("plan: %s read as one unit (%s)", path, type(e).__name__)
        return None


def scan_path(folder: Path, i: int) -> Path:
    return folder / f"{SCAN_PREFIX}{i:08d}.json"


def _stored_scan(folder: Path, i: int, f: InputFile) -> tuple[str, list] | None | bool:
    """A scan stored by a rank (its result, None included), or False when absent or of another file."""
    try:
        rec = json.loads(scan_path(folder, i).read_text())
    except (OSError, ValueError):
        return False
    if rec.get("path") != f.path or rec.get("bytes") != f.size:
        return False
    return None if rec.get("sha256") is None else (rec["sha256"], [tuple(r) for r in rec["ranges"]])


def scan_share(folder: Path, files: Sequence[InputFile], unit_bytes: int | None, rank: int, world: int) -> int:
    """Rank r of W reads the big files r, r + W, ... of ``big_files`` for the plan (each result
    stored atomically, kept by a resume): a corpus of big files is not read by rank 0 alone
    while the other ranks wait. The count this rank read."""
    target = unit_bytes or UNIT_BYTES
    mine = [i for j, i in enumerate(big_files(files, target)) if j % world == rank]
    n = 0
    for i in mine:
        if _stored_scan(folder, i, files[i]) is False:
            got = _scan(files[i].path, target)
            atomic_write_json(scan_path(folder, i), {"path": files[i].path, "bytes": files[i].size, "rank": rank,
                                                     "sha256": got and got[0], "ranges": got and got[1]})
            n += 1
    return n


def load_or_make_plan(plan_path: Path, files: Sequence[InputFile], walk_skipped: list[dict],
                      unit_bytes: int | None, tokenizer_sha256: str) -> dict:
    """The work plan of an interrupted run (checked against the inputs), else a new one.

    Parts made with another tokenizer (the DB's model was replaced) or by an older version of
    this stage are discarded.
    """
    listing = [f.to_json() for f in files]
    if plan_path.exists():
        try:
            plan = json.loads(plan_path.read_text())
        except json.JSONDecodeError:
            plan = None
        if plan is not None and (plan.get("tokenizer_sha256") != tokenizer_sha256
                                 or plan.get("version") != PLAN_VERSION):
            log.warning("chunk: the tokenizer or the part format changed since the interrupted run: "
                        "redoing every unit")
            for part in plan_path.parent.glob(f"{CHUNK_PART_PREFIX}*"):
                shutil.rmtree(part) if part.is_dir() else part.unlink()
            plan = None
        if plan is not None:
            old = plan["files"]
            if old != listing:
                first = next((a for a, b in itertools.zip_longest(old, listing) if a != b), None) \
                    or next(b for a, b in itertools.zip_longest(old, listing) if a != b)
                raise UserError(
                    f"chunk: input files changed since the interrupted run (first difference: "
                    f"{first[0]}); restore them, or delete {plan_path.parent} to start over")
            return plan
    target = unit_bytes or UNIT_BYTES
    ranges: dict[int, list[tuple[int, int, int, int]]] = {}
    hashes: dict[str, str] = {}
    big = big_files(files, target)
    with tqdm(total=sum(files[i].size for i in big), unit="B", unit_scale=True, leave=False,
              desc="plan big files", disable=not big) as bar:
        for i in big:  # one streaming pass each for the hash and the cuts, unless a rank made it
            got = _stored_scan(plan_path.parent, i, files[i])
            if got is False:
                got = _scan(files[i].path, target)
            if got is not None:
                hashes[str(i)], ranges[i] = got
            bar.update(files[i].size)
    plan = {"version": PLAN_VERSION, "files": listing, "units": plan_units(files, target, ranges),
            "hashes": hashes, "walk_skipped": walk_skipped, "tokenizer_sha256": tokenizer_sha256}
    atomic_write_json(plan_path, plan)
    return plan

# ----------------------------------------------------------------------------- one work unit


@dataclass
class UnitSpec:
    index: int
    # path, start, end, first line, the file's size, its sha256 (from the plan), bytes of this item
    items: list[tuple[str, int, int | None, int, int, str | None, int]]
    part_path: str
    chunk_size: int
    val_fraction: float
    max_invalid_fraction: float
    text_field: str = DEFAULT_TEXT_FIELD


_WORKER_TOKENIZER: Tokenizer | None = None
ENCODE_BATCH_DOCS = 1024  # records encoded in one call where the tokenizer batches (HF: Rust threads)
ENCODE_BATCH_CHARS = 4 << 20


def init_worker(proto: Any) -> None:
    """``proto``: a sentencepiece model's bytes, or any picklable tokenizer (an HFTokenizer)."""
    global _WORKER_TOKENIZER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _WORKER_TOKENIZER = Tokenizer(proto, TOKENIZER) if isinstance(proto, bytes) else proto


def process_unit(spec: UnitSpec, tok: Tokenizer | None = None) -> dict[str, Any]:
    """Read, decode, split and tokenise one unit's files; write its part (renamed in when whole).

    Streams everything: a plain-text document of any size goes through in pieces, records in
    batches; what a worker holds is one block, one batch and the part's small buffers.
    """
    tok = tok or _WORKER_TOKENIZER
    assert tok is not None, "worker not initialised"
    writer = PartWriter(Path(spec.part_path), spec.chunk_size, tok.pad_id, tok.eos_id, tok.token_dtype)
    inputs: list[dict] = []
    skipped: list[dict] = []
    repaired: list[dict] = []
    nbytes = 0
    try:
        for path, start, end, first_line, size, sha, item_bytes in spec.items:
            if input_format(path).kind == "text":
                read_sha, invalid, kept = _text_document(writer, tok, path, spec, skipped)
            else:
                read_sha, invalid, kept = _records(writer, tok, path, (start, end, first_line), spec, skipped)
            if start == 0:  # a split file is listed once, with the hash the plan computed
                # bytes: the walk's size (what a re-run compares); sha256 None if unreadable
                inputs.append({"path": path, "bytes": size, "sha256": sha or read_sha})
            if invalid and kept:
                repaired.append({"path": path, "invalid_bytes": invalid})
            nbytes += item_bytes
        writer.close({"index": spec.index, "bytes": nbytes, "inputs": inputs, "skipped": skipped,
                      "repaired": repaired})
    except BaseException:
        writer.abort()
        raise
    return {"index": spec.index, "bytes": nbytes}


@dataclass
class RoundTrip:
    """Whether a document's tokens decode back to its text, and both sizes in UTF-8 bytes.

    Why: a tokenizer that lower-cases, strips accents or maps characters to an unknown token
    (a BERT word-piece one, for instance) alters the corpus; the chunk stage names it, and an
    altered document's documents.jsonl line keeps its source bytes so that bits per byte count
    the source text (retro.metrics.SourceBytes), not the shorter or longer decoded one."""

    bytes: int = 0
    decoded_bytes: int = 0
    tokens: int = 0
    altered: bool = False

    def add(self, tok: Tokenizer, text: str, ids: Any) -> None:
        text = normalise_text(text)
        n = len(text.encode("utf-8", "surrogatepass"))
        self.bytes += n
        self.tokens += len(ids)
        marker = getattr(tok, "round_trip_unless", None)
        if marker is not None and marker not in text:  # known exact: no decode (this project's models)
            self.decoded_bytes += n
            return
        decoded = tok.decode(ids)
        self.decoded_bytes += len(decoded.encode("utf-8", "surrogatepass"))
        self.altered = self.altered or decoded != text

    def record(self) -> dict[str, int]:
        """What documents.jsonl adds for an altered document (nothing for one kept as it is)."""
        return {"bytes": self.bytes, "decoded_bytes": self.decoded_bytes, "tokens": self.tokens} if self.altered else {}


def _bos(tok: Tokenizer) -> np.ndarray:
    """What starts every document: BOS where the tokenizer's base model saw one (DBTokenizer.add_bos)."""
    return np.array([tok.bos_id] if tok.add_bos and tok.bos_id >= 0 else [], dtype=tok.token_dtype)


def _text_document(writer: PartWriter, tok: Tokenizer, path: str, spec: UnitSpec,
                   skipped: list[dict]) -> tuple[str | None, int, bool]:
    """One plain-text file (compressed or not, any size) as one streamed document:
    (sha256 of the file, invalid bytes repaired, kept)."""
    stream = TextStream(path, spec.max_invalid_fraction)
    doc = writer.pending()
    check = RoundTrip()
    code = "H" if tok.token_dtype == np.uint16 else "i"  # array.array: faster than np.asarray(list)
    bos = _bos(tok)
    if bos.size:
        doc.extend(bos)
    for piece in iter_pieces(stream):
        ids = tok.encode(piece)
        check.add(tok, piece, ids)
        if ids:
            doc.extend(np.frombuffer(array.array(code, ids), dtype=tok.token_dtype))
    if stream.reason is not None:
        doc.discard()
        skip = {"path": path, "reason": stream.reason}
        if stream.detail:
            skip["detail"] = stream.detail
        skipped.append(skip)
        return stream.sha256, stream.invalid_bytes, False
    split = "val" if val_digest(stream.text_digest, spec.val_fraction) else "train"
    writer.commit(doc, split, {"source": path, **check.record()}, stream.text_digest)
    return stream.sha256, stream.invalid_bytes, True


def _records(writer: PartWriter, tok: Tokenizer, path: str, span: tuple[int, int | None, int],
             spec: UnitSpec, skipped: list[dict]) -> tuple[str | None, int, bool]:
    """The records of a JSONL or Parquet file (or of one range of it), encoded in batches."""
    report = RecordReport()
    key = "row" if input_format(path).kind == "parquet" else "line"
    batch: list[Record] = []
    chars, invalid, kept = 0, 0, 0
    for rec in iter_records(path, report, spec.text_field, *span, max_invalid_fraction=spec.max_invalid_fraction):
        if rec.text is None:
            skipped.append({"path": path, "line": rec.line, "reason": rec.reason})
            continue
        invalid += rec.invalid_bytes
        batch.append(rec)
        chars += len(rec.text)
        if len(batch) >= ENCODE_BATCH_DOCS or chars >= ENCODE_BATCH_CHARS:
            kept += _encode_records(writer, tok, batch, path, key, spec.val_fraction)
            batch, chars = [], 0
    kept += _encode_records(writer, tok, batch, path, key, spec.val_fraction)
    if report.file_skip is not None:
        skipped.append(report.file_skip)
    return report.sha256, invalid, kept > 0


def _encode_records(writer: PartWriter, tok: Tokenizer, batch: list[Record], path: str, key: str,
                    val_fraction: float) -> int:
    short = [r.text for r in batch if len(r.text) <= ENCODE_PIECE_CHARS]  # type: ignore[arg-type]
    ids_of = iter(tok.encode_batch(short)) if hasattr(tok, "encode_batch") and short else None
    bos = _bos(tok)
    for rec in batch:
        text = rec.text
        assert text is not None
        if ids_of is not None and len(text) <= ENCODE_PIECE_CHARS:
            ids = np.asarray(next(ids_of), dtype=tok.token_dtype)
        else:
            ids = tok.encode_array(text)  # pieces: memory flat in a record's size
        check = RoundTrip()
        check.add(tok, text, ids)
        if bos.size:
            ids = np.concatenate([bos, np.asarray(ids, dtype=tok.token_dtype)])
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        split = "val" if val_digest(digest, val_fraction) else "train"
        writer.add(split, ids, {"source": path, key: rec.line, **check.record()}, digest)
    return len(batch)


class NpyWriter:
    """Write a .npy file of known final shape sequentially, then rename it into place.

    Plain appends instead of a writable memmap: dirty mapped pages would count in this
    process's RSS and grow with the corpus; sequential writes keep memory flat.
    """

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        self.tmp = temp_path(path)
        self.rows = 0
        self.f = open(self.tmp, "wb")
        np.lib.format.write_array_header_1_0(
            self.f, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                     "shape": shape})

    def append(self, arr: np.ndarray) -> None:
        if arr.dtype != self.dtype or arr.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.path.name}: got {arr.dtype}{arr.shape}, expected {self.dtype}(n, *{self.shape[1:]})")
        self.f.write(np.ascontiguousarray(arr).tobytes())
        self.rows += arr.shape[0]

    def close(self) -> None:
        if self.rows != self.shape[0]:
            raise AssertionError(f"{self.path.name}: wrote {self.rows} rows, expected {self.shape[0]}")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
