"""The embed stage: ``stage.py`` (frozen-BERT embeddings of every chunk, float16 shards) and
``embedder.py`` (the Embedder: the one embedding function of the database and of queries).

This package was the module ``index_builder.embed``: the names it held still import from here.
"""

from chunk_store.framework.moved import forward_names

__getattr__ = forward_names("index_builder.embed", "index_builder.embed.stage")
