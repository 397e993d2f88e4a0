"""RETRO-fitting a pretrained Hugging Face causal LM (paper section 4.4): the decoder's config
and tokenizer checked against the database, the pretrained weights loaded, the run's decoder
files saved and reloaded. The model itself (``RetroFit``: the decoder with RETRO's CCA after the
chosen layers and a new neighbour encoder) lives in retro.hf_retrofit, which an export ships;
its names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from chunk_store.framework.errors import UserError
from retro.config import RetroConfig
from retro.hf_retrofit import (RetroFit, RetroFitCache, _Call, decoder_layers,  # noqa: F401 (re-exported)
                               from_decoder_config)
from retro.run_layout import RunLayout


# --------------------------------------------------------------------------- config


def _auto_config(name_or_path: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.hf_decoder={name_or_path!r}: cannot load its config ({msg})") from None


def retrofit_config(cfg: RetroConfig, tokenizer: Any, hf_config: Any | None = None) -> RetroConfig:
    """``cfg`` with the decoder's shape (dim, depth, heads: CCA uses the decoder's head layout)
    and the database tokenizer's vocabulary and pad id filled in; the rest (cca_layers, encoder,
    chunk size, k) stays the user's. Refuses a DB tokenised with another tokenizer."""
    assert cfg.hf_decoder
    hf = hf_config if hf_config is not None else _auto_config(cfg.hf_decoder)
    check_tokenizer(cfg.hf_decoder, tokenizer, hf)
    dim, heads = int(hf.hidden_size), int(hf.num_attention_heads)
    if dim % heads or (dim // heads) % 2:
        raise UserError(f"{cfg.hf_decoder}: hidden_size {dim} / {heads} heads is not an even head dim")
    out = dataclasses.replace(cfg, dim=dim, depth=int(hf.num_hidden_layers), heads=heads, dim_head=dim // heads,
                              vocab_size=int(tokenizer.vocab_size), pad_id=int(tokenizer.pad_id),
                              tie_embeddings=False)
    if not out.resolved_cca_layers:
        raise UserError(f"{cfg.hf_decoder} has {out.depth} layers: the paper's rule (6, 9, ...) places no CCA; "
                        f"set model.cca_layers")
    return out


def check_tokenizer(hf_decoder: str, tokenizer: Any, hf_config: Any) -> None:
    """The one database-vs-decoder check: the same tokenizer file (sha256) and a vocabulary the
    decoder's embedding holds. One line, before any weight is loaded."""
    from chunk_store.tokenization.hugging_face import load_hf_tokenizer

    if getattr(tokenizer, "kind", None) != "hf":
        raise UserError(f"the database was tokenised with a sentencepiece model, not {hf_decoder}'s tokenizer: "
                        f"rebuild it with `retro-build-index chunk --tokenizer hf:{hf_decoder}`")
    own = load_hf_tokenizer(hf_decoder)
    if own.sha256 != tokenizer.sha256:
        raise UserError(f"the database's tokenizer (sha256 {tokenizer.sha256[:12]}) is not {hf_decoder}'s "
                        f"({own.sha256[:12]}): rebuild it with `retro-build-index chunk --tokenizer hf:{hf_decoder}`")
    if own.add_bos and not getattr(tokenizer, "add_bos", False):
        logging.getLogger("retro.hf_decoder").warning(
            "the database's documents start without BOS, but %s's tokenizer starts every text with one "
            "(as the decoder was trained): rebuild the database with this version for the best fit", hf_decoder)
    if tokenizer.base_vocab_size > int(hf_config.vocab_size):
        raise UserError(f"the database's tokenizer has {tokenizer.base_vocab_size} tokens, {hf_decoder}'s "
                        f"embedding only {hf_config.vocab_size}")


# --------------------------------------------------------------------------- building


def load_pretrained(cfg: RetroConfig, dtype: torch.dtype | None = None) -> RetroFit:
    """RetroFit around the pretrained weights of ``cfg.hf_decoder`` (``dtype``: the decoder's,
    e.g. bf16 for a frozen decoder on GPU; the retrieval parameters stay float32)."""
    from transformers import AutoModelForCausalLM

    from index_builder.embed.embedder import quiet_transformers

    assert cfg.hf_decoder
    try:
        with quiet_transformers():
            decoder = AutoModelForCausalLM.from_pretrained(cfg.hf_decoder, dtype=dtype or torch.float32)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.hf_decoder={cfg.hf_decoder!r}: cannot load it ({msg})") from None
    return RetroFit(cfg, decoder)


def save_decoder_files(cfg: RetroConfig, folder: str | os.PathLike) -> None:
    """The decoder's config.json and tokenizer files into ``folder`` (RUN/hf_decoder): what
    loading, evaluating and exporting the run need, without the base model's folder or the hub."""
    from chunk_store.tokenization.hugging_face import load_hf_tokenizer

    assert cfg.hf_decoder
    folder = Path(folder)
    _auto_config(cfg.hf_decoder).save_pretrained(folder)
    load_hf_tokenizer(cfg.hf_decoder).save(folder)


def load_run_decoder(cfg: RetroConfig, run_dir: str | os.PathLike) -> RetroFit:
    """A run's RetroFit, built from RUN/hf_decoder/config.json (weights: the checkpoint's)."""
    folder = RunLayout(run_dir).decoder_dir
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}/config.json is missing: the retrofitted run cannot be rebuilt")
    return from_decoder_config(cfg, _auto_config(str(folder)))
