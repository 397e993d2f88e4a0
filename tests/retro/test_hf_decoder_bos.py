"""A RETRO-fit of a decoder whose tokenizer adds BOS, on a database chunked without it, says so."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from chunk_store.tokenization.hugging_face import HFTokenizer, load_hf_tokenizer, read_tokenizer_files
from retro.hf_decoder import check_tokenizer
from tests.fixtures.hf_tokenizers import LOWER, MIXED, make_shipped_tokenizer


def test_bos_mismatch_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = make_shipped_tokenizer(tmp_path / "tok", LOWER + MIXED, bos=True)
    config = SimpleNamespace(vocab_size=10_000)
    with caplog.at_level(logging.WARNING, logger="retro.hf_decoder"):
        check_tokenizer(str(folder), load_hf_tokenizer(str(folder)), config)
        assert not caplog.records
        old_db = HFTokenizer(read_tokenizer_files(folder), "db", add_bos=False)
        check_tokenizer(str(folder), old_db, config)
    assert "start without BOS" in caplog.text
