"""One unit of the chunk stage: read files, split documents, tokenise, pack into chunks.

A unit is a contiguous run of input files (or line-aligned byte ranges of a big .jsonl), about
2 MB of text; :func:`process_unit` turns it into one part file (``.npz``: each split's chunks and
chunks per document, plus JSON metadata) written atomically, so a killed run redoes only the
units whose part is missing. Worker processes run it with their own copy of the tokenizer.
Pure helpers (the split rule, packing, sequence starts, the unit plan) live here too, so they
can be tested without a database.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from chunk_store.errors import UserError
from chunk_store.layout import CHUNK_PART_PREFIX, SPLITS, TOKENIZER, temp_path
from chunk_store.manifest import atomic_write_json
from chunk_store.text_files import InputFile, read_documents, split_jsonl
from chunk_store.tokenizer import Tokenizer

log = logging.getLogger("chunk_store.packing")

UNIT_BYTES = 2 << 20

# ----------------------------------------------------------------------------- pure helpers


def is_val(text: str, val_fraction: float) -> bool:
    """The stable split rule: sha256 of the document's text, as a fraction of 2**64."""
    if val_fraction <= 0.0:
        return False
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return h < val_fraction * 2.0**64


def pack_documents(token_lists: Sequence[Sequence[int]], chunk_size: int, pad_id: int,
                   eos_id: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Documents' tokens (lists or arrays) -> (chunks (n, chunk_size), chunks per document (d,)).

    Each document gets EOS appended and is padded to whole chunks, so no chunk crosses a
    document boundary. Vectorised: one scatter of all tokens into a pad-filled buffer.
    """
    lens = np.fromiter((len(t) + 1 for t in token_lists), dtype=np.int64, count=len(token_lists))
    doc_chunks = -(-lens // chunk_size)
    total_chunks = int(doc_chunks.sum())
    flat = np.full(total_chunks * chunk_size, pad_id, dtype=dtype)
    if len(token_lists):
        eos = np.array([eos_id], dtype=dtype)
        tokens = np.concatenate([a for t in token_lists for a in (np.asarray(t, dtype=dtype), eos)])
        starts = np.concatenate([[0], np.cumsum(doc_chunks)[:-1]]) * chunk_size  # doc's first slot
        tok_starts = np.concatenate([[0], np.cumsum(lens)[:-1]])  # doc's first token in `tokens`
        pos = np.arange(tokens.size, dtype=np.int64) + np.repeat(starts - tok_starts, lens)
        flat[pos] = tokens
    return flat.reshape(total_chunks, chunk_size), doc_chunks


def sequence_starts(num_chunks: int, chunks_per_seq: int) -> np.ndarray:
    """Non-overlapping sequence starts over the chunk stream; the last partial run dropped."""
    return np.arange(0, num_chunks - chunks_per_seq + 1, chunks_per_seq, dtype=np.int64)


def plan_units(files: Sequence[InputFile], unit_bytes: int | None = None,
               ranges: dict[int, list[tuple[int, int, int]]] | None = None) -> list[list[list]]:
    """Group the work into units of about ``unit_bytes`` (default 2 MB), at most 4096 items each.

    An item is ``[file_index, start, end, first_line]``; ``end`` is None for a whole file, and
    a big .jsonl contributes one item per line-aligned range (``ranges``). A fixed size, not a
    fraction of the corpus, so a worker's memory does not grow with the corpus; small enough
    to balance the workers, large enough that per-part overhead is noise.
    """
    target = unit_bytes if unit_bytes else UNIT_BYTES
    ranges = ranges or {}
    units: list[list[list]] = []
    cur: list[list] = []
    acc = 0
    for i, f in enumerate(files):
        items = [[i, s, e, line] for s, e, line in ranges[i]] if i in ranges else [[i, 0, None, 1]]
        for item in items:
            cur.append(item)
            acc += f.size if item[2] is None else item[2] - item[1]
            if acc >= target or len(cur) >= 4096:
                units.append(cur)
                cur, acc = [], 0
    if cur:
        units.append(cur)
    return units


def load_or_make_plan(plan_path: Path, files: Sequence[InputFile], walk_skipped: list[dict],
                       unit_bytes: int | None, tokenizer_sha256: str) -> dict:
    """The work plan of an interrupted run (checked against the inputs), else a new one.

    Parts made with another tokenizer (the DB's model was replaced) are discarded.
    """
    listing = [f.to_json() for f in files]
    if plan_path.exists():
        try:
            plan = json.loads(plan_path.read_text())
        except json.JSONDecodeError:
            plan = None
        if plan is not None and plan.get("tokenizer_sha256") != tokenizer_sha256:
            log.warning("chunk: the tokenizer changed since the interrupted run: redoing every unit")
            for part in plan_path.parent.glob(f"{CHUNK_PART_PREFIX}*.npz"):
                part.unlink()
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
    ranges: dict[int, list[tuple[int, int, int]]] = {}
    hashes: dict[str, str] = {}
    big = [i for i, f in enumerate(files) if f.path.endswith(".jsonl") and f.size > target]
    with tqdm(total=sum(files[i].size for i in big), unit="B", unit_scale=True, leave=False,
              desc="split .jsonl", disable=not big) as bar:
        for i in big:  # big .jsonl files: one streaming pass for the hash and the cuts
            try:
                hashes[str(i)], ranges[i] = split_jsonl(files[i].path, target)
            except OSError:
                pass  # unreadable: the worker reports it
            bar.update(files[i].size)
    plan = {"files": listing, "units": plan_units(files, target, ranges), "hashes": hashes,
            "walk_skipped": walk_skipped, "tokenizer_sha256": tokenizer_sha256}
    atomic_write_json(plan_path, plan)
    return plan

# ----------------------------------------------------------------------------- one work unit


@dataclass
class UnitSpec:
    index: int
    items: list[tuple[str, int, int | None, int, int, str | None]]  # path, start, end, line, size, sha
    part_path: str
    chunk_size: int
    val_fraction: float
    max_invalid_fraction: float


_WORKER_TOKENIZER: Tokenizer | None = None


def init_worker(proto: Any) -> None:
    """``proto``: a sentencepiece model's bytes, or any picklable tokenizer (an HFTokenizer)."""
    global _WORKER_TOKENIZER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _WORKER_TOKENIZER = Tokenizer(proto, TOKENIZER) if isinstance(proto, bytes) else proto


def process_unit(spec: UnitSpec, tok: Tokenizer | None = None) -> dict[str, Any]:
    """Read, decode, split and tokenise one unit's files; write its part file atomically.

    Streams file by file: a document's text and its Python token list live only while it is
    encoded; what accumulates is its compact token array.
    """
    tok = tok or _WORKER_TOKENIZER
    assert tok is not None, "worker not initialised"
    docs: dict[str, list] = {s: [] for s in SPLITS}
    tokens: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    inputs, skipped, repaired = [], [], []
    nbytes = 0
    for path, start, end, first_line, size, sha in spec.items:
        out = read_documents(path, spec.max_invalid_fraction, start, end, first_line)
        nbytes += out.size
        if start == 0:  # a split file is listed once, with the hash the plan computed
            # bytes: the walk's size (what a re-run compares); sha256 None if unreadable
            inputs.append({"path": path, "bytes": size, "sha256": sha or out.sha256})
        skipped.extend(out.skipped)
        if out.invalid_bytes and out.documents:
            repaired.append({"path": path, "invalid_bytes": out.invalid_bytes})
        # a file's documents in one call where the tokenizer batches (HF: parallel in Rust)
        batch = tok.encode_batch([d.text for d in out.documents]) if hasattr(tok, "encode_batch") else None
        code = "H" if tok.token_dtype == np.uint16 else "i"  # array.array: ~25% faster than np.asarray(list)
        for j, d in enumerate(out.documents):
            split = "val" if is_val(d.text, spec.val_fraction) else "train"
            docs[split].append(d.source_json())
            if batch is not None:
                tokens[split].append(np.frombuffer(array.array(code, batch[j]), dtype=tok.token_dtype))
            else:
                tokens[split].append(tok.encode_array(d.text))  # memory flat in a document's size
        del out
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"index": spec.index, "bytes": nbytes, "inputs": inputs,
                            "skipped": skipped, "repaired": repaired, "docs": docs,
                            "tokens": {}, "chunks": {}}
    for split in SPLITS:
        chunks, doc_chunks = pack_documents(tokens[split], spec.chunk_size, tok.pad_id, tok.eos_id,
                                            tok.token_dtype)
        arrays[f"{split}_chunks"] = chunks
        arrays[f"{split}_doc_chunks"] = doc_chunks
        meta["tokens"][split] = int(sum(len(t) + 1 for t in tokens[split]))
        meta["chunks"][split] = int(chunks.shape[0])
        tokens[split] = []
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    part = Path(spec.part_path)
    tmp = temp_path(part)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, part)
    return {"index": spec.index, "bytes": nbytes}


def read_part_meta(path: Path) -> dict[str, Any] | None:
    """A finished part's metadata, or None if the part is absent or unreadable (redo it)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(bytes(z["meta"]).decode())
    except Exception as e:  # a corrupt part (should not happen: parts are renamed into place)
        log.warning("part %s unreadable (%s): redoing it", path, e)
        return None


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
