"""The sentencepiece tokenizer behind every token array, and how we train one.

Why these training settings: RETRO's chunks must decode back to the exact text (the retrieval
embedder re-tokenises the decoded text, and users read neighbours), and code corpora depend on
whitespace. So the model uses the identity normalisation, keeps every space
(``remove_extra_whitespaces=False``, no dummy prefix), has "\\n" and "\\t" as user-defined
pieces (sentencepiece otherwise treats a newline as a sentence break), learns runs of spaces
(``allow_whitespace_only_pieces``) and falls back to bytes for anything else, so no character
is ever lost: ``decode(encode(s)) == s`` for every string without U+2581 ("▁", which
sentencepiece uses to escape a space and so decodes as a space).

Ids: ``<unk>``=0, ``<s>``=1, ``</s>``=2 (EOS, appended to every document), ``<pad>``=3.
Pad is a control piece, so no ``encode`` ever produces it. A user-supplied model without a pad
piece gets ``pad_id = sp_vocab_size`` and ``vocab_size = sp_vocab_size + 1``.
"""

from __future__ import annotations

import array
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import sentencepiece as spm

from chunk_store.tokenization.sentencepiece_proto import identity_round_trip, read_model
from chunk_store.framework.errors import UserError
from chunk_store.chunk.text_files import normalise_text, visible

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# sentencepiece drops training "sentences" longer than this (bytes); we cut blocks below it
_BLOCK_CHARS = 2000


ENCODE_PIECE_CHARS = 1 << 20


def _cut(text: str, start: int, limit: int) -> int:
    """Where a long document's piece ends: after the last newline (else space) in its second half."""
    half = start + (limit - start) // 2
    for sep in ("\n", " "):
        at = text.rfind(sep, half, limit)
        if at >= 0:
            return at + 1
    return limit


def iter_pieces(blocks: Iterable[str], piece_chars: int = ENCODE_PIECE_CHARS) -> Iterator[str]:
    """A document's text, given as consecutive blocks, re-cut into the pieces it is encoded in.

    Why: sentencepiece's working memory and a Python list of ids grow many times a document's size, so
    a document longer than ``piece_chars`` is encoded piece by piece, cut just after a newline
    (else a space, else hard) in the second half of each piece. The cuts depend only on the text,
    never on how it was split into blocks: a document streamed from disk and the same document
    held whole give the same pieces, hence the same tokens.
    """
    buf = ""
    for block in blocks:
        buf = buf + block if buf else block
        start = 0
        while len(buf) - start > piece_chars:
            end = _cut(buf, start, start + piece_chars)
            yield buf[start:end]
            start = end
        buf = buf[start:] if start else buf
    if buf:
        yield buf


def encode_pieces(encode: Callable[[str], list[int]], blocks: Iterable[str], dtype: np.dtype,
                  piece_chars: int = ENCODE_PIECE_CHARS) -> Iterator[np.ndarray]:
    """Token ids of a document's text blocks as compact arrays, one per piece (:func:`iter_pieces`)."""
    code = "H" if np.dtype(dtype) == np.uint16 else "i"  # array.array: faster than np.asarray(list)
    for piece in iter_pieces(blocks, piece_chars):
        ids = encode(piece)
        if ids:
            yield np.frombuffer(array.array(code, ids), dtype=dtype)


class Tokenizer:
    """``encode``/``decode``/``vocab_size``/``pad_id``/``eos_id`` over a sentencepiece model.

    ``vocab_size`` is the model-facing vocabulary (pad included): an embedding table needs
    exactly this many rows. Picklable (the model travels as bytes), so DataLoader workers and
    process pools can hold one.
    """

    def __init__(self, model_proto: bytes, source: str = "<bytes>") -> None:
        self._proto = bytes(model_proto)
        self.source = source
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except Exception as e:
            raise UserError(f"cannot load sentencepiece model {source}: {e}") from None
        self.sp_vocab_size: int = int(self._sp.get_piece_size())
        pad = int(self._sp.pad_id())
        self.pad_id: int = pad if pad >= 0 else self.sp_vocab_size
        self.vocab_size: int = self.sp_vocab_size + (0 if pad >= 0 else 1)
        self.eos_id: int = int(self._sp.eos_id())
        self.bos_id: int = int(self._sp.bos_id())
        self.add_bos: bool = False  # documents are trained on as they are, EOS only
        # decode(encode(text)) == text for every text without this marker (None: not known), so
        # the chunk stage's round-trip check decodes only those (chunk.packing.RoundTrip)
        self.round_trip_unless: str | None = "\u2581" if identity_round_trip(read_model(self._proto)) else None
        self.unk_id: int = int(self._sp.unk_id())
        if self.eos_id < 0:
            raise UserError(f"sentencepiece model {source} has no EOS piece (train it with eos_id >= 0)")
        self.byte_fallback: bool = any(self._sp.is_byte(i) for i in range(min(self.sp_vocab_size, 512)))

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"missing tokenizer file {path}")
        return cls(path.read_bytes(), str(path))

    # -------------------------------------------------------------- the API every stage uses

    @property
    def token_dtype(self) -> np.dtype:
        """uint16 when every id (pad included) fits, else int32."""
        return np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.int32)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` after the document normalisation (no EOS appended)."""
        return self._sp.encode(normalise_text(text))

    def encode_array(self, text: str, piece_chars: int = ENCODE_PIECE_CHARS) -> np.ndarray:
        """Token ids of ``text`` as a compact array (``token_dtype``), encoded in pieces
        (:func:`iter_pieces`: memory flat in a document's size). Shorter documents encode
        exactly as :meth:`encode`."""
        parts = list(encode_pieces(self.encode, [text], self.token_dtype, piece_chars))
        return np.concatenate(parts) if parts else np.zeros(0, self.token_dtype)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of ``ids``; pad (and any id outside the sentencepiece model) is ignored."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        arr = arr[(arr != self.pad_id) & (arr >= 0) & (arr < self.sp_vocab_size)]
        return self._sp.decode(arr.tolist())

    def blank_ids(self) -> np.ndarray:
        """(vocab_size,) bool: the token's text has nothing visible (EOS, BOS, pad, whitespace and
        invisible pieces, ASCII whitespace bytes). Unknown and partial-UTF-8 byte pieces count as
        visible: a chunk is called blank only when that is certain."""
        out = np.zeros(self.vocab_size, dtype=bool)
        out[self.pad_id] = True
        for i in range(self.sp_vocab_size):
            if self._sp.is_control(i):
                out[i] = True
            elif self._sp.is_byte(i):
                b = int(self._sp.id_to_piece(i)[3:5], 16)
                out[i] = b < 0x80 and not visible(chr(b))
            elif not self._sp.is_unknown(i):
                out[i] = not visible(self._sp.id_to_piece(i).replace("\u2581", " "))
        return out

    def id_to_piece(self, i: int) -> str:
        return "<pad>" if i == self.pad_id and i >= self.sp_vocab_size else self._sp.id_to_piece(int(i))

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def __getstate__(self) -> dict:
        return {"proto": self._proto, "source": self.source}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"], state["source"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, pad_id={self.pad_id}, eos_id={self.eos_id})"


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TokenizerTrainConfig:
    vocab_size: int = 8192
    model_type: str = "unigram"  # encodes faster than bpe on code, same tokens per byte (docs/BENCHMARKS.md)
    character_coverage: float = 0.9995
    num_threads: int = 2  # fixed, not the worker count, so the model never depends on --workers


def _blocks(texts: Iterable[str]) -> Iterator[str]:
    """Cut documents into training 'sentences' of whole lines, each below sentencepiece's limit.

    Blocks keep their newlines (sentencepiece accepts them through ``sentence_iterator``), so
    the model sees "\\n" and indentation in context.
    """
    for text in texts:
        buf: list[str] = []
        n = 0
        for line in text.splitlines(keepends=True):
            while len(line) > _BLOCK_CHARS:  # one very long line: cut it
                if buf:
                    yield "".join(buf)
                    buf, n = [], 0
                yield line[:_BLOCK_CHARS]
                line = line[_BLOCK_CHARS:]
            if n + len(line) > _BLOCK_CHARS and buf:
                yield "".join(buf)
                buf, n = [], 0
            buf.append(line)
            n += len(line)
        if buf:
            yield "".join(buf)


def _train_once(texts: Iterable[str], cfg: TokenizerTrainConfig, coverage: float) -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_blocks(texts),
        model_writer=out,
        vocab_size=cfg.vocab_size,
        model_type=cfg.model_type,
        byte_fallback=True,
        character_coverage=coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n", "\t"],
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        max_sentence_length=4 * _BLOCK_CHARS + 16,
        num_threads=cfg.num_threads,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return out.getvalue()


def _drop_rare_chars(texts: list[str], max_chars: int) -> list[str]:
    """Keep only the ``max_chars`` most frequent characters in the training sample.

    sentencepiece insists on a piece for (almost) every character it sees, so a sample with
    more distinct characters than a small vocabulary holds (CJK, emoji) fails to train. The
    dropped characters are not lost: at encode time byte fallback spells them exactly.
    """
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(t)
    if len(counts) <= max_chars:
        return texts
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    drop = {ord(c): None for c, _ in ranked[max_chars:] if c not in "\n\t "}
    return [t.translate(drop) for t in texts]


def train_tokenizer(texts: Iterable[str], cfg: TokenizerTrainConfig) -> bytes:
    """Train a sentencepiece model on ``texts`` (a bounded sample); return the serialized model."""
    # room for the 262 meta pieces (4 specials, newline, tab, 256 bytes) and as many merges
    sample = _drop_rare_chars(list(texts), max((cfg.vocab_size - 262) // 2, 16))
    try:
        return _train_once(sample, cfg, cfg.character_coverage)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        raise UserError(f"tokenizer training failed (vocab size {cfg.vocab_size}): {msg}") from None
