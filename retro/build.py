"""One way to build a model from its config, for training and for loading a run alike.

A config with ``hf_decoder`` is a RETRO-fit (``retro.hf_decoder.RetroFit``), any other a native
``RETRO``. Training and loading once chose between the two each on its own; one function keeps
them from drifting apart (a new model kind is added here once).
"""

from __future__ import annotations

import os

import torch

from chunk_store.framework.errors import UserError
from retro.config import RetroConfig
from retro.model import RETRO


def model_from_config(cfg: RetroConfig, *, run_dir: str | os.PathLike | None = None,
                      dtype: torch.dtype | None = None, activation_checkpointing: bool = False) -> torch.nn.Module:
    """A fresh model of ``cfg`` (weights: initialised, or a RETRO-fit's pretrained decoder).

    A RETRO-fit's decoder comes from ``cfg.hf_decoder`` (a new run; ``dtype`` is the decoder's),
    or with ``run_dir`` from the run's saved decoder config, randomly initialised: the run's
    checkpoint holds its weights, and neither the hub nor the base model's folder is needed.
    ``activation_checkpointing`` (training): each decoder block's and the encoder's activations
    are recomputed in backward instead of kept (a native RETRO only, so far).
    """
    if not cfg.hf_decoder:
        model = RETRO(cfg)
        model.activation_checkpointing = activation_checkpointing
        return model
    if activation_checkpointing:
        raise UserError("activation_checkpointing=true is not supported with model.hf_decoder (a RETRO-fit) yet")
    from retro.hf_decoder import load_pretrained, load_run_decoder

    if run_dir is not None:
        return load_run_decoder(cfg, run_dir)
    return load_pretrained(cfg, dtype=dtype)
