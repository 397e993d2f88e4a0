"""retro.evaluate against a database other than the run's (the paper trains with 600B tokens
and evaluates with 1.75T): accepted when tokenizer, chunk size and the split's sequences are the
run's own, byte for byte; otherwise one line naming what differs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from chunk_store.layout import DBLayout
from chunk_store.manifest import load_manifest, save_manifest
from retro import RETRO, RetroConfig
from retro.checkpoint import save_checkpoint
from retro.evaluate import main
from retro.run_layout import RunLayout
from retro.train_config import TrainConfig, save_resolved
from tests.fixtures.train_db import CHUNK, K, VOCAB, tiny_db, write_fake_neighbours

ARGS = ["--max-sequences", "6", "--batch-size", "3", "--no-progress"]


@pytest.fixture(scope="module")
def run_and_db(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("other-db")
    db = tiny_db(root)
    run = root / "run"
    cfg = RetroConfig(vocab_size=VOCAB, pad_id=3, dim=32, depth=2, heads=2, dim_head=16, enc_dim=32, enc_depth=1,
                      enc_heads=2, enc_dim_head=16, cca_layers=[2], chunk_size=CHUNK, num_neighbours=K)
    torch.manual_seed(0)
    save_resolved(RunLayout(run).config, TrainConfig(seq_len=64), cfg.to_dict())
    save_checkpoint(run, 3, RETRO(cfg), None, {})
    RunLayout(run).db_record.write_text(json.dumps({"db": str(db)}))
    return run, db


def evaluate_json(run: Path, db: Path, capsys) -> dict:
    assert main(["--run", str(run), "--db", str(db), *ARGS]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def copy_db(db: Path, to: Path) -> Path:
    shutil.copytree(db, to)
    return to


def test_another_db_with_the_same_val_split_is_scored(run_and_db, tmp_path, capsys) -> None:
    run, db = run_and_db
    own = evaluate_json(run, db, capsys)
    assert "trained_db" not in own
    other = copy_db(db, tmp_path / "other")
    write_fake_neighbours(other, seed=5)  # the same val sequences, other neighbours
    res = evaluate_json(run, other, capsys)
    assert res["trained_db"] == str(db) and res["db"] == str(other)
    assert res["tokens"] == own["tokens"] and res["bits_per_byte_no_retrieval"] == own["bits_per_byte_no_retrieval"]
    assert res["bits_per_byte"] != own["bits_per_byte"]  # scored with the other database's neighbours


def test_another_val_split_is_refused(run_and_db, tmp_path, capsys) -> None:
    run, db = run_and_db
    other = copy_db(db, tmp_path / "other")
    path = DBLayout(other).shard(0).chunks("val")
    chunks = np.load(path)
    chunks[len(chunks) // 2, 0] = (int(chunks[len(chunks) // 2, 0]) + 1) % VOCAB  # one token of one chunk
    np.save(path, chunks)
    assert main(["--run", str(run), "--db", str(other), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "is not the one of" in err and "chunks differ" in err and len(err.strip().splitlines()) == 1


def test_another_tokenizer_is_refused(run_and_db, tmp_path, capsys) -> None:
    run, db = run_and_db
    other = copy_db(db, tmp_path / "other")
    m = load_manifest(other)
    m["tokenizer"]["sha256"] = "0" * 64
    save_manifest(other, m)
    assert main(["--run", str(run), "--db", str(other), *ARGS]) == 2
    assert "another tokenizer" in capsys.readouterr().err


def test_without_the_run_database_at_hand_nothing_is_compared(run_and_db, tmp_path, capsys) -> None:
    run, db = run_and_db
    moved_run = tmp_path / "run"
    shutil.copytree(run, moved_run)
    RunLayout(moved_run).db_record.write_text(json.dumps({"db": str(tmp_path / "gone")}))
    res = evaluate_json(moved_run, db, capsys)
    assert "trained_db" not in res
