"""The knn stage: ``stage.py`` (every chunk's k nearest train chunks from other documents), and its
helpers: ``exclusion.py`` (the rule: no neighbour from a document of the chunk's own sequence, and
the widening search), ``range_exclusion.py`` (the range search on IVF/flat), ``exact_passes.py``
(one exact pass shared by units), ``tuning.py`` (recall-tuned nprobe/efSearch), ``rerank.py``
(re-ranking compressed candidates by true distance), ``neighbour_files.py`` (shards -> the
neighbour arrays), ``incremental.py`` (``--refresh`` after ``add``: old rows merge the added chunks) and
``added_search.py`` (the search of the added chunks alone).

This package was the module ``index_builder.knn``: the names it held still import from here.
"""

from chunk_store.framework.moved import forward_names

__getattr__ = forward_names("index_builder.knn", "index_builder.knn.stage")
