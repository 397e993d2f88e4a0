"""Growing a trained faiss index with the vectors of chunks added since (``index`` after ``add``).

Why: training an index (k-means, PQ codebooks, OPQ) is the expensive part and depends on the
distribution of the vectors, not on every vector; a database that grows by a few shards keeps
its trained index and appends the new train chunks' vectors (``index.add``, ids continuing the
global chunk ids). This module grows a single-file index (autofaiss's, or an IVF from before the
parts layout); a parts index gets a new part instead (index_builder.index.parts), its existing
files untouched. ``retro-build-index index --rebuild`` trains a new index instead, e.g. once the
database has grown several-fold. The index file is replaced atomically, so a crash leaves the
old index whole and the re-run adds again. After the add, the codes' error on the added rows is
checked against the old rows' (index_builder.index.codec_check, as for a new part).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from chunk_store.layout import DBLayout, temp_path
from index_builder.embed.stage import open_embeddings, read_rows
from index_builder.index.codec_check import added_rows_check

ADD_BLOCK = 1 << 16  # vectors added per call


def add_new_vectors(db: str | os.PathLike, threads: int = 1) -> dict[str, Any]:
    """Append train embeddings ``[index.ntotal, num_train_chunks)`` to the index; the counts and
    the codec check of the added rows (``codec_check``)."""
    import faiss

    paths = DBLayout(db)
    faiss.omp_set_num_threads(threads)
    index = faiss.read_index(str(paths.index))
    emb = open_embeddings(Path(db), "train")
    n = sum(a.shape[0] for a in emb)
    start = int(index.ntotal)
    if start > n:
        from chunk_store.framework.errors import UserError

        raise UserError(f"index: the index holds {start} vectors, train has {n} chunks: "
                        f"re-run with --rebuild")
    with tqdm(total=n - start, desc="index add", unit="vec", disable=n == start) as bar:
        for a in range(start, n, ADD_BLOCK):
            b = min(a + ADD_BLOCK, n)
            index.add(np.ascontiguousarray(read_rows(emb, a, b), dtype=np.float32))
            bar.update(b - a)
    tmp = temp_path(paths.index)
    faiss.write_index(index, str(tmp))
    os.replace(tmp, paths.index)
    return {"added": n - start, "ntotal": n, "codec_check": added_rows_check(index, emb, start, n)}
