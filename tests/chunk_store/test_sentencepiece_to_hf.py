"""The sentencepiece model as a tokenizer.json: the same ids on ordinary text, every text back."""

from __future__ import annotations

import random

from tokenizers import Tokenizer as RustTokenizer

from chunk_store.tokenization.sentencepiece import Tokenizer, TokenizerTrainConfig, train_tokenizer
from chunk_store.tokenization.sentencepiece_to_hf import hf_tokenizer_files, read_model
from tests.fixtures import random_text
from tests.fixtures.hf_tokenizers import LOWER, MIXED


def test_converted_tokenizer_matches_sentencepiece() -> None:
    texts = [random_text(random.Random(i), 30) for i in range(40)] + LOWER + MIXED
    tok = Tokenizer(train_tokenizer(texts, TokenizerTrainConfig(vocab_size=400)))
    spec = read_model(tok.model_proto)
    assert len(spec["pieces"]) == tok.sp_vocab_size and not spec["add_dummy_prefix"]
    assert [p for p, _, _ in spec["pieces"][:3]] == [tok.id_to_piece(i) for i in range(3)]
    rust = RustTokenizer.from_str(hf_tokenizer_files(tok)["tokenizer.json"].decode())
    for text in [*LOWER, *MIXED, "  two  spaces \n\n\ttab", ""]:
        assert rust.encode(text).ids == tok.encode(text)  # no BOS or EOS added either
    for text in [random_text(random.Random(100 + i)) for i in range(20)]:
        ids = rust.encode(text).ids
        assert rust.decode(ids) == text and len(ids) == len(tok.encode(text))
