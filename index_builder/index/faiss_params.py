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


__all__ = ["apply_search_params"]
