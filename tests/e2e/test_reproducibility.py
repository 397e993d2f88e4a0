"""Two clean builds of a small database, every artifact compared byte for byte (issue 12).

The index is HNSW (the type whose threaded build and timed efSearch differed) built with
``--deterministic``; manifest.json is compared with its times and durations removed (they are
the only fields that may differ, see docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.fixtures import run_cli, shared_tiny_bert, stdlib_corpus

VOLATILE = re.compile(r"seconds|per_s$|^started$|^finished$")


def canonical(obj):
    """The manifest without wall-clock fields; ids made from a finish time keep their stable part."""
    if isinstance(obj, dict):
        return {k: canonical(v) for k, v in obj.items() if not VOLATILE.search(k)}
    if isinstance(obj, list):
        return [canonical(v) for v in obj]
    if isinstance(obj, str):
        return re.sub(r"@\d{4}-\d\d-\d\dT[\d:+]+$", "@TIME", obj)
    return obj


def artifacts(db: Path) -> dict[str, bytes]:
    return {p.relative_to(db).as_posix(): p.read_bytes() for p in sorted(db.rglob("*")) if p.is_file()}


def test_two_clean_builds_give_the_same_bytes(tmp_path, tmp_path_factory):
    corpus = stdlib_corpus(tmp_path / "corpus", ("json",))
    bert = shared_tiny_bert(tmp_path_factory)
    builds = []
    for name in ("a", "b"):
        db = tmp_path / name
        assert run_cli(["all", "--input", corpus, "--out", db, "--vocab-size", 500, "--chunk-size", 32,
                        "--seq-len", 128, "--val-fraction", 0.2, "--embedder", bert, "--device", "cpu",
                        "--tokenize-workers", 0, "--k", 3, "--shard-size", 200, "--index-key", "HNSW32",
                        "--deterministic"]) == 0
        builds.append(artifacts(db))
    a, b = builds
    assert sorted(a) == sorted(b)
    assert {"index/knn.index", "train/neighbours/index.json", "train/neighbours/ids_000000.g1.npy", "tokenizer.model",
            "train/embeddings/000000.npy", "shards/000000/val/chunks.npy", "shards/000000/digests.npy"} <= set(a)
    differ = [name for name in a if name != "manifest.json" and a[name] != b[name]]
    assert differ == []
    ma, mb = (json.loads(x["manifest.json"]) for x in (a, b))
    assert ma["stages"]["index"]["params"]["deterministic"] is True
    assert canonical(ma) == canonical(mb)
