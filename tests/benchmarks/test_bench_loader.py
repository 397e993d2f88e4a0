"""benchmarks/bench_loader.py at a tiny size: its read count, its multi-shard synthetic DB (where
batched reads equal random reads shard by shard), and the script end to end."""

from __future__ import annotations


import numpy as np
import pytest

from tests.fixtures import benchmark_module

from retro.dataset import RetroDataset

@pytest.fixture(scope="module")
def bench():
    return benchmark_module("bench_loader")


def test_count_reads(bench):
    row = 128  # a chunk of 64 uint16 tokens: 32 rows a page
    starts = np.array([0, 128, 4096 * 5, 4096 * 5 + 128, 4096 * 6, 4096 * 2], dtype=np.int64)
    # rows 0,1 one read; pages 5 and 6 (adjacent) one read; back to page 2: a new read
    assert bench.count_reads(starts, starts + row) == 3
    assert bench.count_reads(np.array([0]), np.array([3 << 20])) == 3  # one range: one read per MiB
    far = np.array([10 << 20, 0], dtype=np.int64)  # a run's size is its own, not the reads' before it
    assert bench.count_reads(far, far + row) == 2
    assert bench.count_reads(np.array([], dtype=np.int64), np.array([], dtype=np.int64)) == 0


def test_synthetic_db_batched_equals_random_over_shards(bench, tmp_path):
    db = bench.synthetic_db(tmp_path / "db", shards=3, chunks_per_shard=300, train_seqs=12,
                            chunk_size=16, seq_len=64)
    random, batched = RetroDataset(db, "train", reads="random"), RetroDataset(db, "train")
    assert len(random.store.shards) == 3 and len(random) == 12
    idx = np.random.default_rng(0).permutation(12)
    a, b = random.get_batch(idx), batched.get_batch(idx)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_bench_loader_tiny(bench, capsys):
    assert bench.main(["--chunks-per-shard", "3000", "--train-seqs", "32", "--shards", "2", "--batches", "2",
                       "--latency-ms", "0,1", "--workers", "0", "--write-threads", "1,3", "--no-write"]) == 0
    text = capsys.readouterr().out
    for mode in ("random", "batched", "sequential_file"):
        assert f"| {mode} | 1 ms | 0 |" in text
    assert "x needed (small, H100)" in text and "1 ms, 3 thread(s):" in text
