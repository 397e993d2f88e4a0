"""Text folders -> tokenised chunk / sequence / doc-id memmaps, and the ChunkStore reader."""

from chunk_store.errors import DBError, UserError
from chunk_store.store import ChunkStore

__all__ = ["ChunkStore", "DBError", "UserError"]
