"""Opening an IVF index kept as parts (index_builder.index.parts) vs the same index as one file.

    OMP_NUM_THREADS=1 python benchmarks/bench_index_parts.py --n 200000 --dim 384 --parts 4

Synthetic clustered float16 vectors (bench_scale's generator: topics, documents, chunk noise) are
written as embedding shards; one IVF{nlist},SQ8 is trained on a sample, then filled twice: as
``--parts`` parts (the index stage's layout) and as one knn.index file (the layout before). Each
is opened by :func:`index_builder.index.stage.load_index` in a fresh process, which reports the
seconds to open, its peak RSS (VmHWM) and its private memory (RssAnon) beyond the interpreter's
after its imports, then searches the same queries (nprobe 16; the memory after it beside) and the
ids are compared. A copy of the parts is merged into one part
(index_builder.index.merge_parts, timed: ``merge_s``) and opened the same way.
Modes: ``parts``; ``merged``; ``file-mmap`` (load_index's default: faiss maps an IVF file's lists);
``file-read`` (load_index(mmap=False): the codes read into RAM, as ``update`` did to add).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def build(work: Path, n: int, dim: int, nlist: int, parts: int) -> tuple[Path, Path]:
    """(parts DB, single-file DB) over the same embeddings and trained index."""
    import faiss

    from chunk_store.framework.atomic import atomic_write_json
    from chunk_store.layout import DBLayout
    from index_builder.embed.stage import open_embeddings
    from index_builder.index.ivf_build import build_ivf
    from index_builder.index.parts import fill_part, plan_parts, write_parts_list, write_trained
    from index_builder.index.plan import IndexPlan

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_scale import synthetic_embeddings

    parts_db, file_db = work / "parts", work / "file"
    emb = DBLayout(parts_db).embeddings_dir("train")
    emb.mkdir(parents=True, exist_ok=True)
    shard = 65536
    for i, a in enumerate(range(0, n, shard)):
        docs = np.arange(a, min(a + shard, n)) // 20  # 20 chunks a document
        np.save(DBLayout(parts_db).embedding_shard("train", i), synthetic_embeddings(docs, dim, 0, i))
    shards = open_embeddings(parts_db, "train")
    plan = IndexPlan("ivf", f"IVF{nlist},SQ8", nlist=nlist, train_size=min(n, 64 * nlist), codec="SQ8")
    t0 = time.time()
    index, _ = build_ivf(shards, plan, progress=False, train_only=True)
    print(f"train {time.time() - t0:.1f}s", file=sys.stderr)
    p_paths = DBLayout(parts_db)
    write_trained(index, p_paths)
    t0 = time.time()
    records = plan_parts(0, n, 0, min_parts=parts)
    for rec in records:
        fill_part(p_paths, shards, rec, progress=False)
    print(f"fill {parts} parts {time.time() - t0:.1f}s", file=sys.stderr)
    write_parts_list(p_paths, {"index_key": plan.key, "index_param": "nprobe=16"}, records)
    # the single file: the same trained index, every row added in memory, written whole
    from index_builder.index.ivf_build import add_assigned, coarse_centroids, list_assigner
    from index_builder.embed.stage import read_rows

    whole = faiss.read_index(str(p_paths.index_trained))
    ivf = faiss.extract_index_ivf(whole)
    assigner = list_assigner(coarse_centroids(ivf))
    for a in range(0, n, 65536):
        add_assigned(whole, ivf, read_rows(shards, a, min(a + 65536, n)), assigner)
    f_paths = DBLayout(file_db)
    f_paths.index_dir.mkdir(parents=True, exist_ok=True)
    faiss.write_index(whole, str(f_paths.index))
    atomic_write_json(f_paths.index_infos, {"index_key": plan.key, "index_param": "nprobe=16"})
    np.save(work / "queries.npy", read_rows(shards, 0, n)[::max(1, n // 500)][:500] + 0.01)
    return parts_db, file_db


def merge_copy(parts_db: Path, work: Path) -> tuple[Path, float]:
    """(a DB whose index is a copy of ``parts_db``'s parts merged into one, the merge's seconds)."""
    import shutil

    from chunk_store.layout import DBLayout
    from index_builder.index.merge_parts import merge_parts
    from index_builder.index.parts import listed_parts

    merged_db = work / "merged"
    shutil.rmtree(merged_db, ignore_errors=True)
    shutil.copytree(DBLayout(parts_db).index_dir, DBLayout(merged_db).index_dir)
    paths = DBLayout(merged_db)
    t0 = time.time()
    merge_parts(paths, listed_parts(paths) or [], progress=False)
    return merged_db, time.time() - t0


def open_child(db: Path, mode: str, queries: Path) -> dict:
    """(in a fresh process) open the index, measure, search."""
    import faiss

    faiss.omp_set_num_threads(1)  # (faiss imported before the baseline)

    from index_builder.index.stage import load_index

    base_anon, base_hwm = status_mb("RssAnon"), status_mb("VmHWM")
    t0 = time.time()
    index = load_index(db, mmap=mode != "file-read")
    seconds = time.time() - t0
    out = {"mode": mode, "open_s": round(seconds, 3), "peak_rss_mb": round(status_mb("VmHWM"), 1),
           "peak_rss_over_imports_mb": round(status_mb("VmHWM") - base_hwm, 1),
           "anon_over_imports_mb": round(status_mb("RssAnon") - base_anon, 1), "ntotal": int(index.ntotal)}
    q = np.load(queries)
    t0 = time.time()
    _, ids = index.search(q, 10)
    out["search_500q_s"] = round(time.time() - t0, 3)
    out["peak_rss_after_search_mb"] = round(status_mb("VmHWM"), 1)
    out["anon_after_search_over_imports_mb"] = round(status_mb("RssAnon") - base_anon, 1)
    np.save(queries.parent / f"ids-{mode}.npy", ids)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true", help="open the indexes --work already holds")
    ap.add_argument("--open-child", nargs=3, metavar=("DB", "MODE", "QUERIES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.open_child:
        db, mode, queries = args.open_child
        print(json.dumps(open_child(Path(db), mode, Path(queries))))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_index_parts-"))
    if args.reuse and (work / "queries.npy").exists():
        parts_db, file_db = work / "parts", work / "file"
    else:
        parts_db, file_db = build(work, args.n, args.dim, args.nlist, args.parts)
    merged_db, merge_s = merge_copy(parts_db, work)
    rows = []
    for db, mode in ((parts_db, "parts"), (merged_db, "merged"), (file_db, "file-mmap"), (file_db, "file-read")):
        p = subprocess.run([sys.executable, __file__, "--open-child", str(db), mode, str(work / "queries.npy")],
                           capture_output=True, text=True, check=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    same = all(np.array_equal(np.load(work / "ids-parts.npy"), np.load(work / f"ids-{m}.npy"))
               for m in ("merged", "file-mmap", "file-read"))
    codes_mb = sum(f.stat().st_size for f in (parts_db / "index").glob("part-*.ivfdata")) / 2 ** 20
    print(json.dumps({"n": args.n, "dim": args.dim, "nlist": args.nlist, "parts": args.parts,
                      "codes_mb": round(codes_mb, 1), "merge_s": round(merge_s, 2), "same_ids": same, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
