"""A tiny retrieval database for the dataset / training / evaluation tests, built once per process.

The chunk stage is the real ``retro-build-index chunk`` over a few standard-library
folders; the neighbours are written here (ids of chunks from *other* documents, some -1) so
these tests need neither BERT nor faiss.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

from chunk_store.layout import DBLayout
from chunk_store.manifest import atomic_save_npy, load_manifest, now_iso, record_stage

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
CHUNK, SEQ, VOCAB, K = 16, 64, 512, 2


def write_fake_neighbours(db: Path, k: int = K, seed: int = 0, missing: float = 0.1) -> None:
    """Random train chunk ids from another document for every chunk of both splits, and record
    the knn stage (what ``retro-build-index knn`` leaves behind, without the search)."""
    rng = np.random.default_rng(seed)
    train_docs = np.load(DBLayout(db).shard(0).doc_ids("train"))
    for split in ("train", "val"):
        docs = np.load(DBLayout(db).shard(0).doc_ids(split))
        ids = rng.integers(0, len(train_docs), size=(len(docs), k))
        if split == "train":  # never a chunk of the same document (the paper's rule)
            same = train_docs[ids] == docs[:, None]
            ids[same] = (ids[same] + 997) % len(train_docs)
            ids[train_docs[ids] == docs[:, None]] = -1
        ids[rng.random(ids.shape) < missing] = -1
        atomic_save_npy(db / split / "neighbours.npy", ids.astype(np.int64))
        dist = np.where(ids >= 0, rng.random(ids.shape), np.inf).astype(np.float32)
        atomic_save_npy(db / split / "neighbour_distances.npy", dist)
    t = now_iso()
    record_stage(db, "knn", params={"k": k, "fake": True}, started=t, finished=t, manifest=load_manifest(db))


def build_chunk_db(out: Path, chunk: int = CHUNK, seq: int = SEQ, vocab: int = VOCAB) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    cmd = [PY, "-m", "index_builder", "chunk", "--out", str(out), "--glob", "*.py",
           "--input", str(stdlib / "json"), "--input", str(stdlib / "email"),
           "--vocab-size", str(vocab), "--chunk-size", str(chunk), "--seq-len", str(seq),
           "--val-fraction", "0.2", "--workers", "1"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)
    return out


@functools.lru_cache(maxsize=None)
def _cached(neighbours: bool) -> Path:
    root = Path(tempfile.mkdtemp(prefix="retro-testdb-"))
    db = build_chunk_db(root / "db")
    if neighbours:
        write_fake_neighbours(db)
    return db


def tiny_db(tmp_path: Path, neighbours: bool = True) -> Path:
    """A private copy (tests may modify it) of the cached tiny DB."""
    dst = tmp_path / ("db" if neighbours else "db-no-knn")
    shutil.copytree(_cached(neighbours), dst)
    return dst


def tiny_model_sets(vocab: int = VOCAB, pad_id: int = 3) -> list[str]:
    """--set overrides for a model small enough to train a few steps in seconds on CPU."""
    return [f"model.vocab_size={vocab}", f"model.pad_id={pad_id}", f"model.chunk_size={CHUNK}",
            f"model.num_neighbours={K}", "model.dim=32", "model.depth=2", "model.heads=2",
            "model.dim_head=16", "model.enc_dim=32", "model.enc_depth=1", "model.enc_heads=2",
            "model.enc_dim_head=16", "model.cca_layers=[2]", f"seq_len={SEQ}"]
