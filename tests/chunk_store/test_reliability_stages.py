"""What every DB stage shares, under faults (issue 12): a full disk is one line and resumes; a
damaged output is rebuilt, never "already done"; what changes the bytes is a refused parameter."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from chunk_store.layout import DBLayout
from chunk_store.manifest import load_manifest
from chunk_store.neighbour_shards import read_index
from tests.fixtures import run_cli, shared_db, shared_tiny_bert
from index_builder.cli import main as cli
from tests.fixtures import chunk_argv, outputs


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "/some/where/part.npz")


@pytest.mark.parametrize("target", ["chunk_store.chunk.part_files.PartWriter.close", "chunk_store.chunk.packing.NpyWriter.append"])
def test_a_full_disk_in_the_chunk_stage_is_one_line_and_resumes(target, tmp_path, monkeypatch, capsys,
                                                                  corpus, reference_db):
    db = tmp_path / "db"
    with monkeypatch.context() as m:
        m.setattr(target, full_disk)
        assert cli(chunk_argv(corpus, db, "--workers", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "chunk: no space left on the device writing /some/where/part.npz (" in err and " free, about " in err
    assert "re-run the same command (it resumes)" in err
    assert cli(chunk_argv(corpus, db, "--workers", "1")) == 0
    assert outputs(db) == outputs(reference_db)


def test_a_full_disk_in_embed_is_one_line(tmp_path, tmp_path_factory, monkeypatch, capsys):
    db = tmp_path / "db"
    shutil.copytree(shared_db(tmp_path_factory), db)
    shutil.rmtree(DBLayout(db).embeddings_dir("train"))
    argv = ["embed", "--db", db, "--embedder", shared_tiny_bert(tmp_path_factory), "--shard-size", 256,
            "--tokenize-workers", 0, "--device", "cpu"]
    with monkeypatch.context() as m:
        m.setattr("index_builder.embed.stage.atomic_save_npy", full_disk)
        assert run_cli(argv) == 2
    assert "embed: no space left on the device writing" in capsys.readouterr().err
    assert run_cli(argv) == 0


def test_a_damaged_output_is_rebuilt_not_already_done(tmp_path, tmp_path_factory, capsys):
    db = tmp_path / "db"
    shutil.copytree(shared_db(tmp_path_factory), db)
    paths = DBLayout(db)

    def first_shard() -> Path:  # knn's first neighbour shard (a rebuilt one gets the next generation's name)
        return paths.neighbours_dir("train") / read_index(db, "train").shards[0].ids

    argv_knn = ["knn", "--db", db, "--k", 2, "--shard-size", 256, "--device", "cpu"]
    argv_embed = ["embed", "--db", db, "--embedder", shared_tiny_bert(tmp_path_factory), "--shard-size", 256,
                  "--tokenize-workers", 0, "--device", "cpu"]
    for path, argv, now in ((first_shard(), argv_knn, first_shard),
                            (paths.embedding_shard("train", 0), argv_embed, lambda: paths.embedding_shard("train", 0))):
        good = path.read_bytes()
        path.write_bytes(good[: len(good) - 40])  # truncated
        capsys.readouterr()
        assert run_cli(argv) == 0
        assert "already done" not in capsys.readouterr().out
        assert now().read_bytes() == good
    # the same size but a header that lies: rebuilt too
    path = first_shard()
    good = path.read_bytes()
    data = bytearray(good)
    data[8:20] = b"{'descr': 'x"
    path.write_bytes(bytes(data))
    assert run_cli(argv_knn) == 0
    assert first_shard().read_bytes() == good
    assert load_manifest(db)["stages"]["knn"]["files"][f"train/neighbours/{first_shard().name}"] == len(good)


def test_embed_resumed_with_another_dtype_is_refused(tmp_path, tmp_path_factory, capsys):
    db = shared_db(tmp_path_factory)
    done = load_manifest(db)["stages"]["embed"]["params"]
    other = "fp32" if done["compute_dtype"] == "bf16" else "bf16"
    base = ["embed", "--db", db, "--embedder", shared_tiny_bert(tmp_path_factory), "--tokenize-workers", 0,
            "--device", "cpu"]
    assert run_cli(base + ["--shard-size", 256, "--dtype", other]) == 2
    assert "compute_dtype differs" in capsys.readouterr().err
    assert run_cli(base + ["--shard-size", 256, "--batch-size", done["batch_size"] + 1]) == 2
    assert "batch_size differs" in capsys.readouterr().err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import random

    from tests.fixtures import random_text, write_corpus

    root = tmp_path_factory.mktemp("enospc-corpus")
    rng = random.Random(7)
    write_corpus(root, [random_text(rng, rng.randint(1, 80)) for _ in range(20)])
    return root


@pytest.fixture(scope="module")
def reference_db(corpus, tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("enospc-ref") / "db"
    assert cli(chunk_argv(corpus, db, "--workers", "1")) == 0
    return db


def test_ctrl_c_during_embed_is_one_line_and_resumes(tmp_path, tmp_path_factory):
    import os
    import subprocess
    import sys

    from chunk_store.framework.stage import CRASH_ENV
    from tests.fixtures import build_tiny_db, sigint_default

    db = build_tiny_db(tmp_path / "db", n_docs=12, chunk_size=16, seq_len=64, val_fraction=0.2)
    args = ["embed", "--db", str(db), "--embedder", str(shared_tiny_bert(tmp_path_factory)),
            "--shard-size", "100", "--device", "cpu"]
    # Ctrl-C with a tokenizer worker process running: the process group gets SIGINT
    p = subprocess.run([sys.executable, "-m", "index_builder", *args, "--tokenize-workers", "1"],
                       capture_output=True, text=True, timeout=300, start_new_session=True,
                       env={**os.environ, CRASH_ENV: "embed:1:sigint"}, preexec_fn=sigint_default)
    assert p.returncode == 130, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "KeyboardInterrupt" not in p.stderr, p.stderr[-3000:]
    assert not load_manifest(db)["stages"]["embed"]["finished"]
    assert run_cli([*args, "--tokenize-workers", "0"]) == 0  # the resume, in this process
    assert load_manifest(db)["stages"]["embed"]["finished"]


def test_a_killed_index_build_leaves_no_folder_behind(tmp_path, tmp_path_factory):
    db = tmp_path / "db"
    shutil.copytree(shared_db(tmp_path_factory), db)
    stale = DBLayout(db).index_build_dir(pid=2**22 + 12345)  # a writer that is gone (kill -9)
    stale.mkdir(parents=True)
    (stale / "knn.index").write_bytes(b"half")
    (db / "index" / "knn.index").unlink()
    assert run_cli(["index", "--db", db, "--recall-sample", 100, "--device", "cpu"]) == 0
    assert not stale.exists() and (db / "index" / "knn.index").exists()
    assert [p.name for p in (db / "index").iterdir() if p.name.startswith(".")] == []
