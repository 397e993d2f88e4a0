"""Small real databases for tests of embed / index / knn / Retriever / server (and later stages).

Why a tiny random BERT: the pipeline's logic (bucketing, pooling, shards, exclusion, resume)
does not depend on the weights, and a 2-layer 32-wide BertModel with MiniLM's real word-piece
tokenizer embeds thousands of chunks a second on two cores. The real MiniLM is used by the few
tests that need meaningful similarity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def make_tiny_bert(folder: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised BertModel with the default embedder's tokenizer, saved to ``folder``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from index_builder.embed import _quiet_transformers, default_embedder

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    tok = AutoTokenizer.from_pretrained(default_embedder())
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128)
    with _quiet_transformers():
        BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run_cli(argv: Sequence[str]) -> int:
    from index_builder.cli import main

    return main([str(a) for a in argv])


def build_index_db(db: str | Path, embedder: str | Path, *, n_docs: int = 30, seed: int = 0,
                   chunk_size: int = 16, shard_size: int = 256, index_key: str | None = None,
                   stages: Sequence[str] = ("embed", "index", "knn"), k: int = 2,
                   corpus: str | Path | None = None) -> Path:
    """Chunk a random corpus (chunk_store.testing) and run the requested stages on it."""
    from chunk_store.testing import build_tiny_db

    db = Path(db)
    if not (db / "manifest.json").exists():
        build_tiny_db(db, corpus=corpus, n_docs=n_docs, seed=seed, chunk_size=chunk_size,
                      seq_len=4 * chunk_size, val_fraction=0.2)
    common = ["--db", db]
    if "embed" in stages:
        assert run_cli(["embed", *common, "--embedder", embedder, "--shard-size", shard_size,
                        "--tokenize-workers", 0, "--device", "cpu"]) == 0
    if "index" in stages:
        extra = ["--index-key", index_key] if index_key else []
        assert run_cli(["index", *common, "--recall-sample", 300, *extra]) == 0
    if "knn" in stages:
        assert run_cli(["knn", *common, "--k", k, "--shard-size", shard_size, "--device", "cpu"]) == 0
    return db


def shared_path(tmp_path_factory: object, name: str) -> Path:
    """A folder shared by every test module of one pytest session (built once, then reused)."""
    base = Path(tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    return base / f"index-builder-shared-{name}"


def shared_tiny_bert(tmp_path_factory: object) -> Path:
    return make_tiny_bert(shared_path(tmp_path_factory, "tiny-bert"))


def shared_db(tmp_path_factory: object) -> Path:
    """The tiny random-BERT database with every stage done (HNSW index, k=2), built once."""
    db = shared_path(tmp_path_factory, "db")
    done = db / "train" / "neighbours.npy"
    if not done.exists():
        build_index_db(db, shared_tiny_bert(tmp_path_factory))
    return db


def stdlib_corpus(folder: str | Path, modules: Sequence[str] = ("json", "email/mime", "wsgiref",
                                                                 "urllib", "http")) -> Path:
    """Copy a few standard-library packages' .py files: a real corpus, identical everywhere."""
    import shutil
    import sysconfig

    folder = Path(folder)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for mod in modules:
        for src in sorted((stdlib / mod).glob("*.py")):
            dst = folder / mod / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    return folder


def shared_minilm_db(tmp_path_factory: object) -> Path:
    """A real corpus (stdlib packages) embedded with the real default MiniLM; every stage done."""
    db = shared_path(tmp_path_factory, "minilm-db")
    if not (db / "train" / "neighbours.npy").exists():
        from chunk_store.testing import build_tiny_db

        corpus = stdlib_corpus(shared_path(tmp_path_factory, "stdlib-corpus"), ("json",))
        build_tiny_db(db, corpus=corpus, vocab_size=600, chunk_size=32, seq_len=128,
                      val_fraction=0.2)
        from index_builder.embed import default_embedder

        build_index_db(db, default_embedder(), shard_size=4096)
    return db
