"""The RETRO model (chunked cross-attention, neighbour encoder, rotary embeddings), its
dataset, evaluation and generation.

``RetroForCausalLM`` / ``RetroHFConfig`` (the Hugging Face face of a run, retro.hf_model) load on
first use: importing transformers' model classes costs seconds that ``import retro`` (train.py,
every test) should not pay. Their first import registers model_type "retro" with AutoConfig and
AutoModelForCausalLM.
"""

from typing import Any

from retro.config import RetroConfig
from retro.model import RETRO

__all__ = ["RETRO", "RetroConfig", "RetroForCausalLM", "RetroHFConfig"]


def __getattr__(name: str) -> Any:
    if name in ("RetroForCausalLM", "RetroHFConfig"):
        from retro import hf_model

        return getattr(hf_model, name)
    raise AttributeError(f"module 'retro' has no attribute {name!r}")
