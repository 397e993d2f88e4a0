"""Text folders -> tokenised chunk / sequence / doc-id memmaps, and the ChunkStore reader.

Rooms: ``framework/`` (the stage routine, the stage registry and the toolkit every package
shares), ``chunk/`` (the chunk stage and its input readers), ``add.py`` (the add stage),
``tokenization/`` (the tokenizer protocol and its two implementations); the database format
itself: ``layout.py`` (every file name), ``manifest.py``, ``shards.py``, ``sharded_array.py``,
``store.py`` (the reader).
"""

from chunk_store.framework import moved

# Modules that moved to a better room: their old import paths keep working (same module object).
MOVED = {
    "chunk_store.stage": "chunk_store.framework.stage",
    "chunk_store.errors": "chunk_store.framework.errors",
    "chunk_store.runtime": "chunk_store.framework.runtime",
    "chunk_store.argtypes": "chunk_store.framework.argtypes",
    "chunk_store.build": "chunk_store.chunk.stage",
    "chunk_store.input_formats": "chunk_store.chunk.input_formats",
    "chunk_store.text_files": "chunk_store.chunk.text_files",
    "chunk_store.packing": "chunk_store.chunk.packing",
    "chunk_store.part_files": "chunk_store.chunk.part_files",
    "chunk_store.tokenizer": "chunk_store.tokenization.sentencepiece",
    "chunk_store.hf_tokenizer": "chunk_store.tokenization.hugging_face",
    "chunk_store.db_tokenizer": "chunk_store.tokenization.db_tokenizer",
}
moved.install(MOVED)

from chunk_store.framework.errors import DBError, UserError  # noqa: E402
from chunk_store.store import ChunkStore  # noqa: E402

__all__ = ["ChunkStore", "DBError", "UserError"]
