"""Frozen-BERT chunk embeddings -> autofaiss index -> precomputed neighbours; the Retriever.

``Retriever`` and ``Neighbour`` are imported lazily so that `retro-build-index info` and the
chunk stage never pay for importing torch, transformers or faiss.
"""

__all__ = ["Retriever", "Neighbour"]


def __getattr__(name: str):
    if name in __all__:
        from index_builder import retriever

        return getattr(retriever, name)
    raise AttributeError(f"module 'index_builder' has no attribute {name!r}")
