"""knn: precompute every chunk's k nearest train chunks from other documents.

Train chunks search the train index for k + extra candidates, then drop the chunk itself and
every candidate from any document that shares a training sequence with it (Megatron's rule:
sequences cross document boundaries, so excluding only the chunk's own document would let it
retrieve a later part of its own training sequence, and the model would learn to copy its own
future) and keep the k nearest; rows left short are searched again with more candidates before
being padded with -1. Doc ids are consecutive along a split's chunk stream, so a sequence's
documents are the contiguous range [lo, hi] (:func:`sequence_doc_ranges`); chunks past the last
full sequence exclude their own document only. Val chunks search the same train index (their
documents are not in it), no exclusion. Rows of retrieval-only shards (``add --retrieval-only``)
are not searched and stay -1: no sequence reads them, so knn's cost follows the data that trains.

``--exact``: exact torch search over tiles of the embeddings. On CUDA the default is faiss-gpu, else exact
while N*N*dim is small, else a torch IVF search over the index's lists (index_builder.knn.search_choice).

After ``add`` (more train chunks, the index grown), a plain ``knn`` searches the new chunks' rows
and keeps the old rows as they were; ``--refresh`` (auto) lets the old rows see the new data by
searching only the added chunks and merging them into each old row's list (the same exclusions;
index_builder.knn.incremental, index_builder.knn.added_search; or, on an IVF with fewer added chunks
than old rows, each added chunk finding the old rows it enters: index_builder.knn.reverse_refresh,
index_builder.knn.refresh_units), when the old rows were found under
the same rule by the same trained index, else it re-searches every row (as ``--refresh full``).

Work is cut into shards of queries (``DB/<split>/knn_shards/``), spread over torchrun ranks,
each written atomically: a re-run redoes only the missing shards; rank 0 then writes the
finished neighbours per shard (``DB/<split>/neighbours/``, chunk_store.neighbour_shards): only
the shards whose rows this run changed, then their index (see docs/DB_FORMAT.md).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from chunk_store.framework.errors import UserError
from chunk_store.layout import NEIGHBOUR_DISTANCES, NEIGHBOURS, SPLITS
from chunk_store.manifest import check_params
from chunk_store.neighbour_shards import generation_of, read_index, shard_files, whole_rows
from chunk_store.framework.atomic import atomic_save_npy
from chunk_store.framework.runtime import resolve_device
from chunk_store.framework.stage import RunInfo, Stage, Unit, config_from_args, positive, run_stage
from chunk_store.shards import retrieval_only_ranges, searched_runs
from chunk_store.store import ChunkStore
from index_builder.embed.stage import (npy_header_ok, num_chunks, open_embeddings, read_rows,
                                 shard_ranges)
from index_builder.knn.exact_passes import first_pass, group_units, replay
from index_builder.index.exact_search import ExactSearchConfig, exact_search
from index_builder.index.stage import index_identity, load_index
from index_builder.knn.added_search import AddedChunks
from index_builder.knn.incremental import (MODES, coverage_after, decide, index_trained_id,
                                          merge_prefix, merge_shard)
from index_builder.knn.neighbour_files import assemble, kept_rows
# the exclusion rule and its widening search live in neighbour_exclusion (re-exported here)
from index_builder.knn.exclusion import (SearchFn, search_block, search_with_exclusion,
                                        select_neighbours, sequence_doc_ranges)
from index_builder.knn.ranged_reads import chunk_ranges_of
from index_builder.knn.rerank import release_pages
from index_builder.knn.options import KnnConfig, add_arguments
from index_builder.knn.refresh_units import RefreshUnits
from index_builder.knn.reverse_refresh import pairs_done, pairs_path
from index_builder.knn.search_choice import choose_for_db, device_search

__all__ = ["KnnConfig", "KnnStage", "add_arguments", "run", "search_with_exclusion", "select_neighbours",
           "sequence_doc_ranges"]  # the CLI's entry points and the exclusion rule, re-exported

RESULT_KEYS = ("k", "extra", "method", "index_id", "content_only", "exclusion", "target_recall", "rerank")
# what train neighbours avoid: "sequence" = every document sharing the chunk's training sequence.
# A DB whose knn record lacks it was built with the older own-document rule and is redone.
EXCLUSION = "sequence"


# ----------------------------------------------------------------------------- the stage


class KnnStage(RefreshUnits, Stage[KnnConfig]):
    """Embeddings + index -> neighbours; one unit a shard of ``shard_size`` query chunks."""

    name = "knn"
    packages = ("torch", "faiss")
    result_keys = RESULT_KEYS + ("shard_size",)
    progress_unit = "chunk"

    def params(self, manifest: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.k < 1:
            raise UserError(f"--k must be at least 1, not {cfg.k}")
        if cfg.extra < 0:
            raise UserError(f"--extra must be >= 0, not {cfg.extra}")
        if not 0 <= cfg.target_recall <= 1:
            raise UserError(f"--target-recall must be within [0, 1], not {cfg.target_recall}")
        positive(cfg.tune_sample, "--tune-sample")
        if cfg.rerank is not None:
            positive(cfg.rerank, "--rerank")
        positive(cfg.shard_size, "--shard-size")
        if cfg.reverse_depth < 0:
            raise UserError(f"--reverse-depth must be >= 0 (0: the forward merge), not {cfg.reverse_depth}")
        if cfg.refresh not in (None, *MODES):
            raise UserError(f"--refresh must be one of {', '.join(MODES)}, not {cfg.refresh!r}")
        self.device = str(resolve_device(cfg.device))
        self.choice = choose_for_db(self.db, manifest, self.device, cfg.exact, cfg.search)
        self.exact, self.search_method = self.choice.method == "exact", self.choice.method  # faiss-gpu may fall back
        self.chunks_per_seq = int(manifest["seq_len"]) // int(manifest["chunk_size"])
        return {"k": cfg.k, "extra": cfg.extra, "method": self.choice.recorded_method,
                "index_id": index_identity(manifest), "shard_size": cfg.shard_size,
                "content_only": True,  # chunks of only EOS and padding are never neighbours
                "exclusion": EXCLUSION, "target_recall": float(cfg.target_recall),
                "rerank": "auto" if cfg.rerank is None else int(cfg.rerank),
                "tune_sample": int(cfg.tune_sample),
                "refresh": "full" if cfg.refresh else "new_rows", "rows_before": None,
                # each split's neighbour-index generation when this run started (kept by a resumed
                # run): a higher one on disk was written by this run (begin())
                "generations_before": {s: generation_of(self.db, s) for s in SPLITS}}

    def check(self, recorded: dict[str, Any], params: dict[str, Any], manifest: dict[str, Any]) -> None:
        """After ``add`` the index grew (another index_id): the neighbours already found under
        the same rule are kept, only the new chunks searched; ``--refresh``: the old rows merge
        the added chunks (incremental.decide), or every chunk is searched again. The decision and
        the rows it starts from go into the recorded params: a resumed run plans the same."""
        dec = decide(self.cfg.refresh, recorded, params, self.result_keys, index_trained_id(manifest))
        self.decision = dec
        prev = recorded.get("params", {})
        if recorded.get("finished") is None and prev.get("generations_before") and prev.get("refresh") == dec.mode:
            params["generations_before"] = prev["generations_before"]  # the same plan, interrupted: resumed
        params["refresh"], params["rows_before"] = dec.mode, dec.before
        self.keep_old = dec.mode == "incremental" or (
            dec.mode == "new_rows" and recorded.get("params", {}).get("exclusion") == EXCLUSION)
        if dec.mode == "full":
            recorded.clear()
            return
        if dec.mode == "incremental":
            return
        keys = self.result_keys if recorded.get("finished") is None else \
            [k for k in self.result_keys if k != "index_id"]
        try:
            check_params(recorded.get("params"), params, self.name, keys=keys)
        except UserError as e:  # e.g. another --k on a built DB: --refresh recomputes every row
            raise UserError(f"{e}; or --refresh to recompute every chunk's neighbours with the new value") from None

    def begin(self, manifest: dict[str, Any]) -> None:
        """The rows of each split already searched (kept), read after damaged files are gone."""
        keep = getattr(self, "keep_old", False)
        self.old_rows = {s: kept_rows(self.db, s, self.cfg.k, num_chunks(self.db, manifest, s)) if keep else 0
                         for s in SPLITS}
        self.unread = {s: retrieval_only_ranges(manifest, s) for s in SPLITS}
        self.train_total = num_chunks(self.db, manifest, "train")
        self.merge: dict[str, tuple[int, list[list[int]]]] = {s: (0, []) for s in SPLITS}
        dec = getattr(self, "decision", None)
        if dec is not None and dec.mode == "incremental":
            cov = dec.before["coverage"]
            self.merge = {s: merge_prefix(cov.get(s), self.old_rows[s], self.train_total) for s in SPLITS}
            # rows the coverage does not describe (a damaged file) are searched again, not merged
            self.old_rows = {s: r if self.merge[s][0] or not cov.get(s) or cov[s][-1][0] == r else 0
                             for s, r in self.old_rows.items()}
        # a split whose neighbour index this very run wrote before a crash: its rows are done
        # (merging the added chunks into them again would list those chunks twice)
        before = manifest.get("stages", {}).get(self.name, {}).get("params", {}).get("generations_before") or {}
        self.written_splits = {s for s in SPLITS if s in before and generation_of(self.db, s) > int(before[s])}
        self.counts = {"searched_queries": 0, "merged_queries": 0, "added_vectors_scanned": 0,
                       "merge_seconds": 0.0, "search_seconds": 0.0}
        self.plan_reverse(manifest)  # train's old rows: the reverse pass where it pays

    def complete(self, manifest: dict[str, Any]) -> bool:
        recorded = manifest.get("stages", {}).get(self.name, {}).get("params", {})
        if recorded.get("exclusion") != EXCLUSION:  # built under the own-document rule: redo
            return False
        dec = getattr(self, "decision", None)
        if dec is not None and dec.mode == "incremental":  # rows searched before the last add: merge
            train = num_chunks(self.db, manifest, "train")
            if any(t < train for segs in dec.before["coverage"].values() for _, t in segs):
                return False
        return all(whole_rows(self.db, s, self.cfg.k) == n for s in SPLITS
                   if (n := num_chunks(self.db, manifest, s)))

    def outputs(self, manifest: dict[str, Any]) -> list[Path]:
        """Each split's neighbour index and the shard files it names."""
        out: list[Path] = []
        for s in SPLITS:
            index = read_index(self.db, s) if num_chunks(self.db, manifest, s) else None
            if index is not None:
                out += [self.paths.neighbour_index(s), *shard_files(self.db, s, index)]
        return out

    def temp_folders(self) -> list[tuple[Path, tuple[str, ...]]]:
        return [*((self.paths.knn_shards_dir(s), ("",)) for s in SPLITS),
                *((self.paths.neighbours_dir(s), ("",)) for s in SPLITS),
                *((self.paths.split(s), (NEIGHBOURS, NEIGHBOUR_DISTANCES)) for s in SPLITS)]

    def units(self, manifest: dict[str, Any]) -> list[Unit]:
        """Shards of query rows; after ``add``, only rows past those already searched."""
        out: list[Unit] = []
        old = getattr(self, "old_rows", {})
        done = getattr(self, "written_splits", set())
        out += self.reverse_units(0) if hasattr(self, "reverse_from") else []
        for split in SPLITS:  # old rows merging the added chunks (--refresh, incremental)
            end = 0 if split in done else getattr(self, "merge", {}).get(split, (0, []))[0]
            for i, (a, b) in enumerate(shard_ranges(end, self.cfg.shard_size)):
                out.append(Unit(len(out), b - a, (split, i, a, b, "merge")))
        for split in SPLITS:
            rows, start = num_chunks(self.db, manifest, split), old.get(split, 0)
            start = rows if split in done else start
            for i, (a, b) in enumerate(shard_ranges(rows, self.cfg.shard_size)):
                if b > start:
                    out.append(Unit(len(out), b - max(a, start), (split, i, max(a, start), b)))
        return out

    def unit_done(self, unit: Unit) -> bool:
        split, i, a, b = unit.payload[:4]
        if unit.payload[4:] == ("reverse",):
            return pairs_done(pairs_path(self.db, split, i))
        files = merge_shard(self.db, split, i) if len(unit.payload) > 4 else self.paths.knn_shard(split, i)
        return all(npy_header_ok(p, (b - a, self.cfg.k)) for p in files)

    def setup(self) -> None:
        """The search (the index, or exact search over the embeddings) and the rule's tables.

        No DB-wide array is loaded: doc ids and sequence starts stay memmaps read per range or
        candidate batch, the content mask is computed per lookup (index_builder.knn.ranged_reads)."""
        import faiss
        import torch

        threads = self.cfg.threads or os.cpu_count() or 1
        faiss.omp_set_num_threads(threads)
        torch.set_num_threads(threads)
        # memory-mapped: random access via page cache
        train_store = ChunkStore.open(self.db, "train")  # every shard, global ids
        self.train_docs = train_store.doc_ids
        self.ntotal = ntotal = int(self.train_docs.shape[0])
        self.train_seq_starts = train_store.seq_starts  # memmapped: a binary search a row (sequence_doc_ranges)
        train_emb = open_embeddings(self.db, "train")
        if sum(a.shape[0] for a in train_emb) != ntotal:
            raise UserError(f"knn: train has {ntotal} chunks but its embeddings have "
                            f"{sum(a.shape[0] for a in train_emb)} rows: re-run embed")
        self.content = train_store.content_lookup()  # EOS/padding-only: never a neighbour
        self.emb = {"train": train_emb}
        self.docs = {"train": self.train_docs}
        self.short_rows = 0
        self.tuning = None
        self.rerank = 1  # candidates a neighbour re-ranked by true distance (index_builder.knn.rerank)
        self.range_search: Any = None  # faiss search skipping each row's excluded chunks
        self.range_first, self.short_share = False, None  # every row through it at once
        self.say(f"knn: {self.choice.method} search: {self.choice.why}")
        if self.exact:
            cfg = ExactSearchConfig(device=self.device)

            def search(q: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
                return exact_search(q, train_emb, c, cfg)
        else:
            index = load_index(self.db)
            if index.ntotal != ntotal:
                raise UserError(f"knn: the index holds {index.ntotal} vectors but train has {ntotal} "
                                "chunks: re-run index")

            from index_builder.index.fast_scan import fast_scan_view, index_search
            from index_builder.knn.range_exclusion import faiss_range_search, prefer_range_first, selector_pays
            from index_builder.knn.rerank import default_factor, reranked, reranked_ranges, take_rows

            dev = device_search(self.choice.method, index, train_emb, self.device, self.content, self.say)
            # 4-bit PQ codes: a fast-scan copy searched; the tuner sets both (AddedChunks reads index's nprobe)
            self.fast_view = fast_scan_view(index) if dev is None else None
            searched = index if self.fast_view is None else self.fast_view
            search = index_search(searched) if dev is None else dev.search  # dev: nprobe read from `index`
            self.search_method = (dev.method if dev is not None else
                                  self.search_method + (" (fast scan)" if self.fast_view is not None else ""))
            self.index, self.raw_search = index, search  # the index alone (benchmarks compare with it)
            torch_ivf = self.search_method == "torch-ivf"  # true distances; excluded ranges skipped at no cost
            self.rerank = 1 if torch_ivf else self.cfg.rerank or default_factor(index)
            read = lambda ids: take_rows(train_emb, ids)  # noqa: E731
            if self.rerank > 1:
                search = reranked(search, self.rerank, read, ntotal)
            self.short_share = self._short_share(search, train_emb)
            self.range_first = torch_ivf or prefer_range_first(index, self.short_share)
            if self.range_first or selector_pays(index):
                self.range_search = getattr(dev, "range_search", None) or faiss_range_search(searched, threads)
                if self.rerank > 1:
                    self.range_search = reranked_ranges(self.range_search, self.rerank, read, ntotal)
            if self.cfg.target_recall > 0:
                self.tuning = self._tune(index, search, train_emb)
        self.search: SearchFn = search
        self.added = AddedChunks(train_emb, ntotal, self.device, getattr(self, "index", None), self.rerank,
                                 want=self.cfg.k + self.cfg.extra)
        self.old_files: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _final_train(self, search: SearchFn, queries: np.ndarray, rows: np.ndarray,
                     range_search: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """The final neighbours of train chunks ``rows``: what compute() writes for them."""
        ranges = sequence_doc_ranges(self.train_docs, self.train_seq_starts, self.chunks_per_seq, rows)
        chunk_r = None
        if range_search is not None:
            chunk_r = chunk_ranges_of(ranges, self.train_docs)
        return search_with_exclusion(search, queries, self.cfg.k, self.cfg.extra, self.ntotal, query_ids=rows,
                                     db_docs=self.train_docs, doc_ranges=ranges, content=self.content,
                                     row_search=None if chunk_r is None else
                                     (lambda q, r, c: range_search(q, chunk_r[r], c)),
                                     range_first=self.range_first)

    def _short_share(self, search: SearchFn, train_emb: list[np.ndarray]) -> float:
        """The share of a sample's rows whose plain k + extra candidates leave fewer than k after
        the exclusions (range_exclusion.prefer_range_first decides on it)."""
        from index_builder.knn.rerank import pick_rows

        rows = self._sample_rows(seed=1)
        cand_i, cand_d = search(pick_rows(train_emb, rows), min(self.cfg.k + self.cfg.extra, self.ntotal))
        ranges = sequence_doc_ranges(self.train_docs, self.train_seq_starts, self.chunks_per_seq, rows)
        short = select_neighbours(cand_i, cand_d, self.cfg.k, rows, db_docs=self.train_docs,
                                  doc_ranges=ranges, content=self.content)[2]
        return float(short.mean()) if len(short) else 0.0

    def _sample_rows(self, seed: int) -> np.ndarray:
        """A sample of the train rows knn searches (retrieval-only rows are never queries), as global rows."""
        from index_builder.index.ivf_build import sample_ids

        unread = getattr(self, "unread", {}).get("train", [])
        rows = sample_ids(self.ntotal - sum(hi - lo for lo, hi in unread), self.cfg.tune_sample, seed=seed)
        rows = np.asarray(rows, dtype=np.int64)
        for lo, hi in unread:  # ascending: shift the sample past each unread range in turn
            rows = np.where(rows >= lo, rows + (hi - lo), rows)
        return rows

    def _tune(self, index: Any, search: SearchFn, train_emb: list[np.ndarray]) -> Any:
        """Set the index's nprobe/efSearch to the cheapest whose final neighbours (exclusions
        applied) reach --target-recall on a sample, against the same pipeline over exact search."""
        from index_builder.knn.rerank import pick_rows, take_rows
        from index_builder.knn.tuning import PLATEAU, candidate_params, tune_index

        if not candidate_params(index):
            return None
        rows = self._sample_rows(seed=0)
        queries, exact_cfg = pick_rows(train_emb, rows), ExactSearchConfig(device=self.device)
        # the exact final neighbours in one pass: the exclusions applied inside the exact search
        ranges = sequence_doc_ranges(self.train_docs, self.train_seq_starts, self.chunks_per_seq, rows)
        _, exact_d = exact_search(queries, train_emb, self.cfg.k, exact_cfg,
                                  exclude=chunk_ranges_of(ranges, self.train_docs), valid=self.content)
        also = [v for v in [getattr(self, "fast_view", None)] if v is not None]  # set on the copy too
        tuning = tune_index(index, lambda: self._final_train(search, queries, rows, self.range_search)[0],
                            exact_d, queries, lambda u: take_rows(train_emb, u), self.cfg.target_recall, also=also)
        if not tuning.reached:
            self.say(f"knn: recall@{self.cfg.k} {tuning.recall:.3f} < target {tuning.target} at every setting "
                     f"tried ({len(tuning.tried)}; kept {tuning.param}, the cheapest within {PLATEAU} of the "
                     f"best, candidates re-ranked x{self.rerank}): the index's codes are too coarse (raise "
                     "--rerank or --max-index-memory)")
        return tuning

    def _split_arrays(self, split: str) -> tuple[list[np.ndarray], np.ndarray]:
        if split not in self.emb:
            self.emb[split] = open_embeddings(self.db, split)
            self.docs[split] = ChunkStore.open(self.db, split).doc_ids
        return self.emb[split], self.docs[split]

    def compute(self, unit: Unit, search: SearchFn | None = None, queries: np.ndarray | None = None) -> None:
        split, i, a, b = unit.payload
        emb, docs = self._split_arrays(split)
        ids = np.full((b - a, self.cfg.k), -1, dtype=np.int64)  # rows no sequence reads stay -1 / inf
        dists = np.full((b - a, self.cfg.k), np.inf, dtype=np.float32)
        for ra, rb in searched_runs(a, b, getattr(self, "unread", {}).get(split, [])):
            q = read_rows(emb, ra, rb) if queries is None else queries[ra - a:rb - a]
            if split == "train" and self.range_search is not None and search in (None, self.search):
                got = self._final_train(self.search, q, np.arange(ra, rb, dtype=np.int64), self.range_search)
            else:
                got = search_block(search or self.search, q, self.cfg.k, self.cfg.extra,
                                    self.ntotal, ra, rb, split == "train", docs, self.train_docs,
                                    self.train_seq_starts, self.chunks_per_seq, self.content)
            ids[ra - a:rb - a], dists[ra - a:rb - a] = got
            self.short_rows += int((got[0] < 0).any(axis=1).sum())
            self.counts["searched_queries"] += rb - ra
        p_ids, p_dist = self.paths.knn_shard(split, i)
        atomic_save_npy(p_dist, dists)
        atomic_save_npy(p_ids, ids)
        for shards in self.emb.values():  # the rows read stay in the page cache, not in our RSS
            release_pages(shards)

    def run_units(self, todo: list[Unit], done: Callable[[Unit], None]) -> None:
        """With --exact, consecutive shards share one pass over the embeddings (a GPU's gain)."""
        pass_rows = self.cfg.exact_pass_rows or (262144 if self.device.startswith("cuda") else 0)
        c = min(self.cfg.k + self.cfg.extra, self.ntotal)
        t0 = time.perf_counter()
        # the reverse pass's units first: a merge unit waits for every pair file (its rank's too)
        for unit in sorted([u for u in todo if len(u.payload) > 4], key=lambda u: u.payload[4] != "reverse"):
            (self.compute_reverse if unit.payload[4] == "reverse" else self.compute_merge)(unit)
            done(unit)
        t1 = time.perf_counter()
        todo = [u for u in todo if len(u.payload) == 4]
        unread = getattr(self, "unread", {})
        idle = [u for u in todo if not searched_runs(*u.payload[2:], unread.get(u.payload[0], []))]
        for unit in idle:  # wholly retrieval-only: nothing to read, nothing to search
            self.compute(unit)
            done(unit)
        todo = [u for u in todo if u not in idle]
        for group in group_units(todo, pass_rows if self.exact else 0):
            blocks = [read_rows(self._split_arrays(u.payload[0])[0], u.payload[2], u.payload[3])
                      for u in group]
            first = first_pass(self.search, blocks, c) if len(group) > 1 else None
            for j, (unit, queries) in enumerate(zip(group, blocks)):
                fn = self.search if first is None else replay(self.search, first[j], c)
                self.compute(unit, fn, queries)
                done(unit)
        # the units' own seconds (setup and tuning apart): what the benchmark compares
        self.counts["merge_seconds"] = round(t1 - t0, 3)
        self.counts["search_seconds"] = round(time.perf_counter() - t1, 3)

    def finalize(self, manifest: dict[str, Any], run: RunInfo) -> dict[str, Any]:
        if not hasattr(self, "decision"):  # a first run (nothing recorded: check() was not called)
            self.decision = decide(self.cfg.refresh and "full", {}, {}, (), "")
        if not hasattr(self, "search"):  # rank 0 had no shard left (done before a crash, or by the
            self.setup()  # other ranks): the search parameters recorded are still this index's
        summary: dict[str, Any] = {"k": self.cfg.k, "method": self.choice.recorded_method,
                                   "search": {"method": self.search_method, "why": self.choice.why}, "rerank": self.rerank,
                                   "seconds": round(run.seconds, 2), "shards_reused": run.units_reused,
                                   "world_size": run.world_size}
        if self.tuning is not None:
            summary["search_params"] = self.tuning.param
            summary["recall"] = {f"recall@{self.cfg.k}": self.tuning.recall, "target": self.tuning.target,
                                 "reached": self.tuning.reached, "sample": self.tuning.sample,
                                 "vs": "exact search, same exclusions"}
            summary["tuning"] = self.tuning.tried
        if self.short_share is not None:
            summary["exclusion_search"] = {"short_share": round(self.short_share, 4), "range_first": self.range_first}
        unread = {s: sum(hi - lo for lo, hi in retrieval_only_ranges(manifest, s)) for s in SPLITS}
        if any(unread.values()):
            summary["rows_not_searched"] = {s: n for s, n in unread.items() if n}  # retrieval-only: never read
        for split in SPLITS:
            n = num_chunks(self.db, manifest, split)
            if n:  # a split this run already wrote (before a crash) keeps its shards as they are
                written = split in getattr(self, "written_splits", set())
                summary[split] = assemble(self.db, split, n, self.cfg.k, self.cfg.shard_size,
                                           n if written else getattr(self, "old_rows", {}).get(split, 0),
                                           0 if written else self.merge[split][0],
                                           lambda i, s=split: merge_shard(self.db, s, i))
        dec, train = self.decision, num_chunks(self.db, manifest, "train")
        before = (dec.before or {}).get("coverage") if dec.mode == "new_rows" else None
        kept = dict(self.old_rows)
        for s in getattr(self, "written_splits", set()) & set((before or {}).keys()):
            if before[s] and before[s][-1][0] is not None:  # type: ignore[index]
                kept[s] = min(kept[s], int(before[s][-1][0]))  # type: ignore[index]  # the rows kept as planned
        summary["coverage"] = {s: coverage_after(dec.mode, before, s, kept[s],
                                                 num_chunks(self.db, manifest, s), train) for s in SPLITS}
        summary["index_trained"] = index_trained_id(manifest)
        self.counts["added_vectors_scanned"] = self.added.vectors_scanned
        self.counts["added_search"] = self.added.how
        if getattr(self, "reverse_from", None) is not None:  # rank 0's share of the reverse pass
            rp = getattr(self, "reverse_pass", None)
            self.counts.update(added_search=f"reverse depth={self.cfg.reverse_depth}",
                               reverse_queries=getattr(rp, "queries", 0), reverse_pairs=getattr(rp, "pairs_found", 0))
        summary["refresh"] = {"mode": dec.mode, "why": dec.reason, **self.counts,
                              "merged_rows": {s: self.merge[s][0] for s in SPLITS},
                              "added_chunks": {s: train - self.merge[s][1][0][1] if self.merge[s][1] else 0
                                               for s in SPLITS}}
        return summary

    def report(self, stats: dict[str, Any], run: RunInfo) -> str:
        mode = stats.get("refresh", {}).get("mode")
        return (f"knn: {getattr(self, 'search_method', self.choice.method)} search, k={self.cfg.k}"
                + (f", {mode} refresh" if mode in ("incremental", "full") else "") + ", done in "
                f"{run.seconds:.1f}s ({run.units_reused} shards reused, "
                f"{getattr(self, 'short_rows', 0)} rows with fewer than k neighbours)"
                + (f"; {stats['search_params']}: recall@{self.cfg.k} {self.tuning.recall:.3f} vs exact"
                   if getattr(self, "tuning", None) is not None else ""))


SHARED_OPTIONS = ("device", "shard_size", "threads")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The CLI entry: ``retro-build-index knn``."""
    return run_stage(KnnStage(args.db, config_from_args(KnnConfig, args)))
