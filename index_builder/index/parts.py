"""The IVF index as parts on disk: one trained, empty IVF and many parts of inverted lists.

Layout (chunk_store.layout.DBLayout):

    DB/index/trained.index           the trained IVF without vectors: quantizer, codec, OPQ
    DB/index/part-NNNNN.ivfdata      one part's codes and ids (faiss OnDiskInvertedLists data)
    DB/index/part-NNNNN.ivflists     its list sizes and offsets (faiss write_InvertedLists)
    DB/index/part-NNNNN.json         its record: the global chunk ids [first, first + count) it
                                     holds; written last, so a part with a record is whole
    DB/index/index_infos.json        "layout": "parts" and the list of the parts the index is made
                                     of, written atomically once every part is whole

Why parts: a part is filled by one rank from its range of embedding rows with the shared trained
quantizer and codec (the codes of one part in RAM, never the whole index), and ``add`` (the DB
grew) writes a new part for the new chunks without reading or rewriting the existing ones.

Why the parts are stacked at open time (faiss ``HStackInvertedLists`` over each part's
``OnDiskInvertedLists`` mapped read-only): ``add`` must not rewrite the existing parts, and a
merge needs disk for a second copy of what it merges. The stacked lists cost one list lookup per
part and probed list, and copy each probed list's codes from every part per query; the opener's
memory is the quantizer plus each part's list table (24 bytes a list), the codes stay in the
page cache.

When they are merged (index_builder.index.merge_parts, ``index --merge-parts``, default auto):
parts that ranks filled side by side in one build are merged into one new part once all are
whole (faiss ``OnDiskInvertedLists.merge_from_multiple``, as faiss.contrib.ondisk's
``merge_ondisk`` does), so a search of a fresh index reads one part; a part ``add`` writes stays
separate until more than 16 parts are listed, then all are merged. A merged part is a part like
any other: numbered after the highest listed one, its record the union of their chunk ranges.

The parts list in ``index_infos.json`` is the truth: once it is written, every part file it does
not name (a crashed run's parts under another world size, parts merged into one) is deleted, and
until then a part file not listed is not searched and the next run rewrites it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from chunk_store.framework.atomic import atomic_write_json
from chunk_store.framework.errors import UserError
from chunk_store.layout import INDEX_PART_PREFIX, DBLayout, temp_path
from index_builder.embed.stage import read_rows

LAYOUT = "parts"
PART_MAX_VECTORS = 1 << 22  # a part's codes are in RAM while it is filled: 1.6 GB at SQ8 x 384
ADD_BATCH = 65536


@dataclass(frozen=True)
class PartRecord:
    """One part: its number and the global train chunk ids [first, first + count) it holds."""

    part: int
    first: int
    count: int

    @property
    def stop(self) -> int:
        return self.first + self.count


def plan_parts(start: int, stop: int, first_part: int, min_parts: int = 1,
               max_vectors: int | None = None) -> list[PartRecord]:
    """Rows [start, stop) cut into equal parts, at least ``min_parts`` (a part for every rank)
    and each of at most ``max_vectors`` rows (default PART_MAX_VECTORS), numbered from ``first_part``."""
    max_vectors = max_vectors or PART_MAX_VECTORS
    n = stop - start
    if n <= 0:
        return []
    k = min(n, max(min_parts, -(-n // max_vectors)))
    bounds = [start + n * j // k for j in range(k + 1)]
    return [PartRecord(first_part + j, bounds[j], bounds[j + 1] - bounds[j]) for j in range(k)]


# ----------------------------------------------------------------------------- the record


def next_parts(paths: DBLayout, n: int, min_parts: int, grow: bool) -> tuple[list[PartRecord], list[PartRecord]]:
    """(the listed parts a run keeps, the new parts it fills): after ``add`` (``grow``) the rows
    past the listed parts, else every row; a part for each of ``min_parts`` ranks at least."""
    listed = (listed_parts(paths) or []) if grow else []
    new = plan_parts(max((p.stop for p in listed), default=0), n,
                     max((p.part for p in listed), default=-1) + 1, min_parts=min_parts)
    return listed, new


def read_infos(paths: DBLayout) -> dict[str, Any]:
    """index_infos.json, {} where there is none (or it is unreadable: no index yet)."""
    try:
        return json.loads(paths.index_infos.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def listed_parts(paths: DBLayout) -> list[PartRecord] | None:
    """The parts the index is made of; None where the index is a single file (or none)."""
    infos = read_infos(paths)
    if infos.get("layout") != LAYOUT:
        return None
    return [PartRecord(**p) for p in infos.get("parts", [])]


def has_index(paths: DBLayout) -> bool:
    """An index to search: the single file, or a parts index whose listed files are all there."""
    parts = listed_parts(paths)
    if parts is None:
        return paths.index.exists()
    return paths.index_trained.exists() and all(part_done(paths, p) for p in parts)


def part_done(paths: DBLayout, part: PartRecord) -> bool:
    """The part's record says it holds exactly ``part``'s rows (its files renamed in before it)."""
    try:
        rec = json.loads(paths.index_part_record(part.part).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return rec.get("first") == part.first and rec.get("count") == part.count


def part_files(paths: DBLayout, parts: Sequence[PartRecord]) -> list:
    """Every file of the parts index (the trained index and each part's three files)."""
    out = [paths.index_trained]
    for p in parts:
        out += [paths.index_part_data(p.part), paths.index_part_lists(p.part), paths.index_part_record(p.part)]
    return out


def write_parts_list(paths: DBLayout, infos: dict[str, Any], parts: Sequence[PartRecord]) -> dict[str, Any]:
    """index_infos.json naming ``parts``, replaced atomically; the infos written."""
    infos = {**infos, "layout": LAYOUT, "index_path": paths.index_trained.name,
             "parts": [asdict(p) for p in sorted(parts, key=lambda p: p.part)],
             "size in bytes": sum(f.stat().st_size for f in part_files(paths, parts))}
    atomic_write_json(paths.index_infos, infos)
    return infos


def commit_parts(paths: DBLayout, listed: Sequence[PartRecord], new: Sequence[PartRecord],
                 infos: dict[str, Any]) -> None:
    """Name ``listed`` + ``new`` (each whole) as the index; a single file an earlier build left
    is no longer the index after that."""
    missing = [p.part for p in new if not part_done(paths, p)]
    if missing:
        raise UserError(f"index: parts {missing} are not whole: re-run index")
    write_parts_list(paths, infos, [*listed, *new])
    paths.index.unlink(missing_ok=True)


def trained_fits(paths: DBLayout, key: str, dim: int) -> bool:
    """trained.index is there, empty, with ``key``'s shape: a partial run of the same build."""
    import faiss

    if not paths.index_trained.exists():
        return False
    try:
        have = faiss.extract_index_ivf(faiss.read_index(str(paths.index_trained)))
    except RuntimeError:
        return False
    want = faiss.extract_index_ivf(faiss.index_factory(dim, key))
    return (have.nlist, have.code_size, have.d, have.ntotal) == (want.nlist, want.code_size, want.d, 0)


def remove_parts(paths: DBLayout) -> None:
    """A parts index's files (trained.index, part-*), when another index replaces it."""
    if paths.index_dir.exists():
        for f in paths.index_dir.glob(f"{INDEX_PART_PREFIX}*"):
            f.unlink(missing_ok=True)
    paths.index_trained.unlink(missing_ok=True)


def part_number(name: str) -> int | None:
    """NNNNN of a part file's name (``part-NNNNN.*``), else None."""
    stem = name[len(INDEX_PART_PREFIX):].split(".", 1)[0] if name.startswith(INDEX_PART_PREFIX) else ""
    return int(stem) if stem.isdigit() else None


def remove_unlisted(paths: DBLayout) -> int:
    """Delete every part file the list does not name (the list is the truth: parts a crashed run
    with another world size left, or parts merged into one); records first, so a crash midway
    leaves no record of a part whose data is gone. The number of files removed."""
    listed = {p.part for p in listed_parts(paths) or []}
    if not paths.index_dir.exists():
        return 0
    stray = [f for f in paths.index_dir.glob(f"{INDEX_PART_PREFIX}*")
             if part_number(f.name) is not None and part_number(f.name) not in listed]
    for f in sorted(stray, key=lambda f: f.suffix != ".json"):
        f.unlink(missing_ok=True)
    return len(stray)


def remove_index(paths: DBLayout) -> None:
    """Every file of the index, its record first (a crash between leaves no index, not half of
    one): for --rebuild or a retrain."""
    paths.index_infos.unlink(missing_ok=True)
    paths.index.unlink(missing_ok=True)
    remove_parts(paths)


# ----------------------------------------------------------------------------- writing


def write_trained(index: Any, paths: DBLayout) -> None:
    """The trained, empty IVF, renamed into place when whole."""
    import faiss

    paths.index_dir.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(paths.index_trained)
    faiss.write_index(index, str(tmp))
    os.replace(tmp, paths.index_trained)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """faiss's OnDiskInvertedLists prints "resizing ..." on the C stdout, where the CLI writes
    its JSON summary: sent to stderr while it writes."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def fill_part(paths: DBLayout, shards: Sequence[np.ndarray], part: PartRecord, bf16: bool = False,
              progress: bool = True) -> None:
    """Add rows ``part`` of ``shards`` to a copy of the trained IVF (each to its nearest centroid,
    ids the global chunk ids) and write them as the part's on-disk lists, then its record."""
    import faiss

    from index_builder.index.ivf_build import add_assigned, coarse_centroids, list_assigner

    index = faiss.read_index(str(paths.index_trained))
    ivf = faiss.extract_index_ivf(index)
    centroids = coarse_centroids(ivf)
    if bf16:
        from index_builder.index.centroid_assign import Bf16Assigner

        assigner: Any = Bf16Assigner(centroids)
    else:
        assigner = list_assigner(centroids)
    with tqdm(total=part.count, unit="vec", desc=f"index part {part.part}", disable=not progress,
              leave=False) as bar:
        for a in range(part.first, part.stop, ADD_BATCH):
            b = min(a + ADD_BATCH, part.stop)
            add_assigned(index, ivf, read_rows(shards, a, b), assigner, first_id=a)
            bar.update(b - a)
    write_part(paths, part, [ivf.invlists], ivf.nlist, ivf.code_size)


def write_part(paths: DBLayout, part: PartRecord, sources: Sequence[Any], nlist: int, code_size: int,
               sync: bool = False) -> None:
    """Part ``part``'s files from the inverted lists ``sources`` (their lists concatenated by faiss's
    ``OnDiskInvertedLists.merge_from_multiple``, as faiss.contrib.ondisk.merge_ondisk does): data
    and lists renamed in when whole, then the record. ``sync``: fsynced before the renames (a
    merge deletes the parts it read once its part is listed)."""
    import faiss

    data, lists = paths.index_part_data(part.part), paths.index_part_lists(part.part)
    tmp_data, tmp_lists = temp_path(data), temp_path(lists)
    held = faiss.InvertedListsPtrVector()
    for src in sources:
        held.push_back(src)
    with _stdout_to_stderr():
        ondisk = faiss.OnDiskInvertedLists(nlist, code_size, str(tmp_data))
        ondisk.merge_from_multiple(held.data(), held.size(), False)
    ondisk.filename = data.name  # the opener maps the file beside the lists, wherever the DB is
    faiss.write_InvertedLists(ondisk, faiss.FileIOWriter(str(tmp_lists)))
    del ondisk, held  # unmapped: the data file is whole
    if sync:
        for tmp in (tmp_data, tmp_lists):
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    os.replace(tmp_data, data)
    os.replace(tmp_lists, lists)
    atomic_write_json(paths.index_part_record(part.part), asdict(part))


# ----------------------------------------------------------------------------- opening


def open_parts(paths: DBLayout, parts: Sequence[PartRecord]) -> Any:
    """The trained index searching every part's lists, mapped read-only (module docstring).

    The part objects are kept alive by the returned index (``referenced_objects``, faiss's own
    convention): hold the returned object while searching."""
    import faiss

    if not paths.index_trained.exists():
        raise UserError(f"missing index {paths.index_trained}: run `retro-build-index index --db "
                        f"{paths.root}` first")
    try:
        index = faiss.read_index(str(paths.index_trained))
    except RuntimeError as e:
        raise UserError(f"corrupt index {paths.index_trained}: {str(e).splitlines()[0]}") from None
    ivf = faiss.extract_index_ivf(index)
    opened = [open_part(paths, p, ivf) for p in parts]
    stacked = faiss.InvertedListsPtrVector()
    for lists in opened:
        stacked.push_back(lists)
    combined = opened[0] if len(opened) == 1 else faiss.HStackInvertedLists(stacked.size(), stacked.data())
    ntotal = sum(p.count for p in parts)
    if not opened:
        combined = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(combined, False)
    ivf.ntotal = index.ntotal = ntotal
    index.referenced_objects = [opened, stacked, combined]
    return index


def open_part(paths: DBLayout, part: PartRecord, ivf: Any) -> Any:
    """One part's OnDiskInvertedLists, its data mapped read-only; checked against its record."""
    import faiss

    lists_path, data_path = paths.index_part_lists(part.part), paths.index_part_data(part.part)
    try:
        lists = faiss.downcast_InvertedLists(faiss.read_InvertedLists(
            faiss.FileIOReader(str(lists_path)), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY))
        lists.filename = str(data_path)
        lists.read_only = True
        lists.do_mmap()
    except RuntimeError as e:
        raise UserError(f"corrupt index part {lists_path}: {str(e).splitlines()[0]} "
                        "(delete DB/index and re-run index)") from None
    if (lists.nlist, lists.code_size) != (ivf.nlist, ivf.code_size) or lists.compute_ntotal() != part.count:
        raise UserError(f"index part {lists_path} does not fit {paths.index_trained} or its record "
                        "(delete DB/index and re-run index)")
    return lists


# ----------------------------------------------------------------------------- codes of added rows


def added_codec_check(paths: DBLayout, shards: Sequence[np.ndarray], new: Sequence[PartRecord],
                      seed: int = 0) -> dict[str, Any] | None:
    """How well the codes trained before an ``add`` hold the added rows (the ``new`` parts):
    index_builder.index.codec_check on the trained index (None: no add)."""
    import faiss

    from index_builder.index.codec_check import added_rows_check

    n_old, n_new = (new[0].first, new[-1].stop) if new else (0, 0)
    if n_old <= 0 or n_new <= n_old:
        return None
    return added_rows_check(faiss.read_index(str(paths.index_trained)), shards, n_old, n_new, seed)
