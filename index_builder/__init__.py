"""Frozen-BERT chunk embeddings -> autofaiss index -> precomputed neighbours; the Retriever.

One subpackage a stage: ``embed/`` (the stage and the Embedder, the one embedding function of
database and queries), ``index/`` (the stage, the index-key plan, the IVF build, the update after
add, faiss parameters), ``knn/`` (the stage, the neighbour-exclusion rule, exact passes, search
tuning, re-ranking, the neighbour files). Beside them: ``cli.py`` (retro-build-index),
``retriever.py`` (the neighbour-lookup API) and ``server.py`` (retro-serve).

``Retriever`` and ``Neighbour`` are imported lazily so that `retro-build-index info` and the
chunk stage never pay for importing torch, transformers or faiss.
"""

from chunk_store.framework import moved

# Modules that moved to a better room: their old import paths keep working (same module object).
# The old modules index_builder.embed and index_builder.knn are now packages of the same name:
# their __init__ forwards the old names to the stage module.
MOVED = {
    "index_builder.embedder": "index_builder.embed.embedder",
    "index_builder.faiss_index": "index_builder.index.stage",
    "index_builder.index_plan": "index_builder.index.plan",
    "index_builder.ivf_build": "index_builder.index.ivf_build",
    "index_builder.centroid_assign": "index_builder.index.centroid_assign",
    "index_builder.index_update": "index_builder.index.update",
    "index_builder.determinism": "index_builder.index.determinism",
    "index_builder.exact_search": "index_builder.index.exact_search",
    "index_builder.neighbour_exclusion": "index_builder.knn.exclusion",
    "index_builder.range_exclusion": "index_builder.knn.range_exclusion",
    "index_builder.exact_passes": "index_builder.knn.exact_passes",
    "index_builder.search_tuning": "index_builder.knn.tuning",
    "index_builder.rerank": "index_builder.knn.rerank",
    "index_builder.neighbour_files": "index_builder.knn.neighbour_files",
}
moved.install(MOVED)

__all__ = ["Retriever", "Neighbour"]


def __getattr__(name: str):
    if name in __all__:
        from index_builder import retriever

        return getattr(retriever, name)
    raise AttributeError(f"module 'index_builder' has no attribute {name!r}")
