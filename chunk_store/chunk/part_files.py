"""A chunk-stage part: one work unit's output, written as a stream and read back as one.

Why streamed both ways: a unit can be one compressed JSONL shard of GBs or one plain-text
document of any size, so neither the worker that writes a part nor the merge that reads it may
hold it whole. A part is a folder (chunk_store.layout.PartLayout) of raw files, per split: the
chunk rows (each document's tokens, EOS, pad to whole chunks), a DOC_INFO record per document (its chunks,
its tokens with EOS, the first 16 bytes of the sha256 of its normalised text: the duplicate key)
and one JSON line per document (where it came from); ``part.json`` (counts, inputs, skips) is
written last and the folder renamed into place, so a part is either whole or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np

from chunk_store.layout import SPLITS, PartLayout, temp_path

DOC_INFO = np.dtype([("chunks", "<i8"), ("tokens", "<i8"), ("digest", "S16")])
FLUSH_TOKENS = 1 << 20  # tokens of whole documents buffered per split before they are packed
SPILL_TOKENS = 4 << 20  # a streamed document's tokens held in memory before they go to disk
READ_ROWS = 1 << 16  # chunk rows a reader hands out at a time


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


class PendingDocument:
    """A document whose tokens arrive piece by piece before its split is known (a streamed
    file: the split hashes the whole text). Held in memory up to SPILL_TOKENS, then on disk."""

    def __init__(self, spill: Path, dtype: np.dtype) -> None:
        self.spill, self.dtype = spill, np.dtype(dtype)
        self.parts: list[np.ndarray] = []
        self.file: BinaryIO | None = None
        self.n = 0

    def extend(self, ids: np.ndarray) -> None:
        if self.file is None and self.n + len(ids) > SPILL_TOKENS:
            self.file = open(self.spill, "w+b")
            for part in self.parts:
                self.file.write(part.tobytes())
            self.parts = []
        if self.file is not None:
            self.file.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        else:
            self.parts.append(np.asarray(ids, dtype=self.dtype))
        self.n += len(ids)

    def arrays(self) -> Iterator[np.ndarray]:
        if self.file is None:
            yield from self.parts
            return
        self.file.flush()
        self.file.seek(0)
        block = SPILL_TOKENS * self.dtype.itemsize
        while data := self.file.read(block):
            yield np.frombuffer(data, dtype=self.dtype)

    def discard(self) -> None:
        self.parts = []
        if self.file is not None:
            self.file.close()
            self.file = None
            self.spill.unlink(missing_ok=True)


class PartWriter:
    """Write one part into ``.NAME.tmp-PID`` beside ``final``; :meth:`close` renames it in."""

    def __init__(self, final: Path, chunk_size: int, pad_id: int, eos_id: int, dtype: np.dtype) -> None:
        self.final, self.chunk_size, self.pad_id, self.eos_id = Path(final), chunk_size, pad_id, eos_id
        self.dtype = np.dtype(dtype)
        self.tmp = temp_path(self.final)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.files = PartLayout(self.tmp)
        self.out = {s: (open(self.files.chunks(s), "wb"), open(self.files.doc_info(s), "wb"),
                        open(self.files.documents(s), "w", encoding="utf-8")) for s in SPLITS}
        self.buffer: dict[str, tuple[list[np.ndarray], list[dict], list[bytes]]] = {s: ([], [], []) for s in SPLITS}
        self.buffered = dict.fromkeys(SPLITS, 0)
        self.counts = {s: {"docs": 0, "chunks": 0, "tokens": 0} for s in SPLITS}

    def add(self, split: str, tokens: np.ndarray, source: dict, digest: bytes) -> None:
        """One whole document (buffered, packed with its neighbours in one scatter)."""
        toks, sources, digests = self.buffer[split]
        toks.append(tokens)
        sources.append(source)
        digests.append(digest[:16])
        self.buffered[split] += len(tokens) + 1
        if self.buffered[split] >= FLUSH_TOKENS:
            self._flush(split)

    def pending(self) -> PendingDocument:
        return PendingDocument(self.files.pending, self.dtype)

    def commit(self, doc: PendingDocument, split: str, source: dict, digest: bytes) -> None:
        """A streamed document, now that its split is known: its tokens, EOS, pad to a whole chunk."""
        self._flush(split)
        chunks_f, doc_f, docs_f = self.out[split]
        for arr in doc.arrays():
            chunks_f.write(arr.tobytes())
        tail = np.full(-(doc.n + 1) % self.chunk_size + 1, self.pad_id, dtype=self.dtype)
        tail[0] = self.eos_id
        chunks_f.write(tail.tobytes())
        rows = -(-(doc.n + 1) // self.chunk_size)
        doc_f.write(np.array([(rows, doc.n + 1, digest[:16])], dtype=DOC_INFO).tobytes())
        docs_f.write(json.dumps(source) + "\n")
        self._count(split, 1, rows, doc.n + 1)
        doc.discard()

    def _flush(self, split: str) -> None:
        toks, sources, digests = self.buffer[split]
        if not toks:
            return
        chunks, doc_chunks = pack_documents(toks, self.chunk_size, self.pad_id, self.eos_id, self.dtype)
        chunks_f, doc_f, docs_f = self.out[split]
        chunks_f.write(chunks.tobytes())
        info = np.empty(len(toks), dtype=DOC_INFO)
        info["chunks"] = doc_chunks
        info["tokens"] = [len(t) + 1 for t in toks]
        info["digest"] = digests
        doc_f.write(info.tobytes())
        docs_f.writelines(json.dumps(s) + "\n" for s in sources)
        self._count(split, len(toks), len(chunks), self.buffered[split])
        self.buffer[split] = ([], [], [])
        self.buffered[split] = 0

    def _count(self, split: str, docs: int, chunks: int, tokens: int) -> None:
        c = self.counts[split]
        c["docs"] += docs
        c["chunks"] += chunks
        c["tokens"] += tokens

    def close(self, meta: dict[str, Any]) -> None:
        """Flush, sync, write ``part.json`` (with the counts) and rename the folder into place."""
        for split in SPLITS:
            self._flush(split)
            for f in self.out[split]:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        meta = {**meta, "counts": self.counts, "dtype": self.dtype.str, "chunk_size": self.chunk_size}
        with open(self.files.meta, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(self.final, ignore_errors=True)  # a stale, incomplete part of a dead run
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        for split in SPLITS:
            for f in self.out[split]:
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- reading parts


def read_part_meta(folder: Path) -> dict[str, Any] | None:
    """A whole part's metadata, or None when the part is absent or damaged (redo it): its files
    must hold exactly the rows, documents and lines its counts say."""
    files = PartLayout(Path(folder))
    try:
        meta = json.loads(files.meta.read_text())
        row = np.dtype(meta["dtype"]).itemsize * int(meta["chunk_size"])
        for split in SPLITS:
            c = meta["counts"][split]
            if (files.chunks(split).stat().st_size != c["chunks"] * row
                    or files.doc_info(split).stat().st_size != c["docs"] * DOC_INFO.itemsize
                    or not files.documents(split).exists()):
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def part_doc_info(folder: Path, split: str, meta: dict[str, Any]) -> np.ndarray:
    """The DOC_INFO record of each of ``split``'s documents (32 bytes a document)."""
    n = int(meta["counts"][split]["docs"])
    return np.fromfile(PartLayout(Path(folder)).doc_info(split), dtype=DOC_INFO, count=n)


def part_rows(folder: Path, split: str, meta: dict[str, Any], doc_chunks: np.ndarray,
              keep: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """The chunk rows of ``split``'s documents (only those where ``keep``), READ_ROWS at a time.
    Plain reads, not a memmap: mapped pages would count in the merge's RSS and grow with the part."""
    width, dtype = int(meta["chunk_size"]), np.dtype(meta["dtype"])
    row_bytes = width * dtype.itemsize
    keep = np.ones(len(doc_chunks), dtype=bool) if keep is None else keep
    if not len(doc_chunks):
        return
    cuts = np.concatenate([[0], np.flatnonzero(np.diff(keep.astype(np.int8))) + 1, [len(keep)]])
    with open(PartLayout(Path(folder)).chunks(split), "rb") as f:
        for d0, d1 in zip(cuts[:-1], cuts[1:]):  # runs of documents kept (or dropped) together
            n = int(doc_chunks[d0:d1].sum())
            if not keep[d0]:
                f.seek(n * row_bytes, os.SEEK_CUR)
                continue
            for a in range(0, n, READ_ROWS):
                rows = min(READ_ROWS, n - a)
                yield np.fromfile(f, dtype=dtype, count=rows * width).reshape(rows, width)


def doc_id_blocks(doc_chunks: np.ndarray, first_doc: int) -> Iterator[np.ndarray]:
    """The doc id of each chunk row of documents with ``doc_chunks`` rows each (numbered from
    ``first_doc``), at most 4 x READ_ROWS at a time: one document of any length never makes one
    big array."""
    doc = first_doc
    for a in range(0, len(doc_chunks), READ_ROWS):
        counts = np.asarray(doc_chunks[a:a + READ_ROWS], dtype=np.int64)
        ids = np.arange(doc, doc + len(counts), dtype=np.int64)
        doc += len(counts)
        if counts.sum() <= 4 * READ_ROWS:
            yield np.repeat(ids, counts)
            continue
        for i, c in zip(ids, counts):  # long documents: row blocks of one id each
            for b in range(0, int(c), READ_ROWS):
                yield np.full(min(READ_ROWS, int(c) - b), i, dtype=np.int64)


def part_sources(folder: Path, split: str) -> Iterator[str]:
    """``split``'s documents.jsonl lines of the part (one per document, newline included)."""
    with open(PartLayout(Path(folder)).documents(split), encoding="utf-8") as f:
        yield from f
