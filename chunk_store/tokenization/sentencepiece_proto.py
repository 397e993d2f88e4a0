"""Read a serialized sentencepiece model without protobuf: its pieces (text, score, type), model
type and normaliser settings.

Why: sentencepiece's Python API does not expose the normaliser spec or piece types, and its
``sentencepiece_model_pb2`` needs protobuf, which this project does not install. The wire format
is small; what is read here is what the tokenizer.json conversion and the chunk stage's
round-trip shortcut need.
"""

from __future__ import annotations

import struct
from typing import Any, Iterator

# sentencepiece_model.proto: ModelProto.pieces = 1, trainer_spec = 2, normalizer_spec = 3;
# SentencePiece.piece = 1, score = 2, type = 3 (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4,
# UNUSED 5, BYTE 6); TrainerSpec.model_type = 3 (UNIGRAM 1, BPE 2); NormalizerSpec.
# precompiled_charsmap = 2, add_dummy_prefix = 3, remove_extra_whitespaces = 4 (both default true)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return out, i


def _fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of a protobuf message: an int for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = struct.unpack("<f", buf[i:i + 4])[0], i + 4
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def read_model(proto: bytes) -> dict[str, Any]:
    """pieces [(piece, score, type)], model_type, precompiled_charsmap, add_dummy_prefix,
    remove_extra_whitespaces of a serialized sentencepiece model."""
    out: dict[str, Any] = {"pieces": [], "model_type": 1, "precompiled_charsmap": b"",
                           "add_dummy_prefix": True, "remove_extra_whitespaces": True}
    for field, value in _fields(proto):
        if field == 1:
            piece = dict(_fields(value))
            out["pieces"].append((piece.get(1, b"").decode("utf-8"), float(piece.get(2, 0.0)), int(piece.get(3, NORMAL))))
        elif field == 2:
            out["model_type"] = int(dict(_fields(value)).get(3, 1))
        elif field == 3:
            spec = dict(_fields(value))
            out["precompiled_charsmap"] = spec.get(2, b"")
            out["add_dummy_prefix"] = bool(spec.get(3, 1))
            out["remove_extra_whitespaces"] = bool(spec.get(4, 1))
    return out


def identity_round_trip(spec: dict[str, Any]) -> bool:
    """The model gives every text back as it was, except text holding U+2581 (its space marker):
    identity normalisation, no dummy prefix, spaces kept, byte fallback (this project's models)."""
    return (not spec["precompiled_charsmap"] and not spec["add_dummy_prefix"]
            and not spec["remove_extra_whitespaces"] and any(t == BYTE for _, _, t in spec["pieces"]))
