"""autofaiss on faiss >= 1.14: a view of faiss whose ``OPQMatrix`` takes keywords again.

Why its own module: the index stage installs it before autofaiss builds (``setup``); it is not
about the stage, and the stage module stays under the house's 500 lines.
"""

from __future__ import annotations

from typing import Any


class _FaissWithOPQKeywords:
    """A view of the faiss module whose ``OPQMatrix`` accepts keywords again.

    faiss 1.14's SWIG constructors take positional arguments only, and autofaiss builds OPQ
    (inner-product) indexes with ``faiss.OPQMatrix(d, M=..., d2=...)``. Only autofaiss's
    index-factory module sees this view; faiss itself is left untouched.
    """

    def __init__(self, faiss_module: Any) -> None:
        self._faiss = faiss_module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._faiss, name)

    def OPQMatrix(self, d: int = 0, M: int = 1, d2: int = -1) -> Any:  # noqa: N802 (faiss's name)
        return self._faiss.OPQMatrix(d, M, d2)


def opq_keywords_supported(faiss_module: Any) -> bool:
    try:
        faiss_module.OPQMatrix(8, M=2, d2=8)
        return True
    except (TypeError, NotImplementedError):
        return False


def patch_autofaiss_for_faiss_114() -> bool:
    """Install the OPQMatrix shim into autofaiss when this faiss rejects keywords; True if installed."""
    import faiss
    from autofaiss.indices import index_factory as af_factory

    if isinstance(af_factory.faiss, _FaissWithOPQKeywords):
        return True
    if opq_keywords_supported(faiss):
        return False
    af_factory.faiss = _FaissWithOPQKeywords(faiss)
    return True
