"""Loader modes (issue 22, "a data path that keeps up with the GPU"): batched reads and the
per-epoch retrieved-tokens file give the batches of the original random-read path, shuffled, over
2 ranks and across an epoch boundary; a file whose writer crashed midway is never read."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys

import numpy as np
import pytest
import torch

from chunk_store import DBError
from chunk_store.sharded_array import ShardedArray
from retro.dataset import RetroDataset
from retro.distributed import ShardedBatchSampler
from retro.neighbour_reads import take_sorted
from retro.retrieved_file import RetrievedFileDataset, epoch_file, train_loader, write_epoch_file
from retro.train_config import TrainConfig
from tests.fixtures.train_db import REPO, tiny_db, write_train_config

MB = 64  # micro-batch: the tiny DB's ~3000 train sequences make ~24 micro-batches per rank and epoch


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return tiny_db(tmp_path_factory.mktemp("reads"))


def test_take_sorted_over_shards_equals_fancy_indexing():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 100, size=(n, 3)).astype(np.int32) for n in (5, 1, 7)]
    arr = ShardedArray(parts, add=[0, 100, 200])
    whole = np.concatenate([p.astype(np.int64) + a for p, a in zip(parts, (0, 100, 200))])
    ids = rng.integers(0, 13, size=(4, 6))  # repeats, any order, every shard
    np.testing.assert_array_equal(take_sorted(arr, ids), whole[ids])
    np.testing.assert_array_equal(take_sorted(parts[0], [4, 0, 4]), parts[0][[4, 0, 4]])
    with pytest.raises(IndexError):
        take_sorted(arr, [13])


@pytest.mark.parametrize("split", ["train", "val"])
def test_batched_reads_equal_random_reads(db, split):
    random, batched = RetroDataset(db, split, reads="random"), RetroDataset(db, split, reads="batched")
    idx = np.random.default_rng(1).integers(-len(random), len(random), size=40)  # repeats, negatives
    idx[-1] = len(random) - 1  # the last sequence: its target chunk is past the end
    a, b = random.get_batch(idx), batched.get_batch(idx)
    assert a.keys() == b.keys() == {"tokens", "neighbours"}
    for key in a:
        assert a[key].dtype == b[key].dtype == np.int64
        np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(IndexError):
        batched.get_batch([len(batched)])


def reference_batches(db, rank: int, world: int, steps: int) -> list[dict[str, np.ndarray]]:
    """Today's loader: the random-read path over the sampler's indices."""
    ds = RetroDataset(db, "train", reads="random")
    sampler = ShardedBatchSampler(len(ds), MB, rank, world, seed=3)
    out = []
    for _, batch in zip(range(steps), sampler):
        out.append(ds.get_batch(batch))
    return out


@pytest.mark.parametrize("mode,workers", [("batched", 0), ("sequential_file", 0), ("sequential_file", 2)])
@pytest.mark.parametrize("rank", [0, 1])
def test_every_mode_gives_the_batches_of_random_reads(db, tmp_path, mode, workers, rank):
    world = 2
    ds = RetroDataset(db, "train")
    sampler = ShardedBatchSampler(len(ds), MB, rank, world, seed=3)
    steps = sampler.batches_per_epoch + 3  # into the second epoch (a second file)
    loader = train_loader(ds, sampler, mode=mode, device=torch.device("cpu"), num_workers=workers,
                          prefetch_factor=2, persistent_workers=True, seed=3, directory=tmp_path / "retrieved")
    ref = reference_batches(db, rank, world, steps)
    for step, (want, got) in enumerate(zip(ref, loader)):
        assert got.keys() == want.keys(), step
        for key in want:
            assert got[key].dtype == torch.int64
            assert torch.equal(got[key], torch.from_numpy(want[key])), (step, key)
    if mode == "sequential_file":
        names = sorted(p.name for p in (tmp_path / "retrieved").glob("*.npy"))
        assert len(names) == 2 and all(f"rank{rank}of2" in n for n in names), names
        assert not list((tmp_path / "retrieved").glob(".*tmp*"))


def _crash_midway(db, directory) -> None:
    """A writer killed after its first block (os._exit: no cleanup runs, as for SIGKILL)."""
    import retro.retrieved_file as rf

    rf.WRITE_BLOCK = 16
    calls = []
    original = RetroDataset.get_batch

    def dying(self, indices):
        calls.append(1)
        if len(calls) > 2:  # the warm-up read, one block, then death
            os._exit(9)
        return original(self, indices)

    RetroDataset.get_batch = dying  # type: ignore[method-assign]
    ds = RetroDataset(db, "train")
    write_epoch_file(ds, ShardedBatchSampler(len(ds), MB, 0, 1, seed=3), 0, directory, progress=False, threads=1)


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_file_whose_writer_crashed_is_not_used(db, tmp_path):
    directory = tmp_path / "retrieved"
    proc = multiprocessing.get_context("fork").Process(target=_crash_midway, args=(db, directory))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 9
    ds = RetroDataset(db, "train")
    sampler = ShardedBatchSampler(len(ds), MB, 0, 1, seed=3)
    final = epoch_file(directory, ds, sampler, 0)
    assert not final.exists() and list(directory.glob(f".{final.name}.tmp-*")), "the crash left a partial file"
    files = RetrievedFileDataset(ds, sampler, directory, progress=False)
    ref = reference_batches(db, 0, 1, 2)
    for b, want in enumerate(ref):
        got = files.__getitems__([(0, b * MB + j, i) for j, i in enumerate(sampler.epoch_indices(0)[b * MB:(b + 1) * MB].tolist())])
        for key in want:
            assert torch.equal(got[key], torch.from_numpy(want[key]))
    assert final.exists() and not list(directory.glob(f".{final.name}.tmp-*"))


def test_a_file_of_other_samples_is_refused(db, tmp_path):
    ds = RetroDataset(db, "train")
    s3, s4 = (ShardedBatchSampler(len(ds), MB, 0, 1, seed=s) for s in (3, 4))
    written = write_epoch_file(ds, s3, 0, tmp_path, progress=False)
    os.replace(written, epoch_file(tmp_path, ds, s4, 0))  # seed 3's order under seed 4's name
    files = RetrievedFileDataset(ds, s4, tmp_path, progress=False)
    with pytest.raises(DBError, match="other samples"):
        files.__getitems__([(0, j, int(i)) for j, i in enumerate(s4.epoch_indices(0)[:MB])])


def test_config_keys():
    assert TrainConfig().neighbour_reads == "batched" and TrainConfig().num_workers is None
    with pytest.raises(DBError, match="neighbour_reads must be"):
        TrainConfig(neighbour_reads="mmap")


def test_training_with_the_file_equals_training_with_batched_reads(db, tmp_path):
    sys.path.insert(0, str(REPO))
    import train

    keys = {"max_steps": 3, "warmup_steps": 1, "batch_size": 4, "micro_batch_size": 2, "eval_every": 0,
            "eval_batches": 1, "checkpoint_every": 0, "log_every": 1, "num_workers": 0, "device": "cpu",
            "dtype": "float32"}
    config = write_train_config(tmp_path / "cfg.yaml", keys)
    losses = {}
    for mode in ("batched", "sequential_file"):
        out = tmp_path / mode
        train.train(train.parse_args(["--config", str(config), "--db", str(db), "--out", str(out),
                                      "--set", f"neighbour_reads={mode}"]))
        losses[mode] = [r["train_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                        if "train_loss" in r]
    assert losses["batched"] == losses["sequential_file"] and len(losses["batched"]) == 3
    assert list((tmp_path / "sequential_file" / "retrieved").glob("*.npy"))


def test_command_prewrites_the_files_training_reads(db, tmp_path):
    from retro.retrieved_file import main

    config = write_train_config(tmp_path / "cfg.yaml", {"micro_batch_size": MB, "batch_size": MB * 2, "seed": 3})
    assert main(["--config", str(config), "--db", str(db), "--out", str(tmp_path / "r"), "--epochs", "0",
                 "--world-size", "2", "--ranks", "1"]) == 0
    ds = RetroDataset(db, "train")
    sampler = ShardedBatchSampler(len(ds), MB, 1, 2, seed=3)
    assert [p.name for p in (tmp_path / "r").glob("*.npy")] == [epoch_file(tmp_path / "r", ds, sampler, 0).name]
    rows = np.load(epoch_file(tmp_path / "r", ds, sampler, 0), mmap_mode="r")
    want = reference_batches(db, 1, 2, 1)[0]
    np.testing.assert_array_equal(rows["index"][:MB], sampler.epoch_indices(0)[:MB].numpy())
    np.testing.assert_array_equal(rows["neighbours"][:MB].astype(np.int64), want["neighbours"])


def test_file_name_changes_with_the_neighbours(tmp_path):
    from chunk_store.manifest import load_manifest, record_stage

    db = tiny_db(tmp_path)
    ds = RetroDataset(db, "train")
    sampler = ShardedBatchSampler(len(ds), MB, 0, 1, seed=3)
    before = epoch_file(tmp_path, ds, sampler, 0)
    assert epoch_file(tmp_path, RetroDataset(db, "train"), sampler, 0) == before
    cut = {epoch_file(tmp_path, RetroDataset(db, "train", alignment=a, min_match=mm), sampler, 0)
           for a, mm in (("chunk", 0.0), ("content", 0.0), ("content", 0.5))}
    assert len(cut) == 3 and before in cut  # the windows' cut is in the name: no stale file is read
    t = "2000-01-01T00:00:00+00:00"
    record_stage(db, "knn", params={"k": 2}, started=t, finished=t, manifest=load_manifest(db))  # knn re-run
    assert epoch_file(tmp_path, RetroDataset(db, "train"), sampler, 0) != before
