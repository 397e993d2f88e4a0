"""Any Hugging Face tokenizer behind the token arrays (``--tokenizer hf:NAME_OR_PATH``).

Why: to RETRO-fit a pretrained decoder the database must be tokenised with that decoder's own
tokenizer. ``HFTokenizer`` has the interface every stage uses with the sentencepiece
``Tokenizer`` (encode / decode / vocab_size / pad_id / eos_id / token_dtype, picklable), over
the Rust ``tokenizers`` library (a fast tokenizer's ``tokenizer.json``), so chunking needs no
``transformers`` and encodes in batches.

Ids: the tokenizer's BOS starts every document where its post-processor adds one (Llama,
Mistral: ``add_bos``), as the base model saw text in training; its EOS ends every document; its pad token pads, or, when it has none (GPT-2),
``pad_id`` is appended past its vocabulary (``vocab_size = len(tokenizer) + 1``), as for a
sentencepiece model without a pad piece. Decoding drops pad and special tokens, so bits per byte
count the text's own bytes, exactly as the sentencepiece path does.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from chunk_store.framework.errors import UserError
from chunk_store.layout import HF_TOKENIZER_FILES, HF_TOKENIZER_JSON, DBLayout
from chunk_store.chunk.text_files import normalise_text, visible
from chunk_store.tokenization.sentencepiece import Tokenizer, encode_pieces
from chunk_store.tokenization.protocol import DBTokenizer

HF_PREFIX = "hf:"
# EOS spellings tried, in order, when tokenizer_config.json does not name one
_EOS_GUESSES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A fast Hugging Face tokenizer with the chunk store's tokenizer interface.

    Built from the bytes of its files (``tokenizer.json`` at least), so it pickles small and
    exactly, and its identity is the sha256 of ``tokenizer.json``.
    """

    kind = "hf"

    def __init__(self, files: Mapping[str, bytes], source: str = "<files>", add_bos: bool | None = None) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        if HF_TOKENIZER_JSON not in files:
            raise UserError(f"Hugging Face tokenizer {source} has no {HF_TOKENIZER_JSON} (a fast tokenizer is needed)")
        self.files = {k: bytes(v) for k, v in files.items()}
        self.source = source
        try:
            self._tok = RustTokenizer.from_str(self.files[HF_TOKENIZER_JSON].decode("utf-8"))
        except Exception as e:
            raise UserError(f"cannot load {HF_TOKENIZER_JSON} of {source}: {e}") from None
        # a tokenizer.json made for a model's inputs may truncate (MiniLM's: 128 tokens) and pad
        # (to 128): applied to a corpus, that cuts every document silently and writes pads as text
        self._tok.no_truncation()
        self._tok.no_padding()
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            if name in self.files:
                try:
                    config.update(json.loads(self.files[name]))
                except json.JSONDecodeError as e:
                    raise UserError(f"corrupt {name} of {source}: {e}") from None
        self.base_vocab_size: int = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eos_id: int = self._find_eos(config)
        pad = self._id_of(_token_content(config.get("pad_token")))
        self.pad_id: int = pad if pad is not None else self.base_vocab_size
        self.vocab_size: int = self.base_vocab_size + (0 if pad is not None else 1)
        bos = self._id_of(_token_content(config.get("bos_token")))
        self.bos_id: int = -1 if bos is None else bos
        # BOS at document starts exactly where the base model's tokenizer puts one: its
        # post-processor (Llama's TemplateProcessing "<s> $A"); transformers' fast tokenizers
        # follow it, a bos_token in the config alone adds nothing (GPT-2)
        self.add_bos: bool = self._post_processor_adds_bos() if add_bos is None else bool(add_bos)
        self.sha256: str = hashlib.sha256(self.files[HF_TOKENIZER_JSON]).hexdigest()

    def _post_processor_adds_bos(self) -> bool:
        if self.bos_id < 0:
            return False
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        return len(full) > len(plain) and full[0] == self.bos_id and full[1:1 + len(plain)] == plain

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def _find_eos(self, config: Mapping[str, Any]) -> int:
        named = _token_content(config.get("eos_token"))
        for token in ((named,) if named else ()) + _EOS_GUESSES:
            i = self._id_of(token)
            if i is not None:
                return i
        raise UserError(f"Hugging Face tokenizer {self.source} has no EOS token (set eos_token in its "
                        f"tokenizer_config.json)")

    # -------------------------------------------------------------- the API every stage uses

    @property
    def token_dtype(self) -> np.dtype:
        """uint16 when every id (pad included) fits, else int32."""
        return np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.int32)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` after the document normalisation; no BOS/EOS added."""
        return self._tok.encode(normalise_text(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of many texts at once (the Rust side runs them in parallel)."""
        encs = self._tok.encode_batch([normalise_text(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encs]

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a compact array (``token_dtype``), encoded in pieces as the
        sentencepiece kind (chunk_store.tokenization.sentencepiece.iter_pieces): memory flat in a document's size."""
        parts = list(encode_pieces(self.encode, [text], self.token_dtype))
        return np.concatenate(parts) if parts else np.zeros(0, self.token_dtype)

    def blank_ids(self) -> np.ndarray:
        """(vocab_size,) bool: the token shows nothing (pad, special tokens, whitespace and
        invisible text). A token that decodes to a partial UTF-8 sequence (U+FFFD) counts as
        visible: a chunk is called blank only when that is certain (as Tokenizer.blank_ids)."""
        out = np.zeros(self.vocab_size, dtype=bool)
        out[self.pad_id] = True
        special = {i for i in (self.eos_id, self.bos_id) if i >= 0}
        for i in range(self.base_vocab_size):
            text = self._tok.decode([i], skip_special_tokens=True)
            out[i] = i in special or not visible(text)
        return out

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of ``ids``; pad, special tokens and ids outside the tokenizer are dropped."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        arr = arr[(arr != self.pad_id) & (arr >= 0) & (arr < self.base_vocab_size)]
        return self._tok.decode(arr.tolist(), skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return "<pad>" if i == self.pad_id and i >= self.base_vocab_size else (self._tok.id_to_token(int(i)) or "")

    def manifest_record(self) -> dict[str, Any]:
        """What the DB manifest says about this tokenizer (see docs/DB_FORMAT.md)."""
        return {"kind": "hf", "files": sorted(self.files), "sha256": self.sha256, "source": self.source,
                "vocab_size": self.vocab_size, "base_vocab_size": self.base_vocab_size,
                "pad_id": self.pad_id, "eos_id": self.eos_id, "bos_id": self.bos_id, "add_bos": self.add_bos,
                "normalisation": "utf-8, BOM stripped, CRLF/CR -> LF; then the tokenizer's own"}

    def save(self, folder: str | Path) -> None:
        """Write the tokenizer's files into ``folder`` (each atomically)."""
        from chunk_store.framework.atomic import atomic_write_bytes

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            atomic_write_bytes(folder / name, data)

    def __getstate__(self) -> dict:
        return {"files": self.files, "source": self.source, "add_bos": self.add_bos}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["files"], state["source"], state.get("add_bos"))  # type: ignore[misc]

    def __repr__(self) -> str:
        return (f"HFTokenizer({self.source!r}, vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
                f"eos_id={self.eos_id}, add_bos={self.add_bos})")


def read_tokenizer_files(folder: str | Path) -> dict[str, bytes]:
    """The HF_TOKENIZER_FILES present in ``folder``."""
    folder = Path(folder)
    return {name: (folder / name).read_bytes() for name in HF_TOKENIZER_FILES if (folder / name).is_file()}


def load_hf_tokenizer(name_or_path: str) -> HFTokenizer:
    """A local folder holding ``tokenizer.json``, or a hub name (through ``transformers``, which
    converts a slow tokenizer to a fast one and caches the download)."""
    name = name_or_path[len(HF_PREFIX):] if name_or_path.startswith(HF_PREFIX) else name_or_path
    folder = Path(name).expanduser()
    if (folder / HF_TOKENIZER_JSON).is_file():
        return HFTokenizer(read_tokenizer_files(folder), str(folder.resolve()))
    if folder.exists():
        raise UserError(f"{folder} has no {HF_TOKENIZER_JSON}: not a (fast) Hugging Face tokenizer folder")
    try:
        from transformers import AutoTokenizer

        auto = AutoTokenizer.from_pretrained(name)
        with tempfile.TemporaryDirectory() as tmp:
            auto.save_pretrained(tmp)
            files = read_tokenizer_files(tmp)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load Hugging Face tokenizer {name!r} (no such folder; hub: {msg})") from None
    return HFTokenizer(files, name)


def open_db_tokenizer(db: str | Path, record: Mapping[str, Any] | None) -> DBTokenizer:
    """The tokenizer a DB's manifest names: its HF folder or its sentencepiece model."""
    paths = DBLayout(db)
    record = record or {}
    if record.get("kind") == "hf":
        if not (paths.hf_tokenizer / HF_TOKENIZER_JSON).is_file():
            raise UserError(f"missing tokenizer file {paths.hf_tokenizer / HF_TOKENIZER_JSON}")
        # a DB recorded before add_bos was chunked without BOS: keep its documents' form
        tok = HFTokenizer(read_tokenizer_files(paths.hf_tokenizer), str(paths.hf_tokenizer),
                          add_bos=bool(record.get("add_bos", False)))
        if record.get("sha256") not in (None, tok.sha256):
            raise UserError(f"corrupt {paths.hf_tokenizer / HF_TOKENIZER_JSON}: its sha256 differs from the manifest's")
        return tok
    return Tokenizer.from_file(paths.root / record.get("file", paths.tokenizer.name))
