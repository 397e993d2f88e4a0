"""Which search the knn stage runs: the faiss index (on the CPU or, with faiss-gpu, on the GPU),
the torch IVF search over the index's lists, or an exact pass; and the search functions for the
two device searches.

Why a rule: on CUDA the stage used to run an exact pass whenever faiss had no GPU support, every
query against every chunk: seconds at 1M chunks on an H100, hours at 100M. Now an exact pass runs
by default only while N x N x dim is under :data:`EXACT_MAX_NND` (the pass costs 2 N^2 dim
flops: 4e15 at the bound, about a minute of an H100's fp32 arithmetic, TF32 off); past it the
search keeps the IVF's bounded cost: faiss-gpu where installed, else the torch IVF search
(index_builder.index.torch_ivf_search) where the DB has an IVF index, else the faiss index on the
CPU (also where the DB is larger than the GPU holds for the torch search: it would read the
embeddings again on every call). The CPU default is unchanged (the faiss index). ``--exact``
forces the exact pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from chunk_store.framework.errors import UserError
from index_builder.knn.exclusion import SearchFn
from index_builder.knn.range_exclusion import RangeSearch

EXACT_MAX_NND = 2e15  # N * N * dim: an exact pass of 2 N^2 dim flops, ~1 min of an H100 (fp32)
METHODS = ("exact", "index", "faiss-gpu", "torch-ivf")


@dataclass(frozen=True)
class SearchChoice:
    """The search and the reason, said in one line and recorded in the knn summary."""

    method: str  # one of METHODS
    why: str

    @property
    def recorded_method(self) -> str:
        """The manifest's params.method: faiss on the GPU finds what it finds on the CPU ("index")."""
        return "index" if self.method == "faiss-gpu" else self.method


def exact_is_small(n: int, dim: int) -> bool:
    """Whether an exact pass over ``n`` chunks of ``dim`` dimensions is within the budget."""
    return float(n) * float(n) * float(dim) <= EXACT_MAX_NND


def choose_search(n: int, dim: int, device: str, faiss_gpu: bool, has_ivf: bool,
                  exact: bool | None = None, forced: str | None = None,
                  device_rows: int | None = None) -> SearchChoice:
    """The search for ``n`` train chunks of ``dim`` dimensions on ``device`` (module doc).

    ``exact``: --exact / --no-exact (None: the rule decides); ``forced``: the hidden --search;
    ``device_rows``: the rows the GPU holds for the torch IVF search (:func:`gpu_rows`; None: no
    limit). Past it the torch search would gather the embeddings again on every call, slower
    than faiss on the CPU, so the CPU index is taken."""
    if forced is not None:
        if forced not in METHODS:
            raise UserError(f"--search must be one of {', '.join(METHODS)}, not {forced!r}")
        if forced in ("torch-ivf", "faiss-gpu") and not has_ivf:
            raise UserError(f"--search {forced} needs an IVF index; this DB's index has no inverted lists")
        if forced == "faiss-gpu" and not faiss_gpu:
            raise UserError("--search faiss-gpu: this faiss has no GPU support or sees no GPU "
                            "(install faiss-gpu: see the README)")
        return SearchChoice(forced, f"asked (--search {forced})")
    if exact:
        return SearchChoice("exact", "asked (--exact)")
    if not device.startswith("cuda"):
        return SearchChoice("index", "on the CPU: the faiss index")
    if faiss_gpu and has_ivf:
        return SearchChoice("faiss-gpu", "CUDA with faiss-gpu: the IVF index on the GPU")
    if exact is None and exact_is_small(n, dim):
        return SearchChoice("exact", f"CUDA, {n} chunks x {dim} dims: an exact pass is within "
                                     f"N*N*dim <= {EXACT_MAX_NND:.0e}")
    if has_ivf and device_rows is not None and n > device_rows:
        return SearchChoice("index", f"CUDA without faiss-gpu, {n} chunks past the {device_rows} the GPU holds "
                                     "for the torch IVF search: the faiss index on the CPU (install faiss-gpu)")
    if has_ivf:
        return SearchChoice("torch-ivf", "CUDA without faiss-gpu: the IVF index's lists searched with torch"
                                         + ("" if exact is False else f" (N*N*dim > {EXACT_MAX_NND:.0e}: "
                                                                       "no exact pass)"))
    return SearchChoice("index", "CUDA without faiss-gpu and no IVF index: the faiss index on the CPU"
                                 + ("" if exact is False else f" (N*N*dim > {EXACT_MAX_NND:.0e}: no exact pass)"))


def choose_for_db(db: Any, manifest: dict[str, Any], device: str, exact: bool | None = None,
                  forced: str | None = None) -> SearchChoice:
    """:func:`choose_search` for a database: its train chunks, embedding width, index and this machine."""
    from index_builder.embed.stage import num_chunks
    from index_builder.index.stage import faiss_gpu_available

    dim = int(manifest.get("stages", {}).get("embed", {}).get("params", {}).get("dim") or 0)
    return choose_search(num_chunks(db, manifest, "train"), dim, device,
                         device.startswith("cuda") and faiss_gpu_available(), index_has_ivf(manifest),
                         exact, forced, gpu_rows(device, dim))


def gpu_rows(device: str, dim: int) -> int | None:
    """Rows of ``dim`` float16 dimensions the torch IVF search keeps on ``device`` (None off CUDA)."""
    if not device.startswith("cuda") or dim <= 0:
        return None
    from index_builder.index.torch_ivf_search import default_block_rows

    return default_block_rows(device, dim, 2 * dim + 12)  # fp16 row, fp32 norm, int64 id


def index_has_ivf(manifest: dict[str, Any]) -> bool:
    """Whether the DB's index (its recorded factory key) has inverted lists."""
    key = manifest.get("stages", {}).get("index", {}).get("stats", {}).get("index_key")
    return "IVF" in str(key or "")


@dataclass
class DeviceSearch:
    """The plain search and the excluded-range search of a device method (knn stage: setup)."""

    search: SearchFn
    range_search: RangeSearch | None  # None: the caller's faiss range search over the CPU index
    method: str  # what runs: "faiss-gpu" or "torch-ivf" (faiss-gpu falls back to torch-ivf)


def device_search(method: str, index: Any, shards: Sequence[np.ndarray], device: str,
                  content: Any, say: Callable[[str], None] = print) -> DeviceSearch | None:
    """The search functions for ``method`` over the loaded CPU ``index`` (None for "index"/"exact").

    Both read nprobe from the CPU index at each call, so the stage's recall tuner, which sets it
    there, tunes them too. faiss-gpu's plain search runs on a GPU copy of the index (the excluded
    range is skipped on the CPU index: faiss's GPU indexes take no ID selector); where faiss cannot
    copy the index to the GPU, the torch IVF search runs instead."""
    if method not in ("faiss-gpu", "torch-ivf"):
        return None
    from index_builder.index.torch_ivf_search import TorchIVFConfig, TorchIVFSearch, ivf_of

    if method == "faiss-gpu":
        gpu = _faiss_gpu_search(index, say)
        if gpu is not None:
            return DeviceSearch(gpu, None, "faiss-gpu")
    if ivf_of(index) is None:
        raise UserError("knn: the torch IVF search needs an IVF index; this DB's index has no inverted lists")
    tivf = TorchIVFSearch(index, shards, TorchIVFConfig(device=device), valid=content)

    def search(q: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        return tivf.search(q, c)

    def range_search(q: np.ndarray, ranges: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        return tivf.search(q, c, exclude=ranges, valid=None if content is None else True)

    return DeviceSearch(search, range_search, "torch-ivf")


def _faiss_gpu_search(index: Any, say: Callable[[str], None]) -> SearchFn | None:
    """A search on a GPU copy of ``index`` (nprobe copied from the CPU index each call); None,
    said, where faiss cannot copy this index type to the GPU."""
    import faiss

    from index_builder.index.torch_ivf_search import ivf_of

    try:
        res = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
    except (RuntimeError, AttributeError) as e:
        say(f"knn: faiss could not copy the index to the GPU ({str(e).splitlines()[0][:120]}): "
            "the torch IVF search instead")
        return None
    ivf, params = ivf_of(index), faiss.GpuParameterSpace()

    def search(q: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        params.set_index_parameter(gpu_index, "nprobe", int(ivf.nprobe))
        d, i = gpu_index.search(np.ascontiguousarray(q, dtype=np.float32), c)
        return i.astype(np.int64), d.astype(np.float32)

    search.resources = res  # type: ignore[attr-defined]  (the GPU memory must outlive the index)
    return search


__all__ = ["DeviceSearch", "EXACT_MAX_NND", "METHODS", "SearchChoice", "choose_for_db", "choose_search", "device_search",
           "exact_is_small", "gpu_rows", "index_has_ivf"]
