"""Merging a parts index's parts into one part whose lists live on disk (``--merge-parts``).

Why: a search over stacked parts (index_builder.index.parts) copies each probed list's codes
from every part (faiss ``HStackInvertedLists``), measured at 0.9-2.2x a single file's time for
four parts (docs/BENCHMARKS.md, "index_parts"). The parts that ranks filled side by side are
merged into one new part, as autofaiss's distributed mode and Megatron's parallel add do: faiss's
``OnDiskInvertedLists.merge_from_multiple`` (faiss.contrib.ondisk.merge_ondisk) reads the parts'
lists memory-mapped and writes them list by list into one file, opened memory-mapped for search
like any part. ``add`` still writes a new part and never rewrites the merged one.

When (:func:`plan_merge`): ``auto`` merges after a build that filled 2+ parts from scratch (several
torchrun ranks, or more rows than PART_MAX_VECTORS) and, after an ``add``, only once more than
AUTO_MAX_PARTS parts are listed (then all of them); ``always`` whenever 2+ parts are listed;
``never`` never. The merge needs free disk for a second copy of the parts it merges.

Crash safety: the decision is written into index_infos.json with the parts list (``merge_pending``),
so a re-run finds and completes it. The merged part is numbered after the highest listed part and
its record covers the union of their chunk ranges; the list then names it in their place
(atomically), and only then are their files deleted: a crash at any point leaves the old parts
listed and searchable, or the merged part listed and whole.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from typing import Any, Sequence

from tqdm.auto import tqdm

from chunk_store.framework.errors import UserError
from chunk_store.framework.stage import crash_point
from chunk_store.layout import DBLayout
from index_builder.index import parts as index_parts
from index_builder.index.parts import PartRecord

log = logging.getLogger(__name__)

MERGE_MODES = ("auto", "never", "always")
AUTO_MAX_PARTS = 16  # auto: after an add, parts listed before all of them are merged
PENDING_KEY = "merge_pending"  # index_infos.json: the listed parts a committed list still has to merge
STAGE = "index"  # the crash points' stage (chunk_store.framework.stage.crash_point)


@dataclass(frozen=True)
class MergeConfig:
    """What to merge when: ``mode`` one of MERGE_MODES."""

    mode: str = "auto"
    auto_max_parts: int | None = None  # None: AUTO_MAX_PARTS


def plan_merge(cfg: MergeConfig, listed: Sequence[PartRecord], new: Sequence[PartRecord],
               infos: dict[str, Any]) -> tuple[list[PartRecord], str | None]:
    """(the parts to merge once ``listed`` + ``new`` are listed, why none where none).

    ``listed`` empty: a build from scratch; else an add (or a re-run of a listed index, whose
    committed decision ``infos[PENDING_KEY]`` it carries on)."""
    every = sorted([*listed, *new], key=lambda p: p.first)
    if cfg.mode not in MERGE_MODES:
        raise UserError(f"--merge-parts must be one of {', '.join(MERGE_MODES)}, not {cfg.mode!r}")
    if len(every) < 2:
        return [], None
    if cfg.mode == "never":
        return [], "--merge-parts never"
    pending = set(infos.get(PENDING_KEY) or [])
    if pending:
        return [p for p in every if p.part in pending], None
    if cfg.mode == "always":
        return every, None
    if not listed:
        return every, None  # auto: parts filled side by side from scratch
    limit = cfg.auto_max_parts or AUTO_MAX_PARTS
    if len(every) > limit:
        return every, None
    return [], f"auto: an add keeps its part separate ({len(every)} parts, merged past {limit})"


def with_pending(infos: dict[str, Any], parts: Sequence[PartRecord]) -> dict[str, Any]:
    """``infos`` naming ``parts`` as the merge still to do (none: the key dropped)."""
    out = {k: v for k, v in infos.items() if k != PENDING_KEY}
    if parts:
        out[PENDING_KEY] = sorted(p.part for p in parts)
    return out


def part_bytes(paths: DBLayout, parts: Sequence[PartRecord]) -> int:
    """The bytes of the parts' data and list files (a merge writes about as many)."""
    return sum(f.stat().st_size for p in parts
               for f in (paths.index_part_data(p.part), paths.index_part_lists(p.part)))


def merge_parts(paths: DBLayout, parts: Sequence[PartRecord], progress: bool = True) -> dict[str, Any]:
    """Merge the listed ``parts`` (contiguous chunk ranges) into one new part, list it in their
    place, delete their files (and any other part file the list does not name); what happened:
    {"parts", "into", "bytes_written", "seconds"} or {"skipped": why} (too little free disk:
    one warning logged, the parts stay listed, the pending merge dropped)."""
    import faiss

    t0 = time.time()
    listed = index_parts.listed_parts(paths) or []
    parts = sorted(parts, key=lambda p: p.first)
    if not set(parts) <= set(listed) or any(a.stop != b.first for a, b in zip(parts, parts[1:])):
        raise UserError(f"index: parts {[p.part for p in parts]} are not listed contiguous parts: "
                        "re-run index")
    merged = PartRecord(max(p.part for p in listed) + 1, parts[0].first, sum(p.count for p in parts))
    if not index_parts.part_done(paths, merged):
        need, free = part_bytes(paths, parts), shutil.disk_usage(paths.index_dir).free
        if free < need:
            why = (f"too little free disk to merge {len(parts)} parts: {free} bytes free, {need} needed "
                   f"(free some and re-run with --merge-parts always)")
            log.warning("index: %s", why)
            index_parts.write_parts_list(paths, with_pending(index_parts.read_infos(paths), []), listed)
            index_parts.remove_unlisted(paths)
            return {"skipped": why, "parts": [p.part for p in parts]}
        ivf = faiss.extract_index_ivf(faiss.read_index(str(paths.index_trained)))
        sources = [index_parts.open_part(paths, p, ivf) for p in parts]
        with tqdm(total=merged.count, unit="vec", desc=f"index merge {len(parts)} parts",
                  disable=not progress, leave=False) as bar:
            index_parts.write_part(paths, merged, sources, ivf.nlist, ivf.code_size, sync=True)
            bar.update(merged.count)
        del sources
    crash_point(STAGE, "merge-written")  # the merged part whole, the old parts still listed
    kept = [p for p in listed if p not in parts]
    index_parts.write_parts_list(paths, with_pending(index_parts.read_infos(paths), []), [*kept, merged])
    crash_point(STAGE, "merge-listed")  # the merged part listed, the old parts' files still there
    index_parts.remove_unlisted(paths)
    return {"parts": [p.part for p in parts], "into": merged.part,
            "bytes_written": part_bytes(paths, [merged]), "seconds": round(time.time() - t0, 2)}


def commit_and_merge(paths: DBLayout, listed: Sequence[PartRecord], new: Sequence[PartRecord],
                     infos: dict[str, Any], cfg: MergeConfig, progress: bool = True) -> dict[str, Any] | None:
    """List ``listed`` + ``new`` (each whole) as the index, with the merge :func:`plan_merge`
    decides committed alongside; then merge, or remove the part files the list does not name.
    The merge's record (:func:`merge_parts`), {"skipped": why}, or None (one part: nothing to do)."""
    todo, why = plan_merge(cfg, listed, new, infos)
    index_parts.commit_parts(paths, listed, new, with_pending(infos, todo))
    if todo:
        return merge_parts(paths, todo, progress=progress)
    index_parts.remove_unlisted(paths)
    return {"skipped": why} if why else None


def merge_summary(merge: dict[str, Any] | None) -> str:
    """The stage's one-line summary's words for a merge record ('' for none)."""
    if not merge:
        return ""
    if "skipped" in merge:
        return f"; parts not merged ({merge['skipped']})"
    return (f"; merged parts {merge['parts'][0]}-{merge['parts'][-1]} into part {merge['into']} "
            f"({merge['bytes_written'] / 2 ** 20:.1f} MB in {merge['seconds']:.1f}s)")


__all__ = ["AUTO_MAX_PARTS", "MERGE_MODES", "MergeConfig", "PENDING_KEY", "commit_and_merge", "merge_parts",
           "merge_summary", "plan_merge"]
