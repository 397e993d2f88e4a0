"""chunk: text folders -> tokenised chunks, doc ids and training sequences (train/val splits).

How it scales and resumes: the sorted file list is cut into work units (contiguous runs of
files, about 2 MB each; a big .jsonl is cut into line-aligned byte ranges) recorded once in
``DB/.chunk_work/plan.json``. Each unit is read, decoded, split and tokenised by a worker
process, which writes one part file atomically. A final merge streams the parts, in unit
order, into ``.npy`` files whose final size is known up front. So memory is bounded by a unit
(plus ~1 KB of manifest metadata per input file), not by the corpus; the result does not
depend on ``--workers`` or on unit boundaries; and a re-run after a crash (Ctrl-C, kill -9)
reuses every finished part and redoes only the rest and the merge, ending byte-identical to
an uninterrupted run. (Called from Python with ``workers > 1``, the calling script needs the
usual ``if __name__ == "__main__":`` guard: workers start through multiprocessing's
forkserver.)

Sequence rule (``seq_starts``): each split's chunks form one stream (documents in file order,
each padded to whole chunks); training sequences are consecutive, non-overlapping runs of
``seq_len / chunk_size`` chunks over that stream, the last partial run dropped. Sequences
cross document boundaries as in the paper (a document's EOS and padding mark the seam), so
short documents (most source files) waste no sequence slots, and every token is seen once per
epoch.

Split rule: a document goes to ``val`` when a stable hash (sha256) of its normalised text falls
below ``--val-fraction``; adding files never moves an existing document, and identical
documents always land in the same split (no train/val leakage through duplicates).
"""

from __future__ import annotations

import argparse
import array
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from chunk_store.manifest import (
    FORMAT_VERSION,
    DBError,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    check_params,
    load_manifest,
    manifest_path,
    now_iso,
    save_manifest,
    sha256_file,
    stage_done,
    versions,
)
from chunk_store.text_files import (
    DEFAULT_MAX_INVALID_FRACTION,
    InputFile,
    iter_sample_text,
    read_documents,
    split_jsonl,
    walk_inputs,
)
from chunk_store.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer

log = logging.getLogger("chunk_store.build")

SPLITS = ("train", "val")
WORK_DIR = ".chunk_work"
TOKENIZER_NAME = "tokenizer.model"
# env hooks used by the kill-and-resume tests: SIGKILL this process at a deterministic point
KILL_AFTER_PARTS_ENV = "RETRO_CHUNK_KILL_AFTER_PARTS"
KILL_IN_MERGE_ENV = "RETRO_CHUNK_KILL_IN_MERGE"
SIGINT_AFTER_PARTS_ENV = "RETRO_CHUNK_SIGINT_AFTER_PARTS"
UNIT_BYTES = 2 << 20
TASKS_PER_WORKER = 8


@dataclass(frozen=True)
class ChunkConfig:
    """Everything the chunk stage needs; ``params()`` is what must match on a re-run."""

    inputs: tuple[str, ...]
    globs: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    chunk_size: int = 64
    seq_len: int = 2048
    val_fraction: float = 0.0
    vocab_size: int | None = 8192
    tokenizer_file: str | None = None
    tokenizer_sample_mb: float = 4.0  # unigram training costs ~5 s per MB on 2 cores
    tokenizer_type: str = "unigram"  # sentencepiece model type when training: unigram | bpe
    max_invalid_fraction: float = DEFAULT_MAX_INVALID_FRACTION
    workers: int = 1
    unit_bytes: int | None = None  # work-unit size; None = auto. Never changes the result.

    def validate(self) -> None:
        if not self.inputs:
            raise DBError("chunk: give at least one --input folder")
        if self.chunk_size < 1:
            raise DBError(f"chunk: --chunk-size must be positive, got {self.chunk_size}")
        if self.seq_len < self.chunk_size or self.seq_len % self.chunk_size:
            raise DBError(f"chunk: --seq-len ({self.seq_len}) must be a positive multiple of "
                          f"--chunk-size ({self.chunk_size})")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DBError(f"chunk: --val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.tokenizer_file is None and (self.vocab_size is None or self.vocab_size < 300):
            raise DBError(f"chunk: --vocab-size must be >= 300 (256 byte pieces + specials), "
                          f"got {self.vocab_size}")
        if self.tokenizer_type not in ("unigram", "bpe"):
            raise DBError(f"chunk: --tokenizer-type must be unigram or bpe, got {self.tokenizer_type}")
        if self.workers < 1:
            raise DBError(f"chunk: --workers must be >= 1, got {self.workers}")
        if not 0.0 <= self.max_invalid_fraction <= 1.0:
            raise DBError("chunk: --max-invalid-fraction must be in [0, 1]")

    def params(self) -> dict[str, Any]:
        """Parameters that change the result (the worker count does not)."""
        p: dict[str, Any] = {
            "inputs": [str(Path(i).expanduser().resolve()) for i in self.inputs],
            "globs": list(self.globs),
            "excludes": list(self.excludes),
            "chunk_size": self.chunk_size,
            "seq_len": self.seq_len,
            "val_fraction": self.val_fraction,
            "max_invalid_fraction": self.max_invalid_fraction,
        }
        if self.tokenizer_file is not None:
            path = Path(self.tokenizer_file)
            if not path.is_file():
                raise DBError(f"chunk: missing tokenizer file {path}")
            p["tokenizer"] = {"sha256": sha256_file(path)}  # the content, wherever the file is
        else:
            p["tokenizer"] = {"train": True, "vocab_size": self.vocab_size,
                              "sample_mb": self.tokenizer_sample_mb, "model_type": self.tokenizer_type}
        return p


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


def _init_worker(proto: bytes) -> None:
    global _WORKER_TOKENIZER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _WORKER_TOKENIZER = Tokenizer(proto, TOKENIZER_NAME)


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
    code = "H" if tok.token_dtype == np.uint16 else "i"  # array.array: ~25% faster than np.asarray(list)
    for path, start, end, first_line, size, sha in spec.items:
        out = read_documents(path, spec.max_invalid_fraction, start, end, first_line)
        nbytes += out.size
        if start == 0:  # a split file is listed once, with the hash the plan computed
            # bytes: the walk's size (what a re-run compares); sha256 None if unreadable
            inputs.append({"path": path, "bytes": size, "sha256": sha or out.sha256})
        skipped.extend(out.skipped)
        if out.invalid_bytes and out.documents:
            repaired.append({"path": path, "invalid_bytes": out.invalid_bytes})
        for d in out.documents:
            split = "val" if is_val(d.text, spec.val_fraction) else "train"
            docs[split].append(d.source_json())
            tokens[split].append(np.frombuffer(array.array(code, tok.encode(d.text)), dtype=tok.token_dtype))
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
    tmp = part.with_name(f".{part.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, part)
    return {"index": spec.index, "bytes": nbytes}


def _read_part_meta(path: Path) -> dict[str, Any] | None:
    """A finished part's metadata, or None if the part is absent or unreadable (redo it)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(bytes(z["meta"]).decode())
    except Exception as e:  # a corrupt part (should not happen: parts are renamed into place)
        log.warning("part %s unreadable (%s): redoing it", path, e)
        return None


# ----------------------------------------------------------------------------- the stage


def _kill_self_if(env: str, count: int | None = None, pool: ProcessPoolExecutor | None = None) -> None:
    """Test hook: SIGKILL this process (and its workers) when ``env`` says so.

    ``RETRO_CHUNK_SIGINT_AFTER_PARTS`` instead sends SIGINT to the whole process group at
    that point, exactly what Ctrl-C in a terminal does.
    """
    if count is not None and os.environ.get(SIGINT_AFTER_PARTS_ENV) == str(count):
        os.killpg(os.getpgid(0), signal.SIGINT)
        return
    val = os.environ.get(env)
    if not val or (count is not None and count < int(val)):
        return
    if pool is not None:
        for p in list(getattr(pool, "_processes", {}).values()):
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    os.kill(os.getpid(), signal.SIGKILL)


def _clean_stale_tmp(db: Path) -> None:
    """Remove temporary files a killed run of this stage left behind (never final files)."""
    for d in [db, db / WORK_DIR, *(db / s for s in SPLITS)]:
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name and p.is_file():
                base = p.name[1:].split(".tmp-")[0]
                if base.startswith("part_") or base in {TOKENIZER_NAME, "plan.json", "chunks.npy",
                                                        "doc_ids.npy", "seq_starts.npy",
                                                        "documents.jsonl"}:
                    p.unlink(missing_ok=True)


def _prepare_tokenizer(db: Path, cfg: ChunkConfig, files: Sequence[InputFile],
                       manifest: dict[str, Any]) -> Tokenizer:
    """Load the DB's tokenizer if this run already made it; else copy or train one."""
    dest = db / TOKENIZER_NAME
    rec = manifest.get("tokenizer")
    if rec and dest.exists() and sha256_file(dest) == rec.get("sha256"):
        return Tokenizer.from_file(dest)
    if cfg.tokenizer_file is not None:
        proto = Path(cfg.tokenizer_file).read_bytes()
        tok = Tokenizer(proto, cfg.tokenizer_file)
        source = str(Path(cfg.tokenizer_file).resolve())
    else:
        assert cfg.vocab_size is not None
        budget = int(cfg.tokenizer_sample_mb * (1 << 20))
        sample = tqdm(iter_sample_text(files, budget, max_invalid_fraction=cfg.max_invalid_fraction),
                      desc="tokenizer sample", unit="doc", leave=False)
        t0 = time.time()
        proto = train_tokenizer(sample, TokenizerTrainConfig(vocab_size=cfg.vocab_size,
                                                             model_type=cfg.tokenizer_type))
        log.info("trained tokenizer in %.1fs", time.time() - t0)
        tok = Tokenizer(proto, TOKENIZER_NAME)
        source = "trained"
    atomic_write_bytes(dest, proto)
    manifest["tokenizer"] = {
        "kind": "sentencepiece",
        "file": TOKENIZER_NAME,
        "sha256": hashlib.sha256(proto).hexdigest(),
        "source": source,
        "vocab_size": tok.vocab_size,
        "sp_vocab_size": tok.sp_vocab_size,
        "pad_id": tok.pad_id,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "unk_id": tok.unk_id,
        "byte_fallback": tok.byte_fallback,
        "normalisation": "utf-8, BOM stripped, CRLF/CR -> LF; sentencepiece identity rule",
    }
    manifest["token_dtype"] = tok.token_dtype.name
    save_manifest(db, manifest)
    return tok


def _load_or_make_plan(work: Path, files: Sequence[InputFile], walk_skipped: list[dict],
                       unit_bytes: int | None, tokenizer_sha256: str) -> dict:
    """The work plan of an interrupted run (checked against the inputs), else a new one.

    Parts made with another tokenizer (the DB's model was replaced) are discarded.
    """
    plan_path = work / "plan.json"
    listing = [f.to_json() for f in files]
    if plan_path.exists():
        try:
            plan = json.loads(plan_path.read_text())
        except json.JSONDecodeError:
            plan = None
        if plan is not None and plan.get("tokenizer_sha256") != tokenizer_sha256:
            log.warning("chunk: the tokenizer changed since the interrupted run: redoing every unit")
            for part in work.glob("part_*.npz"):
                part.unlink()
            plan = None
        if plan is not None:
            old = plan["files"]
            if old != listing:
                first = next((a for a, b in itertools.zip_longest(old, listing) if a != b), None) \
                    or next(b for a, b in itertools.zip_longest(old, listing) if a != b)
                raise DBError(
                    f"chunk: input files changed since the interrupted run (first difference: "
                    f"{first[0]}); restore them, or delete {work} to start over")
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


def _run_units(pending: list[UnitSpec], tok: Tokenizer, workers: int, total_bytes: int,
               done_bytes: int) -> None:
    bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, desc="chunk",
               smoothing=0.1)
    finished = 0
    try:
        if workers == 1 or len(pending) <= 1:
            for spec in pending:
                bar.update(process_unit(spec, tok)["bytes"])
                finished += 1
                _kill_self_if(KILL_AFTER_PARTS_ENV, finished)
            return
        # forkserver, not fork: a forked worker would inherit (and count in its RSS) the main
        # process's file list, which grows with the corpus
        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload(["chunk_store.build"])
        # a fresh worker every few units: heap fragmentation would otherwise grow a worker's
        # RSS with the number of units it has processed, i.e. with the corpus
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(tok.model_proto,),
                                 max_tasks_per_child=TASKS_PER_WORKER) as pool:
            # keep at most 2*workers units in flight: results are tiny, but this bounds the queue
            todo = iter(pending)
            running: set[Future] = set()
            try:
                for spec in itertools.islice(todo, 2 * workers):
                    running.add(pool.submit(process_unit, spec))
                while running:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for fut in done:
                        bar.update(fut.result()["bytes"])
                        finished += 1
                        _kill_self_if(KILL_AFTER_PARTS_ENV, finished, pool)
                        nxt = next(todo, None)
                        if nxt is not None:
                            running.add(pool.submit(process_unit, nxt))
            except BaseException:
                for fut in running:
                    fut.cancel()
                raise
    finally:
        bar.close()


class NpyWriter:
    """Write a .npy file of known final shape sequentially, then rename it into place.

    Plain appends instead of a writable memmap: dirty mapped pages would count in this
    process's RSS and grow with the corpus; sequential writes keep memory flat.
    """

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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


def _merge(db: Path, work: Path, plan: dict, tok: Tokenizer, cfg: ChunkConfig) -> dict[str, Any]:
    """Copy the parts, in order, into the final arrays (sizes known up front), streaming.

    One part is in memory at a time; what is kept across parts is per-file metadata for the
    manifest (inputs, skips), never tokens or per-document lists.
    """
    n_units = len(plan["units"])
    part_paths = [work / f"part_{i:08d}.npz" for i in range(n_units)]
    totals = {s: {"docs": 0, "chunks": 0, "tokens": 0} for s in SPLITS}
    inputs: list[dict] = []
    skipped: list[dict] = list(plan["walk_skipped"])
    repaired: list[dict] = []
    nbytes = 0
    for p in part_paths:  # pass 1: sizes and manifest metadata
        m = _read_part_meta(p)
        if m is None:
            raise DBError(f"chunk: part {p} is missing after processing: re-run to redo it")
        for s in SPLITS:
            totals[s]["docs"] += len(m["docs"][s])
            totals[s]["chunks"] += m["chunks"][s]
            totals[s]["tokens"] += m["tokens"][s]
        inputs += m["inputs"]
        skipped += m["skipped"]
        for sk in m["skipped"]:
            log.info("skipped %s%s: %s", sk["path"], f" line {sk['line']}" if "line" in sk else "",
                     sk["reason"])
        repaired += m["repaired"]
        nbytes += m["bytes"]
    counts: dict[str, dict[str, int]] = {}
    chunks_per_seq = cfg.seq_len // cfg.chunk_size
    for split in SPLITS:  # pass 2: the arrays, one split at a time
        out_dir = db / split
        out_dir.mkdir(parents=True, exist_ok=True)
        n_chunks, n_docs = totals[split]["chunks"], totals[split]["docs"]
        w_c = NpyWriter(out_dir / "chunks.npy", tok.token_dtype, (n_chunks, cfg.chunk_size))
        w_d = NpyWriter(out_dir / "doc_ids.npy", np.dtype(np.int64), (n_chunks,))
        docs_tmp = out_dir / f".documents.jsonl.tmp-{os.getpid()}"
        doc = 0
        with open(docs_tmp, "w") as docs_f:
            for p in tqdm(part_paths, desc=f"merge {split}", unit="part", leave=False):
                with np.load(p, allow_pickle=False) as z:
                    c = z[f"{split}_chunks"]
                    dc = z[f"{split}_doc_chunks"]
                    meta = json.loads(bytes(z["meta"]).decode())
                w_c.append(c)
                w_d.append(np.repeat(np.arange(doc, doc + len(dc), dtype=np.int64), dc))
                docs_f.writelines(json.dumps(d) + "\n" for d in meta["docs"][split])
                doc += len(dc)
            docs_f.flush()
            os.fsync(docs_f.fileno())
        assert doc == n_docs
        w_c.close()
        w_d.close()
        os.replace(docs_tmp, out_dir / "documents.jsonl")
        starts = sequence_starts(n_chunks, chunks_per_seq)
        atomic_save_npy(out_dir / "seq_starts.npy", starts)
        counts[split] = {**totals[split], "seqs": int(len(starts))}
        _kill_self_if(KILL_IN_MERGE_ENV)
    return {"counts": counts, "inputs": inputs, "skipped": skipped, "repaired": repaired,
            "bytes": nbytes}


def summary_line(counts: dict, skipped: list[dict], repaired: list[dict]) -> str:
    docs = sum(c["docs"] for c in counts.values())
    chunks = sum(c["chunks"] for c in counts.values())
    tokens = sum(c["tokens"] for c in counts.values())
    by_reason = Counter(s["reason"] for s in skipped)
    skip = ", ".join(f"{r}={n}" for r, n in sorted(by_reason.items())) or "none"
    splits = "; ".join(f"{s}: {c['docs']} docs / {c['chunks']} chunks / {c['seqs']} seqs"
                       for s, c in counts.items())
    return (f"chunk: {docs} documents, {chunks} chunks, {tokens} tokens ({splits}); "
            f"skipped {sum(by_reason.values())} ({skip}); repaired {len(repaired)} files")


def build(db: str | os.PathLike, cfg: ChunkConfig) -> dict[str, Any]:
    """Run (or resume, or skip if done) the chunk stage into ``db``; return a summary."""
    cfg.validate()
    db = Path(db)
    params = cfg.params()
    manifest: dict[str, Any] | None = None
    if manifest_path(db).exists():
        manifest = load_manifest(db)
        check_params(manifest["stages"].get("chunk", {}).get("params"), params, "chunk")
        for key in ("chunk_size", "seq_len"):
            check_params({key: manifest.get(key)}, {key: params[key]}, "chunk")
    elif db.exists() and (not db.is_dir() or any(db.iterdir())):
        raise DBError(f"chunk: {db} exists and is not a retro database (no {manifest_path(db).name})")

    walk = walk_inputs(cfg.inputs, cfg.globs, cfg.excludes, progress=True)
    if manifest is not None and stage_done(manifest, "chunk"):
        recorded = [(i["path"], i["bytes"]) for i in manifest.get("inputs", [])]
        now = [(f.path, f.size) for f in walk.files]
        if recorded != now:
            diff = next((a for a, b in itertools.zip_longest(recorded, now) if a != b), None) or \
                next(b for a, b in itertools.zip_longest(recorded, now) if a != b)
            raise DBError(f"chunk: the inputs changed since {db} was built (first difference: "
                          f"{diff[0]}): use a new --out")
        shutil.rmtree(db / WORK_DIR, ignore_errors=True)
        line = summary_line(manifest["counts"], manifest.get("skipped", []), manifest.get("repaired", []))
        print(f"{line} (already done: nothing to do)", file=sys.stderr)
        return {"skipped_stage": True, **manifest["stages"]["chunk"]["stats"]}
    if not walk.files:
        raise DBError(f"chunk: no input files found under {', '.join(cfg.inputs)} "
                      f"(globs {list(cfg.globs) or 'none'}, excludes {list(cfg.excludes) or 'none'})")

    started = now_iso()
    db.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        manifest = {"format_version": FORMAT_VERSION, "chunk_size": cfg.chunk_size,
                    "seq_len": cfg.seq_len, "stages": {}}
    else:
        started = manifest["stages"].get("chunk", {}).get("started", started)
    manifest["stages"]["chunk"] = {"params": params, "versions": versions("sentencepiece"),
                                   "started": started, "finished": None, "stats": {}}
    save_manifest(db, manifest)
    _clean_stale_tmp(db)

    tok = _prepare_tokenizer(db, cfg, walk.files, manifest)
    work = db / WORK_DIR
    work.mkdir(exist_ok=True)
    plan = _load_or_make_plan(work, walk.files, walk.skipped, cfg.unit_bytes,
                              manifest["tokenizer"]["sha256"])
    del walk  # the plan holds the file list from here on
    files = [InputFile.from_json(r) for r in plan["files"]]
    hashes = plan.get("hashes", {})
    specs = [UnitSpec(u, [(files[i].path, start, end, line, files[i].size, hashes.get(str(i)))
                          for i, start, end, line in items],
                      str(work / f"part_{u:08d}.npz"), cfg.chunk_size, cfg.val_fraction,
                      cfg.max_invalid_fraction)
             for u, items in enumerate(plan["units"])]
    pending = [s for s in specs if _read_part_meta(Path(s.part_path)) is None]
    pending_ids = {s.index for s in pending}
    total_bytes = sum(f.size for f in files)
    done_bytes = sum((size if end is None else end - start)
                     for s in specs if s.index not in pending_ids
                     for _, start, end, _, size, _ in s.items)
    if len(pending) < len(specs):
        log.warning("chunk: resuming: %d of %d work units already done", len(specs) - len(pending),
                    len(specs))
    t0 = time.time()
    _run_units(pending, tok, cfg.workers, total_bytes, done_bytes)
    t_tok = time.time() - t0
    merged = _merge(db, work, plan, tok, cfg)

    manifest["counts"] = merged["counts"]
    manifest["inputs"] = merged["inputs"]
    manifest["skipped"] = merged["skipped"]
    manifest["repaired"] = merged["repaired"]
    stats = {
        "bytes": merged["bytes"],
        "documents": sum(c["docs"] for c in merged["counts"].values()),
        "chunks": sum(c["chunks"] for c in merged["counts"].values()),
        "tokens": sum(c["tokens"] for c in merged["counts"].values()),
        "skipped": dict(Counter(s["reason"] for s in merged["skipped"])),
        "repaired_files": len(merged["repaired"]),
        "seconds_tokenising_this_run": round(t_tok, 3),
        "workers": cfg.workers,
    }
    manifest["stages"]["chunk"].update(finished=now_iso(), stats=stats)
    save_manifest(db, manifest)
    shutil.rmtree(work, ignore_errors=True)
    print(summary_line(merged["counts"], merged["skipped"], merged["repaired"]), file=sys.stderr)
    return stats


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", default=[], metavar="DIR",
                        help="folder of text files, walked recursively (repeatable; a file works too)")
    parser.add_argument("--glob", action="append", default=[], metavar="GLOB",
                        help="keep only files whose name or relative path matches (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="drop files/folders whose relative path matches, e.g. 'test/*' (repeatable)")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="FILE", default=None,
                     help="an existing sentencepiece model (copied into the DB)")
    tok.add_argument("--vocab-size", type=int, default=None, metavar="N",
                     help="train a sentencepiece model of N pieces on a corpus sample (default 8192)")
    parser.add_argument("--chunk-size", type=int, default=64, metavar="M",
                        help="tokens per chunk (default 64, as in the paper)")
    parser.add_argument("--seq-len", type=int, default=2048, metavar="N",
                        help="tokens per training sequence, a multiple of --chunk-size (default 2048)")
    parser.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                        help="fraction of documents held out as the val split (stable hash; default 0)")
    parser.add_argument("--workers", type=int, default=max(1, min(os.cpu_count() or 1, 8)),
                        metavar="N",
                        help="tokenising processes (default: CPU count, at most 8); the result is "
                             "identical for any N")
    parser.add_argument("--tokenizer-sample-mb", type=float, default=4.0, metavar="MB",
                        help="MB of text sampled (deterministically) to train the tokenizer (default 4)")
    parser.add_argument("--tokenizer-type", choices=("unigram", "bpe"), default="unigram",
                        help="sentencepiece model type to train (unigram encodes ~9x faster than "
                             "bpe here, at the same compression)")
    parser.add_argument("--unit-mb", type=float, default=None, metavar="MB",
                        help="work-unit size in MB (default 2); never changes the result")
    parser.add_argument("--max-invalid-fraction", type=float, default=DEFAULT_MAX_INVALID_FRACTION,
                        metavar="F", help="skip files with more undecodable UTF-8 bytes than this "
                                          "fraction (default 0.01); below it they become U+FFFD")


def config_from_args(args: argparse.Namespace) -> ChunkConfig:
    vocab = args.vocab_size if args.vocab_size is not None else (None if args.tokenizer else 8192)
    return ChunkConfig(
        inputs=tuple(args.input), globs=tuple(args.glob), excludes=tuple(args.exclude),
        chunk_size=args.chunk_size, seq_len=args.seq_len, val_fraction=args.val_fraction,
        vocab_size=vocab, tokenizer_file=args.tokenizer,
        tokenizer_sample_mb=args.tokenizer_sample_mb, tokenizer_type=args.tokenizer_type,
        max_invalid_fraction=args.max_invalid_fraction, workers=args.workers,
        unit_bytes=int(args.unit_mb * (1 << 20)) if args.unit_mb else None,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    return build(args.db, config_from_args(args))
