"""The RETRO model (chunked cross-attention, neighbour encoder, rotary embeddings), its
dataset, evaluation and generation."""

from retro.config import RetroConfig
from retro.model import RETRO

__all__ = ["RETRO", "RetroConfig"]
