"""index: an autofaiss index over the train embeddings, with its recall measured against exact search.

autofaiss reads the float16 shards of ``DB/train/embeddings/`` batch by batch (out of core),
picks an index type within ``--max-index-memory`` and trains it within ``--current-memory``,
and tunes its search parameters; ``--index-key`` forces a faiss factory string. The metric is
squared L2, as in the paper. faiss-gpu is used when installed. ``--distributed pyspark`` hands
the build to autofaiss's Spark mode (``pip install '.[spark]'``).

After the build, recall@k of the index against exact search is measured on a sample of train
chunks and stored in the manifest (``stages.index.stats.recall``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from chunk_store.manifest import (
    DBError,
    check_params,
    load_manifest,
    now_iso,
    record_stage,
    require_stage,
    versions,
)

log = logging.getLogger(__name__)

INDEX_DIR = "index"
INDEX_FILE = "knn.index"
INFOS_FILE = "index_infos.json"
METRIC = "l2"
RECALL_KS = (1, 2, 10)
RESULT_KEYS = ("index_key", "max_index_memory", "metric", "embed_id", "memory_mappable",
               "max_query_ms")


# ----------------------------------------------------------------------------- faiss >= 1.14 shim


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


# ----------------------------------------------------------------------------- loading


def index_paths(db: str | os.PathLike) -> tuple[Path, Path]:
    folder = Path(db) / INDEX_DIR
    return folder / INDEX_FILE, folder / INFOS_FILE


def index_identity(manifest: dict[str, Any]) -> str:
    """What a knn result depends on: the index build (its key and when it finished)."""
    rec = manifest.get("stages", {}).get("index", {})
    return f"{rec.get('stats', {}).get('index_key')}@{rec.get('finished')}"


def load_index(db: str | os.PathLike, mmap: bool = True) -> Any:
    """Read the index (memory-mapped where its type allows) and apply autofaiss's tuned params."""
    import faiss

    path, infos_path = index_paths(db)
    if not path.exists():
        raise DBError(f"missing index {path}: run `retro-build-index index --db {db}` first")
    index = None
    if mmap:
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:  # e.g. HNSW: not memory-mappable, read it whole
            index = None
    if index is None:
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise DBError(f"corrupt index {path}: {str(e).splitlines()[0]}") from None
    param = None
    if infos_path.exists():
        try:
            param = json.loads(infos_path.read_text()).get("index_param")
        except json.JSONDecodeError:
            param = None
    if param:
        try:
            faiss.ParameterSpace().set_index_parameters(index, param)
        except RuntimeError as e:
            log.warning("could not apply index parameters %r: %s", param, e)
    return index


# ----------------------------------------------------------------------------- recall


def measure_recall(db: str | os.PathLike, index: Any, sample: int = 1000, ks: tuple[int, ...] = RECALL_KS,
                   seed: int = 0, device: str = "cpu") -> dict[str, float]:
    """recall@k of ``index`` vs exact search, on ``sample`` random train chunks as queries.

    A returned id counts as a hit when its true distance is within the exact k-th distance
    (ties between duplicate chunks are common in real corpora and are not misses).
    """
    from index_builder.embed import open_embeddings, read_rows
    from index_builder.knn import ExactSearchConfig, exact_search

    shards = open_embeddings(db, "train")
    n = sum(s.shape[0] for s in shards)
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    queries = np.stack([read_rows(shards, int(i), int(i) + 1)[0] for i in ids])
    kmax = min(max(ks), n)
    _, exact_d = exact_search(queries, shards, kmax, ExactSearchConfig(device=device))
    _, got_i = index.search(queries, kmax)
    got = np.stack([read_rows(shards, int(j), int(j) + 1)[0] if j >= 0 else
                    np.full(queries.shape[1], np.inf, dtype=np.float32)
                    for j in got_i.ravel()]).reshape(len(ids), kmax, -1)
    true_d = ((got - queries[:, None, :]) ** 2).sum(-1)
    out = {}
    for k in ks:
        if k > kmax:
            continue
        thresh = exact_d[:, k - 1:k] * (1 + 1e-3) + 1e-4
        hits = (true_d[:, :k] <= thresh).sum(axis=1)
        out[f"recall@{k}"] = round(float(hits.mean() / k), 4)
    return out


# ----------------------------------------------------------------------------- the stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("index")
    g.add_argument("--max-index-memory", default="4G",
                   help="the largest index autofaiss may build (e.g. 4G; smaller -> compressed index)")
    g.add_argument("--current-memory", default="16G",
                   help="memory autofaiss may use while training the index")
    g.add_argument("--index-key", default=None,
                   help="force a faiss index factory string (e.g. 'IVF4096,PQ64', 'HNSW32', 'Flat')")
    g.add_argument("--max-query-ms", type=float, default=2.0,
                   help="autofaiss tunes search parameters (nprobe/efSearch) to this time per query; "
                        "lower = faster knn and lookups, higher = better recall")
    g.add_argument("--memory-mappable", action="store_true",
                   help="only index types that the Retriever can memory-map (IVF families)")
    g.add_argument("--recall-sample", type=int, default=1000,
                   help="train chunks used to measure the index's recall against exact search")
    g.add_argument("--distributed", default=None, choices=["pyspark"],
                   help="build with autofaiss's Spark mode (needs pip install '.[spark]')")
    g.add_argument("--temporary-indices-folder", default=None,
                   help="shared folder for Spark's partial indices (default: DB/index/tmp)")
    g.add_argument("--threads", type=int, default=None,
                   help="faiss / torch CPU threads (default: all cores)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import faiss
    import torch

    from index_builder.embed import resolve_device

    db = Path(args.db)
    manifest = load_manifest(db)
    require_stage(manifest, "embed", "index")
    embed = manifest["stages"]["embed"]
    embed_id = f"{embed['params'].get('embedder_id')}@{embed.get('finished')}"
    distributed = getattr(args, "distributed", None)
    if distributed == "pyspark":
        _require_pyspark()
    params = {
        "index_key": getattr(args, "index_key", None),
        "max_index_memory": getattr(args, "max_index_memory", "4G"),
        "current_memory": getattr(args, "current_memory", "16G"),
        "metric": METRIC,
        "memory_mappable": bool(getattr(args, "memory_mappable", False)) or distributed == "pyspark",
        "max_query_ms": float(getattr(args, "max_query_ms", 2.0) or 2.0),
        "distributed": distributed,
        "embed_id": embed_id,
        "dim": embed["params"].get("dim"),
    }
    index_path, infos_path = index_paths(db)
    recorded = manifest["stages"].get("index")
    if recorded and recorded.get("finished") and index_path.exists():
        if recorded["params"].get("embed_id") != embed_id:
            raise DBError("index: the embeddings changed since the index was built "
                          f"(built from {recorded['params'].get('embed_id')}, now {embed_id}); "
                          "delete DB/index and re-run index")
        check_params(recorded.get("params"), params, "index", keys=RESULT_KEYS)
        print(f"index: already done ({recorded['stats'].get('index_key')}, "
              f"{recorded['stats'].get('recall')})")
        return {"skipped": True, **recorded.get("stats", {})}
    # a partial build leaves nothing reusable: autofaiss starts over (files appear atomically)
    threads = getattr(args, "threads", None) or os.cpu_count() or 1
    started = now_iso()
    manifest = record_stage(db, "index", params=params, started=started, finished=None,
                            versions_=versions("faiss", "autofaiss"), manifest=manifest)
    shim = patch_autofaiss_for_faiss_114()
    use_gpu = _faiss_gpu_usable(getattr(args, "device", "auto"))
    tmp_dir = db / INDEX_DIR / f".build-{os.getpid()}"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    from autofaiss import build_index

    kwargs: dict[str, Any] = dict(
        embeddings=str(db / "train" / "embeddings"),
        index_path=str(tmp_dir / INDEX_FILE),
        index_infos_path=str(tmp_dir / INFOS_FILE),
        file_format="npy",
        metric_type=METRIC,
        max_index_memory_usage=params["max_index_memory"],
        current_memory_available=params["current_memory"],
        index_key=params["index_key"],
        nb_cores=threads,
        use_gpu=use_gpu,
        should_be_memory_mappable=params["memory_mappable"],
        max_index_query_time_ms=params["max_query_ms"],
        verbose=logging.WARNING,
    )
    if distributed == "pyspark":
        # executors must run a Python that has autofaiss & co.: this one, unless the user (or
        # the cluster's config) says otherwise; only affects a session created from here on
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        kwargs["distributed"] = "pyspark"
        kwargs["temporary_indices_folder"] = (getattr(args, "temporary_indices_folder", None)
                                              or str((db / INDEX_DIR / "tmp").resolve()))
    try:
        index, infos = build_index(**kwargs)
    except (ValueError, RuntimeError, AssertionError) as e:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise DBError(f"index: autofaiss failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not (tmp_dir / INDEX_FILE).exists():
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise DBError(
            "index: autofaiss built no index (not enough memory for the chosen index type? "
            f"--current-memory is {params['current_memory']}, --max-index-memory "
            f"{params['max_index_memory']}; see its log above)")
    build_seconds = time.time() - t0
    os.replace(tmp_dir / INFOS_FILE, infos_path)
    os.replace(tmp_dir / INDEX_FILE, index_path)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    infos_json = json.loads(infos_path.read_text())

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    loaded = load_index(db)
    device = resolve_device(getattr(args, "device", "auto"))
    recall = measure_recall(db, loaded, sample=int(getattr(args, "recall_sample", 1000) or 1000),
                            device=device)
    stats = {
        "index_key": infos_json.get("index_key"),
        "index_param": infos_json.get("index_param"),
        "ntotal": int(loaded.ntotal),
        "size_bytes": index_path.stat().st_size,
        "build_seconds": round(build_seconds, 2),
        "recall": recall,
        "recall_sample": min(int(getattr(args, "recall_sample", 1000) or 1000), int(loaded.ntotal)),
        "use_gpu": use_gpu,
        "opq_shim": shim,
    }
    record_stage(db, "index", params=params, started=started, finished=now_iso(), stats=stats,
                 versions_=versions("faiss", "autofaiss"))
    print(f"index: {stats['index_key']} over {stats['ntotal']} chunks in {build_seconds:.1f}s; "
          + ", ".join(f"{k}={v:.3f}" for k, v in recall.items()) + " (vs exact search)")
    return stats


def _faiss_gpu_usable(device: str | None) -> bool:
    if device == "cpu":
        return False
    try:
        import faiss

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:
        return False


def _require_pyspark() -> None:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise DBError("--distributed pyspark needs pyspark: pip install 'retro[spark]' "
                      "(and a Spark session or cluster, see the README)") from None
