"""The index stage: ``stage.py`` (the trained faiss index over the train embeddings, its recall
check, the update after add), ``plan.py`` (which index key a size and a memory budget get),
``ivf_build.py`` and ``centroid_assign.py`` (the bounded IVF build, bf16 k-means), ``update.py``
(adding new vectors to a trained index), ``determinism.py`` (byte-identical builds),
``faiss_params.py`` (nprobe / efSearch on any index), ``exact_search.py`` (exact top-k in torch,
the reference of every recall figure)."""
