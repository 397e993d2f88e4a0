"""What every tokenizer of a database offers: the one type the rest of the code names.

Two implementations satisfy it, the sentencepiece :class:`~chunk_store.tokenization.sentencepiece.Tokenizer`
(trained on the corpus) and :class:`~chunk_store.tokenization.hugging_face.HFTokenizer` (any fast
Hugging Face tokenizer). Code that takes a database's tokenizer annotates it as
:class:`DBTokenizer`, never as a union of the two, so a third kind needs no edit there;
tests/chunk_store/test_tokenizer_protocol.py checks both against it, signatures included.
"""

from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class DBTokenizer(Protocol):
    """Token ids <-> text for one database. ``vocab_size`` counts every id the model sees (pad
    included); ``pad_id`` is never produced by ``encode``; ``eos_id`` ends every document;
    ``bos_id`` is -1 where the tokenizer has none; ``add_bos``: every document (and a generation
    prompt) starts with ``bos_id``, as the base model's tokenizer feeds it. Instances pickle
    (worker processes hold one)."""

    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int
    add_bos: bool
    source: str

    @property
    def token_dtype(self) -> np.dtype:
        """The narrowest integer dtype holding every id (uint16 or int32)."""
        ...

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` after the document normalisation; no BOS/EOS added."""
        ...

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as a ``token_dtype`` array, in pieces: memory flat in a document's size."""
        ...

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of ``ids``; pad and ids outside the tokenizer are dropped."""
        ...

    def blank_ids(self) -> np.ndarray:
        """(vocab_size,) bool: ids whose text shows nothing (a chunk of only those is blank)."""
        ...

    def id_to_piece(self, i: int) -> str:
        """The token's own spelling (for people reading ids)."""
        ...


def document_ids(tok: DBTokenizer, text: str) -> list[int]:
    """The ids of ``text`` as the start of a document: BOS first where the tokenizer adds one
    (the chunk stage's documents and generation prompts must begin alike)."""
    return ([tok.bos_id] if tok.add_bos and tok.bos_id >= 0 else []) + tok.encode(text)


__all__ = ["DBTokenizer", "document_ids"]
