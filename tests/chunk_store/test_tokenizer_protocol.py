"""Both tokenizers of a database satisfy the one protocol (chunk_store.tokenization.protocol):
every member present, every method's parameters accepted as the protocol declares them (extra
parameters only with defaults), and the shared contract holds on real instances."""

from __future__ import annotations

import inspect
import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from chunk_store.tokenization.hugging_face import HFTokenizer, load_hf_tokenizer
from chunk_store.tokenization.protocol import DBTokenizer
from chunk_store.tokenization.sentencepiece import Tokenizer, TokenizerTrainConfig, train_tokenizer
from tests.fixtures import make_hf_tokenizer, random_text

TEXTS = [random_text(random.Random(i), 30) for i in range(40)]


@pytest.fixture(scope="module", params=["sentencepiece", "hf-gpt2", "hf-llama"])
def tokenizer(request, tmp_path_factory) -> DBTokenizer:
    if request.param == "sentencepiece":
        return Tokenizer(train_tokenizer(TEXTS, TokenizerTrainConfig(vocab_size=400)))
    folder = make_hf_tokenizer(tmp_path_factory.mktemp("hf"), TEXTS, family=request.param.split("-")[1])
    return load_hf_tokenizer(str(folder))


def protocol_methods() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in vars(DBTokenizer).items()
            if inspect.isfunction(member) and not name.startswith("_")}


@pytest.mark.parametrize("cls", [Tokenizer, HFTokenizer])
def test_each_class_implements_every_method_with_compatible_signatures(cls: type) -> None:
    methods = protocol_methods()
    assert {"encode", "encode_array", "decode", "blank_ids", "id_to_piece"} <= set(methods)
    for name, want in methods.items():
        have = inspect.signature(getattr(cls, name))
        want_params = list(want.parameters.values())
        have_params = list(have.parameters.values())
        assert [p.name for p in have_params[:len(want_params)]] == [p.name for p in want_params], (cls, name)
        assert all(p.default is not inspect.Parameter.empty for p in have_params[len(want_params):]), (cls, name)
    assert isinstance(getattr(cls, "token_dtype"), property)


def test_instances_satisfy_the_protocol_and_its_contract(tokenizer: DBTokenizer) -> None:
    assert isinstance(tokenizer, DBTokenizer)
    for attr in ("vocab_size", "pad_id", "eos_id", "bos_id", "source"):
        assert hasattr(tokenizer, attr), attr
    text = TEXTS[3]
    ids = tokenizer.encode(text)
    assert tokenizer.pad_id not in ids and ids
    arr = tokenizer.encode_array(text)
    assert arr.dtype == tokenizer.token_dtype and arr.tolist() == ids
    assert int(np.max(arr)) < tokenizer.vocab_size
    assert tokenizer.decode(ids + [tokenizer.pad_id]) == tokenizer.decode(ids)
    blank = tokenizer.blank_ids()
    assert blank.shape == (tokenizer.vocab_size,) and blank[tokenizer.pad_id]
    assert isinstance(tokenizer.id_to_piece(ids[0]), str)
    again = pickle.loads(pickle.dumps(tokenizer))
    assert again.encode(text) == ids


def test_something_else_is_not_a_tokenizer() -> None:
    class Half:
        vocab_size = pad_id = eos_id = bos_id = 0
        source = "x"

        def encode(self, text: str) -> list[int]:
            return []

    assert not isinstance(Half(), DBTokenizer)
    assert not isinstance(Path("."), DBTokenizer)
