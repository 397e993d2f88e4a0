"""A sentencepiece model as the files ``transformers.AutoTokenizer.from_pretrained(DIR)`` loads.

Why: an export of a native run carried only ``tokenizer.model``, which transformers cannot place
(it fell back to tiktoken and failed). transformers' own converter (convert_slow_tokenizer's
SpmConverter) needs protobuf and writes Llama's normalisation (strip the right end, collapse
spaces), which is not this model's: ours keeps every space, has no dummy prefix, encodes newline
and tab as pieces and falls back to bytes. So the ``tokenizer.json`` is built here with the
``tokenizers`` library from the model's own pieces, scores and normaliser settings, read from its
serialized proto (sentencepiece_proto): the same ids as sentencepiece, the same text back.
"""

from __future__ import annotations

import json
from typing import Any

from chunk_store.framework.errors import UserError
from chunk_store.layout import HF_TOKENIZER_FILES, HF_TOKENIZER_JSON
from chunk_store.tokenization.sentencepiece import Tokenizer
from chunk_store.tokenization.sentencepiece_proto import BYTE, CONTROL, UNUSED, USER_DEFINED, read_model

NEVER = -1e9  # the score of pieces sentencepiece never matches in text (control, byte, unused)


def hf_tokenizer_json(tok: Tokenizer) -> str:
    """``tokenizer.json`` of ``tok``'s sentencepiece model (a unigram one; the pad id appended
    past the model, where it has no pad piece, as a special token)."""
    from tokenizers import AddedToken, Regex, decoders, normalizers
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import Unigram

    spec = read_model(tok.model_proto)
    if spec["model_type"] != 1:
        raise UserError("only a unigram sentencepiece model converts to tokenizer.json here "
                        "(the default; --tokenizer-type bpe does not)")
    vocab = [(p, NEVER if t in (CONTROL, BYTE, UNUSED) else s) for p, s, t in spec["pieces"]]
    rust = RustTokenizer(Unigram(vocab, unk_id=tok.unk_id, byte_fallback=tok.byte_fallback))
    steps: list[Any] = []
    if spec["precompiled_charsmap"]:
        steps.append(normalizers.Precompiled(spec["precompiled_charsmap"]))
    if spec["remove_extra_whitespaces"]:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec["add_dummy_prefix"]:
        steps.append(normalizers.Prepend(" "))
    steps.append(normalizers.Replace(" ", "\u2581"))
    rust.normalizer = normalizers.Sequence(steps)
    dec: list[Any] = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec["add_dummy_prefix"]:
        dec.append(decoders.Strip(" ", 1, 0))
    rust.decoder = decoders.Sequence(dec)
    # user-defined pieces (newline, tab) are matched before the model, as sentencepiece does;
    # control pieces stay in the model only, never matched (NEVER): a literal "</s>" in a text is
    # text, as for sentencepiece, not an added token that transformers would split out
    rust.add_tokens([AddedToken(p, normalized=False, special=False)
                     for p, _, t in spec["pieces"] if t == USER_DEFINED])
    if tok.pad_id >= tok.sp_vocab_size:
        rust.add_special_tokens([AddedToken("<pad>", normalized=False, special=True)])
    return rust.to_str()


def hf_tokenizer_files(tok: Tokenizer, model_max_length: int | None = None) -> dict[str, bytes]:
    """``tokenizer.json`` and ``tokenizer_config.json`` for ``AutoTokenizer.from_pretrained``:
    no BOS added (the model was trained on documents as they are, EOS ending each), no clean-up
    of spaces on decode."""
    pieces = read_model(tok.model_proto)["pieces"]

    def piece(i: int) -> str | None:
        return pieces[i][0] if 0 <= i < len(pieces) else None

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": piece(tok.eos_id), "bos_token": piece(tok.bos_id), "unk_token": piece(tok.unk_id),
        "pad_token": piece(tok.pad_id) or "<pad>",
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
    }
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    config = {k: v for k, v in config.items() if v is not None}
    return {HF_TOKENIZER_JSON: hf_tokenizer_json(tok).encode("utf-8"),
            HF_TOKENIZER_FILES[1]: (json.dumps(config, indent=2) + "\n").encode("utf-8")}
