"""`--tokenizer hf:NAME_OR_PATH`: any fast Hugging Face tokenizer behind the chunk stage."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from chunk_store import ChunkStore
from chunk_store.framework.errors import UserError
from chunk_store.tokenization.hugging_face import HFTokenizer, load_hf_tokenizer
from chunk_store.layout import DBLayout
from chunk_store.manifest import sha256_file
from tests.fixtures import build_tiny_db, make_hf_tokenizer, random_text, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("hf-corpus")
    texts = [random_text(random.Random(i)) for i in range(24)]
    write_corpus(root / "corpus", texts)
    return root, texts


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_round_trip_and_ids(corpus: tuple[Path, list[str]], family: str) -> None:
    """decode(encode(s)) == s on every mixed document (code, CJK, emoji, odd whitespace), so bits
    per byte count exactly the text's bytes; pad is appended only when the tokenizer has none."""
    root, texts = corpus
    tok = load_hf_tokenizer(f"hf:{make_hf_tokenizer(root / family, texts, family=family)}")
    rng = random.Random(7)
    for s in [random_text(rng) for _ in range(20)] + ["", "a\r\nb"]:
        expected = s.replace("\r\n", "\n")
        assert tok.decode(tok.encode(s)) == expected
        assert tok.decode(tok.encode(s) + [tok.eos_id, tok.pad_id]) == expected  # specials and pad drop
    assert tok.encode_batch(texts[:3]) == [tok.encode(t) for t in texts[:3]]
    if family == "gpt2":
        assert (tok.pad_id, tok.vocab_size) == (tok.base_vocab_size, tok.base_vocab_size + 1)
    else:
        assert tok.pad_id < tok.base_vocab_size == tok.vocab_size and tok.eos_id != tok.pad_id
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(texts[0]) == tok.encode(texts[0]) and clone.sha256 == tok.sha256


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_chunk_stage_with_hf_tokenizer(tmp_path: Path, corpus: tuple[Path, list[str]], family: str) -> None:
    """The files are copied into the DB and hashed; chunks end documents with its EOS, pad with its
    pad id; one worker and two give identical arrays; the store decodes the documents back."""
    root, texts = corpus
    folder = make_hf_tokenizer(root / family, texts, family=family)
    dbs = [build_tiny_db(tmp_path / f"db{w}", root / "corpus", tokenizer_file=f"hf:{folder}", workers=w,
                         chunk_size=16, seq_len=64) for w in (1, 2)]
    paths = DBLayout(dbs[0])
    rec = json.loads(paths.manifest.read_text())["tokenizer"]
    assert rec["kind"] == "hf" and rec["sha256"] == sha256_file(folder / "tokenizer.json")
    assert sha256_file(paths.hf_tokenizer / "tokenizer.json") == rec["sha256"]
    for split in ("train", "val"):
        assert np.array_equal(np.load(paths.shard(0).chunks(split)), np.load(DBLayout(dbs[1]).shard(0).chunks(split)))
    store = ChunkStore.open(dbs[0], "train")
    tok = store.tokenizer
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == rec["vocab_size"]
    flat = store.chunks.reshape(-1)
    assert int(flat.max()) < tok.vocab_size and (flat == tok.eos_id).sum() == store.num_docs
    decoded = {tok.decode(store.chunks[store.doc_ids == d]) for d in range(store.num_docs)}
    assert decoded <= {t.replace("\r\n", "\n") for t in texts}


def test_bad_hf_tokenizer_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_hf_tokenizer(f"hf:{tmp_path / 'empty'}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load tokenizer.json"):
        load_hf_tokenizer(f"hf:{tmp_path / 'bad'}")
