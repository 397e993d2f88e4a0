"""Small, deterministic corpora and databases for tests (ours and the later stages').

Why here and not in tests/: every stage's tests need a real database, and building one the
same way everywhere (tiny vocabulary, short chunks, a val split) keeps the suite fast and the
fixtures honest: they run the real chunk stage, not a hand-made imitation.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

WORDS = ("the of and retrieval chunk model token neighbour database encoder decoder attention "
         "train sequence python function return value index search embedding layer").split()
CODE_LINES = (
    "def f(x):", "    return x + 1", "\tif x:", "        y = [i for i in range(10)]",
    "class A(object):", "    pass", "# a comment", "import os, sys", "print('hello', 42)",
    "    for i in range(3):  # loop", "x = {'a': 1, \"b\": 2.5e-3}",
)
WHITESPACE = (" ", "  ", "    ", "\t", "\n", "\n\n", " \t ", "\u00a0", "\u3000", "\x0c")


def random_text(rng: random.Random, n_parts: int = 40) -> str:
    """A document mixing English, code with indentation, CJK, emoji and odd whitespace."""
    parts: list[str] = []
    for _ in range(n_parts):
        kind = rng.random()
        if kind < 0.35:
            parts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))))
        elif kind < 0.6:
            parts.append("\n".join(rng.choice(CODE_LINES) for _ in range(rng.randint(1, 6))))
        elif kind < 0.72:
            parts.append("".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 8))))
        elif kind < 0.82:
            parts.append("".join(chr(rng.randint(0x1F600, 0x1F64F)) for _ in range(rng.randint(1, 4))))
        elif kind < 0.9:
            parts.append(str(rng.randint(0, 10**9)))
        else:
            parts.append("".join(rng.choice("éüßçøå€£¥—…«»") for _ in range(rng.randint(1, 5))))
        parts.append(rng.choice(WHITESPACE))
    return "".join(parts) + "\n"


def write_corpus(folder: str | Path, texts: Sequence[str], per_folder: int = 7) -> list[Path]:
    """Write ``texts`` as UTF-8 files into nested subfolders; return the paths in walk order."""
    folder = Path(folder)
    paths = []
    for i, text in enumerate(texts):
        sub = folder / f"d{i // per_folder:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"doc_{i:04d}.txt"
        p.write_bytes(text.encode("utf-8"))
        paths.append(p)
    return paths


def build_tiny_db(db: str | Path, corpus: str | Path | None = None, *, n_docs: int = 40,
                  seed: int = 0, vocab_size: int = 400, chunk_size: int = 16, seq_len: int = 64,
                  val_fraction: float = 0.2, workers: int = 1,
                  tokenizer_file: str | None = None) -> Path:
    """Write a random corpus (unless ``corpus`` is given) and run the real chunk stage on it."""
    from chunk_store.build import ChunkConfig, build

    db = Path(db)
    if corpus is None:
        corpus = db.parent / f"{db.name}-corpus"
        rng = random.Random(seed)
        write_corpus(corpus, [random_text(rng) for _ in range(n_docs)])
    cfg = ChunkConfig(inputs=(str(corpus),), chunk_size=chunk_size, seq_len=seq_len,
                      val_fraction=val_fraction, vocab_size=None if tokenizer_file else vocab_size,
                      tokenizer_file=tokenizer_file, workers=workers)
    build(db, cfg)
    return db
