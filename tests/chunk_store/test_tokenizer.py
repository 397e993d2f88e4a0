"""The sentencepiece wrapper: exact round-trips, a pad id no encode produces, user models."""

from __future__ import annotations

import io
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from chunk_store.manifest import DBError
from chunk_store import ChunkStore
from tests.fixtures import chunk_argv, outputs, random_text, write_corpus
from chunk_store.chunk.text_files import normalise_text
from chunk_store.tokenization.sentencepiece import Tokenizer, TokenizerTrainConfig, train_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    rng = random.Random(1)
    texts = [random_text(rng) for _ in range(30)]
    return Tokenizer(train_tokenizer(texts, TokenizerTrainConfig(vocab_size=500)), "test")


# Text without U+2581 (sentencepiece's space marker, documented to decode as a space) and
# without lone surrogates (not encodable as UTF-8, so never in a decoded file).
chars = st.one_of(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"),
    st.sampled_from(list(" \t\n\r\x0b\x0c\u00a0\u3000") + ["\r\n", "    ", "\t\t"]),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),
)
texts = st.lists(chars, max_size=80).map("".join)


@settings(max_examples=150, deadline=None)
@given(texts)
def test_round_trip_is_exact_up_to_normalisation(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == normalise_text(text)
    assert tok.pad_id not in ids
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.eos_id not in ids


def test_ids_and_dtype(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.eos_id) == (3, 2)
    assert tok.vocab_size == tok.sp_vocab_size <= 500
    assert tok.token_dtype == np.uint16
    assert tok.byte_fallback
    # pad and EOS decode to nothing: a padded chunk decodes to its text
    ids = tok.encode("def f(x):\n\treturn x")
    assert tok.decode(ids + [tok.eos_id] + [tok.pad_id] * 5) == "def f(x):\n\treturn x"
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "def f(x):\n\treturn x"


def test_whitespace_and_indentation_survive(tok: Tokenizer) -> None:
    src = "class A:\n    def f(self):\n\t\treturn  1\n\n\n        # x  \n"
    assert tok.decode(tok.encode(src)) == src


def test_pickle(tok: Tokenizer) -> None:
    tok2 = pickle.loads(pickle.dumps(tok))
    assert tok2.encode("héllo 世界 😀") == tok.encode("héllo 世界 😀")
    assert tok2.vocab_size == tok.vocab_size


REPO = Path(__file__).resolve().parents[2]

TRAIN_IN_A_PROCESS = """
import random, sys
from chunk_store import ChunkStore
from tests.fixtures import chunk_argv, outputs, random_text, write_corpus
from chunk_store.tokenization.sentencepiece import Tokenizer, TokenizerTrainConfig, train_tokenizer
rng = random.Random(2)
texts = [random_text(rng) for _ in range(10)]
model = train_tokenizer(texts, TokenizerTrainConfig(vocab_size=400))
tok = Tokenizer(model, "t")
sys.stdout.buffer.write(model)
open(sys.argv[1], "w").write(repr([tok.encode(t) for t in texts]))
"""


def _python(args: list[str], hash_seed: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": hash_seed}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, timeout=300)


def test_training_and_encoding_are_deterministic_across_processes(tmp_path: Path) -> None:
    """Two interpreters with different hash seeds train the same model bytes and encode the same ids."""
    runs = []
    for seed in ("0", "4242"):
        ids = tmp_path / f"ids-{seed}"
        p = _python(["-c", TRAIN_IN_A_PROCESS, str(ids)], seed)
        assert p.returncode == 0, p.stderr.decode()[-3000:]
        runs.append((p.stdout, ids.read_text()))
    assert runs[0][0] and runs[0][0] == runs[1][0]  # the serialised model, byte for byte
    assert runs[0][1] == runs[1][1]


CHUNK_IN_A_PROCESS = "import sys; from index_builder.cli import main; sys.exit(main(sys.argv[1:]))"


def test_chunk_stage_is_deterministic_across_processes_and_workers(tmp_path: Path) -> None:
    """The chunk stage run by separate processes with different hash seeds and worker counts
    (1 vs 2, small units so both workers get work) writes the same tokenizer model and arrays."""
    rng = random.Random(7)
    corpus = tmp_path / "corpus"
    write_corpus(corpus, [random_text(rng) for _ in range(24)])
    results = []
    for seed, workers in (("0", "1"), ("31337", "2")):
        db = tmp_path / f"db-{workers}"
        p = _python(["-c", CHUNK_IN_A_PROCESS, *chunk_argv(corpus, db, "--workers", workers,
                                                          "--unit-mb", "0.002")], seed)
        assert p.returncode == 0, p.stderr.decode()[-3000:]
        results.append((db, outputs(db)))
    (db1, out1), (db2, out2) = results
    assert out1.keys() == out2.keys() and all(out1.values())
    for name in out1:
        assert out1[name] == out2[name], name  # tokenizer.model and every .npy / documents.jsonl
    for split in ("train", "val"):  # and the arrays as read back, for a readable failure
        a, b = ChunkStore.open(db1, split), ChunkStore.open(db2, split)
        assert a.num_chunks > 0
        for attr in ("chunks", "doc_ids", "seq_starts"):
            assert np.array_equal(getattr(a, attr), getattr(b, attr)), (split, attr)


def test_user_model_without_pad_gets_an_extra_id() -> None:
    from tests.fixtures import WORDS

    rng = random.Random(3)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(rng.choices(WORDS, k=30)) for _ in range(50)]),
        model_writer=out,
        vocab_size=300, byte_fallback=True, pad_id=-1, minloglevel=2, hard_vocab_limit=False)
    t = Tokenizer(out.getvalue(), "user")
    assert t.pad_id == t.sp_vocab_size and t.vocab_size == t.sp_vocab_size + 1
    ids = t.encode("hello world")
    assert t.decode(ids + [t.pad_id, t.pad_id]) == t.decode(ids)
    assert t.pad_id not in ids


def test_bad_model_is_a_one_line_error(tmp_path) -> None:
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DBError, match="bad.model"):
        Tokenizer.from_file(bad)
    with pytest.raises(DBError, match="missing tokenizer file"):
        Tokenizer.from_file(tmp_path / "absent.model")


def test_token_dtype_widens_past_uint16(tok: Tokenizer) -> None:
    big = pickle.loads(pickle.dumps(tok))
    big.vocab_size = 1 << 16  # ids 0..65535 still fit
    assert big.token_dtype == np.uint16
    big.vocab_size = (1 << 16) + 1
    assert big.token_dtype == np.int32
