"""add: new input files into new shards of an existing database (``retro-build-index add``).

Why a stage of its own: a finished shard is never rewritten, so a database grows by new shards,
chunked with the database's own tokenizer and parameters (chunk size, sequence length, val
fraction, decoding rules). Files already in the database (same path and size) are not read
again; documents whose text is already in the database are dropped as duplicates (unless
``--keep-duplicates``). An add resumes like any stage (its work units, then its shards); a
later add with other inputs is a new add. Afterwards ``embed`` embeds the new chunks, ``index``
adds their vectors to the trained index and ``knn`` finds the new chunks' neighbours
(``knn --refresh``: the old chunks' lists merge the new chunks, or every chunk is searched again;
index_builder.knn.incremental).

``--retrieval-only`` adds a retrieval database larger than the training data (as the paper and
InstructRetro do): the new documents all go to the train split, are embedded, indexed and
retrieved, but their shard starts no training sequence, so every training and validation
sequence stays what it was, byte for byte.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from chunk_store.chunk.stage import ChunkConfig, ChunkStage
from chunk_store.framework.errors import UserError
from chunk_store.tokenization.hugging_face import open_db_tokenizer
from chunk_store.chunk.input_formats import DEFAULT_TEXT_FIELD
from chunk_store.manifest import check_params, load_manifest, require_stage
from chunk_store.shards import db_inputs
from chunk_store.framework.stage import run_stage
from chunk_store.chunk.text_files import WalkResult
from chunk_store.tokenization.protocol import DBTokenizer

log = logging.getLogger("chunk_store.add")


class AddStage(ChunkStage):
    """The chunk stage over the files not yet in the database, writing new shards."""

    name = "add"

    def open_manifest(self) -> dict[str, Any]:
        if not self.paths.manifest.exists():
            raise UserError(f"add: {self.db} is not a retro database (no {self.paths.manifest.name}): "
                            f"build it with `retro-build-index chunk --out {self.db} ...`")
        manifest = load_manifest(self.db)
        require_stage(manifest, "chunk", "add")
        self.cfg.validate()
        return manifest

    def params(self, manifest: dict[str, Any]) -> dict[str, Any]:
        params = {"inputs": [str(Path(i).expanduser().resolve()) for i in self.cfg.inputs],
                  "globs": list(self.cfg.globs), "excludes": list(self.cfg.excludes),
                  "text_field": self.cfg.text_field, "keep_duplicates": self.cfg.keep_duplicates}
        if self.cfg.retrieval_only:  # absent otherwise: records of plain adds stay as they were
            params["retrieval_only"] = True
        return params

    def check(self, recorded: dict[str, Any], params: dict[str, Any], manifest: dict[str, Any]) -> None:
        """A finished add with other inputs is history: this is a new add. An unfinished one
        must be finished first (its parts are on disk)."""
        if recorded.get("finished"):
            if recorded.get("params") != params:
                recorded.clear()
            return
        check_params(recorded.get("params"), params, "add (an interrupted add is pending: re-run it first)")

    def walk(self) -> WalkResult:
        """The files under the inputs that the database does not hold yet (path and size)."""
        if self._walk is None:
            found = super().walk()
            known = {(r["path"], r["bytes"]) for r in db_inputs(self.db, load_manifest(self.db))}
            paths = {p for p, _ in known}
            new = [f for f in found.files if (f.path, f.size) not in known]
            for f in new:
                if f.path in paths:
                    log.warning("add: %s changed since it was added: its new text is added too", f.path)
            self._walk = WalkResult(new, found.skipped)
            self.already = len(found.files) - len(new)
        return self._walk

    def complete(self, manifest: dict[str, Any]) -> bool:
        return not self.walk().files

    def preflight(self, manifest: dict[str, Any]) -> None:
        if self.walk().files:
            super().preflight(manifest)

    def prepare_tokenizer(self, manifest: dict[str, Any]) -> DBTokenizer:
        return open_db_tokenizer(self.db, manifest["tokenizer"])

    def skip_message(self, stats: dict[str, Any]) -> str:
        return f"add: nothing new under {', '.join(self.cfg.inputs)} ({self.already} files already in {self.db})"


def add_config(db: str | os.PathLike, args: argparse.Namespace) -> ChunkConfig:
    """The DB's chunk parameters with this add's inputs, globs, text field and workers."""
    manifest = load_manifest(db)
    require_stage(manifest, "chunk", "add")
    chunk = manifest["stages"]["chunk"]["params"]
    retrieval_only = bool(getattr(args, "retrieval_only", False))  # `all` has no such option
    if retrieval_only and args.keep_duplicates:  # a kept copy of a val document would retrieve it
        raise UserError("add: --retrieval-only drops documents already in the database; "
                        "--keep-duplicates would let a validation document retrieve its own copy")
    return ChunkConfig(
        inputs=tuple(args.input), globs=tuple(args.glob), excludes=tuple(args.exclude),
        chunk_size=int(manifest["chunk_size"]), seq_len=int(manifest["seq_len"]),
        # retrieval-only documents all go to train: none becomes validation data
        val_fraction=0.0 if retrieval_only else float(chunk.get("val_fraction", 0.0)), vocab_size=None,
        tokenizer_file=str(Path(db) / manifest["tokenizer"].get("file", "")),
        max_invalid_fraction=float(chunk.get("max_invalid_fraction", ChunkConfig.max_invalid_fraction)),
        workers=args.workers, unit_bytes=int(args.unit_mb * (1 << 20)) if args.unit_mb else None,
        text_field=args.text_field or chunk.get("text_field", DEFAULT_TEXT_FIELD),
        keep_duplicates=args.keep_duplicates, retrieval_only=retrieval_only)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", default=[], metavar="DIR", required=True,
                        help="folder (or file) of new inputs, walked like chunk's (repeatable)")
    parser.add_argument("--glob", action="append", default=[], metavar="GLOB")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    parser.add_argument("--text-field", default=None, metavar="NAME",
                        help="JSONL field / Parquet column of the text (default: the database's)")
    parser.add_argument("--keep-duplicates", action="store_true",
                        help="store documents whose normalised text is already in the database")
    parser.add_argument("--retrieval-only", action="store_true",
                        help="retrieval data only: the new documents are embedded, indexed and retrieved, "
                             "but form no training or validation sequence (training and val data stay "
                             "as they were); `knn --refresh` lets the old chunks retrieve them (old rows merge the new chunks)")
    parser.add_argument("--workers", type=int, default=max(1, min(os.cpu_count() or 1, 8)), metavar="N")
    parser.add_argument("--unit-mb", type=float, default=None, metavar="MB")


SHARED_OPTIONS: tuple[str, ...] = ()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The CLI entry: ``retro-build-index add`` (and ``all`` on a built database with new inputs)."""
    return run_stage(AddStage(args.db, add_config(args.db, args)))
