"""The tokenizer a database is chunked with: trained on a corpus sample, copied from a
sentencepiece file, or a Hugging Face tokenizer (``hf:NAME_OR_PATH``); recorded in the manifest.

Why its own module: the chunk stage decides once, before any unit runs, and a resumed run must
reuse exactly the tokenizer the interrupted one recorded (checked by content hash).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from chunk_store.framework.errors import UserError
from chunk_store.tokenization.hugging_face import HF_PREFIX, HFTokenizer, load_hf_tokenizer, open_db_tokenizer
from chunk_store.layout import TOKENIZER, DBLayout
from chunk_store.manifest import save_manifest, sha256_file
from chunk_store.framework.atomic import atomic_write_bytes
from chunk_store.chunk.input_formats import iter_sample_text
from chunk_store.chunk.text_files import InputFile
from chunk_store.tokenization.sentencepiece import Tokenizer, TokenizerTrainConfig, train_tokenizer
from chunk_store.tokenization.protocol import DBTokenizer

log = logging.getLogger("chunk_store.chunk.stage")


def prepare_tokenizer(db: Path, cfg: Any, files: Sequence[InputFile],
                       manifest: dict[str, Any]) -> DBTokenizer:
    """Load the DB's tokenizer if this run already made it; else copy or train one.

    ``cfg`` is the chunk stage's ChunkConfig (not imported: chunk_store.chunk.stage imports this).
    """
    dest = db / TOKENIZER
    rec = manifest.get("tokenizer")
    if cfg.tokenizer_file is not None and cfg.tokenizer_file.startswith(HF_PREFIX):
        return _prepare_hf_tokenizer(db, cfg.tokenizer_file, manifest)
    if rec and dest.exists() and sha256_file(dest) == rec.get("sha256"):
        return Tokenizer.from_file(dest)
    if cfg.tokenizer_file is not None:
        proto = Path(cfg.tokenizer_file).read_bytes()
        tok = Tokenizer(proto, cfg.tokenizer_file)
        source = str(Path(cfg.tokenizer_file).resolve())
    else:
        assert cfg.vocab_size is not None
        budget = int(cfg.tokenizer_sample_mb * (1 << 20))
        sample = tqdm(iter_sample_text(files, budget, max_invalid_fraction=cfg.max_invalid_fraction,
                                       text_field=cfg.text_field),
                      desc="tokenizer sample", unit="doc", leave=False)
        t0 = time.time()
        proto = train_tokenizer(sample, TokenizerTrainConfig(vocab_size=cfg.vocab_size,
                                                             model_type=cfg.tokenizer_type))
        log.info("trained tokenizer in %.1fs", time.time() - t0)
        tok = Tokenizer(proto, TOKENIZER)
        source = "trained"
    atomic_write_bytes(dest, proto)
    manifest["tokenizer"] = {
        "kind": "sentencepiece",
        "file": TOKENIZER,
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


def _prepare_hf_tokenizer(db: Path, name: str, manifest: dict[str, Any]) -> HFTokenizer:
    """Copy a Hugging Face tokenizer's files into DB/hf_tokenizer/ and record it (once)."""
    rec = manifest.get("tokenizer")
    if rec and rec.get("kind") == "hf":
        try:
            return open_db_tokenizer(db, rec)  # type: ignore[return-value]
        except UserError:
            pass  # a crash between copy and manifest: copy again
    tok = load_hf_tokenizer(name)
    tok.save(DBLayout(db).hf_tokenizer)
    manifest["tokenizer"] = tok.manifest_record()
    manifest["token_dtype"] = tok.token_dtype.name
    save_manifest(db, manifest)
    return tok
