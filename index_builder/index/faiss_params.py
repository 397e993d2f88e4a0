"""Search parameters (nprobe, efSearch, quantizer_efSearch) on any faiss index, in faiss's
ParameterSpace syntax ("nprobe=8,quantizer_efSearch=64"): the one place that applies them.

Where parameters come from a file or a manifest (the index build's report, the knn stage's
tuning), a string that does not fit this index is not fatal: the index still searches with its
own defaults, and the caller says whether that deserves a warning."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("index_builder.index")


def apply_search_params(index: Any, param: str | None, *, strict: bool = True, warn: bool = True) -> bool:
    """Set ``param`` on ``index``; True if applied. Empty ``param``: nothing to do (True).

    ``strict``: faiss's RuntimeError propagates (parameters this code chose itself must fit);
    otherwise it is logged (``warn``) or ignored and False is returned."""
    if not param:
        return True
    import faiss

    try:
        faiss.ParameterSpace().set_index_parameters(index, param)
    except RuntimeError as e:
        if strict:
            raise
        if warn:
            log.warning("could not apply index parameters %r: %s", param, e)
        return False
    return True


def drop_pq_table(index: Any) -> None:
    """Free an IVF-PQ index's precomputed distance table and search without it.

    faiss's reader rebuilds the table on load even for an ``np`` key (the flag is not stored):
    nlist x M x 256 floats, 805 MB at 8,192 lists x PQ96 (16M chunks), 6.4 GB at the chooser's
    65,536 lists: the knn stage's private memory then grew with N, past ``--max-index-memory``.
    Searching without the table costs no measurable time (docs/BENCHMARKS.md)."""
    import faiss

    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return
    if isinstance(ivf, faiss.IndexIVFPQ) and ivf.precomputed_table.size() > 0:
        ivf.use_precomputed_table = -1
        ivf.precomputed_table.resize(0)


__all__ = ["apply_search_params", "drop_pq_table"]
