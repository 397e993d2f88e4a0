"""RetroConfig: the shape of a RETRO model, read from the ``model:`` section of a config YAML.

Training settings live at the top level of the same YAML (``retro.train_config.TrainConfig``
reads them); this class only reads ``data["model"]`` (or the whole mapping when there is no
``model`` key), so one file describes a whole run. Unknown model keys are an error: a typo must
not silently fall back to a default. ``load_yaml`` is the one config-file reader of both; a
config may derive from another (``extends: tiny.yaml``) and name only the keys it changes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from chunk_store.framework.errors import UserError


EXTENDS = "extends"  # a config's parent: a file name relative to the config's own folder


def merge_config(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` on top: mappings merge key by key, anything else (lists too)
    replaces, so a derived config names only what differs from its parent."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's top-level mapping, its ``extends:`` parents merged in (a derived config is
    its parent plus its own keys), or a one-line UserError naming the file."""
    data = _read_mapping(Path(path))
    parent = data.pop(EXTENDS, None)
    if parent is None:
        return data
    path = Path(path)
    if not isinstance(parent, str) or not parent.strip():
        raise UserError(f"{path}: {EXTENDS} must name a config file, got {parent!r}")
    parent_path = path.parent / parent
    chain = (*_chain, path.resolve())
    if parent_path.resolve() in chain:
        names = " -> ".join(str(p.name) for p in (*chain, parent_path))
        raise UserError(f"{path}: {EXTENDS} cycle ({names})")
    if not parent_path.is_file():
        raise UserError(f"{path}: {EXTENDS} {parent}, but there is no config file at {parent_path}")
    return merge_config(load_yaml(parent_path, chain), data)


def _read_mapping(path: Path) -> dict[str, Any]:
    """One file's own top-level mapping (no ``extends:`` resolved)."""
    if not path.is_file():
        raise UserError(f"no config file at {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"invalid YAML in {path}: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    if not isinstance(data, Mapping):
        raise UserError(f"{path} must hold a mapping, got {type(data).__name__}")
    return dict(data)


NEIGHBOUR_ALIGNMENTS = ("chunk", "content")  # retro.neighbour_alignment
CCA_NULL_VALUES = ("learned", "zero")  # RetroConfig.cca_null_value


@dataclass
class RetroConfig:
    """Decoder + neighbour-encoder hyper-parameters (Borgeaud et al. 2022, section 2)."""

    vocab_size: int = 4096
    pad_id: int = 3  # chunk_store's trained tokenizer: <unk>=0, <s>=1, </s>=2, <pad>=3
    # decoder
    dim: int = 512
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    mlp_ratio: float = 4.0
    # 1-based decoder layers followed by chunked cross-attention; None = the paper's rule
    # (every third layer from the 6th: 6, 9, 12, ...)
    cca_layers: list[int] | None = None
    # encoder (bidirectional, over each neighbour's 2 * chunk_size tokens)
    enc_dim: int = 512
    enc_depth: int = 2
    enc_heads: int = 8
    enc_dim_head: int = 64
    enc_mlp_ratio: float = 4.0
    # retrieval
    chunk_size: int = 64
    num_neighbours: int = 2
    # "chunk": each neighbour is its database chunk and the next (the paper); "content": the
    # neighbour's 2m-token window moved within its document to line up with the query chunk's
    # tokens (retro.neighbour_alignment: a small model then learns to copy near-duplicates)
    neighbour_alignment: str = "chunk"
    # with "content": drop a neighbour whose window matches its query chunk by less than this share
    # of the weighted maximum (0: keep every neighbour, the paper); retro.neighbour_alignment says why
    neighbour_min_match: float = 0.0
    # CCA's null slot, which every query may attend to (the only key left when all of a chunk's
    # neighbours are padding: none retrieved, or dropped by neighbour_min_match). "learned": a
    # learned key and value. "zero": a learned key and a zero value, so such a chunk gets exactly
    # nothing from CCA (a RETRO-fit is then exactly its base decoder there) and the null key
    # works as a learned gate on the neighbours' share
    cca_null_value: str = "learned"
    # misc
    dropout: float = 0.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    init_std: float = 0.02
    # RETRO-fitting (retro.hf_decoder): a pretrained Hugging Face causal LM (hub name or folder)
    # whose layers replace the decoder above; dim, depth, heads, vocab_size and pad_id then come
    # from it and the database's tokenizer
    hf_decoder: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived values

    @property
    def resolved_cca_layers(self) -> list[int]:
        """1-based decoder layer indices that have a CCA block (the paper's rule when None)."""
        if self.cca_layers is None:
            return list(range(6, self.depth + 1, 3))
        return sorted(set(int(i) for i in self.cca_layers))

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.dim * self.mlp_ratio))

    @property
    def enc_mlp_hidden(self) -> int:
        return int(round(self.enc_dim * self.enc_mlp_ratio))

    def validate(self) -> None:
        """One-line UserError on an impossible configuration (these come from user YAML)."""
        if self.hf_decoder is not None and (not isinstance(self.hf_decoder, str) or not self.hf_decoder.strip()):
            raise UserError(f"model.hf_decoder must be a Hugging Face model name or folder, or null, "
                            f"got {self.hf_decoder!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise UserError(f"model.tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if self.cca_layers is not None and (not isinstance(self.cca_layers, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.cca_layers)):
            raise UserError(f"model.cca_layers must be a list of layer numbers or null, got {self.cca_layers!r}")
        positive = ("vocab_size", "dim", "depth", "heads", "dim_head", "enc_dim", "enc_depth",
                    "enc_heads", "enc_dim_head", "chunk_size", "num_neighbours")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"model.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.pad_id, int) or isinstance(self.pad_id, bool):
            raise UserError(f"model.pad_id must be an integer, got {self.pad_id!r}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise UserError(f"model.pad_id={self.pad_id} is outside the vocabulary (vocab_size={self.vocab_size})")
        for name in ("mlp_ratio", "enc_mlp_ratio", "norm_eps", "rope_base", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise UserError(f"model.{name} must be a positive finite number, got {value!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.neighbour_alignment not in NEIGHBOUR_ALIGNMENTS:
            raise UserError(f"model.neighbour_alignment must be one of {NEIGHBOUR_ALIGNMENTS}, "
                            f"got {self.neighbour_alignment!r}")
        m = self.neighbour_min_match
        if not isinstance(m, (int, float)) or isinstance(m, bool) or not 0.0 <= m <= 1.0:
            raise UserError(f"model.neighbour_min_match must be in [0, 1], got {m!r}")
        if m > 0 and self.neighbour_alignment != "content":
            raise UserError("model.neighbour_min_match needs model.neighbour_alignment: content "
                            "(the match is measured on the realigned window)")
        if self.cca_null_value not in CCA_NULL_VALUES:
            raise UserError(f"model.cca_null_value must be one of {CCA_NULL_VALUES}, got {self.cca_null_value!r}")
        if self.dim_head % 2 or self.enc_dim_head % 2:
            raise UserError("model.dim_head and model.enc_dim_head must be even (rotary embeddings)")
        if self.cca_layers is not None:
            bad = [i for i in self.cca_layers if not 1 <= int(i) <= self.depth]
            if bad:
                raise UserError(f"model.cca_layers {bad} outside 1..depth={self.depth} (layers are 1-based)")

    # ------------------------------------------------------------------ (de)serialisation

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RetroConfig":
        """Build from a mapping; reads ``data["model"]`` when present. Unknown keys are an error."""
        if "model" in data and isinstance(data["model"], Mapping):
            data = data["model"]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"unknown model config key(s) {unknown}; known: {sorted(names)}")
        kwargs = dict(data)
        name = "cca_layers"
        try:  # a value of the wrong type is one line naming the key, not a ValueError traceback
            if kwargs.get("cca_layers") is not None:
                layers = kwargs["cca_layers"]
                if not isinstance(layers, (list, tuple)) or any(isinstance(i, bool) for i in layers):
                    raise TypeError("not a list of layer numbers")
                kwargs["cca_layers"] = [int(i) for i in layers]
            for name in ("mlp_ratio", "enc_mlp_ratio", "dropout", "norm_eps", "rope_base", "init_std"):
                if name in kwargs:
                    if isinstance(kwargs[name], bool):
                        raise TypeError("a boolean is not a number")
                    kwargs[name] = float(kwargs[name])
        except (TypeError, ValueError) as e:
            raise UserError(f"model.{name}={data[name]!r} has the wrong type ({e})") from None
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RetroConfig":
        return cls.from_dict(load_yaml(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ cost model

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count computed from the shape (equals ``sum(p.numel())`` of RETRO(cfg))."""
        d, inner = self.dim, self.heads * self.dim_head
        e, e_inner = self.enc_dim, self.enc_heads * self.enc_dim_head
        dec_layer = 2 * d + 4 * d * inner + 2 * d * self.mlp_hidden
        cca = d + d * inner + 2 * e * inner + inner * d + 2 * inner
        enc_layer = (e + 4 * e * e_inner                          # norm + self-attention
                     + e + d + e * e_inner + 2 * d * e_inner + e_inner * e  # cross-attn to decoder
                     + e + 2 * e * self.enc_mlp_hidden)                # norm + MLP
        total = self.depth * dec_layer + d                        # + the final norm
        if self.resolved_cca_layers:  # else decoder-only (the baseline): no CCA, no encoder
            total += len(self.resolved_cca_layers) * cca + self.enc_depth * enc_layer + e
            if e != d:
                total += d * e                                    # shared-embedding -> encoder width
        if include_embedding:
            total += self.vocab_size * d
            if not self.tie_embeddings:
                total += self.vocab_size * d
        return total

    def flops_per_token(self, seq_len: int, with_retrieval: bool = True, training: bool = True,
                        frozen_decoder: bool = False) -> float:
        """Matmul FLOPs per decoder token (x3 for a training step: forward + backward).

        A training step's backward is 2x the forward: 1x for activation gradients, 1x for weight
        gradients. With ``frozen_decoder`` (RETRO-fitting) only the encoder and CCA weights take
        gradients, so the weight-gradient half counts their FLOPs alone (activation gradients
        still flow through the whole decoder, counted in full).

        Attention scores count the full (non-causal) seq_len x seq_len product, the PaLM MFU
        convention, so numbers compare with published MFU figures. With retrieval, every chunk of
        ``chunk_size`` tokens adds the encoder over k x 2 x chunk_size neighbour tokens plus the CCA
        key/value projections; that per-chunk cost is divided over the chunk's tokens.
        """
        d, inner, m, k = self.dim, self.heads * self.dim_head, self.chunk_size, self.num_neighbours
        e, e_inner = self.enc_dim, self.enc_heads * self.enc_dim_head
        r = 2 * m  # tokens per neighbour
        per_layer = 2 * (4 * d * inner) + 2 * 2 * seq_len * inner + 2 * (2 * d * self.mlp_hidden)
        fwd = self.depth * per_layer + 2 * d * self.vocab_size
        retrieval = 0.0
        if with_retrieval and self.resolved_cca_layers:
            n_cca = len(self.resolved_cca_layers)
            kv_len = k * r + 1
            # per token: q/out projections and attention over the chunk's k * 2m neighbour tokens
            cca_tok = 2 * (2 * d * inner) + 2 * 2 * kv_len * inner
            # per chunk: key/value projections of the k * 2m encoded neighbour tokens
            cca_chunk = 2 * (2 * e * inner) * k * r
            enc_tok = (2 * (4 * e * e_inner) + 2 * 2 * r * e_inner      # self-attention
                       + 2 * (2 * e * e_inner) + 2 * 2 * m * e_inner       # cross-attn q/out + scores
                       + 2 * (2 * e * self.enc_mlp_hidden))                # MLP
            enc_chunk = self.enc_depth * (k * r * enc_tok + m * 2 * (2 * d * e_inner))  # + kv of H_u
            if e != d:
                enc_chunk += k * r * 2 * d * e
            retrieval = n_cca * (cca_tok + cca_chunk / m) + enc_chunk / m
        fwd += retrieval
        if not training:
            return float(fwd)
        return float(2 * fwd + (retrieval if frozen_decoder else fwd))
