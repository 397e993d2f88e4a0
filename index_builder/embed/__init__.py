"""The embed stage: ``stage.py`` (frozen-BERT embeddings of every chunk, float16 shards) and
``embedder.py`` (the Embedder: the one embedding function of the database and of queries).

This package was the module ``index_builder.embed``: the names it held still import from here.
"""

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    stage = importlib.import_module("index_builder.embed.stage")  # not `from . import`: that asks __getattr__
    try:
        return getattr(stage, name)
    except AttributeError:
        raise AttributeError(f"module 'index_builder.embed' has no attribute {name!r}") from None
