"""ChunkStore: the read side of a retrieval database split (memmapped, instant to open).

Every later stage reads chunks through this class: the embedder (``text``), the dataset and
generation (``chunks``, ``seq_starts``, ``neighbour_tokens``), the retriever (``text`` of
neighbours). Arrays are opened with ``mmap_mode="r"``, so opening costs the same for 1 KB or
1 TB, and pickling a store (DataLoader workers) re-opens the files instead of copying them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from chunk_store.framework.errors import UserError
from chunk_store.layout import SPLITS, TOKENIZER, DBLayout
from chunk_store.manifest import load_manifest, open_npy, stage_done
from chunk_store.tokenization.hugging_face import open_db_tokenizer
from chunk_store.sharded_array import concat
from chunk_store.shards import ALTERED_KEY, shard_paths, shard_records
from chunk_store.tokenization.protocol import DBTokenizer


class ChunkStore:
    """One split of a database: ``ChunkStore.open(db, split="train"|"val")``."""

    def __init__(self, db: str | Path, split: str = "train") -> None:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
        self.db = Path(db)
        self.split = split
        self.manifest: dict[str, Any] = load_manifest(self.db)
        if not stage_done(self.manifest, "chunk"):
            raise UserError(f"{self.db} has no finished 'chunk' stage: run `retro-build-index chunk "
                          f"--out {self.db} ...` (it resumes)")
        self.chunk_size: int = int(self.manifest["chunk_size"])
        self.seq_len: int = int(self.manifest["seq_len"])
        tok_rec = self.manifest.get("tokenizer") or {}
        tok_path = self.db / tok_rec.get("file", TOKENIZER)
        self.tokenizer: DBTokenizer = open_db_tokenizer(self.db, tok_rec)
        if tok_rec.get("vocab_size") not in (None, self.tokenizer.vocab_size):
            raise UserError(f"corrupt {tok_path}: vocab size {self.tokenizer.vocab_size}, the manifest "
                          f"says {tok_rec['vocab_size']}")
        self.paths = DBLayout(self.db)
        self.shards = [shard_paths(self.db, rec) for rec in shard_records(self.manifest)]
        chunks, doc_ids, seq_starts = [], [], []
        for paths in self.shards:
            c, d = open_npy(paths.chunks(split)), open_npy(paths.doc_ids(split))
            if c.ndim != 2 or c.shape[1] != self.chunk_size:
                raise UserError(f"corrupt {paths.chunks(split)}: shape {c.shape}, expected (n, {self.chunk_size})")
            if d.shape != (c.shape[0],):
                raise UserError(f"corrupt {paths.doc_ids(split)}: shape {d.shape}, expected ({c.shape[0]},)")
            chunks.append(c)
            doc_ids.append(d)
            seq_starts.append(open_npy(paths.seq_starts(split)))
        # global ids: a shard's chunks and documents come after those of the shards before it
        self._chunk_offsets = np.concatenate([[0], np.cumsum([c.shape[0] for c in chunks])]).astype(np.int64)
        docs = [int(rec.get("counts", {}).get(split, {}).get("docs", int(d[-1]) + 1 if len(d) else 0))
                for rec, d in zip(shard_records(self.manifest), doc_ids)]
        self._doc_offsets_by_shard = np.concatenate([[0], np.cumsum(docs)]).astype(np.int64)
        self.chunks: np.ndarray = concat(chunks)  # type: ignore[assignment]
        self.doc_ids: np.ndarray = concat(doc_ids, self._doc_offsets_by_shard[:-1])  # type: ignore[assignment]
        self.seq_starts: np.ndarray = concat(seq_starts, self._chunk_offsets[:-1])  # type: ignore[assignment]
        self._local_doc_ids = doc_ids
        counts = self.manifest.get("counts", {}).get(split, {})
        self.num_chunks: int = int(self._chunk_offsets[-1])
        self.num_docs: int = int(self._doc_offsets_by_shard[-1])
        if counts and counts.get("chunks") != self.num_chunks:
            raise UserError(f"corrupt {self.shards[0].chunks(split)}: {self.num_chunks} chunks, the manifest "
                            f"says {counts.get('chunks')}")
        self._neighbours: np.ndarray | None = None
        self._neighbour_distances: np.ndarray | None = None
        self._train: ChunkStore | None = self if split == "train" else None
        self._doc_offsets: dict[int, np.ndarray] = {}
        self._altered: dict[int, dict[str, int]] | None = None

    @classmethod
    def open(cls, db: str | Path, split: str = "train") -> "ChunkStore":
        return cls(db, split)

    # -------------------------------------------------------------- basic accessors

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def num_seqs(self) -> int:
        return int(self.seq_starts.shape[0])

    @property
    def chunks_per_seq(self) -> int:
        return self.seq_len // self.chunk_size

    def __len__(self) -> int:
        return self.num_chunks

    def _check_id(self, chunk_id: int) -> int:
        i = int(chunk_id)
        if not 0 <= i < self.num_chunks:
            raise IndexError(f"chunk id {i} out of range for {self.split} split of {self.num_chunks}")
        return i

    def content_mask(self, block: int = 1 << 18) -> np.ndarray:
        """(num_chunks,) bool: the chunk holds a token with visible text.

        Why: a document whose length is a multiple of the chunk size ends in a chunk of only EOS
        and padding, and a run of blank lines makes a chunk of whitespace; both embed like empty
        text and must never be anyone's neighbour (knn and the Retriever filter candidates with
        this mask). A per-token table, read in blocks: memory stays flat."""
        if getattr(self, "_content", None) is None:
            out = np.empty(self.num_chunks, dtype=bool)
            for a in range(0, self.num_chunks, block):
                out[a:a + block] = self._visible(np.asarray(self.chunks[a:a + block]))
            self._content = out
        return self._content

    def blank_table(self) -> np.ndarray:
        """(vocab_size,) bool: the tokenizer's blank_ids, computed once (a decode of every token:
        O(vocabulary), not O(chunks))."""
        if getattr(self, "_blank", None) is None:
            self._blank = self.tokenizer.blank_ids()  # a race computes it twice, the same
        return self._blank

    def _visible(self, rows: np.ndarray) -> np.ndarray:
        """Token rows (..., chunk_size) -> (...) bool: the row holds a token with visible text."""
        return visible_rows(rows, self.blank_table())

    def content_of(self, ids: np.ndarray) -> np.ndarray:
        """:meth:`content_mask` at ``ids`` only (any shape, valid chunk ids), reading just those
        rows: a lookup that must not scan the whole split first (the Retriever)."""
        return self.content_lookup()[np.asarray(ids, dtype=np.int64)]

    def content_lookup(self) -> "ContentLookup":
        """``content_mask()``'s interface (``lookup[ids]``) read per lookup: see ContentLookup."""
        return ContentLookup.of(self)

    def text(self, chunk_id: int) -> str:
        """The decoded text of one chunk (pad dropped; EOS decodes to nothing)."""
        return self.tokenizer.decode(self.chunks[self._check_id(chunk_id)])

    def continuation_ids(self, ids: np.ndarray) -> np.ndarray:
        """Chunk c -> c + 1 when it is in the same document, else -1 (also for -1 inputs)."""
        ids = np.asarray(ids, dtype=np.int64)
        nxt = ids + 1
        ok = (ids >= 0) & (nxt < self.num_chunks)
        same = np.zeros(ids.shape, dtype=bool)
        same[ok] = self.doc_ids[nxt[ok]] == self.doc_ids[ids[ok]]
        return np.where(same, nxt, -1)

    def _shard_of_doc(self, doc_id: int) -> tuple[int, int]:
        """(shard, local doc id) of a global doc id."""
        if not 0 <= doc_id < self.num_docs:
            raise IndexError(f"doc id {doc_id} out of range for {self.split} split of {self.num_docs}")
        s = int(np.searchsorted(self._doc_offsets_by_shard, doc_id, side="right")) - 1
        return s, doc_id - int(self._doc_offsets_by_shard[s])

    def doc_chunk_range(self, doc_id: int) -> tuple[int, int]:
        """[first, end) chunk ids of one document (doc ids are sorted: a doc's chunks are consecutive)."""
        s, local = self._shard_of_doc(doc_id)
        ids = self._local_doc_ids[s]
        lo = int(np.searchsorted(ids, local, side="left"))
        hi = int(np.searchsorted(ids, local, side="right"))
        base = int(self._chunk_offsets[s])
        return base + lo, base + hi

    def doc_text(self, doc_id: int) -> str:
        """The whole document, decoded from its chunks (equals the source text after normalisation)."""
        lo, hi = self.doc_chunk_range(doc_id)
        return self.tokenizer.decode(self.chunks[lo:hi])

    def doc_source(self, doc_id: int) -> dict:
        """Where a document came from: {"source": path[, "line": n | "row": n]} (documents.jsonl).

        Reads one line through a line-offset index of its shard built on first use (8 bytes a
        document), so it stays cheap for millions of documents.
        """
        s, local = self._shard_of_doc(doc_id)
        path = self.shards[s].documents(self.split)
        if s not in self._doc_offsets:
            if not path.exists():
                raise UserError(f"missing file {path}")
            parts, pos = [], 0
            with open(path, "rb") as f:
                while block := f.read(64 << 20):  # blockwise: memory bounded for any size
                    parts.append(np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + 1 + pos)
                    pos += len(block)
            ends = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            expected = int(self._doc_offsets_by_shard[s + 1] - self._doc_offsets_by_shard[s])
            if len(ends) != expected:
                raise UserError(f"corrupt {path}: {len(ends)} lines for {expected} documents")
            self._doc_offsets[s] = np.concatenate([[0], ends]).astype(np.int64)
        offsets = self._doc_offsets[s]
        lo, hi = int(offsets[local]), int(offsets[local + 1])
        with open(path, "rb") as f:
            f.seek(lo)
            line = f.read(hi - lo)
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"corrupt {path} line {local + 1}: {e}") from None

    def altered_documents(self) -> dict[int, dict[str, int]]:
        """Global doc id -> {"bytes", "decoded_bytes", "tokens"} of each document the tokenizer
        does not give back as it was (decode(encode(text)) != text), read from documents.jsonl of
        the shards whose record counts some: empty, and nothing read, for a lossless tokenizer."""
        if self._altered is None:
            out: dict[int, dict[str, int]] = {}
            for s, rec in enumerate(shard_records(self.manifest)):
                if not (rec.get("altered_documents") or {}).get(self.split):
                    continue
                base = int(self._doc_offsets_by_shard[s])
                with open(self.shards[s].documents(self.split), encoding="utf-8") as f:
                    for local, line in enumerate(f):
                        if ALTERED_KEY in line:
                            d = json.loads(line)
                            out[base + local] = {k: int(d[k]) for k in ("bytes", "decoded_bytes", "tokens")}
            self._altered = out
        return self._altered

    # -------------------------------------------------------------- neighbours (after knn)

    def _load_neighbours(self) -> None:
        if self._neighbours is not None or not stage_done(self.manifest, "knn"):
            return
        from chunk_store.neighbour_shards import open_neighbours

        opened = open_neighbours(self.db, self.split)
        where = self.paths.neighbours_dir(self.split)
        if opened is None:
            raise UserError(f"missing {where}: knn is recorded as done; re-run `retro-build-index knn --db {self.db}`")
        self._neighbours, self._neighbour_distances = opened
        if self._neighbours.ndim != 2 or self._neighbours.shape[0] != self.num_chunks:
            raise UserError(f"corrupt {where}: shape {self._neighbours.shape}, expected "
                          f"({self.num_chunks}, k)")

    @property
    def neighbours(self) -> np.ndarray | None:
        """(num_chunks, k) train chunk ids, -1 where none; None until the knn stage has run.
        Per-shard files read as one array (chunk_store.neighbour_shards.open_neighbours)."""
        self._load_neighbours()
        return self._neighbours

    @property
    def neighbour_distances(self) -> np.ndarray | None:
        self._load_neighbours()
        return self._neighbour_distances

    @property
    def train_store(self) -> "ChunkStore":
        """The train split (neighbour ids always point into it)."""
        if self._train is None:
            self._train = ChunkStore(self.db, "train")
        return self._train

    def neighbour_tokens(self, ids: np.ndarray) -> np.ndarray:
        """Train chunk ids (..., k) -> tokens (..., k, 2 * chunk_size): chunk + continuation.

        The continuation is the next chunk of the same document, else all pad; a -1 id gives
        all pad. Always reads the *train* split. Returned in the store's token dtype (callers
        convert with ``.astype(np.int64)``).
        """
        train = self.train_store
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"neighbour ids must be integers, got {ids.dtype}")
        flat = ids.reshape(-1).astype(np.int64)
        if flat.size and (flat.max() >= train.num_chunks or flat.min() < -1):
            bad = flat[(flat >= train.num_chunks) | (flat < -1)][0]
            raise IndexError(f"neighbour id {bad} out of range for the train split of {train.num_chunks} chunks")
        cs = self.chunk_size
        out = np.full((flat.size, 2, cs), self.tokenizer.pad_id, dtype=train.chunks.dtype)
        valid = flat >= 0
        if valid.any():
            out[valid, 0] = train.chunks[flat[valid]]
            cont = train.continuation_ids(flat)
            has = cont >= 0
            if has.any():
                out[has, 1] = train.chunks[cont[has]]
        return out.reshape(*ids.shape, 2 * cs)

    # -------------------------------------------------------------- pickling (DataLoader workers)

    def __getstate__(self) -> dict:
        return {"db": str(self.db), "split": self.split}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["db"], state["split"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return (f"ChunkStore({str(self.db)!r}, split={self.split!r}, docs={self.num_docs}, "
                f"chunks={self.num_chunks}, seqs={self.num_seqs}, chunk_size={self.chunk_size})")


def visible_rows(tokens: Any, blank: np.ndarray) -> np.ndarray:
    """Token rows (..., chunk_size) -> (...) bool: the row holds a token with visible text
    (``blank``: the tokenizer's (vocab,) table of tokens that decode to nothing visible)."""
    rows = np.clip(np.asarray(tokens).astype(np.int64), 0, len(blank) - 1)
    return ~blank[rows].all(axis=-1)


BLOCK_ROWS = 1 << 16  # rows of chunk tokens read at a time for a slice of a ContentLookup


class ContentLookup:
    """Whether each chunk asked for holds visible text (ChunkStore.content_mask's rule), computed
    from those chunks' tokens at each lookup: indexes like the (num_chunks,) bool mask it stands
    for (an int, a slice, an integer array of any shape) without ever building it.

    Why: the mask scans every chunk (minutes and N bytes of RAM at billions of chunks), while knn
    asks about one batch's candidates and the Retriever about a few dozen a query, and both must
    not hold O(database) arrays (issue 24). Stateless: safe to share between threads."""

    def __init__(self, chunks: Any, blank_ids: np.ndarray) -> None:
        self.chunks = chunks
        self.blank = np.asarray(blank_ids, dtype=bool)
        self.shape = (int(chunks.shape[0]),)
        self.dtype = np.dtype(bool)
        self.ndim = 1

    @classmethod
    def of(cls, store: "ChunkStore") -> "ContentLookup":
        """The lookup of a ChunkStore split (its tokenizer's blank table computed once)."""
        return cls(store.chunks, store.blank_table())

    def __len__(self) -> int:
        return self.shape[0]

    def _visible(self, tokens: np.ndarray) -> np.ndarray:
        return visible_rows(tokens, self.blank)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                return self[np.arange(start, stop, step, dtype=np.int64)]
            out = np.empty(max(stop - start, 0), dtype=bool)
            for a in range(start, stop, BLOCK_ROWS):  # blocks: memory flat in the slice
                b = min(a + BLOCK_ROWS, stop)
                out[a - start:b - start] = self._visible(self.chunks[a:b])
            return out
        if isinstance(key, (int, np.integer)):
            return bool(self._visible(self.chunks[int(key)]))
        key = np.asarray(key)
        if key.dtype == bool:
            key = np.flatnonzero(key)
        # each distinct chunk read once, in row order (a batch's candidates repeat: neighbours of
        # neighbouring chunks overlap), then spread back to the key's shape
        rows, where = np.unique(key.reshape(-1).astype(np.int64), return_inverse=True)
        return self._visible(self.chunks[rows])[where.reshape(-1)].reshape(key.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError("ContentLookup is read per batch of chunks; index it, do not materialise it")
