"""retro-build-index all / info end to end, and one-line errors for stages run out of order."""

from __future__ import annotations

import json
import subprocess
import sys

from chunk_store.manifest import load_manifest
from chunk_store.neighbour_shards import load_neighbours
from tests.fixtures import shared_tiny_bert, stdlib_corpus


def test_all_then_info_then_rerun_is_a_no_op(tmp_path, tmp_path_factory, capsys):
    from index_builder.cli import main

    bert = shared_tiny_bert(tmp_path_factory)
    corpus = stdlib_corpus(tmp_path / "corpus", ("json",))
    db = tmp_path / "db"
    argv = ["all", "--input", str(corpus), "--out", str(db), "--vocab-size", "500",
            "--chunk-size", "32", "--seq-len", "128", "--val-fraction", "0.2", "--workers", "1",
            "--embedder", str(bert), "--device", "cpu", "--tokenize-workers", "0", "--k", "3",
            "--shard-size", "200"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index('{\n  "summary"'):])["summary"]
    assert set(summary) == {"chunk", "embed", "index", "knn"}
    assert summary["index"]["recall"]["recall@2"] >= 0.9
    m = load_manifest(db)
    assert all(m["stages"][s]["finished"] for s in ("chunk", "embed", "index", "knn"))
    nb = load_neighbours(db, "train")[0]
    assert nb.shape == (m["counts"]["train"]["chunks"], 3)

    assert main(["info", "--db", str(db)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["status"] == {"chunk": "done", "embed": "done", "index": "done", "knn": "done"}
    assert info["manifest"]["stages"]["index"]["stats"]["recall"]["recall@2"] >= 0.9
    assert main(["info", "--db", str(db), "--brief"]) == 0
    brief = json.loads(capsys.readouterr().out)
    assert brief["status"] == info["status"] and "inputs" not in brief["manifest"]
    assert brief["manifest"]["stages"]["index"]["recall"] == info["manifest"]["stages"]["index"]["stats"]["recall"]

    # search: the Retriever from the command line; a chunk's own text finds that chunk first
    from chunk_store import ChunkStore

    store = ChunkStore.open(db, "train")
    query = store.text(5)
    assert main(["search", "--db", str(db), "--k", "2", query]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in found] == [query]
    assert found[0]["neighbours"][0]["chunk_id"] == 5 and len(found[0]["neighbours"]) == 2
    assert main(["search", "--db", str(db), "--k", "0", query]) == 2

    mtime = (db / "train" / "neighbours" / "index.json").stat().st_mtime_ns
    assert main(argv) == 0  # everything already done: resumes to a no-op
    assert (db / "train" / "neighbours" / "index.json").stat().st_mtime_ns == mtime
    # another k on the same DB is refused, naming both values
    p = subprocess.run([sys.executable, "-m", "index_builder", "knn", "--db", str(db), "--k", "2"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "k=3" in p.stderr and "k=2" in p.stderr


def test_stage_before_its_inputs_is_one_line(tmp_path):
    from tests.fixtures import build_tiny_db

    db = build_tiny_db(tmp_path / "db", n_docs=3)
    for stage, needs in (("knn", "index"), ("index", "embed")):
        p = subprocess.run([sys.executable, "-m", "index_builder", stage, "--db", str(db)],
                           capture_output=True, text=True)
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
        assert f"needs the '{needs}' stage first" in p.stderr


def test_cli_defaults_are_the_stage_configs_defaults():
    """Defaults live in one place: a stage's config dataclass; the parser only repeats them."""
    import pytest

    from chunk_store.framework.stage import config_from_args
    from index_builder.cli import build_parser
    from index_builder.embed.stage import EmbedConfig
    from index_builder.index.stage import IndexConfig
    from index_builder.knn.stage import KnnConfig

    parser = build_parser()
    configs = {"embed": EmbedConfig, "index": IndexConfig, "knn": KnnConfig}
    for command, cls in configs.items():
        args = parser.parse_args([command, "--db", "x"])
        assert config_from_args(cls, args) == cls(), command
    every = parser.parse_args(["all", "--out", "x", "--input", "y"])  # one parser, every stage's options
    for cls in configs.values():
        assert config_from_args(cls, every) == cls()
    # --device is the index stage's too (it runs the recall measurement's exact search)
    assert config_from_args(IndexConfig, parser.parse_args(["index", "--db", "x", "--device", "cpu"])).device == "cpu"
    with pytest.raises(SystemExit):
        parser.parse_args(["chunk", "--out", "x", "--device", "cpu"])  # chunk has no device
