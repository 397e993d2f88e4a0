"""Text folders -> tokenised chunk / sequence / doc-id memmaps, and the ChunkStore reader."""

from chunk_store.manifest import DBError
from chunk_store.store import ChunkStore

__all__ = ["ChunkStore", "DBError"]
