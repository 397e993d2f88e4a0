"""knn --refresh after add: incremental (old rows merge the added chunks) vs full (every row again).

    nice -n 19 python benchmarks/bench_knn_refresh.py --docs 400 --added 20,80 --threads 1

A database A is chunked (the real chunk stage on random word documents), embedded with
bench_scale's synthetic clustered vectors (no BERT), indexed (``--index-key``) and knn'd; then for
each added size, a copy of it gets that many new documents (the real ``add`` stage), synthetic
embeddings for the new chunks (appended: the old rows stay as they were) and the grown index
(``index`` adds the vectors), and two copies of that run ``knn --refresh`` (incremental) and
``knn --refresh full``, each in its own process: wall and CPU seconds (user + system of the child)
the stage's own seconds (setup, index load and recall tuning included) and its units' (merging
old rows; searching rows through the whole index), and the work it records (queries searched
through the whole index, old rows merged, added vectors scanned: exact, all of them a query; IVF,
nprobe / nlist of them). The merged neighbours are compared with the full
refresh's (the share of ids equal; with an exact index the rest are ties). A third copy runs a
plain ``knn`` (the new rows only). Each run's neighbour bytes written: the per-shard files it wrote
(chunk_store.neighbour_shards: only shards with a changed row) beside what the single-file assembly
before them wrote (every split's whole neighbours.npy + neighbour_distances.npy, after every run).

Prints a markdown table; ``--write`` replaces the ``bench_knn_refresh`` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scale import synthetic_embeddings, write_embeddings  # noqa: E402
from report import machine, write_section  # noqa: E402

DIM = 32


def corpus(folder: Path, n_docs: int, seed: int) -> Path:
    """``n_docs`` documents of 150-600 random words from a 2,000-word vocabulary."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(2000)]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(150, 600)))
        (folder / f"doc{seed}_{i:05d}.txt").write_text(text + "\n")
    return folder


def cli(*argv: object) -> None:
    from index_builder.cli import main

    if main([str(a) for a in argv]) != 0:
        raise SystemExit(f"failed: {argv}")


def append_embeddings(db: Path, seed: int, dim: int = DIM) -> None:
    """The new chunks' synthetic embeddings as a new shard file per split, the embed stage
    recorded again (same embedder id, a new finish time: the index adds the new vectors)."""
    from chunk_store import ChunkStore
    from chunk_store.framework.atomic import atomic_save_npy
    from chunk_store.layout import DBLayout
    from chunk_store.manifest import load_manifest, now_iso, record_stage
    from index_builder.embed.stage import open_embeddings

    paths, manifest = DBLayout(db), load_manifest(db)
    for split in ("train", "val"):
        docs = np.asarray(ChunkStore.open(db, split).doc_ids)
        have = sum(a.shape[0] for a in open_embeddings(db, split)) if paths.embeddings_dir(split).exists() else 0
        if len(docs) > have:
            offset = 10 ** 9 if split == "val" else 0
            files = len(list(paths.embeddings_dir(split).glob("*.npy")))
            atomic_save_npy(paths.embedding_shard(split, files),
                            synthetic_embeddings(docs[have:] + offset, dim, seed, files))
    embed = manifest["stages"]["embed"]
    time.sleep(1.1)  # the index sees a new embed record by its finish time, to the second
    record_stage(db, "embed", params=embed["params"], started=embed["started"], finished=now_iso(),
                 stats=embed["stats"], manifest=manifest)


def timed_knn(db: Path, args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    """One knn run in its own process: wall, CPU of the child, the stage's recorded work."""
    from chunk_store.manifest import load_manifest

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "index_builder", "knn", "--db", str(db), "--k", str(args.k),
                        "--device", "cpu", "--threads", str(args.threads), "--shard-size", str(args.shard_size),
                        *extra], capture_output=True, text=True)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    stats = load_manifest(db)["stages"]["knn"]["stats"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    written, whole = neighbour_bytes(db)
    return {"wall": wall, "cpu": cpu, "stage_s": stats["seconds"], **stats["refresh"],
            "bytes_written": written, "bytes_single_file": whole,
            "shards_written": sum(stats[s]["shards_written"] for s in ("train", "val")),
            "shards": sum(stats[s]["shards_written"] + stats[s]["shards_kept"] for s in ("train", "val"))}


NPY_HEADER = 128  # bytes: np.save's header of a 2-D array (format 1.0)


def neighbour_bytes(db: Path) -> tuple[int, int]:
    """(bytes of the neighbour shard files the last knn run wrote: those of the index's newest
    generation, bytes the single-file assembly wrote: both splits' whole (n, k) pair of files)."""
    from chunk_store.layout import DBLayout
    from chunk_store.neighbour_shards import read_index

    written = whole = 0
    for split in ("train", "val"):
        index = read_index(db, split)
        if index is None:
            continue
        folder, mark = DBLayout(db).neighbours_dir(split), f".g{index.generation}.npy"
        written += sum((folder / name).stat().st_size for sh in index.shards for name in (sh.ids, sh.dist)
                       if name.endswith(mark))
        whole += 2 * NPY_HEADER + index.rows * index.k * (8 + 4)  # int64 ids + float32 distances
    return written, whole


def agreement(a: Path, b: Path) -> float:
    """The share of neighbour ids equal between two databases' train and val rows."""
    eq = n = 0
    from chunk_store.neighbour_shards import load_neighbours

    for split in ("train", "val"):
        x, y = load_neighbours(a, split)[0], load_neighbours(b, split)[0]
        eq, n = eq + int((x == y).sum()), n + x.size
    return eq / max(n, 1)


def changed_share(before: dict[str, np.ndarray], db: Path) -> float:
    """The share of the old rows (both splits) whose neighbour ids the run changed."""
    from chunk_store.neighbour_shards import load_neighbours

    changed = total = 0
    for split, old in before.items():
        new = load_neighbours(db, split)[0][:len(old)]
        changed, total = changed + int((new != old).any(axis=1).sum()), total + len(old)
    return changed / max(total, 1)


def run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from chunk_store.manifest import load_manifest
    from chunk_store.neighbour_shards import load_neighbours

    base = work / "base"
    cli("chunk", "--input", corpus(work / "a", args.docs, 0), "--out", base, "--vocab-size", 400,
        "--chunk-size", 64, "--seq-len", 256, "--val-fraction", 0.1)
    write_embeddings(base, DIM, seed=0)
    cli("index", "--db", base, "--index-key", args.index_key, "--recall-sample", 200)
    cli("knn", "--db", base, "--k", args.k, "--device", "cpu", "--threads", args.threads,
        "--shard-size", args.shard_size)
    n_old = load_manifest(base)["counts"]["train"]["chunks"]
    rows = []
    for added in args.added:
        grown = work / f"grown{added}"
        shutil.copytree(base, grown)
        cli("add", "--db", grown, "--input", corpus(work / f"b{added}", added, added))
        append_embeddings(grown, seed=0)
        cli("index", "--db", grown, "--index-key", args.index_key, "--recall-sample", 200)
        full, plain, fwd = work / f"full{added}", work / f"plain{added}", work / f"forward{added}"
        for copy in (full, plain, fwd):
            shutil.copytree(grown, copy)
        before = {s: load_neighbours(grown, s)[0] for s in ("train", "val")}
        inc = timed_knn(grown, args, "--refresh", "incremental")  # the reverse pass where it pays
        inc["old_rows_changed"] = changed_share(before, grown)
        forward = timed_knn(fwd, args, "--refresh", "incremental", "--reverse-depth", "0")
        forward["old_rows_changed"] = changed_share(before, fwd)
        ful = timed_knn(full, args, "--refresh", "full")
        new = timed_knn(plain, args)
        n = load_manifest(grown)["counts"]["train"]["chunks"]
        rows.append({"old_train": n_old, "added_train": n - n_old, "incremental": inc, "forward": forward,
                     "full": ful, "new rows": new, "same_ids": agreement(grown, full),
                     "same_ids_forward": agreement(fwd, full)})
        for db in (full, grown, plain, fwd):
            shutil.rmtree(db)
    return rows


def bytes_table(rows: Sequence[dict[str, Any]]) -> str:
    """Neighbour bytes each run wrote: per-shard files vs the single-file assembly."""
    out = ["| train chunks old + added | knn run | old rows changed | shards written / all | bytes written (per shard) "
           "| bytes written (single file) | ratio |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for mode in ("new rows", "incremental", "full"):
            m = r[mode]
            changed = f"{m['old_rows_changed']:.3f}" if "old_rows_changed" in m else "-"
            out.append(f"| {r['old_train']:,} + {r['added_train']:,} | {mode} | {changed} "
                       f"| {m['shards_written']} / {m['shards']} "
                       f"| {m['bytes_written']:,} | {m['bytes_single_file']:,} "
                       f"| {m['bytes_written'] / max(m['bytes_single_file'], 1):.3f} |")
    return "\n".join(out)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """incremental: what --refresh chooses (the reverse pass where it pays); forward: every old row
    searches the added chunks (--reverse-depth 0); full: every row through the whole index."""
    out = ["| train chunks old + added | refresh | added chunks found by | wall s | CPU s | stage s | merge s "
           "| search s | queries searched | old rows merged | reverse queries | added vectors scanned "
           "| ids equal to full |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for mode in ("incremental", "forward", "full"):
            if mode not in r:
                continue
            m = r[mode]
            same = {"incremental": r["same_ids"], "forward": r.get("same_ids_forward")}.get(mode)
            out.append(f"| {r['old_train']:,} + {r['added_train']:,} | {mode} | {m.get('added_search') or '-'} "
                       f"| {m['wall']:.1f} | {m['cpu']:.1f} "
                       f"| {m['stage_s']:.2f} | {m['merge_seconds']:.2f} | {m['search_seconds']:.2f} | {m['searched_queries']:,} "
                       f"| {m['merged_queries']:,} | {m.get('reverse_queries', 0):,} "
                       f"| {m['added_vectors_scanned']:,} | {'-' if same is None else f'{same:.4f}'} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=400, help="documents in A")
    p.add_argument("--added", type=lambda s: [int(x) for x in s.split(",")], default=[20, 80],
                   help="documents added, one run each (comma-separated)")
    p.add_argument("--index-key", default="Flat")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shard-size", type=int, default=16384, help="knn's rows a shard (the default of the CLI)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--write", action="store_true", help="replace the section of docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-knn-refresh-") as tmp:
        rows = run(args, Path(tmp))
    text = table(rows) + "\n\n" + bytes_table(rows)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.write:
        write_section("bench_knn_refresh", f"{machine()}, index {args.index_key}, k={args.k}, "
                                           f"--threads {args.threads}, --shard-size {args.shard_size}\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
