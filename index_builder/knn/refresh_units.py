"""The knn stage's work units of an incremental refresh (``knn --refresh`` after ``add``).

Why its own module: the knn stage (index_builder.knn.stage) searches query rows; an incremental
refresh also merges the added chunks into the rows already searched, found one of two ways:

- forward (index_builder.knn.added_search): every old row searches the added chunks;
- reverse (index_builder.knn.reverse_refresh): every added chunk searches the old rows, in units
  of its own, before the merge units; chosen where it scans for fewer queries (reverse_refresh.worth_it).

A merge unit is one shard of old rows: its lists, the new candidates, every one re-scored by one
formula (incremental.rescored), the exclusion rule, the k best by (distance, chunk id).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from chunk_store.framework.atomic import atomic_save_npy
from chunk_store.neighbour_shards import open_neighbours
from chunk_store.shards import searched_runs
from index_builder.embed.stage import read_rows, shard_ranges
from index_builder.knn.exclusion import exclusion_args, search_block, search_with_exclusion, select_neighbours
from index_builder.knn.incremental import merge_shard, rescored, row_starts, sort_candidates
from index_builder.knn.rerank import pick_rows, release_pages
from index_builder.knn import reverse_refresh as rev


def rule_rows(rule: dict[str, Any], rows: np.ndarray) -> dict[str, Any]:
    """The exclusion rule's arguments for a subset of its rows (per-row arrays sliced)."""
    return {key: v[rows] if key in ("query_ids", "doc_ranges") else v for key, v in rule.items()}


class RefreshUnits:
    """Mixed into KnnStage: ``self`` has its db, cfg, counts, merge plan, search and arrays."""

    # -- the plan (begin) and the units
    def plan_reverse(self, manifest: dict[str, Any]) -> None:
        """Whether train's old rows get their new candidates by the reverse pass: sets
        ``reverse_from`` (the first added chunk searched, None: forward) and ``reverse_runs``."""
        self.reverse_from: int | None = None
        end, segs = self.merge["train"]
        if not end or not segs:
            return
        first = min(t for _, t in segs)
        runs = searched_runs(0, end, self.unread.get("train", []))
        key = manifest.get("stages", {}).get("index", {}).get("stats", {}).get("index_key")
        if self.choice.method == "index" and rev.worth_it(
                self.train_total - first, sum(b - a for a, b in runs), self.cfg.reverse_depth, key):
            self.reverse_from, self.reverse_runs = first, runs

    def reverse_units(self, start: int) -> list[Any]:
        """Units of added chunks for the reverse pass (numbered from ``start``)."""
        from chunk_store.framework.stage import Unit

        if getattr(self, "reverse_from", None) is None or "train" in self.written_splits:
            return []
        ranges = [(i, a, b) for i, (a, b) in enumerate(shard_ranges(self.train_total, self.cfg.shard_size))
                  if b > self.reverse_from]
        return [Unit(start + n, b - a, ("train", i, a, b, "reverse")) for n, (i, a, b) in enumerate(ranges)]

    def reverse_files(self) -> list[Any]:
        return [rev.pairs_path(self.db, "train", u.payload[1]) for u in self.reverse_units(0)]

    # -- the reverse pass
    def compute_reverse(self, unit: Any) -> None:
        split, i, a, b, _ = unit.payload
        if not hasattr(self, "reverse_pass"):
            old = self._old_files("train")
            kth = (lambda rows: np.full(len(rows), np.inf, np.float32)) if old[1] is None else \
                (lambda rows: np.asarray(old[1][rows], dtype=np.float32)[:, -1])
            index = getattr(self, "fast_view", None) or self.index
            self.reverse_pass = rev.ReversePass(index, self.index, self.emb["train"], self.reverse_runs,
                                                self.merge["train"][1], kth, self.content, self.cfg.reverse_depth)
        pairs = self.reverse_pass.search(max(a, self.reverse_from), b)
        rev.write_pairs(rev.pairs_path(self.db, split, i), pairs)
        release_pages(self.emb["train"])

    # -- the merge
    def _old_files(self, split: str) -> tuple[Any, Any]:
        if split not in self.old_files:  # the rows being replaced: read until assemble swaps the index
            self.old_files[split] = open_neighbours(self.db, split)
        return self.old_files[split]

    def compute_merge(self, unit: Any) -> None:
        """Old rows [a, b) (--refresh, incremental): each searched run merged by :meth:`_merge_rows`;
        retrieval-only rows (no sequence reads them) are neither read nor searched and stay -1."""
        split, i, a, b, _ = unit.payload
        k = self.cfg.k
        ids, dists = np.full((b - a, k), -1, np.int64), np.full((b - a, k), np.inf, np.float32)
        for ra, rb in searched_runs(a, b, self.unread.get(split, [])):
            ids[ra - a:rb - a], dists[ra - a:rb - a] = self._merge_rows(split, ra, rb)
        p_ids, p_dist = merge_shard(self.db, split, i)
        p_ids.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(p_dist, dists)
        atomic_save_npy(p_ids, ids)
        for shards in self.emb.values():
            release_pages(shards)

    def _new_candidates(self, split: str, a: int, b: int, queries: Any) -> tuple[np.ndarray, np.ndarray]:
        """(rows of [a, b) with new candidates, relative to a; their candidates (n, c), -1 padded)."""
        k, docs = self.cfg.k, self._split_arrays(split)[1]
        if split == "train" and getattr(self, "reverse_from", None) is not None:
            if not hasattr(self, "reverse_pairs"):
                rev.wait_for(self.reverse_files(), self.say)
                self.reverse_pairs = rev.load_pairs(self.reverse_files())
            rows, cand = rev.candidates(self.reverse_pairs, a, b, k + self.cfg.extra)
            return rows - a, cand
        queries = queries()
        new_i = np.full((b - a, k), -1, np.int64)
        for r0, r1, t in row_starts(self.merge[split][1], a, b):
            rows = slice(r0 - a, r1 - a)
            new_i[rows] = search_block(
                self.added.search(t), queries[rows], k, self.cfg.extra, self.ntotal - t, r0, r1,
                split == "train", docs, self.train_docs, self.train_seq_starts, self.chunks_per_seq, self.content)[0]
        return np.arange(b - a), new_i

    def _merge_rows(self, split: str, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [a, b): each one's old list merged with its new candidates (forward: its k
        nearest allowed added chunks; reverse: the added chunks that found it), the k best kept by
        (distance, chunk id). Rows without a new candidate keep their lists as they are."""
        k, (emb, docs) = self.cfg.k, self._split_arrays(split)
        got: dict[str, np.ndarray] = {}

        def queries() -> np.ndarray:  # every row's embedding, read once where the forward search needs it
            if "q" not in got:
                got["q"] = read_rows(emb, a, b)
            return got["q"]

        old = self._old_files(split)
        old_i = np.array(old[0][a:b], dtype=np.int64)
        old_d = np.full(old_i.shape, np.inf, np.float32) if old[1] is None else np.array(old[1][a:b], dtype=np.float32)
        touched, new_i = self._new_candidates(split, a, b, queries)
        rule = exclusion_args(split == "train", a, b, docs, self.train_docs, self.train_seq_starts,
                              self.chunks_per_seq, self.content)
        ids, dists = old_i.copy(), old_d.copy()
        if len(touched):
            q = got["q"][touched] if "q" in got else pick_rows(emb, touched + a)
            cand = rescored(q, np.concatenate([old_i[touched], new_i], axis=1), self.emb["train"])
            ids[touched], dists[touched], _ = select_neighbours(*sort_candidates(*cand), k,
                                                                **rule_rows(rule, touched))
        # an old neighbour the rule refuses now (not after `add`: new chunks get new documents
        # and sequences; a guard against a changed rule): that row is searched again in full,
        # through the index (its distances are then the index's)
        stale = (select_neighbours(old_i, old_d, k, **rule)[0] >= 0).sum(1) < (old_i >= 0).sum(1)
        if stale.any():
            rows = np.flatnonzero(stale)
            ids[rows], dists[rows] = search_with_exclusion(self.search, pick_rows(emb, rows + a), k,
                                                           self.cfg.extra, self.ntotal, **rule_rows(rule, rows))
            self.counts["stale_rows"] = self.counts.get("stale_rows", 0) + len(rows)
        self.counts["merged_queries"] += b - a
        self.counts["merged_rows_rescored"] = self.counts.get("merged_rows_rescored", 0) + len(touched)
        self.short_rows += int((ids < 0).any(axis=1).sum())
        return ids, dists


__all__ = ["RefreshUnits", "rule_rows"]
