"""knn's per-range lookups (index_builder.knn.ranged_reads) answer as the DB-wide tables they replace."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from chunk_store.sharded_array import ShardedArray
from index_builder.knn.range_exclusion import chunk_ranges, doc_starts
from chunk_store.store import ContentLookup
from index_builder.knn.ranged_reads import chunk_ranges_of, sorted_search


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_content_lookup_equals_the_whole_mask(data) -> None:
    n = data.draw(st.integers(1, 40))
    rng = np.random.default_rng(data.draw(st.integers(0, 999)))
    blank = np.zeros(10, dtype=bool)
    blank[[0, 3]] = True  # tokens 0 and 3 show no text
    chunks = rng.choice([0, 3, 5], size=(n, 4), p=[0.45, 0.45, 0.1]).astype(np.uint16)
    mask = ~blank[chunks].all(axis=1)
    look = ContentLookup(chunks, blank)
    key = rng.integers(0, n, size=data.draw(st.sampled_from([(7,), (3, 5), (0,)])))
    np.testing.assert_array_equal(look[key], mask[key])
    a, b = sorted(data.draw(st.lists(st.integers(0, n), min_size=2, max_size=2)))
    np.testing.assert_array_equal(look[a:b], mask[a:b])
    assert look[n - 1] == mask[n - 1] and len(look) == n


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=30), st.integers(1, 4))
def test_binary_searches_equal_the_doc_start_table(doc_lengths, parts) -> None:
    """chunk_ranges_of (binary search of the doc ids, over shards too) == chunk_ranges over the
    whole table of every document's first chunk, which knn no longer builds."""
    doc_ids = np.repeat(np.arange(len(doc_lengths)), doc_lengths).astype(np.int64)
    cuts = np.linspace(0, len(doc_ids), parts + 1).astype(int)
    pieces = [doc_ids[a:b] for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    offsets = [int(p[0]) for p in pieces]
    sharded = ShardedArray([p - o for p, o in zip(pieces, offsets)], offsets)
    lo = np.arange(len(doc_lengths))
    ranges = np.stack([lo, np.minimum(lo + 2, len(doc_lengths) - 1)], axis=1)
    want = chunk_ranges(ranges, doc_starts(doc_ids))
    np.testing.assert_array_equal(chunk_ranges_of(ranges, doc_ids), want)
    np.testing.assert_array_equal(chunk_ranges_of(ranges, sharded), want)
    values = np.arange(-1, len(doc_lengths) + 2)
    for side in ("left", "right"):
        np.testing.assert_array_equal(sorted_search(sharded, values, side), np.searchsorted(doc_ids, values, side))
