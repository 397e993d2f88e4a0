"""index: an autofaiss index over the train embeddings, with its recall measured against exact search.

autofaiss reads the float16 shards of ``DB/train/embeddings/`` batch by batch (out of core),
picks an index type within ``--max-index-memory`` and trains it within ``--current-memory``,
and tunes its search parameters; ``--index-key`` forces a faiss factory string. The metric is
squared L2, as in the paper. faiss-gpu is used when installed. ``--distributed pyspark`` hands
the build to autofaiss's Spark mode (``pip install '.[spark]'``).

After the build, recall@k of the index against exact search is measured on a sample of train
chunks and stored in the manifest (``stages.index.stats.recall``).

Past the HNSW range (``--hnsw-max`` vectors, or where HNSW32 exceeds ``--max-index-memory``) the
key comes from :func:`index_builder.index.plan.choose_index`, whose training cost is bounded, and
:mod:`index_builder.index.ivf_build` builds it (a random training sample, k-means on every core or the
GPU, batched adds); the plan is recorded in ``stages.index.stats.plan``. ``--index-key`` overrides.

That IVF index is kept as parts (:mod:`index_builder.index.parts`): rank 0 trains the empty IVF
(``trained.index``) in :meth:`IndexStage.begin`, then each part of the train rows is a unit of
work, so every torchrun rank fills its own parts; after ``add`` the new chunks become a new part
and the existing parts' files are not touched. Rank 0 then lists the parts and merges them where
``--merge-parts`` says (:mod:`index_builder.index.merge_parts`). :func:`load_index` opens either layout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chunk_store.framework.argtypes import float_in
from chunk_store.framework.errors import UserError
from chunk_store.layout import DBLayout
from chunk_store.manifest import check_params, load_manifest
from chunk_store.framework import runtime
from chunk_store.framework.runtime import resolve_device
from chunk_store.framework.stage import RunInfo, Stage, Unit, config_from_args, run_stage
from index_builder.index.determinism import fixed_search_params, make_deterministic, stable_infos
from index_builder.embed.stage import num_chunks, open_embeddings
from index_builder.index.update import add_new_vectors
from index_builder.index.faiss_params import apply_search_params, drop_pq_table
from index_builder.index.merge_parts import MERGE_MODES, MergeConfig, commit_and_merge, merge_summary
from index_builder.index import parts as index_parts
from index_builder.index.faiss_compat import patch_autofaiss_for_faiss_114
from index_builder.index.plan import IndexPlan, choose_index, parse_memory
from index_builder.index.recall import measure_recall, query_split

log = logging.getLogger(__name__)

METRIC = "l2"
RESULT_KEYS = ("index_key", "max_index_memory", "metric", "embed_id", "memory_mappable",
               "max_query_ms", "deterministic", "hnsw_max", "train_per_centroid")


# ----------------------------------------------------------------------------- loading


def index_identity(manifest: dict[str, Any]) -> str:
    """What a knn result depends on: the index build (its key and when it finished)."""
    rec = manifest.get("stages", {}).get("index", {})
    return f"{rec.get('stats', {}).get('index_key')}@{rec.get('finished')}"


def load_index(db: str | os.PathLike, mmap: bool = True) -> Any:
    """Read the index (memory-mapped where its type allows) and apply autofaiss's tuned params.

    A parts index (index_builder.index.parts) is opened with every part's lists mapped read-only,
    whatever ``mmap`` says: its memory is the quantizer, not the codes."""
    import faiss

    paths = DBLayout(db)
    path, infos_path = paths.index, paths.index_infos
    parts = index_parts.listed_parts(paths)
    if parts is not None:
        index = index_parts.open_parts(paths, parts)
    elif not path.exists():
        raise UserError(f"missing index {path}: run `retro-build-index index --db {db}` first")
    else:
        index = None
    if parts is None and mmap:
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:  # e.g. HNSW: not memory-mappable, read it whole
            index = None
    if parts is None and index is None:
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise UserError(f"corrupt index {path}: {str(e).splitlines()[0]}") from None
    drop_pq_table(index)
    param = None
    if infos_path.exists():
        try:
            param = json.loads(infos_path.read_text()).get("index_param")
        except json.JSONDecodeError:
            param = None
    apply_search_params(index, param, strict=False)
    return index


# ----------------------------------------------------------------------------- the stage


def faiss_gpu_available() -> bool:
    """faiss was built with GPU support and sees a GPU (faiss-gpu; faiss-cpu never does)."""
    try:
        import faiss

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:
        return False


@dataclass(frozen=True)
class IndexConfig:
    """The index stage's options (the CLI's defaults come from here)."""

    max_index_memory: str = "4G"  # the largest index autofaiss may build
    current_memory: str = "16G"  # memory autofaiss may use while training
    index_key: str | None = None  # force a faiss factory string
    max_query_ms: float = 2.0  # autofaiss tunes nprobe/efSearch to this time per query
    memory_mappable: bool = False
    recall_sample: int = 1000
    distributed: str | None = None  # "pyspark": autofaiss's Spark mode
    temporary_indices_folder: str | None = None
    threads: int | None = None
    device: str = "auto"
    deterministic: bool = False  # one thread, fixed search parameters: the same bytes every build
    rebuild: bool = False  # train a new index even where the trained one could take the new vectors
    hnsw_max: int = 1_000_000  # past this many vectors: a bounded-training IVF key (index_plan)
    train_per_centroid: int = 64  # IVF k-means sample: vectors a centroid
    merge_parts: str = "auto"  # merge a parts index into one part: auto | never | always (merge_parts)


class IndexStage(Stage[IndexConfig]):
    """Train embeddings -> one faiss index (one unit: autofaiss builds it whole), then its recall."""

    name = "index"
    packages = ("faiss", "autofaiss")
    result_keys = RESULT_KEYS
    progress_unit = "index"

    def params(self, manifest: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        embed = manifest["stages"]["embed"]
        if cfg.distributed == "pyspark":
            _require_pyspark()
            if cfg.deterministic:
                raise UserError("index: --deterministic builds on one machine and thread: drop --distributed")
        self.params_ = {
            "index_key": cfg.index_key,
            "max_index_memory": cfg.max_index_memory,
            "current_memory": cfg.current_memory,
            "metric": METRIC,
            "memory_mappable": bool(cfg.memory_mappable) or cfg.distributed == "pyspark",
            "max_query_ms": float(cfg.max_query_ms),
            "distributed": cfg.distributed,
            "embed_id": f"{embed['params'].get('embedder_id')}@{embed.get('finished')}",
            "dim": embed["params"].get("dim"),
            "deterministic": bool(cfg.deterministic),
            "hnsw_max": int(cfg.hnsw_max),
            "train_per_centroid": int(cfg.train_per_centroid),
        }
        self.plan = self._plan(manifest)
        return self.params_

    def _plan(self, manifest: dict[str, Any]) -> IndexPlan | None:
        """The chooser's plan; None where --index-key or --distributed leaves it to autofaiss."""
        cfg = self.cfg
        if cfg.index_key or cfg.distributed:
            return None
        n = int(manifest.get("counts", {}).get("train", {}).get("chunks") or 0)
        dim = int(manifest["stages"]["embed"]["params"].get("dim") or 0)
        if n <= 0 or dim <= 0:
            return None
        if cfg.hnsw_max < 0 or cfg.train_per_centroid < 39:
            raise UserError("index: --hnsw-max must be >= 0 and --train-per-centroid >= 39 (faiss's minimum)")
        return choose_index(n, dim, parse_memory(cfg.max_index_memory), parse_memory(cfg.current_memory),
                            hnsw_max=cfg.hnsw_max, per_centroid=cfg.train_per_centroid)

    def check(self, recorded: dict[str, Any], params: dict[str, Any], manifest: dict[str, Any]) -> None:
        """Only a finished index binds a re-run: a partial build leaves nothing to reuse. After
        ``add`` (the same embedder, more chunks embedded) the trained index takes the new vectors
        (index_builder.index.update); ``--rebuild`` trains a new one."""
        self.update = False
        if not recorded.get("finished"):
            # a listed parts index is whole (its list is written last): a stopped add resumes as an add
            listed = index_parts.listed_parts(self.paths)
            if listed and not self.cfg.rebuild and index_parts.has_index(self.paths):
                check_params(recorded.get("params"), params, self.name,
                             keys=[k for k in self.result_keys if k != "embed_id"])
                self.update = sum(p.count for p in listed) != num_chunks(self.db, manifest, "train")
            return
        if not index_parts.has_index(self.paths):
            return
        if self.cfg.rebuild:
            recorded.clear()  # a new build: nothing of the old one binds it
            self.rebuild_over = True  # begin() removes the old index's files
            return
        before, now = recorded["params"].get("embed_id"), params["embed_id"]
        # embed_id carries the embed stage's finish time, to the second: an add finishing within
        # the second of the first embed leaves it unchanged, so the grown train split says it too
        ntotal = recorded.get("stats", {}).get("ntotal")
        grown = ntotal is not None and ntotal != num_chunks(self.db, manifest, "train")
        if before != now or grown:
            if str(before).split("@")[0] != str(now).split("@")[0]:
                raise UserError("index: the embeddings changed since the index was built "
                                f"(built from {before}, now {now}); delete DB/index and re-run index, "
                                "or run it with --rebuild")
            self.update = True  # the database grew: add the new vectors
        check_params(recorded.get("params"), params, self.name, keys=[k for k in self.result_keys if k != "embed_id"])

    def complete(self, manifest: dict[str, Any]) -> bool:
        if getattr(self, "update", False):  # the recorded size: an add rewrites it when it finishes
            ntotal = manifest.get("stages", {}).get("index", {}).get("stats", {}).get("ntotal")
            return ntotal == num_chunks(self.db, manifest, "train")
        listed = index_parts.listed_parts(self.paths) or []  # --merge-parts always: 2+ parts are work
        return index_parts.has_index(self.paths) and not (self.cfg.merge_parts == "always" and len(listed) > 1)

    def outputs(self, manifest: dict[str, Any]) -> list[Path]:
        parts = index_parts.listed_parts(self.paths)
        if parts is not None:
            return index_parts.part_files(self.paths, parts) + [self.paths.index_infos]
        return [self.paths.index, self.paths.index_infos]

    @property
    def as_parts(self) -> bool:
        """This run writes parts: a new IVF build, or an add to an index that is already parts
        (an add to a single-file index keeps its file: index_builder.index.update)."""
        if getattr(self, "update", False):
            return index_parts.listed_parts(self.paths) is not None
        return self.plan is not None and self.plan.builder == "ivf"

    @property
    def keeps_listed(self) -> bool:
        """The listed parts stay and only rows past them become parts: an add, or a re-run of a
        build whose list was written (its parts, a merged one too, are not planned again)."""
        return getattr(self, "update", False) or (not self.cfg.rebuild and bool(index_parts.listed_parts(self.paths))
                                                  and index_parts.has_index(self.paths))

    def skip_message(self, stats: dict[str, Any]) -> str:
        return f"index: already done ({stats.get('index_key')}, {stats.get('recall')})"

    def temp_folders(self) -> list[tuple[Path, tuple[str, ...]]]:
        return [(self.paths.index_dir, ("",))]

    def begin(self, manifest: dict[str, Any]) -> None:
        """A parts build: rank 0 trains the empty IVF (unless a partial run left one of this
        plan's shape), every rank waits for it; --rebuild first removes the old index."""
        if runtime.rank() == 0:
            if getattr(self, "rebuild_over", False):
                index_parts.remove_index(self.paths)
            if (self.as_parts and not getattr(self, "update", False)
                    and not index_parts.trained_fits(self.paths, self.plan.key, int(self.params_["dim"]))):
                self.setup()
                index_parts.remove_index(self.paths)  # parts filled with another quantizer
                self._train_ivf()
        runtime.barrier()

    def units(self, manifest: dict[str, Any]) -> list[Unit]:
        if not self.as_parts:
            return [Unit(0, 1)]
        _, todo = index_parts.next_parts(self.paths, num_chunks(self.db, manifest, "train"),
                                         runtime.world_size(), grow=self.keeps_listed)
        return [Unit(i, p.count, p) for i, p in enumerate(todo)]

    def unit_done(self, unit: Unit) -> bool:
        if unit.payload is None:
            return False  # autofaiss starts over: a partial build leaves nothing reusable
        return index_parts.part_done(self.paths, unit.payload)

    def setup(self) -> None:
        self.threads = self.cfg.threads or os.cpu_count() or 1
        self.shim = patch_autofaiss_for_faiss_114()
        self.use_gpu = self.cfg.device != "cpu" and faiss_gpu_available() and not self.cfg.deterministic

    def compute(self, unit: Unit) -> None:
        """One part of a parts index (index_builder.index.parts); else autofaiss into a temporary
        folder, both files renamed into place (after ``add``: the new vectors appended to it)."""
        cfg = self.cfg
        if unit.payload is not None:  # a part of a parts index
            t0 = time.time()
            index_parts.fill_part(self.paths, open_embeddings(self.db, "train"), unit.payload,
                                  bf16=self._ivf_device()[1])
            self.build_seconds = getattr(self, "build_seconds", 0.0) + time.time() - t0
            return
        if getattr(self, "update", False):
            t0 = time.time()
            grown = add_new_vectors(self.db, 1 if cfg.deterministic else self.threads)
            self.added, self.codec_check = grown["added"], grown["codec_check"]
            self.build_seconds = time.time() - t0
            self.build_stats = {}
            return
        tmp_dir = self.paths.index_build_dir()
        tmp_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        self.build_stats: dict[str, Any] = {}
        self._build_autofaiss(tmp_dir)
        if cfg.deterministic:
            make_deterministic(tmp_dir / self.paths.index.name, tmp_dir / self.paths.index_infos.name)
        stable_infos(tmp_dir / self.paths.index_infos.name, self.paths.index)
        self.build_seconds = time.time() - t0
        os.replace(tmp_dir / self.paths.index_infos.name, self.paths.index_infos)
        os.replace(tmp_dir / self.paths.index.name, self.paths.index)
        shutil.rmtree(tmp_dir, ignore_errors=True)

    def _ivf_device(self) -> tuple[str, bool]:
        """(device, bf16) for the IVF's k-means and assignment; sets the thread counts."""
        import faiss
        import torch

        from index_builder.embed.embedder import default_dtype

        faiss.omp_set_num_threads(1 if self.cfg.deterministic else self.threads)
        torch.set_num_threads(1 if self.cfg.deterministic else self.threads)
        device = "cpu" if self.cfg.deterministic else str(resolve_device(self.cfg.device))
        bf16 = not self.cfg.deterministic and device == "cpu" and default_dtype("cpu") == "bf16"
        return device, bf16

    def _train_ivf(self) -> None:
        """The chooser's IVF key trained (bounded sample) and written empty: trained.index."""
        from index_builder.index.ivf_build import build_ivf

        t0 = time.time()
        device, bf16 = self._ivf_device()
        index, stats = build_ivf(open_embeddings(self.db, "train"), self.plan, device=device,
                                 faiss_gpu=self.use_gpu, bf16=bf16, train_only=True)
        index_parts.write_trained(index, self.paths)
        stats["train_seconds"] = round(time.time() - t0, 2)
        self.build_stats = stats  # a resumed run that did not train reports none

    def _build_autofaiss(self, tmp_dir: Path) -> None:
        """autofaiss's build (its key choice unless --index-key) into ``tmp_dir``."""
        from autofaiss import build_index

        cfg, params = self.cfg, self.params_
        kwargs: dict[str, Any] = dict(
            embeddings=str(self.paths.embeddings_dir("train")),
            index_path=str(tmp_dir / self.paths.index.name),
            index_infos_path=str(tmp_dir / self.paths.index_infos.name),
            file_format="npy",
            metric_type=METRIC,
            max_index_memory_usage=params["max_index_memory"],
            current_memory_available=params["current_memory"],
            index_key=params["index_key"],
            nb_cores=1 if cfg.deterministic else self.threads,
            use_gpu=self.use_gpu,
            should_be_memory_mappable=params["memory_mappable"],
            max_index_query_time_ms=params["max_query_ms"],
            verbose=logging.WARNING,
        )
        if cfg.distributed == "pyspark":
            # executors must run a Python that has autofaiss & co.: this one, unless the user (or
            # the cluster's config) says otherwise; only affects a session created from here on
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            kwargs["distributed"] = "pyspark"
            kwargs["temporary_indices_folder"] = (cfg.temporary_indices_folder
                                                  or str((self.paths.index_dir / "tmp").resolve()))
        try:
            build_index(**kwargs)
        except (ValueError, RuntimeError, AssertionError) as e:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise UserError(f"index: autofaiss failed: {type(e).__name__}: "
                            f"{str(e).splitlines()[0]}") from None
        if not (tmp_dir / self.paths.index.name).exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise UserError(
                "index: autofaiss built no index (not enough memory for the chosen index type? "
                f"--current-memory is {params['current_memory']}, --max-index-memory "
                f"{params['max_index_memory']}; see its log above)")

    def finalize(self, manifest: dict[str, Any], run: RunInfo) -> dict[str, Any]:
        """Load the new index and measure its recall against exact search."""
        import faiss
        import torch

        if self.as_parts:
            self._write_parts_list()
        else:
            index_parts.remove_parts(self.paths)  # a single-file build replaced a parts index
        infos = json.loads(self.paths.index_infos.read_text())
        if not hasattr(self, "threads"):  # rank 0 had no unit to compute (a resumed run)
            self.setup()
        self.build_seconds = getattr(self, "build_seconds", 0.0)
        torch.set_num_threads(self.threads), faiss.omp_set_num_threads(self.threads)
        loaded = load_index(self.db)
        sample = int(self.cfg.recall_sample or 1000)
        from index_builder.knn.rerank import default_factor

        rerank = default_factor(loaded)  # what the knn stage's default will do with this index
        queries, split = query_split(self.db)
        recall = measure_recall(self.db, loaded, sample=sample, device=str(resolve_device(self.cfg.device)),
                                rerank=rerank)
        return {
            "index_key": infos.get("index_key"),
            "index_param": infos.get("index_param"),
            "ntotal": int(loaded.ntotal),
            "size_bytes": int(infos.get("size in bytes") or self.paths.index.stat().st_size),
            "parts": len(infos.get("parts", [])) or None,
            "build_seconds": round(self.build_seconds, 2),
            "recall": recall,
            "recall_sample": min(sample, sum(s.shape[0] for s in queries)),
            "recall_queries": "val" if split == "val" else "train, own id left out",
            "rerank": rerank,
            "use_gpu": self.use_gpu,
            "opq_shim": self.shim,
            "added_without_training": getattr(self, "added", None),
            "added_codec_check": getattr(self, "codec_check", None),
            "merge": getattr(self, "merge", None),
            "plan": self.plan.as_dict() if self.plan is not None else {"builder": "autofaiss", "key": None,
                                                                      "reason": "--index-key or --distributed"},
            "build": getattr(self, "build_stats", None) or {},
        }

    def _write_parts_list(self) -> None:
        """index_infos.json naming the listed parts and this run's new ones (rank 0, all whole)."""
        import faiss

        listed, new = index_parts.next_parts(self.paths, num_chunks(self.db, load_manifest(self.db), "train"),
                                             runtime.world_size(), grow=self.keeps_listed)
        infos = index_parts.read_infos(self.paths) if listed else {
            "index_key": self.plan.key if self.plan else None, "builder": "retro ivf_build",
            "index_param": fixed_search_params(faiss.read_index(str(self.paths.index_trained)))}
        update = getattr(self, "update", False)
        self.added = sum(p.count for p in new) if update else None
        self.codec_check = index_parts.added_codec_check(self.paths, open_embeddings(self.db, "train"),
                                                         new if update else [])
        self.merge = commit_and_merge(self.paths, listed, new, infos, MergeConfig(self.cfg.merge_parts))

    def report(self, stats: dict[str, Any], run: RunInfo) -> str:
        """Rank 0's figures; another rank only waited for it (its stats are empty: finalize and
        the one unit ran on rank 0), so it says so rather than fail on a missing key."""
        if run.rank != 0 and (run.units_done or run.units_reused):
            return (f"index: rank {run.rank} of {run.world_size} filled {run.units_done} part(s) "
                    f"({run.units_reused} already whole); rank 0 recorded the index")
        if run.rank != 0:
            return f"index: built by rank 0 (rank {run.rank} of {run.world_size} waited)"
        return (f"index: {stats['index_key']} over {stats['ntotal']} chunks in "
                f"{stats['build_seconds']:.1f}s; "
                + ", ".join(f"{k}={v:.3f}" for k, v in stats["recall"].items()) + " (vs exact search)"
                + merge_summary(stats.get("merge")))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """index's own options (--device and --threads are shared: index_builder.cli)."""
    d = IndexConfig
    g = parser.add_argument_group("index")
    g.add_argument("--max-index-memory", default=d.max_index_memory,
                   help="the largest index autofaiss may build (e.g. 4G; smaller -> compressed index)")
    g.add_argument("--current-memory", default=d.current_memory,
                   help="memory autofaiss may use while training the index")
    g.add_argument("--index-key", default=d.index_key,
                   help="force a faiss index factory string (e.g. 'IVF4096,PQ64', 'HNSW32', 'Flat')")
    g.add_argument("--rebuild", action="store_true", default=d.rebuild,
                   help="train a new index; default after `add`: add the new chunks' vectors to the "
                        "trained index")
    g.add_argument("--max-query-ms", type=float_in(0.0, 1e6, low_open=True), default=d.max_query_ms,
                   help="autofaiss tunes search parameters (nprobe/efSearch) to this time per query; "
                        "lower = faster knn and lookups, higher = better recall")
    g.add_argument("--memory-mappable", action="store_true", default=d.memory_mappable,
                   help="only index types that the Retriever can memory-map (IVF families)")
    g.add_argument("--recall-sample", type=int, default=d.recall_sample,
                   help="train chunks used to measure the index's recall against exact search")
    g.add_argument("--deterministic", action="store_true", default=d.deterministic,
                   help="build on one thread with fixed search parameters (no timing): two builds from "
                        "the same embeddings give the same bytes (docs/RELIABILITY.md)")
    g.add_argument("--hnsw-max", type=int, default=d.hnsw_max,
                   help="past this many train chunks the index is a bounded-training IVF key "
                        "(IVF_HNSW32 + SQ8 or PQ, OPQ where it pays) instead of autofaiss's choice")
    g.add_argument("--train-per-centroid", type=int, default=d.train_per_centroid,
                   help="IVF: training vectors sampled per centroid (bounds the k-means' time)")
    g.add_argument("--merge-parts", default=d.merge_parts, choices=MERGE_MODES,
                   help="merge an IVF index's parts into one on-disk part: auto (after ranks filled "
                        "parts from scratch, or past 16 parts after add), always, never")
    g.add_argument("--distributed", default=d.distributed, choices=["pyspark"],
                   help="build with autofaiss's Spark mode (needs pip install '.[spark]')")
    g.add_argument("--temporary-indices-folder", default=d.temporary_indices_folder,
                   help="shared folder for Spark's partial indices (default: DB/index/tmp)")


SHARED_OPTIONS = ("device", "threads")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The CLI entry: ``retro-build-index index``."""
    return run_stage(IndexStage(args.db, config_from_args(IndexConfig, args)))


def _require_pyspark() -> None:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise UserError("--distributed pyspark needs pyspark: pip install 'retro[spark]' "
                        "(and a Spark session or cluster, see the README)") from None
