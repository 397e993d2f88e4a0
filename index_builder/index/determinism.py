"""The index stage's determinism switch (``--deterministic``): the same inputs and arguments give
the same ``knn.index`` and ``index_infos.json`` bytes, and so the same neighbours.

Why a switch and not the default: autofaiss picks the search parameters (efSearch, nprobe) by
timing queries, and builds with every core, where HNSW's threaded insertion order varies; both
make two clean builds differ. Deterministic mode builds on one thread and replaces the timed
choice with a fixed rule (:func:`fixed_search_params`), at the cost of build time and of a search
speed that is not tuned to the machine. The manifest records which mode built the index
(``stages.index.params.deterministic``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from index_builder.index.faiss_params import apply_search_params

# autofaiss's report fields that measure this machine's speed, not the index
TIMING_KEYS = ("avg_search_speed_ms", "99p_search_speed_ms")


def fixed_search_params(index: Any) -> str:
    """Search parameters from the index's shape alone (faiss ParameterSpace syntax)."""
    import faiss

    params: list[str] = []
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        nlist = int(ivf.nlist)
        nprobe = min(nlist, max(16, nlist // 16))
        params.append(f"nprobe={nprobe}")
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            params.append(f"quantizer_efSearch={max(64, 2 * nprobe)}")
    elif isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        params.append("efSearch=128")
    return ",".join(params)


def make_deterministic(index_path: Path, infos_path: Path) -> str:
    """Rewrite a just-built index with fixed search parameters and its report without timings;
    returns the parameters."""
    import faiss

    index = faiss.read_index(str(index_path))
    param = fixed_search_params(index)
    apply_search_params(index, param)
    faiss.write_index(index, str(index_path))
    infos = json.loads(infos_path.read_text())
    infos = {k: v for k, v in infos.items() if k not in TIMING_KEYS}
    infos["index_param"] = param
    infos_path.write_text(json.dumps(infos))
    return param


def stable_infos(infos_path: Path, final_index: Path) -> None:
    """autofaiss's report names the temporary build folder (with a PID): name the final file,
    relative to the report's folder (a database that is moved or copied stays the same bytes)."""
    infos: dict[str, Any] = json.loads(infos_path.read_text())
    if "index_path" in infos:
        infos["index_path"] = final_index.name
        infos_path.write_text(json.dumps(infos))
