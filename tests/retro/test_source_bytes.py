"""Bits per byte count the source text's bytes, also where the tokenizer alters the text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chunk_store import ChunkStore
from retro.metrics import SourceBytes, target_bytes
from tests.fixtures import build_tiny_db
from tests.fixtures.hf_tokenizers import LOWER, MIXED, make_shipped_tokenizer, shipped_corpus


@pytest.mark.parametrize("kind", ["wordpiece", "lowercase"])
def test_bits_per_byte_count_source_bytes(tmp_path: Path, kind: str) -> None:
    """Target bytes of a row holding whole documents are their source text's UTF-8 bytes, not the
    decoded text's (wordpiece: lower-cased, accents stripped, emoji -> <unk>, whitespace
    collapsed); documents the tokenizer keeps count exactly as before (decoded)."""
    texts = LOWER + MIXED
    folder = (make_shipped_tokenizer(tmp_path / "tok", texts, kind="wordpiece") if kind == "wordpiece"
              else make_shipped_tokenizer(tmp_path / "tok", texts, lowercase=True))
    db = build_tiny_db(tmp_path / "db", shipped_corpus(tmp_path, texts), tokenizer_file=f"hf:{folder}",
                       val_fraction=0.0)
    store = ChunkStore.open(db, "train")
    count = SourceBytes(store)
    decoded_differs = 0
    for d in range(store.num_docs):
        a, b = store.doc_chunk_range(d)
        row = np.asarray(store.chunks[a:b], dtype=np.int64).reshape(1, -1)
        text = Path(store.doc_source(d)["source"]).read_text(encoding="utf-8")
        ids = np.arange(a, b).repeat(store.chunk_size)[None, :]
        assert count(row, ids) == len(text.encode("utf-8"))
        decoded_differs += target_bytes(store.tokenizer, row, store.pad_id) != len(text.encode("utf-8"))
        if text in LOWER and kind == "lowercase":
            assert count(row, ids) == target_bytes(store.tokenizer, row, store.pad_id)
    assert decoded_differs == (4 if kind == "wordpiece" else 0)


def test_per_chunk_bytes_of_the_leakage_analysis_add_up_to_the_rows(tmp_path: Path) -> None:
    """--overlap's per-chunk bytes are scaled the same way: a row's chunks add up to its bytes."""
    from retro.leakage import chunk_bytes
    from retro.metrics import target_chunk_ids

    texts = LOWER + MIXED
    folder = make_shipped_tokenizer(tmp_path / "tok", texts, kind="wordpiece")
    db = build_tiny_db(tmp_path / "db", shipped_corpus(tmp_path, texts), tokenizer_file=f"hf:{folder}",
                       val_fraction=0.0)
    store = ChunkStore.open(db, "train")
    count, m = SourceBytes(store), store.chunk_size
    for d in range(store.num_docs):
        a, b = store.doc_chunk_range(d)
        targets = np.asarray(store.chunks[a:b], dtype=np.int64).reshape(1, -1)[:, 1:]
        ids = np.arange(a, b)[None, :]
        decoded = chunk_bytes(store.tokenizer, targets, m, store.pad_id)
        scaled = count.scale_chunks(decoded, ids, targets, m)
        whole = count(targets, target_chunk_ids(ids, targets.shape[1], m))
        assert abs(float(scaled.sum()) - whole) <= 0.5
        assert float(scaled.sum()) != int(decoded.sum())
