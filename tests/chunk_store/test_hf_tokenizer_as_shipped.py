"""Hugging Face tokenizers as they ship: a tokenizer.json made for a model's inputs (truncation,
fixed padding, lower-casing, a BOS template) must not cut, pad or silently alter the corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from chunk_store import ChunkStore
from chunk_store.chunk.stage import summary_line
from chunk_store.tokenization.hugging_face import load_hf_tokenizer
from tests.fixtures import build_tiny_db
from tests.fixtures.hf_tokenizers import LOWER, MIXED, make_shipped_tokenizer, shipped_corpus

def _docs(store: ChunkStore) -> list[np.ndarray]:
    """Each document's tokens, EOS and pad dropped."""
    tok = store.tokenizer
    out = []
    for d in range(store.num_docs):
        a, b = store.doc_chunk_range(d)
        flat = np.asarray(store.chunks[a:b]).reshape(-1)
        out.append(flat[: int(np.flatnonzero(flat == tok.eos_id)[0])])
    return out


def test_file_truncation_and_padding_are_turned_off(tmp_path: Path) -> None:
    """A tokenizer.json with truncation at 8 tokens and fixed padding to 32 (as MiniLM's at 128):
    every document keeps all its tokens, and no pad token is written as text."""
    texts = LOWER + MIXED
    folder = make_shipped_tokenizer(tmp_path / "tok", texts, truncation=8, padding=32)
    tok = load_hf_tokenizer(f"hf:{folder}")
    from tokenizers import Tokenizer

    plain = Tokenizer.from_file(str(folder / "tokenizer.json"))
    plain.no_truncation()
    plain.no_padding()
    for t in texts:
        assert tok.encode(t) == plain.encode(t, add_special_tokens=False).ids
        assert len(tok.encode(t)) > 32
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode("a") == plain.encode("a", add_special_tokens=False).ids  # not padded to 32
    db = build_tiny_db(tmp_path / "db", shipped_corpus(tmp_path, texts), tokenizer_file=f"hf:{folder}",
                       val_fraction=0.0)
    store = ChunkStore.open(db, "train")
    expected = sorted(len(plain.encode(t, add_special_tokens=False).ids) for t in texts)
    assert sorted(len(d) for d in _docs(store)) == expected
    assert not any((d == tok.pad_id).any() for d in _docs(store))


def test_lossy_tokenizer_is_named_in_the_summary(tmp_path: Path) -> None:
    """A lower-casing tokenizer alters the two documents with capitals and leaves the two
    lower-case ones: the summary names it with that share, the shard record counts it, and the
    altered documents' source and decoded bytes are kept (bits per byte count the source's)."""
    texts = LOWER + MIXED
    folder = make_shipped_tokenizer(tmp_path / "tok", texts, lowercase=True)
    db = tmp_path / "db"
    from chunk_store.chunk.stage import ChunkConfig, build

    stats = build(db, ChunkConfig(inputs=(str(shipped_corpus(tmp_path, texts)),), chunk_size=16, seq_len=64,
                                  val_fraction=0.0, tokenizer_file=f"hf:{folder}"))
    line = summary_line(stats)
    assert "the tokenizer alters 2 of 4 documents (50.0%)" in line, line
    assert stats["altered_documents"] == 2
    store = ChunkStore.open(db, "train")
    altered = store.altered_documents()
    assert len(altered) == 2
    sources = {store.doc_source(d)["source"]: d for d in range(store.num_docs)}
    for path, d in sources.items():
        text = Path(path).read_text(encoding="utf-8")
        if text in MIXED:
            rec = altered[d]
            assert rec["bytes"] == len(text.encode("utf-8")) and rec["decoded_bytes"] > 0
        else:
            assert d not in altered


def test_lossless_tokenizer_reports_nothing(tmp_path: Path) -> None:
    texts = LOWER + MIXED
    folder = make_shipped_tokenizer(tmp_path / "tok", texts)
    db = build_tiny_db(tmp_path / "db", shipped_corpus(tmp_path, texts), tokenizer_file=f"hf:{folder}",
                       val_fraction=0.0)
    manifest = json.loads((db / "manifest.json").read_text())
    assert "alters" not in summary_line(manifest["stages"]["chunk"]["stats"])
    assert ChunkStore.open(db, "train").altered_documents() == {}


def test_native_tokenizer_alters_only_text_with_its_space_marker(tmp_path: Path) -> None:
    """The trained sentencepiece model gives every text back except one holding U+2581 (its space
    marker, decoded as a space): only that document is named, the others are not even decoded."""
    from chunk_store.chunk.stage import ChunkConfig, build

    texts = LOWER + MIXED + ["a\u2581marked word " * 20]
    stats = build(tmp_path / "db", ChunkConfig(inputs=(str(shipped_corpus(tmp_path, texts)),), chunk_size=16,
                                               seq_len=64, val_fraction=0.0, vocab_size=300))
    assert stats["altered_documents"] == 1 and "alters 1 of 5 documents (20.0%)" in summary_line(stats)
    store = ChunkStore.open(tmp_path / "db", "train")
    assert store.tokenizer.round_trip_unless == "\u2581"
    [(d, rec)] = store.altered_documents().items()
    assert rec["bytes"] == len(texts[-1].encode()) and "\u2581" in Path(store.doc_source(d)["source"]).read_text()
