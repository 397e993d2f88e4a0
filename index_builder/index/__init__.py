"""The index stage: ``stage.py`` (the trained faiss index over the train embeddings, its recall
check, the update after add), ``plan.py`` (which index key a size and a memory budget get),
``ivf_build.py`` and ``centroid_assign.py`` (the bounded IVF build, bf16 k-means), ``parts.py``
(the IVF index as parts on disk), ``merge_parts.py`` (parts merged into one on-disk part),
``update.py`` (adding new vectors to a single-file index), ``codec_check.py`` (how well the trained
codes hold added rows), ``determinism.py`` (byte-identical builds),
``faiss_params.py`` (nprobe / efSearch on any index), ``exact_search.py`` (exact top-k in torch,
the reference of every recall figure)."""
