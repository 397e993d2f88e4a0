"""Which parts each new shard of a chunk (or add) run holds: fixed once, recorded with the plan.

Why recorded: shard ``base + j`` of a run holds the j-th contiguous run of parts. When a resume
derived the runs from its own world size, the shards written by the world that started (2 ranks:
parts [0, n/2) and [n/2, n)) and those written by the resume (1 rank: [0, n), skipped since
shard ``base`` was there; 3 ranks: [n/3, 2n/3), ...) overlapped or left gaps, and the run ended
with documents lost or stored twice, exit 0 (issue 24). So the first run of a plan records the
partition and the first shard number in ``plan.json``; every later run, whatever its world size,
writes the shards still missing (shard j by rank j % world) and lists exactly the recorded ones.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chunk_store.framework.atomic import atomic_write_json
from chunk_store.framework.errors import UserError
from chunk_store.layout import DBLayout

log = logging.getLogger("chunk_store.chunk.merge_plan")


@dataclass(frozen=True)
class ShardJob:
    """One new shard: its number and the parts [lo, hi) it holds, in order."""

    index: int
    lo: int
    hi: int
    first: bool  # the run's first non-empty shard: it records the walk's skipped files


def partition(n_units: int, world: int) -> list[list[int]]:
    """[lo, hi) of parts a shard, ``world`` shards of contiguous parts (some empty when n < world)."""
    return [[n_units * r // world, n_units * (r + 1) // world] for r in range(world)]


def ensure_merge_plan(plan: dict[str, Any], plan_path: Path, db: Path, base: int, world: int) -> dict[str, Any]:
    """Rank 0: the plan with its recorded partition (``plan["merge"]``), recorded now when absent.

    A plan from before the partition was recorded may have shards of an interrupted merge at
    ``base`` and past it; they are not in the manifest and every part they were made of is still
    on disk, so they are removed and rewritten under the partition recorded now."""
    merge = plan.get("merge")
    if merge is not None:
        if merge.get("base") != base:  # the manifest's shards changed under an interrupted run
            raise UserError(f"chunk: the interrupted run in {plan_path.parent} writes shards from "
                            f"{merge.get('base')}, the database's next shard is {base}: delete "
                            f"{plan_path.parent} and re-run")
        return plan
    shards = DBLayout(db).shards_dir
    stale = [d for d in sorted(shards.glob("*")) if d.is_dir() and d.name.isdigit() and int(d.name) >= base] \
        if shards.is_dir() else []
    for d in stale:
        log.warning("chunk: %s was written by an interrupted run that recorded no partition: rewriting it", d)
        shutil.rmtree(d)
    plan = {**plan, "merge": {"base": base, "ranges": partition(len(plan["units"]), world)}}
    atomic_write_json(plan_path, plan)
    return plan


def shard_jobs(plan: dict[str, Any]) -> list[ShardJob]:
    """Every non-empty shard of the recorded partition, in order."""
    merge = plan["merge"]
    jobs = [ShardJob(merge["base"] + j, lo, hi, False) for j, (lo, hi) in enumerate(merge["ranges"]) if lo < hi]
    if jobs:
        jobs[0] = ShardJob(jobs[0].index, jobs[0].lo, jobs[0].hi, True)
    return jobs


def rank_jobs(plan: dict[str, Any], rank: int, world: int) -> list[ShardJob]:
    """This rank's shards: the j-th recorded shard goes to rank j % world (any world size)."""
    return [job for j, job in enumerate(shard_jobs(plan)) if j % world == rank]
