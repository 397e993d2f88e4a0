"""knn: precompute every chunk's k nearest train chunks from other documents.

Train chunks search the train index for k + extra candidates, then drop the chunk itself and
every candidate from its own document (otherwise the model learns to copy its own future) and
keep the k nearest; rows left short are searched again with more candidates before being padded
with -1. Val chunks search the same train index (their documents are not in it), no exclusion.

``--exact`` (the default on CUDA when faiss has no GPU support) replaces the index by an exact
search: torch matmul + top-k over tiles of the embedding matrix, memory bounded, so a GPU user
without faiss-gpu still precomputes fast. Same exclusions, same output.

Work is cut into shards of queries (``DB/<split>/knn_shards/``), spread over torchrun ranks,
each written atomically: a re-run redoes only the missing shards; rank 0 then assembles
``neighbours.npy`` and ``neighbour_distances.npy`` (see docs/DB_FORMAT.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from chunk_store.manifest import (
    DBError,
    atomic_save_npy,
    check_params,
    load_manifest,
    now_iso,
    open_npy,
    record_stage,
    require_stage,
    versions,
)
from index_builder import dist
from index_builder.embed import DEFAULT_SHARD_SIZE, SPLITS, open_embeddings, read_rows, shard_ranges

MAX_CANDIDATES = 4096  # escalation cap for rows whose candidates are all excluded
RESULT_KEYS = ("k", "extra", "method", "index_id")


# ----------------------------------------------------------------------------- exact search


@dataclass(frozen=True)
class ExactSearchConfig:
    """Tile sizes bound memory: a (query_block x tile_rows) fp32 distance block at a time."""

    device: str = "cpu"
    tile_rows: int = 65536
    query_block: int = 4096


def exact_search(
    queries: np.ndarray,
    database: Sequence[np.ndarray] | np.ndarray,
    k: int,
    cfg: ExactSearchConfig = ExactSearchConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared-L2 k-NN of ``queries`` (q, d) in ``database`` (a list of (n_i, d) shards).

    Loops over tiles of the database (each read once, e.g. from float16 memmaps, and moved to
    ``cfg.device``) and, inside, over blocks of queries, keeping a running top-k per query.
    Returns (ids int64 (q, k), distances float32 (q, k)); -1 / inf where the database is smaller
    than k. Same code on CPU and CUDA; fp32 arithmetic (TF32 off) for exactness.
    """
    import torch

    shards = [database] if isinstance(database, np.ndarray) else list(database)
    device = torch.device(cfg.device)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    nq = q.shape[0]
    best_d = torch.full((nq, k), float("inf"), device=device)
    best_i = torch.full((nq, k), -1, dtype=torch.long, device=device)
    if nq == 0 or k == 0:
        return best_i.cpu().numpy(), best_d.cpu().numpy()
    qt = torch.from_numpy(q).to(device)
    q_norm = (qt * qt).sum(dim=1)
    offset = 0
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            for shard in shards:
                for t0 in range(0, shard.shape[0], cfg.tile_rows):
                    # a private copy (memmaps are read-only), moved in its stored dtype, then fp32
                    tile_np = np.array(shard[t0:t0 + cfg.tile_rows], copy=True)
                    tile = torch.from_numpy(tile_np).to(device).float()
                    t_norm = (tile * tile).sum(dim=1)
                    kk = min(k, tile.shape[0])
                    for b0 in range(0, nq, cfg.query_block):
                        b1 = min(b0 + cfg.query_block, nq)
                        d = (q_norm[b0:b1, None] + t_norm[None, :]
                             - 2.0 * (qt[b0:b1] @ tile.T)).clamp_(min=0.0)
                        td, ti = torch.topk(d, kk, dim=1, largest=False, sorted=True)
                        cat_d = torch.cat([best_d[b0:b1], td], dim=1)
                        cat_i = torch.cat([best_i[b0:b1], ti + offset + t0], dim=1)
                        # stable merge: ties keep the lower chunk id (earlier shard/tile first)
                        order = torch.argsort(cat_d, dim=1, stable=True)[:, :k]
                        best_d[b0:b1] = torch.gather(cat_d, 1, order)
                        best_i[b0:b1] = torch.gather(cat_i, 1, order)
                offset += shard.shape[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return best_i.cpu().numpy(), best_d.cpu().numpy()


# ----------------------------------------------------------------------------- exclusion


def select_neighbours(
    cand_ids: np.ndarray,
    cand_dist: np.ndarray,
    k: int,
    query_ids: np.ndarray | None = None,
    query_docs: np.ndarray | None = None,
    db_docs: np.ndarray | None = None,
    exclude_docs: Sequence[set[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep, per row, the first k candidates that are not the query itself nor from its document.

    ``cand_*`` are (q, c) sorted by distance, ids -1 for none. ``query_ids``/``query_docs`` enable
    the self / same-document exclusion (train); ``exclude_docs`` adds per-row doc-id sets
    (the Retriever's option). Returns (ids (q, k) -1 padded, distances (q, k) inf padded,
    short: bool (q,) rows that found fewer than k).
    """
    valid = cand_ids >= 0
    if query_ids is not None:
        valid &= cand_ids != query_ids[:, None]
    if db_docs is not None and (query_docs is not None or exclude_docs is not None):
        cand_docs = np.asarray(db_docs[np.clip(cand_ids, 0, None).ravel()]).reshape(cand_ids.shape)
        if query_docs is not None:
            valid &= cand_docs != query_docs[:, None]
        if exclude_docs is not None:
            for row, docs in enumerate(exclude_docs):
                if docs:
                    valid[row] &= ~np.isin(cand_docs[row], np.fromiter(docs, dtype=np.int64))
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(cand_ids, order, axis=1).astype(np.int64)
    dist_ = np.take_along_axis(cand_dist, order, axis=1).astype(np.float32)
    keep = np.take_along_axis(valid, order, axis=1)
    if ids.shape[1] < k:  # fewer candidates than k at all
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        dist_ = np.pad(dist_, ((0, 0), (0, pad)), constant_values=np.inf)
        keep = np.pad(keep, ((0, 0), (0, pad)), constant_values=False)
    ids[~keep] = -1
    dist_[~keep] = np.inf
    return ids, dist_, ~keep.all(axis=1)


SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def search_with_exclusion(
    search: SearchFn,
    queries: np.ndarray,
    k: int,
    extra: int,
    ntotal: int,
    query_ids: np.ndarray | None = None,
    query_docs: np.ndarray | None = None,
    db_docs: np.ndarray | None = None,
    exclude_docs: Sequence[set[int]] | None = None,
    max_candidates: int = MAX_CANDIDATES,
) -> tuple[np.ndarray, np.ndarray]:
    """k + extra candidates, exclusions, then re-search short rows with 4x the candidates."""
    c = min(k + extra, ntotal)
    cand_i, cand_d = search(queries, c)
    ids, dists, short = select_neighbours(cand_i, cand_d, k, query_ids, query_docs, db_docs,
                                          exclude_docs)
    while short.any() and c < min(ntotal, max_candidates):
        c = min(c * 4, ntotal, max_candidates)
        rows = np.flatnonzero(short)
        cand_i, cand_d = search(queries[rows], c)
        r_ids, r_d, r_short = select_neighbours(
            cand_i, cand_d, k,
            None if query_ids is None else query_ids[rows],
            None if query_docs is None else query_docs[rows],
            db_docs,
            None if exclude_docs is None else [exclude_docs[r] for r in rows])
        ids[rows], dists[rows] = r_ids, r_d
        short[rows] = r_short
    return ids, dists


# ----------------------------------------------------------------------------- the stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("knn")
    g.add_argument("--k", type=int, default=2, help="neighbours per chunk")
    g.add_argument("--extra", type=int, default=10,
                   help="extra candidates searched to survive the self/same-document exclusion")
    g.add_argument("--exact", action=argparse.BooleanOptionalAction, default=None,
                   help="exact torch search instead of the index (default: on with CUDA and no faiss-gpu)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where BERT (embed) and exact search (knn --exact) run; auto = cuda if available")
    g.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="chunks per shard (the unit of resume and of torchrun sharding)")
    g.add_argument("--threads", type=int, default=None,
                   help="faiss / torch CPU threads (default: all cores)")
    g.add_argument("--exact-pass-rows", type=int, default=None,
                   help="--exact: queries sharing one pass over the embeddings "
                        "(default 262144 on CUDA, one shard on CPU)")


def _faiss_has_gpu() -> bool:
    try:
        import faiss

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:
        return False


def knn_shard_paths(db: Path, split: str, i: int) -> tuple[Path, Path]:
    folder = db / split / "knn_shards"
    return folder / f"ids_{i:06d}.npy", folder / f"dist_{i:06d}.npy"


def _shard_ok(paths: tuple[Path, Path], rows: int, k: int) -> bool:
    for p in paths:
        if not p.exists():
            return False
        try:
            a = np.load(p, mmap_mode="r", allow_pickle=False)
        except Exception:
            return False
        if a.shape != (rows, k):
            return False
    return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from index_builder.embed import resolve_device
    from index_builder.faiss_index import index_identity, load_index

    db = Path(args.db)
    manifest = load_manifest(db)
    require_stage(manifest, "index", "knn")
    k = int(getattr(args, "k", 2))
    extra = int(getattr(args, "extra", 10))
    if k < 1:
        raise DBError(f"--k must be at least 1, not {k}")
    if extra < 0:
        raise DBError(f"--extra must be >= 0, not {extra}")
    shard_size = int(getattr(args, "shard_size", None) or DEFAULT_SHARD_SIZE)
    threads = getattr(args, "threads", None) or os.cpu_count() or 1
    device = resolve_device(getattr(args, "device", "auto"))
    exact = getattr(args, "exact", None)
    if exact is None:
        exact = device.startswith("cuda") and not _faiss_has_gpu()
    params = {"k": k, "extra": extra, "method": "exact" if exact else "index",
              "index_id": index_identity(manifest), "shard_size": shard_size}
    recorded = manifest["stages"].get("knn")
    if recorded:
        check_params(recorded.get("params"), params, "knn", keys=RESULT_KEYS + ("shard_size",))
        if recorded.get("finished") and all(
                (db / s / "neighbours.npy").exists() for s in SPLITS if _count(db, s)):
            print("knn: already done")
            return {"skipped": True, **recorded.get("stats", {})}

    rank, world = dist.rank(), dist.world_size()
    started = (recorded or {}).get("started") or now_iso()
    if rank == 0:
        manifest = record_stage(db, "knn", params=params, started=started, finished=None,
                                versions_=versions("torch", "faiss"), manifest=manifest)
    import faiss

    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)
    train_docs = open_npy(db / "train" / "doc_ids.npy")  # memory-mapped: random access via page cache
    ntotal = int(train_docs.shape[0])
    train_emb = open_embeddings(db, "train")
    if sum(a.shape[0] for a in train_emb) != ntotal:
        raise DBError(f"knn: train has {ntotal} chunks but its embeddings have "
                      f"{sum(a.shape[0] for a in train_emb)} rows: re-run embed")

    search: SearchFn
    if exact:
        cfg = ExactSearchConfig(device=device)

        def search(q: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
            return exact_search(q, train_emb, c, cfg)
    else:
        index = load_index(db)
        if index.ntotal != ntotal:
            raise DBError(f"knn: the index holds {index.ntotal} vectors but train has {ntotal} "
                          "chunks: re-run index")

        def search(q: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
            d, i = index.search(np.ascontiguousarray(q, dtype=np.float32), c)
            return i.astype(np.int64), d.astype(np.float32)

    pass_rows = getattr(args, "exact_pass_rows", None) or (262144 if device.startswith("cuda") else 0)
    todo, reused = [], 0
    for split in SPLITS:
        for i, (a, b) in enumerate(shard_ranges(_count(db, split), shard_size)):
            if i % world != rank:
                continue
            if _shard_ok(knn_shard_paths(db, split, i), b - a, k):
                reused += 1
            else:
                todo.append((split, i, a, b))
    dist.clean_stale_tmp(*(db / s / "knn_shards" for s in SPLITS))
    dist.clean_stale_tmp(*(db / s for s in SPLITS), prefixes=("neighbours.npy", "neighbour_distances.npy"))
    t0 = time.time()
    short_rows = 0
    written = 0
    emb_cache: dict[str, list[np.ndarray]] = {"train": train_emb}
    docs_cache: dict[str, np.ndarray] = {"train": train_docs}
    with tqdm(total=sum(b - a for *_, a, b in todo), unit="chunk",
              desc=f"knn[{rank}/{world}]" if world > 1 else "knn", disable=not todo,
              dynamic_ncols=True) as bar:
        for group in _groups(todo, pass_rows if exact else 0):
            split = group[0][0]
            if split not in emb_cache:
                emb_cache[split] = open_embeddings(db, split)
                docs_cache[split] = open_npy(db / split / "doc_ids.npy")
            blocks = [read_rows(emb_cache[split], a, b) for _, _, a, b in group]
            first = _first_pass(search, blocks, min(k + extra, ntotal)) if len(group) > 1 else None
            for j, ((_, i, a, b), queries) in enumerate(zip(group, blocks)):
                fn = search if first is None else _replay(search, first[j], min(k + extra, ntotal))
                ids, dists = _search_block(fn, queries, k, extra, ntotal, a, b, split == "train",
                                           docs_cache[split], train_docs)
                short_rows += int((ids < 0).any(axis=1).sum())
                p_ids, p_dist = knn_shard_paths(db, split, i)
                atomic_save_npy(p_dist, dists)
                atomic_save_npy(p_ids, ids)
                bar.update(b - a)
                written += 1
                dist.kill_self_if("RETRO_TEST_KILL_KNN_AFTER", written)
    seconds = time.time() - t0
    dist.barrier()
    summary: dict[str, Any] = {"k": k, "method": params["method"], "seconds": round(seconds, 2),
                               "shards_reused": reused, "world_size": world}
    if rank == 0:
        for split in SPLITS:
            n = _count(db, split)
            if n == 0:
                continue
            stats = _assemble(db, split, n, k, shard_size, train_docs)
            summary[split] = stats
        manifest = load_manifest(db)
        record_stage(db, "knn", params=params, started=started, finished=now_iso(), stats=summary,
                     versions_=versions("torch", "faiss"), manifest=manifest)
    print(f"knn: {params['method']} search, k={k}, done in {seconds:.1f}s "
          f"({reused} shards reused, {short_rows} rows with fewer than k neighbours)")
    return summary


def _groups(todo: list[tuple[str, int, int, int]], max_rows: int) -> list[list[tuple[str, int, int, int]]]:
    """Consecutive shards of one split, up to max_rows queries a group (0: one shard a group).

    The exact search reads the whole database once per group, so on a GPU many shards of
    queries share one pass over the embeddings; results are still written shard by shard.
    """
    groups: list[list[tuple[str, int, int, int]]] = []
    rows = 0
    for job in todo:
        n = job[3] - job[2]
        if groups and groups[-1][0][0] == job[0] and rows + n <= max_rows:
            groups[-1].append(job)
            rows += n
        else:
            groups.append([job])
            rows = n
    return groups


def _first_pass(search: SearchFn, blocks: list[np.ndarray], c: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One search for all blocks' queries, split back per block."""
    ids, d = search(np.concatenate(blocks), c)
    out, start = [], 0
    for blk in blocks:
        out.append((ids[start:start + len(blk)], d[start:start + len(blk)]))
        start += len(blk)
    return out


def _replay(search: SearchFn, first: tuple[np.ndarray, np.ndarray], c: int) -> SearchFn:
    """A search that answers its first call from precomputed candidates, then searches."""
    used = [False]

    def fn(q: np.ndarray, cc: int) -> tuple[np.ndarray, np.ndarray]:
        if not used[0] and cc == c and len(q) == len(first[0]):
            used[0] = True
            return first
        return search(q, cc)

    return fn


def _search_block(search: SearchFn, queries: np.ndarray, k: int, extra: int, ntotal: int,
                  a: int, b: int, is_train: bool, docs: np.ndarray,
                  train_docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if is_train:
        return search_with_exclusion(search, queries, k, extra, ntotal,
                                     query_ids=np.arange(a, b, dtype=np.int64),
                                     query_docs=np.asarray(docs[a:b]), db_docs=train_docs)
    return search_with_exclusion(search, queries, k, extra, ntotal)


def _count(db: Path, split: str) -> int:
    path = db / split / "doc_ids.npy"
    return int(np.load(path, mmap_mode="r").shape[0]) if path.exists() else 0


def _assemble(db: Path, split: str, n: int, k: int, shard_size: int,
              train_docs: np.ndarray) -> dict[str, Any]:
    """Concatenate the shards into neighbours.npy / neighbour_distances.npy (atomic), then
    delete the shards. Also checks the exclusion invariant on the result."""
    folder = db / split
    tmp_ids = folder / f".neighbours.npy.tmp-{os.getpid()}"
    tmp_d = folder / f".neighbour_distances.npy.tmp-{os.getpid()}"
    out_i = np.lib.format.open_memmap(tmp_ids, mode="w+", dtype=np.int64, shape=(n, k))
    out_d = np.lib.format.open_memmap(tmp_d, mode="w+", dtype=np.float32, shape=(n, k))
    missing = 0
    for i, (a, b) in enumerate(shard_ranges(n, shard_size)):
        paths = knn_shard_paths(db, split, i)
        if not _shard_ok(paths, b - a, k):
            raise DBError(f"knn: shard {paths[0]} is missing after every rank finished; re-run knn")
        ids = np.load(paths[0])
        out_i[a:b] = ids
        out_d[a:b] = np.load(paths[1])
        missing += int((ids < 0).sum())
    out_i.flush()
    out_d.flush()
    del out_i, out_d
    os.replace(tmp_d, folder / "neighbour_distances.npy")
    os.replace(tmp_ids, folder / "neighbours.npy")
    shutil.rmtree(folder / "knn_shards", ignore_errors=True)
    return {"chunks": n, "missing_neighbours": missing}
