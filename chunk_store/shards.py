"""A database is a set of immutable shards: how they are written, listed and deduplicated.

Why shards: a database of hundreds of billions of tokens is built by many processes on many
machines and grows by ``add``; no file may have to be rewritten to grow it, and the manifest
must stay small however many input files there are. So each chunk-stage run (or each of its
ranks) writes its own shard, ``DB/shards/NNNNNN/``: the split arrays of a DB
(``<split>/chunks.npy``, ``doc_ids.npy``, ``seq_starts.npy``, ``documents.jsonl``, ids local
to the shard), its per-file records (``inputs.jsonl``, ``skipped.jsonl``, ``repaired.jsonl``),
its documents' sorted digests (``digests.npy``) and its record (``shard.json``). The manifest
lists the shards' records in order; readers (chunk_store.store) number chunks and documents
globally in that order. A DB from before shards is one shard whose arrays sit in ``DB/<split>/``
and whose per-file records sit in the manifest.

Duplicates: a document whose normalised text has the digest of a document already in the
database (an earlier shard, an earlier part of this build) is not stored, only counted; the
digest is the first 16 bytes of the text's sha256 (no collision below ~10^18 documents).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from chunk_store.framework.errors import UserError
from chunk_store.layout import SHARDS_DIR, SPLITS, DBLayout, temp_path
from chunk_store.framework.atomic import atomic_save_npy, atomic_write_json
from chunk_store.chunk.packing import NpyWriter, sequence_starts
from chunk_store.chunk.part_files import doc_id_blocks, part_doc_info, part_rows, part_sources

log = logging.getLogger("chunk_store.shards")
DIGEST = np.dtype("S16")
# a documents.jsonl line of a document the tokenizer alters has this key (chunk.packing.RoundTrip)
ALTERED_KEY = '"decoded_bytes": '
LEGACY_DIR = "."  # the one shard of a DB from before shards: its arrays in DB/<split>/


# ----------------------------------------------------------------------------- listing


def shard_records(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Each shard's record in order; a DB from before shards is one record (``dir`` ".")."""
    if manifest.get("shards"):
        return list(manifest["shards"])
    return [{"dir": LEGACY_DIR, "counts": manifest.get("counts", {}), "by": "chunk"}]


def retrieval_only_ranges(manifest: dict[str, Any], split: str) -> list[tuple[int, int]]:
    """The [start, stop) global rows of ``split`` in retrieval-only shards (``add --retrieval-only``).

    No training or validation sequence is made of them, so nothing ever reads their neighbours:
    knn leaves those rows unsearched (-1), which keeps its cost with the data that trains, not the
    database (a 100x retrieval-only database would otherwise cost 100x the queries).
    """
    out: list[tuple[int, int]] = []
    start = 0
    for record in shard_records(manifest):
        n = int(record.get("counts", {}).get(split, {}).get("chunks", 0))
        if record.get("retrieval_only") and n:
            if out and out[-1][1] == start:  # consecutive retrieval-only shards: one range
                out[-1] = (out[-1][0], start + n)
            else:
                out.append((start, start + n))
        start += n
    return out


def shard_paths(db: Path, record: dict[str, Any]) -> DBLayout:
    return DBLayout(Path(db) / record["dir"])


def _read_jsonl(path: Path) -> Iterator[dict]:
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def _log(db: Path, manifest: dict[str, Any], key: str, by: str | None) -> Iterator[dict]:
    for rec in shard_records(manifest):
        if by is not None and rec.get("by", "chunk") != by:
            continue
        if rec["dir"] == LEGACY_DIR:
            yield from manifest.get(key, [])
            continue
        paths = shard_paths(db, rec)
        yield from _read_jsonl({"inputs": paths.inputs_log, "skipped": paths.skipped_log,
                                "repaired": paths.repaired_log}[key])


def db_inputs(db: Path, manifest: dict[str, Any], by: str | None = None) -> list[dict]:
    """Every input file record ({path, bytes, sha256}) of the shards (made ``by`` one stage)."""
    return list(_log(db, manifest, "inputs", by))


def db_skipped(db: Path, manifest: dict[str, Any]) -> list[dict]:
    return list(_log(db, manifest, "skipped", None))


def db_repaired(db: Path, manifest: dict[str, Any]) -> list[dict]:
    return list(_log(db, manifest, "repaired", None))


def total_counts(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """The DB's counts per split: the sum of its shards'."""
    out = {s: {"docs": 0, "chunks": 0, "tokens": 0, "seqs": 0} for s in SPLITS}
    for rec in records:
        for s in SPLITS:
            for key in out[s]:
                out[s][key] += int(rec.get("counts", {}).get(s, {}).get(key, 0))
    return out


# ----------------------------------------------------------------------------- duplicates


def _member(sorted_digests: np.ndarray, d: np.ndarray) -> np.ndarray:
    if not len(sorted_digests) or not len(d):
        return np.zeros(len(d), dtype=bool)
    pos = np.searchsorted(sorted_digests, d)
    return np.asarray(sorted_digests[np.minimum(pos, len(sorted_digests) - 1)]) == d


class DigestSet:
    """The documents a database already holds, by digest: the finished shards' sorted
    ``digests.npy`` (memmapped: a lookup reads a few pages) plus sorted runs of this build's,
    merged log-structured (a run merges with the last while it is not smaller), so adding n
    digests costs O(n log n) and a lookup O(runs x log n)."""

    def __init__(self, frozen: Iterable[np.ndarray] = ()) -> None:
        self.frozen = [f for f in frozen if len(f)]
        self.runs: list[np.ndarray] = []

    def contains(self, d: np.ndarray) -> np.ndarray:
        hit = np.zeros(len(d), dtype=bool)
        for arr in (*self.frozen, *self.runs):
            hit |= _member(arr, d)
        return hit

    def add(self, d: np.ndarray) -> None:
        run = np.sort(np.asarray(d, dtype=DIGEST))
        while self.runs and len(self.runs[-1]) <= 2 * len(run):
            run = np.sort(np.concatenate([self.runs.pop(), run]))
        self.runs.append(run)

    def keep(self, d: np.ndarray) -> np.ndarray:
        """Which of ``d`` (in order) are new: not held, and the first of their digest in ``d``;
        those are added."""
        first = np.zeros(len(d), dtype=bool)
        if len(d):
            first[np.unique(d, return_index=True)[1]] = True
        keep = first & ~self.contains(d)
        if keep.any():
            self.add(d[keep])
        return keep


def frozen_digests(db: Path, manifest: dict[str, Any]) -> list[np.ndarray]:
    """The sorted digests of every finished shard that has them (a DB from before shards has
    none: its documents are not deduplicated against)."""
    out = []
    for rec in shard_records(manifest):
        path = shard_paths(db, rec).digests
        if path.exists():
            out.append(np.load(path, mmap_mode="r"))
    return out


# ----------------------------------------------------------------------------- writing a shard


def shard_dir(index: int) -> str:
    return f"{SHARDS_DIR}/{index:06d}"


def next_shard_index(manifest: dict[str, Any]) -> int:
    """The number the next shard gets: one past the highest in use."""
    used = [int(r["dir"].rsplit("/", 1)[-1]) for r in manifest.get("shards") or [] if r["dir"] != LEGACY_DIR]
    return max(used) + 1 if used else 0


def read_shard_record(paths: DBLayout) -> dict[str, Any] | None:
    """A finished, whole shard's record (its ``shard.json``, every file present), else None."""
    try:
        record = json.loads(paths.shard_meta.read_text())
    except (OSError, ValueError):
        return None
    return record if all(f.is_file() for f in shard_files(paths)) else None


def write_shard(db: Path, index: int, parts: Sequence[tuple[Path, dict[str, Any]]], *, token_dtype: np.dtype,
                chunk_size: int, chunks_per_seq: int, seen: DigestSet | None, by: str,
                walk_skipped: Sequence[dict] = (), crash: Any = None, sequences: bool = True) -> dict[str, Any]:
    """Merge ``parts`` (folder, part.json), in order, into shard ``index``; its record.

    ``sequences=False`` (retrieval-only data): the shard's chunks start no training sequence
    (empty ``seq_starts``; the record says ``retrieval_only``), so adding it leaves every training
    and validation sequence of the database as it was.

    Streams: one block of one part is in memory at a time, plus 17 bytes a document of the shard
    (which stay, their digests; ``seen`` holds 16 more). ``seen`` (None: keep duplicates) drops documents already in the database and
    learns this shard's. ``shard.json`` is written last: a shard with it is whole.
    """
    paths = DBLayout(Path(db) / shard_dir(index))
    record: dict[str, Any] = {"dir": shard_dir(index), "by": by, "counts": {}, "duplicates": 0}
    if not sequences:
        record["retrieval_only"] = True
    digests: list[np.ndarray] = []
    for split in SPLITS:
        keeps = []  # pass 1: which documents stay (1 byte a document), the sizes
        n_chunks = n_docs = tokens = 0
        for p, meta in parts:
            info = part_doc_info(p, split, meta)
            keep = seen.keep(info["digest"]) if seen is not None else np.ones(len(info), dtype=bool)
            keeps.append(keep)
            digests.append(info["digest"][keep])
            record["duplicates"] += int((~keep).sum())
            n_chunks += int(info["chunks"][keep].sum())
            n_docs += int(keep.sum())
            tokens += int(info["tokens"][keep].sum())
        paths.split(split).mkdir(parents=True, exist_ok=True)
        w_c = NpyWriter(paths.chunks(split), token_dtype, (n_chunks, chunk_size))
        w_d = NpyWriter(paths.doc_ids(split), np.dtype(np.int64), (n_chunks,))
        docs_tmp = temp_path(paths.documents(split))
        doc = altered = 0
        with open(docs_tmp, "w", encoding="utf-8") as docs_f:
            for (p, meta), keep in tqdm(list(zip(parts, keeps)), desc=f"merge {split}", unit="part",
                                        leave=False):  # pass 2: the arrays
                info = part_doc_info(p, split, meta)
                for rows in part_rows(p, split, meta, info["chunks"], keep):
                    w_c.append(rows)
                for ids in doc_id_blocks(info["chunks"][keep], doc):
                    w_d.append(ids)
                doc += int(keep.sum())
                kept = [line for line, k in zip(part_sources(p, split), keep) if k]
                altered += sum(ALTERED_KEY in line for line in kept)
                docs_f.writelines(kept)
            docs_f.flush()
            os.fsync(docs_f.fileno())
        w_c.close()
        w_d.close()
        os.replace(docs_tmp, paths.documents(split))
        starts = sequence_starts(n_chunks, chunks_per_seq) if sequences else np.zeros(0, np.int64)
        atomic_save_npy(paths.seq_starts(split), starts)
        record["counts"][split] = {"docs": n_docs, "chunks": n_chunks, "tokens": tokens, "seqs": int(len(starts))}
        if altered:  # documents the tokenizer does not give back as they were (packing.RoundTrip)
            record.setdefault("altered_documents", {})[split] = altered
        if crash is not None:
            crash()
    atomic_save_npy(paths.digests, np.sort(np.concatenate(digests)) if digests else np.zeros(0, DIGEST))
    logs = {"inputs": [], "skipped": list(walk_skipped), "repaired": []}
    for _, meta in parts:
        for key in logs:
            logs[key] += meta[key]
    for sk in logs["skipped"]:
        log.info("skipped %s%s: %s", sk["path"], f" line {sk['line']}" if "line" in sk else "", sk["reason"])
    for key, path in (("inputs", paths.inputs_log), ("skipped", paths.skipped_log),
                      ("repaired", paths.repaired_log)):
        tmp = temp_path(path)
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in logs[key])
        os.replace(tmp, path)
    record.update({"inputs": len(logs["inputs"]), "bytes": int(sum(m["bytes"] for _, m in parts)),
                   "skipped": dict(Counter(s["reason"] for s in logs["skipped"])),
                   "repaired": len(logs["repaired"])})
    atomic_write_json(paths.shard_meta, record)
    return record


def shard_files(paths: DBLayout) -> list[Path]:
    """Every file of a finished shard (recorded as a stage's outputs, verified on a re-run)."""
    return [*(f(s) for s in SPLITS for f in (paths.chunks, paths.doc_ids, paths.seq_starts, paths.documents)),
            paths.digests, paths.inputs_log, paths.skipped_log, paths.repaired_log, paths.shard_meta]


def check_shard_dirs(db: Path, records: Sequence[dict[str, Any]]) -> None:
    for rec in records:
        if not (Path(db) / rec["dir"]).is_dir():
            raise UserError(f"corrupt {db}: shard {rec['dir']} is missing")


def searched_runs(a: int, b: int, unread: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The runs of rows [a, b) outside the ``unread`` ranges (sorted, disjoint): those knn searches."""
    runs, pos = [], a
    for lo, hi in unread:
        if hi <= pos or lo >= b:
            continue
        if lo > pos:
            runs.append((pos, lo))
        pos = max(pos, hi)
    if pos < b:
        runs.append((pos, b))
    return runs
