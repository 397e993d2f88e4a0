"""Hugging Face tokenizers as they ship: a tokenizer.json made for a model's inputs (truncation,
fixed padding, lower-casing, a BOS template) must not cut, pad or silently alter the corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from chunk_store import ChunkStore
from chunk_store.tokenization.hugging_face import load_hf_tokenizer
from tests.fixtures import build_tiny_db, write_corpus
from tests.fixtures.hf_tokenizers import make_shipped_tokenizer

LOWER = ["the retrieval database holds chunks of text and their neighbours. " * 6,
         "every chunk is embedded by a frozen encoder and searched in the index.\n" * 5]
MIXED = ["The Café serves Crème Brûlée to Zoë; RETRO retrieves it 🙂.\n\nSee   you.\n" * 4,
         "Naïve Models TRUNCATE long documents at 128 tokens, Silently!\n" * 5]


def _corpus(root: Path, texts: list[str]) -> Path:
    write_corpus(root / "corpus", texts)
    return root / "corpus"


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
    db = build_tiny_db(tmp_path / "db", _corpus(tmp_path, texts), tokenizer_file=f"hf:{folder}",
                       val_fraction=0.0)
    store = ChunkStore.open(db, "train")
    expected = sorted(len(plain.encode(t, add_special_tokens=False).ids) for t in texts)
    assert sorted(len(d) for d in _docs(store)) == expected
    assert not any((d == tok.pad_id).any() for d in _docs(store))
