"""chunk: text folders -> tokenised chunks, doc ids and training sequences (train/val splits).

How it scales and resumes: the sorted file list is cut into work units (contiguous runs of
files, about 2 MB each; a big .jsonl is cut into line-aligned byte ranges) recorded once in
``DB/.chunk_work/plan.json``. Each unit is read, decoded, split and tokenised by a worker
process, which writes one part file atomically. A final merge streams the parts, in unit
order, into ``.npy`` files whose final size is known up front. So memory is bounded by a unit
(plus ~1 KB of manifest metadata per input file), not by the corpus; the result does not
depend on ``--workers`` or on unit boundaries; and a re-run after a crash (Ctrl-C, kill -9)
reuses every finished part and redoes only the rest and the merge, ending byte-identical to
an uninterrupted run (the stage routine, chunk_store.framework.stage, owns the resume), with any
number of torchrun ranks: the shards keep the parts recorded by the run that started
(chunk_store.chunk.merge_plan). (Called from
Python with ``workers > 1``, the calling script needs the usual ``if __name__ == "__main__":``
guard: workers start through multiprocessing's forkserver.)

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
import itertools
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


from chunk_store.framework.errors import UserError
from chunk_store.tokenization.db_tokenizer import prepare_tokenizer
from chunk_store.tokenization.hugging_face import HF_PREFIX, load_hf_tokenizer, open_db_tokenizer
from chunk_store.layout import (CHUNK_PART_PREFIX, CHUNK_PLAN, CHUNKS, DOC_IDS, DOCUMENTS, HF_TOKENIZER_FILES,
                                SEQ_STARTS, SPLITS, TOKENIZER)
from chunk_store.manifest import FORMAT_VERSION, check_params, load_manifest, sha256_file, stage_done
from chunk_store.chunk.input_formats import DEFAULT_TEXT_FIELD, iter_sample_text
from chunk_store.framework import runtime
from chunk_store.chunk.merge_plan import ShardJob, ensure_merge_plan, rank_jobs, shard_jobs
from chunk_store.chunk.packing import SCAN_PREFIX, UnitSpec, init_worker, load_or_make_plan, process_unit, scan_share
from chunk_store.chunk.part_files import part_doc_info, read_part_meta
from chunk_store.shards import (DigestSet, db_inputs, frozen_digests, next_shard_index, read_shard_record,
                                shard_files, shard_paths, shard_records, total_counts, write_shard)
from chunk_store.framework.stage import RunInfo, Stage, Unit, crash_point, run_stage
from chunk_store.chunk.text_files import DEFAULT_MAX_INVALID_FRACTION, InputFile, WalkResult, walk_inputs
from chunk_store.tokenization.sentencepiece import Tokenizer
from chunk_store.tokenization.protocol import DBTokenizer

log = logging.getLogger("chunk_store.chunk.stage")

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
    tokenizer_sample_mb: float = 4.0  # unigram training cost grows with the sample (docs/BENCHMARKS.md)
    tokenizer_type: str = "unigram"  # sentencepiece model type when training: unigram | bpe
    max_invalid_fraction: float = DEFAULT_MAX_INVALID_FRACTION
    workers: int = 1
    unit_bytes: int | None = None  # work-unit size; None = auto. Never changes the result.
    text_field: str = DEFAULT_TEXT_FIELD  # the text of a JSONL record or a Parquet row
    keep_duplicates: bool = False  # store documents whose normalised text is already in the DB
    # add --retrieval-only: the new shard's chunks are retrievable (train split, embedded, indexed)
    # but start no training sequence; read by the add stage, not a chunk-stage parameter
    retrieval_only: bool = False

    def validate(self) -> None:
        if not self.inputs:
            raise UserError("chunk: give at least one --input folder")
        if self.chunk_size < 1:
            raise UserError(f"chunk: --chunk-size must be positive, got {self.chunk_size}")
        if self.seq_len < self.chunk_size or self.seq_len % self.chunk_size:
            raise UserError(f"chunk: --seq-len ({self.seq_len}) must be a positive multiple of "
                          f"--chunk-size ({self.chunk_size})")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"chunk: --val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.tokenizer_file is None and (self.vocab_size is None or self.vocab_size < 300):
            raise UserError(f"chunk: --vocab-size must be >= 300 (256 byte pieces + specials), "
                          f"got {self.vocab_size}")
        if self.tokenizer_type not in ("unigram", "bpe"):
            raise UserError(f"chunk: --tokenizer-type must be unigram or bpe, got {self.tokenizer_type}")
        if self.workers < 1:
            raise UserError(f"chunk: --workers must be >= 1, got {self.workers}")
        if not 0.0 <= self.max_invalid_fraction <= 1.0:
            raise UserError("chunk: --max-invalid-fraction must be in [0, 1]")
        if not self.text_field:
            raise UserError("chunk: --text-field must not be empty")

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
            "text_field": self.text_field,
            "keep_duplicates": self.keep_duplicates,
        }
        if self.tokenizer_file is not None and self.tokenizer_file.startswith(HF_PREFIX):
            hf = load_hf_tokenizer(self.tokenizer_file)  # the content decides, not the name
            p["tokenizer"] = {"hf": self.tokenizer_file[len(HF_PREFIX):], "sha256": hf.sha256}
        elif self.tokenizer_file is not None:
            path = Path(self.tokenizer_file)
            if not path.is_file():
                raise UserError(f"chunk: missing tokenizer file {path}")
            p["tokenizer"] = {"sha256": sha256_file(path)}  # the content, wherever the file is
        else:
            p["tokenizer"] = {"train": True, "vocab_size": self.vocab_size,
                              "sample_mb": self.tokenizer_sample_mb, "model_type": self.tokenizer_type}
        return p


# ----------------------------------------------------------------------------- the stage


class ChunkStage(Stage[ChunkConfig]):
    """Text folders -> part files (one a work unit, in worker processes) -> merged split arrays."""

    name = "chunk"
    packages = ("sentencepiece",)
    progress_unit = "B"
    progress_scale = True

    def __init__(self, db: str | os.PathLike, cfg: ChunkConfig) -> None:
        super().__init__(db, cfg)
        self._walk: WalkResult | None = None
        self.tok: DBTokenizer | None = None
        self.plan: dict[str, Any] = {}
        self.base = 0  # the index of the first shard this run writes
        self.new_records: list[dict[str, Any]] = []  # the shards this run wrote (finalize)

    def walk(self) -> WalkResult:
        if self._walk is None:
            self._walk = walk_inputs(self.cfg.inputs, self.cfg.globs, self.cfg.excludes, progress=True,
                                     never=[self.db])  # the database is never its own input
        return self._walk

    def open_manifest(self) -> dict[str, Any]:
        self.cfg.validate()
        if self.paths.manifest.exists():
            return load_manifest(self.db)
        # rank 0 alone judges a folder without a manifest: under torchrun it may be writing one now
        if runtime.rank() == 0 and self.db.exists() and (not self.db.is_dir() or any(self.db.iterdir())):
            raise UserError(f"chunk: {self.db} exists and is not a retro database "
                            f"(no {self.paths.manifest.name})")
        return {"format_version": FORMAT_VERSION, "chunk_size": self.cfg.chunk_size,
                "seq_len": self.cfg.seq_len, "stages": {}}

    def params(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return self.cfg.params()

    def check(self, recorded: dict[str, Any], params: dict[str, Any], manifest: dict[str, Any]) -> None:
        super().check(recorded, params, manifest)
        for key in ("chunk_size", "seq_len"):
            check_params({key: manifest.get(key)}, {key: params[key]}, "chunk")

    def complete(self, manifest: dict[str, Any]) -> bool:
        """Done, unless the inputs changed since (then refuse: a finished DB is never rewritten)."""
        inputs = db_inputs(self.db, manifest, by="chunk")
        recorded = sorted((i["path"], i["bytes"]) for i in inputs)
        now = sorted((f.path, f.size) for f in self.walk().files)
        if recorded != now:
            diff = next((a for a, b in itertools.zip_longest(recorded, now) if a != b), None) or \
                next(b for a, b in itertools.zip_longest(recorded, now) if a != b)
            raise InputsChanged(f"chunk: the inputs changed since {self.db} was built (first difference: "
                                f"{diff[0]}): use a new --out, or `retro-build-index add --db {self.db} "
                                f"--input ...` to add files")
        for rec in inputs:  # unreadable then (no sha256), readable now: changed too
            if rec.get("sha256") is None and _readable(rec["path"]):
                raise InputsChanged(f"chunk: the inputs changed since {self.db} was built ({rec['path']} "
                                    f"was unreadable and is readable now): use a new --out, or "
                                    f"`retro-build-index add` to add it")
        shutil.rmtree(self.paths.chunk_work, ignore_errors=True)
        return True

    def outputs(self, manifest: dict[str, Any]) -> list[Path]:
        p = self.paths
        tok = manifest.get("tokenizer") or {}
        tokenizer = ([p.hf_tokenizer / name for name in tok.get("files", [])] if tok.get("kind") == "hf"
                     else [p.tokenizer])
        return [*tokenizer, *(f for rec in self.new_records for f in shard_files(shard_paths(self.db, rec)))]

    def skip_message(self, stats: dict[str, Any]) -> str:
        if "counts" not in stats:  # recorded by a version before shards
            stats = {**stats, "counts": load_manifest(self.db).get("counts", {})}
        return f"{summary_line(stats, self.name)} (already done: nothing to do)"

    def say(self, line: str) -> None:
        print(line, file=sys.stderr)

    def space_needed(self) -> int | None:
        """Parts and merged arrays: about 2 x 4 bytes a token at ~4 bytes of text a token."""
        return 2 * sum(f.size for f in self.walk().files)

    def preflight(self, manifest: dict[str, Any]) -> None:
        if not self.walk().files:
            raise UserError(f"chunk: no input files found under {', '.join(self.cfg.inputs)} "
                            f"(globs {list(self.cfg.globs) or 'none'}, "
                            f"excludes {list(self.cfg.excludes) or 'none'})")
        skipped: list[dict] = []  # reads files only until the first text: a corpus costs one file
        if next(iter_sample_text(self.walk().files, 1, max_invalid_fraction=self.cfg.max_invalid_fraction,
                                 skipped=skipped, text_field=self.cfg.text_field), None) is None:
            reasons = Counter(s["reason"] for s in skipped + self.walk().skipped)
            why = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())) or "none"
            raise UserError(f"chunk: no text found in the inputs ({sum(reasons.values())} files skipped: {why})")

    def temp_folders(self) -> list[tuple[Path, tuple[str, ...]]]:
        finals = (CHUNKS, DOC_IDS, SEQ_STARTS, DOCUMENTS)
        shards = sorted(self.paths.shards_dir.glob("*")) if self.paths.shards_dir.is_dir() else []
        return [(self.db, (TOKENIZER,)), (self.paths.hf_tokenizer, HF_TOKENIZER_FILES),
                (self.paths.chunk_work, (CHUNK_PART_PREFIX, CHUNK_PLAN, SCAN_PREFIX)),
                *((d, ("",)) for d in shards), *((d / s, finals) for d in shards for s in SPLITS)]

    def rank_units(self, units: list[Unit], rank: int, world: int) -> list[Unit]:
        return [u for u in units if u.index % world == rank]

    def prepare_tokenizer(self, manifest: dict[str, Any]) -> DBTokenizer:
        return prepare_tokenizer(self.db, self.cfg, self.walk().files, manifest)

    def begin(self, manifest: dict[str, Any]) -> None:
        """The tokenizer (trained once) and the plan: rank 0 makes them, the others read them.
        The plan fixes which parts each new shard holds, once, for the world size that starts
        it: a resume with any other number of ranks writes the same shards (merge_plan). Big
        files are read for the plan by every rank, a share each (packing.scan_share)."""
        if not self.paths.chunk_plan.exists():  # written by rank 0 only after this barrier
            self.paths.chunk_work.mkdir(parents=True, exist_ok=True)
            scan_share(self.paths.chunk_work, self.walk().files, self.cfg.unit_bytes, runtime.rank(),
                       runtime.world_size())
            runtime.barrier()
        if runtime.rank() == 0:
            self.tok = self.prepare_tokenizer(manifest)
            self.paths.chunk_work.mkdir(exist_ok=True)
            plan = load_or_make_plan(self.paths.chunk_plan, self.walk().files, self.walk().skipped,
                                     self.cfg.unit_bytes, manifest["tokenizer"]["sha256"])
            self.plan = ensure_merge_plan(plan, self.paths.chunk_plan, self.db, next_shard_index(manifest),
                                          runtime.world_size())
        runtime.barrier()
        if runtime.rank() != 0:
            manifest = load_manifest(self.db)
            self.tok = open_db_tokenizer(self.db, manifest["tokenizer"])
            self.plan = json.loads(self.paths.chunk_plan.read_text())
        self._walk = None  # the plan holds the file list from here on
        self.base = int(self.plan["merge"]["base"])

    def units(self, manifest: dict[str, Any]) -> list[Unit]:
        files = [InputFile.from_json(r) for r in self.plan["files"]]
        hashes = self.plan.get("hashes", {})
        out = []
        for u, items in enumerate(self.plan["units"]):
            spec = UnitSpec(u, [(files[i].path, start, end, line, files[i].size, hashes.get(str(i)), nbytes)
                                for i, start, end, line, nbytes in items],
                            str(self.paths.chunk_part(u)), self.cfg.chunk_size, self.cfg.val_fraction,
                            self.cfg.max_invalid_fraction, self.cfg.text_field)
            out.append(Unit(u, sum(item[-1] for item in spec.items), spec))
        return out

    def unit_done(self, unit: Unit) -> bool:
        return read_part_meta(self.paths.chunk_part(unit.index)) is not None

    def compute(self, unit: Unit) -> None:
        process_unit(unit.payload, self.tok)

    def run_units(self, todo: list[Unit], done: Callable[[Unit], None]) -> None:
        if self.cfg.workers == 1 or len(todo) <= 1:
            super().run_units(todo, done)
            return
        assert self.tok is not None
        _run_in_pool(todo, self.tok, self.cfg.workers, done)

    def finish_rank(self, manifest: dict[str, Any], run: RunInfo) -> None:
        """Each recorded shard (the j-th contiguous run of parts, merged by rank j % W) is written
        unless a run before a crash wrote it: the shards, concatenated, hold the same documents in
        the same order for any number of ranks, and the same shards whatever the resume's W."""
        for job in rank_jobs(self.plan, runtime.rank(), runtime.world_size()):
            if read_shard_record(self.paths.shard(job.index)) is None:
                self._write_shard(manifest, job)

    def _write_shard(self, manifest: dict[str, Any], job: ShardJob) -> None:
        assert self.tok is not None
        lo, hi = job.lo, job.hi
        parts = [(self.paths.chunk_part(u), read_part_meta(self.paths.chunk_part(u))) for u in range(hi)]
        missing = next((p for p, meta in parts if meta is None), None)
        if missing is not None:
            raise UserError(f"{self.name}: part {missing} is missing after processing: re-run to redo it")
        seen = None
        if not self.cfg.keep_duplicates:
            seen = DigestSet(frozen_digests(self.db, manifest))
            for p, meta in parts[:lo]:  # what the ranks before this one keep
                for split in SPLITS:
                    seen.keep(part_doc_info(p, split, meta)["digest"])
        write_shard(self.db, job.index, parts[lo:hi], token_dtype=self.tok.token_dtype,
                    chunk_size=self.cfg.chunk_size, chunks_per_seq=self.cfg.seq_len // self.cfg.chunk_size,
                    sequences=not self.cfg.retrieval_only, seen=seen, by=self.name,
                    walk_skipped=self.plan["walk_skipped"] if job.first else (),
                    crash=lambda: crash_point(self.name, "merge"))

    def finalize(self, manifest: dict[str, Any], run: RunInfo) -> dict[str, Any]:
        """Rank 0: list the new shards in the manifest (their records), the new totals. Every
        shard of the recorded partition must be whole: a missing one is refused, never dropped."""
        new = []
        for job in shard_jobs(self.plan):
            rec = read_shard_record(self.paths.shard(job.index))
            if rec is None:
                raise UserError(f"{self.name}: shard {self.paths.shard(job.index).root} (parts {job.lo} to "
                                f"{job.hi - 1}) is missing after every rank finished: re-run the same "
                                f"command (it resumes)")
            new.append(rec)
        old = manifest.get("shards") or (shard_records(manifest) if stage_done(manifest, "chunk") else [])
        manifest["shards"] = [*old, *new]
        manifest["counts"] = total_counts(manifest["shards"])
        shutil.rmtree(self.paths.chunk_work, ignore_errors=True)
        self.new_records = new
        counts = total_counts(new)
        return {
            "bytes": sum(r["bytes"] for r in new),
            "documents": sum(c["docs"] for c in counts.values()),
            "chunks": sum(c["chunks"] for c in counts.values()),
            "tokens": sum(c["tokens"] for c in counts.values()),
            "counts": counts,
            "shards": [r["dir"] for r in new],
            "skipped": dict(sum((Counter(r["skipped"]) for r in new), Counter())),
            "repaired_files": sum(r["repaired"] for r in new),
            "duplicates": sum(r["duplicates"] for r in new),
            "altered_documents": sum(sum(r.get("altered_documents", {}).values()) for r in new),
            "seconds_tokenising_this_run": round(run.seconds, 3),
            "workers": self.cfg.workers,
        }

    def report(self, stats: dict[str, Any], run: RunInfo) -> str:
        return summary_line(stats, self.name)


class InputsChanged(UserError):
    """A finished chunk stage asked to read other inputs (``all`` then adds them instead)."""


def _readable(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.read(1)
        return True
    except OSError:
        return False


def build(db: str | os.PathLike, cfg: ChunkConfig) -> dict[str, Any]:
    """Run (or resume, or skip if done) the chunk stage into ``db``; return its stats."""
    return run_stage(ChunkStage(db, cfg))


# ----------------------------------------------------------------------------- its steps


def _run_in_pool(todo: list[Unit], tok: DBTokenizer, workers: int, done: Callable[[Unit], None]) -> None:
    """Process units in ``workers`` processes, at most 2 x workers in flight, ``done`` in order of
    completion (the parts are independent; the merge reads them in unit order)."""
    # forkserver, not fork: a forked worker would inherit (and count in its RSS) the main
    # process's file list, which grows with the corpus
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["chunk_store.chunk.packing"])
    # a fresh worker every few units: heap fragmentation would otherwise grow a worker's
    # RSS with the number of units it has processed, i.e. with the corpus
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker,
                             initargs=(tok.model_proto if isinstance(tok, Tokenizer) else tok,),
                             max_tasks_per_child=TASKS_PER_WORKER) as pool:
        queue = iter(todo)
        running: dict[Future, Unit] = {}
        try:
            for unit in itertools.islice(queue, 2 * workers):
                running[pool.submit(process_unit, unit.payload)] = unit
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    fut.result()
                    done(running.pop(fut))
                    nxt = next(queue, None)
                    if nxt is not None:
                        running[pool.submit(process_unit, nxt.payload)] = nxt
        except BaseException:
            for fut in running:
                fut.cancel()
            raise


def summary_line(stats: dict[str, Any], stage: str = "chunk") -> str:
    """The stage's one-line summary from its stats (what this run added)."""
    counts = stats.get("counts", {})
    skipped = stats.get("skipped", {})
    skip = ", ".join(f"{r}={n}" for r, n in sorted(skipped.items())) or "none"
    splits = "; ".join(f"{s}: {c['docs']} docs / {c['chunks']} chunks / {c['seqs']} seqs"
                       for s, c in counts.items())
    dups = f"; {stats['duplicates']} duplicate documents dropped" if stats.get("duplicates") else ""
    return (f"{stage}: {stats.get('documents', 0)} documents, {stats.get('chunks', 0)} chunks, "
            f"{stats.get('tokens', 0)} tokens ({splits}); skipped {sum(skipped.values())} ({skip}); "
            f"repaired {stats.get('repaired_files', 0)} files{dups}{altered_note(stats)}")


def altered_note(stats: dict[str, Any]) -> str:
    """Names a tokenizer that does not give documents back as they were, with the share."""
    n, docs = int(stats.get("altered_documents") or 0), int(stats.get("documents") or 0)
    if not n or not docs:
        return ""
    return (f"; the tokenizer alters {n} of {docs} documents ({100 * n / docs:.1f}%): decode(encode(text)) "
            f"is not the text (lower-casing, accent stripping, unknown tokens or whitespace); bits per "
            f"byte count the source text's bytes")


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
                     help="an existing sentencepiece model (copied into the DB), or hf:NAME_OR_PATH: "
                          "a Hugging Face tokenizer (a folder with tokenizer.json, or a hub name), "
                          "e.g. the decoder's you will RETRO-fit")
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
    parser.add_argument("--text-field", default=DEFAULT_TEXT_FIELD, metavar="NAME",
                        help="the field of a JSONL record / column of a Parquet file holding the "
                             "text (default text)")
    parser.add_argument("--keep-duplicates", action="store_true",
                        help="store documents whose normalised text is already in the database "
                             "(default: stored once, the rest counted)")
    parser.add_argument("--max-invalid-fraction", type=float, default=DEFAULT_MAX_INVALID_FRACTION,
                        metavar="F", help="skip files with more undecodable UTF-8 bytes than this "
                                          "fraction (default 0.01); below it they become U+FFFD")


SHARED_OPTIONS: tuple[str, ...] = ()  # chunk reads none of --device, --shard-size, --threads


def config_from_args(args: argparse.Namespace) -> ChunkConfig:
    vocab = args.vocab_size if args.vocab_size is not None else (None if args.tokenizer else 8192)
    return ChunkConfig(
        inputs=tuple(args.input), globs=tuple(args.glob), excludes=tuple(args.exclude),
        chunk_size=args.chunk_size, seq_len=args.seq_len, val_fraction=args.val_fraction,
        vocab_size=vocab, tokenizer_file=args.tokenizer,
        tokenizer_sample_mb=args.tokenizer_sample_mb, tokenizer_type=args.tokenizer_type,
        max_invalid_fraction=args.max_invalid_fraction, workers=args.workers,
        unit_bytes=int(args.unit_mb * (1 << 20)) if args.unit_mb else None,
        text_field=args.text_field, keep_duplicates=args.keep_duplicates,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The CLI entry: ``retro-build-index chunk``."""
    return build(args.db, config_from_args(args))