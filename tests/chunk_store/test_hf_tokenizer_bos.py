"""Hugging Face tokenizers with a BOS token (Llama, Mistral): the database holds each document the
way the base model's own tokenizer feeds it (BOS first where its post-processor adds one), and a
generation prompt starts the same way."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from chunk_store import ChunkStore
from chunk_store.tokenization.hugging_face import load_hf_tokenizer
from chunk_store.tokenization.protocol import document_ids
from tests.fixtures import build_tiny_db
from tests.fixtures.hf_tokenizers import LOWER, MIXED, make_shipped_tokenizer, shipped_corpus


def _doc_tokens(store: ChunkStore, d: int) -> list[int]:
    """Document d's tokens up to its EOS (included)."""
    a, b = store.doc_chunk_range(d)
    flat = np.asarray(store.chunks[a:b]).reshape(-1)
    return flat[: int(np.flatnonzero(flat == store.tokenizer.eos_id)[0]) + 1].tolist()


@pytest.mark.parametrize("cls", ["LlamaTokenizerFast", "PreTrainedTokenizerFast"])
@pytest.mark.parametrize("bos", [True, False])
def test_documents_start_as_the_base_tokenizer_starts_them(tmp_path: Path, cls: str, bos: bool) -> None:
    """A tiny Llama-style tokenizer (BPE + a TemplateProcessing post-processor adding <s>): each
    document in the DB is exactly what transformers' AutoTokenizer gives for its text, then EOS;
    without the template, no BOS (the config's bos_token alone adds nothing)."""
    from transformers import AutoTokenizer

    texts = LOWER + MIXED
    folder = make_shipped_tokenizer(tmp_path / "tok", texts, bos=bos, tokenizer_class=cls)
    auto = AutoTokenizer.from_pretrained(str(folder))
    tok = load_hf_tokenizer(f"hf:{folder}")
    assert tok.add_bos is bos and tok.bos_id == auto.bos_token_id
    assert pickle.loads(pickle.dumps(tok)).add_bos is bos
    corpus = shipped_corpus(tmp_path, texts)
    records = ["a record of a jsonl file", "Another One, encoded in a batch"]
    (corpus / "records.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records))
    db = build_tiny_db(tmp_path / "db", corpus, tokenizer_file=f"hf:{folder}", val_fraction=0.0)
    store = ChunkStore.open(db, "train")
    assert store.tokenizer.add_bos is bos and store.num_docs == len(texts) + len(records)
    assert json.loads((db / "manifest.json").read_text())["tokenizer"]["add_bos"] is bos
    for d in range(store.num_docs):
        src = store.doc_source(d)
        text = (records[src["line"] - 1] if "line" in src else Path(src["source"]).read_text(encoding="utf-8"))
        assert _doc_tokens(store, d) == auto(text).input_ids + [tok.eos_id]
        assert store.doc_text(d) == text  # BOS decodes to nothing
    prompt = "the retrieval database"
    assert document_ids(tok, prompt) == auto(prompt).input_ids


def test_a_db_recorded_without_bos_stays_without(tmp_path: Path) -> None:
    """A DB whose manifest predates add_bos was chunked without BOS: its tokenizer says so, so
    `add` and generation keep its documents' form."""
    texts = LOWER + MIXED
    folder = make_shipped_tokenizer(tmp_path / "tok", texts, bos=True)
    db = build_tiny_db(tmp_path / "db", shipped_corpus(tmp_path, texts), tokenizer_file=f"hf:{folder}",
                       val_fraction=0.0)
    manifest = json.loads((db / "manifest.json").read_text())
    del manifest["tokenizer"]["add_bos"]
    (db / "manifest.json").write_text(json.dumps(manifest))
    tok = ChunkStore.open(db, "train").tokenizer
    assert tok.add_bos is False and pickle.loads(pickle.dumps(tok)).add_bos is False
    assert document_ids(tok, "the") == tok.encode("the")
