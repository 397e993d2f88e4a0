"""Build an IVF index (the plan of :mod:`index_builder.index.plan`) from the float16 embedding
shards, with every training cost bounded.

Why not autofaiss here: it trains on the first ``train_size`` rows of the folder (a DB's first
documents, not a sample of it) and its sample grows with N. Here the sample is a seeded random
draw of ``plan.train_size`` rows over the whole DB; the coarse k-means runs with faiss on every
core, with faiss-gpu's k-means where there is one, or :func:`torch_kmeans` on CUDA where faiss has
no GPU support (the same code runs, and is tested, on the CPU); then the vectors are added in
batches read from the memmaps (memory: the index plus one batch).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from index_builder.index.exact_search import read_block
from index_builder.index.plan import OPQ_TRAIN_MAX, IndexPlan

log = logging.getLogger(__name__)

ADD_BATCH = 65536
KMEANS_ITERS = 10  # faiss's default for IVF training
OPQ_ITERS = 20
CODEC_TRAIN_MAX = 32768  # SQ8's ranges and PQ's 256 centroids a sub-space need far fewer


def gather_rows(shards: Sequence[np.ndarray], ids: np.ndarray, run: int = 4096) -> np.ndarray:
    """Rows ``ids`` (sorted, unique) of the concatenated shards as float32, shard by shard, read
    ``run`` rows at a time (:func:`read_block`: the RSS stays the sample, not the shards)."""
    out = np.empty((len(ids), shards[0].shape[1]), dtype=np.float32)
    offset, pos = 0, 0
    for arr in shards:
        n = arr.shape[0]
        hi = int(np.searchsorted(ids, offset + n))
        while pos < hi:
            lo_row = int(ids[pos]) - offset
            end = min(hi, int(np.searchsorted(ids, offset + lo_row + run)))
            block = read_block(arr, lo_row, int(ids[end - 1]) - offset + 1)
            out[pos:end] = block[ids[pos:end] - offset - lo_row]
            pos = end
        offset += n
    return out


def sample_ids(n: int, size: int, seed: int = 0) -> np.ndarray:
    """A seeded uniform sample of ``size`` row ids of ``n``, sorted (sequential reads)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def torch_kmeans(x: np.ndarray, k: int, niter: int = KMEANS_ITERS, seed: int = 0, device: str = "cpu",
                 block: int = 16384, bf16: bool = False) -> np.ndarray:
    """Lloyd's k-means in torch: (k, d) float32 centroids of ``x`` (n, d).

    For CUDA machines whose faiss has no GPU support, and CPUs with native bf16 (``bf16``: the
    assignment's GEMM in bfloat16, index_builder.index.centroid_assign; the means in fp32). fp32
    otherwise (TF32 allowed: centroids need not be exact), assignment by blocks of ``block`` rows
    (memory block x k), empty clusters re-seeded from random points as faiss does. Same code on
    CPU (tested) and CUDA.
    """
    import torch

    from index_builder.index.centroid_assign import augment

    dev = torch.device(device)
    block = min(block, max(256, (1 << 28) // k))  # the (block, k) distances within 1 GB at 2^18 lists
    g = torch.Generator(device="cpu").manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dev)
    n = xt.shape[0]
    if n < k:
        raise ValueError(f"k-means: {n} points for {k} centroids")
    xa = augment(xt, 1.0) if bf16 else None  # (n, d + 1) bf16, once
    cent = xt[torch.randperm(n, generator=g)[:k].to(dev)].clone()
    for _ in range(niter):
        assign = torch.empty(n, dtype=torch.long, device=dev)
        ca = augment(cent).T.contiguous() if bf16 else None
        c_norm = None if bf16 else (cent * cent).sum(1)
        for b0 in range(0, n, block):
            if xa is not None:
                assign[b0:b0 + block] = (xa[b0:b0 + block] @ ca).argmax(1)
                continue
            xb = xt[b0:b0 + block]
            assign[b0:b0 + block] = (c_norm[None, :] - 2.0 * (xb @ cent.T)).argmin(1)
        sums = torch.zeros_like(cent).index_add_(0, assign, xt)
        counts = torch.bincount(assign, minlength=k).to(xt.dtype)
        empty = counts == 0
        cent = sums / counts.clamp(min=1)[:, None]
        if empty.any():
            refill = torch.randint(0, n, (int(empty.sum()),), generator=g).to(dev)
            cent[empty] = xt[refill]
    return cent.cpu().numpy()


def train_coarse(x: np.ndarray, nlist: int, device: str, faiss_gpu: bool, seed: int = 0,
                 bf16: bool = False, two_level: bool = False) -> tuple[np.ndarray, str]:
    """The IVF centroids and which k-means made them: faiss-gpu, torch on CUDA, torch in bf16 on
    a CPU with native bf16 (``bf16``), or faiss on the CPU; ``two_level`` (the plan's choice past
    2^16 lists) on the CPU: faiss's two-level k-means, sqrt(nlist) groups and then each group's
    share of the lists over its own vectors, nlist / sqrt(nlist) times cheaper than the flat one."""
    import faiss

    if device.startswith("cuda") and not faiss_gpu:
        return torch_kmeans(x, nlist, seed=seed, device=device), "torch-kmeans-" + device
    if two_level and not faiss_gpu:
        from faiss.contrib.clustering import two_level_clustering

        groups = max(1, int(round(nlist ** 0.5)))
        centroids, _ = two_level_clustering(x, groups, nlist, clustering_niter=KMEANS_ITERS, seed=seed + 1234)
        return np.ascontiguousarray(centroids, dtype=np.float32), "faiss-kmeans-two-level-cpu"
    if bf16 and not faiss_gpu:
        return torch_kmeans(x, nlist, seed=seed, bf16=True), "torch-kmeans-cpu-bf16"
    km = faiss.Kmeans(x.shape[1], nlist, niter=KMEANS_ITERS, seed=seed + 1234, gpu=bool(faiss_gpu),
                      max_points_per_centroid=max(1, -(-x.shape[0] // nlist)))
    km.train(x)
    return np.asarray(km.centroids, dtype=np.float32), "faiss-kmeans-" + ("gpu" if faiss_gpu else "cpu")


def build_ivf(shards: Sequence[np.ndarray], plan: IndexPlan, device: str = "cpu", faiss_gpu: bool = False,
              seed: int = 0, progress: bool = True, bf16: bool = False,
              train_only: bool = False) -> tuple[Any, dict[str, Any]]:
    """Train and fill ``plan.key`` over the shards; returns (index, build stats). ``bf16``: the
    k-means and the lists' assignment compare vectors with centroids in bfloat16 (CPU only).
    ``train_only``: the trained index without vectors (the parts layout fills it part by part:
    index_builder.index.parts)."""
    import time

    import faiss
    from tqdm.auto import tqdm

    n, dim = sum(s.shape[0] for s in shards), shards[0].shape[1]
    stats: dict[str, Any] = {}
    t0 = time.time()
    x = gather_rows(shards, sample_ids(n, plan.train_size, seed))
    stats["train_vectors"] = int(x.shape[0])
    _phase(stats, "sample", t0, progress)
    index = faiss.index_factory(dim, plan.key, faiss.METRIC_L2)
    ivf = faiss.extract_index_ivf(index)
    if plan.opq:
        t = time.time()
        pre = faiss.downcast_index(index)
        opq = faiss.downcast_VectorTransform(pre.chain.at(0))
        opq.niter = OPQ_ITERS  # faiss's 50 cost minutes at 384 dims, for a rotation that converges sooner
        opq.train(x[:OPQ_TRAIN_MAX])
        x = opq.apply(x)
        _phase(stats, "opq", t, progress)
    t = time.time()
    bf16 = bf16 and device == "cpu" and not faiss_gpu
    centroids, stats["kmeans"] = train_coarse(x, ivf.nlist, device, faiss_gpu, seed, bf16=bf16,
                                              two_level=plan.kmeans == "two-level")
    _phase(stats, "kmeans", t, progress)
    quantizer = faiss.downcast_index(ivf.quantizer)
    quantizer.add(centroids)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = 128  # assignment accuracy while adding
    t = time.time()
    # the quantizer is full: only the codec (SQ8 ranges / PQ codebooks) trains, on a bounded
    # sample (faiss assigns each training vector to its list first, with the HNSW quantizer)
    ivf.train(x[:CODEC_TRAIN_MAX])
    index.is_trained = True
    _phase(stats, "codec", t, progress)
    if train_only:
        return index, stats
    del x
    t = time.time()
    if bf16:
        from index_builder.index.centroid_assign import Bf16Assigner

        assigner: Any = Bf16Assigner(centroids)
    else:
        assigner = list_assigner(centroids, faiss_gpu)
    stats["assign"] = "torch-bf16" if bf16 else "faiss-flat-" + ("gpu" if faiss_gpu else "cpu")
    with tqdm(total=n, unit="vec", desc="index add", disable=not progress, leave=False) as bar:
        for arr in shards:
            for b0 in range(0, arr.shape[0], ADD_BATCH):
                batch = read_block(arr, b0, min(b0 + ADD_BATCH, arr.shape[0]))
                add_assigned(index, ivf, batch, assigner)
                bar.update(len(batch))
    _phase(stats, "add", t, progress)
    return index, stats


def _phase(stats: dict[str, Any], name: str, t0: float, progress: bool) -> None:
    """Record a phase's seconds; with progress, say it on stderr as it ends (a long build's
    phases are visible while it runs, not only in the manifest after)."""
    import sys
    import time

    stats[f"{name}_seconds"] = round(time.time() - t0, 2)
    if progress:
        print(f"index build: {name} {stats[f'{name}_seconds']:.0f}s", file=sys.stderr, flush=True)


def list_assigner(centroids: np.ndarray, faiss_gpu: bool = False) -> Any:
    """A flat (brute-force, BLAS) index over the centroids for assigning vectors while adding.

    Why not the HNSW quantizer the index searches with: at a few thousand lists, HNSW's
    efSearch x M scattered distance computations cost as much as comparing with every centroid,
    which BLAS does several times faster in batches (docs/BENCHMARKS.md, "Database at scale").
    The assignment is the exact nearest centroid, where HNSW's is approximate."""
    import faiss

    flat = faiss.IndexFlatL2(centroids.shape[1])
    if faiss_gpu:
        flat = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, flat)
    flat.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return flat


def add_assigned(index: Any, ivf: Any, x: np.ndarray, assigner: Any, first_id: int | None = None) -> None:
    """Add ``x`` (ids ``first_id``..., by default continuing from ntotal) with lists from
    ``assigner``; through the index's pre-transform (OPQ) first, where it has one."""
    import faiss

    pre = faiss.downcast_index(index)
    if isinstance(pre, faiss.IndexPreTransform):
        for i in range(pre.chain.size()):
            x = faiss.downcast_VectorTransform(pre.chain.at(i)).apply(x)
    _, lists = assigner.search(x, 1)
    first = int(ivf.ntotal) if first_id is None else first_id
    ids = np.arange(first, first + len(x), dtype=np.int64)
    ivf.add_core(len(x), faiss.swig_ptr(np.ascontiguousarray(x)), faiss.swig_ptr(ids),
                 faiss.swig_ptr(np.ascontiguousarray(lists[:, 0])))
    index.ntotal = ivf.ntotal


def coarse_centroids(ivf: Any) -> np.ndarray:
    """The (nlist, d) centroids stored in a trained IVF's quantizer (flat or HNSW storage)."""
    return np.ascontiguousarray(ivf.quantizer.reconstruct_n(0, ivf.nlist), dtype=np.float32)
