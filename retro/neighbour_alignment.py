"""Neighbours realigned to the chunk that retrieved them (``model.neighbour_alignment: content``).

Why: RETRO's neighbour is a database chunk and the chunk after it, cut at the database's own
chunk boundaries (``chunk``, the paper's rule). A near-duplicate of the query's text (another
version of the same file) is then shifted against the query by up to a chunk, differently for
every neighbour, and the model must find the place to copy from by content. A small model does
not learn that within a CPU budget: benchmarks/copy_probe.py gives a 1.2M-parameter model its own
text as the neighbour, and it copies within 200 steps when the neighbour is aligned and not at all
by 400 steps when it is shifted by up to 32 tokens (docs/BENCHMARKS.md).

``content`` reads the neighbour's document around it (the chunk before, the chunk, the two after)
and returns the 2m-token window whose first m tokens best match the query chunk token for token
(matches weighted towards the chunk's end, which is where the copy continues; ties and windows no
better than the stored one keep the stored one). Only the query chunk's own tokens are used, which
the model has already read, and the window stays inside the neighbour's document (pad beyond it),
so nothing of the future leaks. A neighbour unrelated to the query keeps its place.

``model.neighbour_min_match`` (> 0) drops a neighbour whose chosen window matches its query chunk
by less than that share of the weighted maximum (pad: CCA then sees only its null key/value for
it). Why: a model that learned to copy is worse with an unrelated neighbour than with none, on
training and val text alike (benchmarks/low_overlap_causes.py: 0.03-0.05 bpb at 300 steps and
0.13 at 1,200 on the val chunks whose query shares at most 8 tokens with its neighbours), and it
never learns to predict alone when every chunk brings neighbours. Dropped, those chunks train the
decoder by itself. Like the alignment, the rule reads only the query chunk's own tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from einops import rearrange, repeat

from retro.neighbour_reads import check_neighbour_ids, take_unique

WINDOW_CHUNKS = (-1, 0, 1, 2)  # the rows read around each neighbour chunk j: j-1 .. j+2


def document_windows(train: Any, ids: np.ndarray, pad_id: int) -> np.ndarray:
    """Train chunk ids (x,), -1 for none -> (x, 4m) tokens of chunks j-1 .. j+2, pad where a row
    is outside j's document (or the split). Rows read once each, in file order."""
    m, n = int(train.chunk_size), int(train.num_chunks)
    rows = ids[:, None] + np.asarray(WINDOW_CHUNKS)                          # (x, 4)
    valid = (ids >= 0)[:, None] & (rows >= 0) & (rows < n)
    out = np.full((len(ids), len(WINDOW_CHUNKS), m), pad_id, dtype=np.int64)
    if not valid.any():
        return rearrange(out, "x c m -> x (c m)")
    uniq = np.unique(rows[valid])
    toks, docs = take_unique(train.chunks, uniq), take_unique(train.doc_ids, uniq)
    at = np.searchsorted(uniq, np.where(valid, rows, uniq[0]))
    doc = np.where(valid, docs[at], -1)
    same = valid & (doc == doc[:, 1:2])                                       # j's own document only
    out[same] = toks[at[same]]
    return rearrange(out, "x c m -> x (c m)")


def best_offsets(windows: np.ndarray, queries: np.ndarray, pad_id: int) -> np.ndarray:
    """(x, 4m) document windows, (x, m) query chunks -> (x,) offsets o in [-(m-1), m-1]: where
    ``windows[x, m + o : 2m + o]`` matches the query best (weights 1 .. m along the chunk)."""
    m = queries.shape[-1]
    offsets = np.arange(-(m - 1), m)
    views = np.lib.stride_tricks.sliding_window_view(windows, m, axis=1)[:, m + offsets]  # (x, 2m-1, m)
    score = match_scores(views, queries[:, None, :], pad_id)                 # (x, 2m-1)
    # the stored window (o = 0) wins ties, then the nearer offset
    rank = score * (2 * m) - np.abs(offsets)[None, :]
    return offsets[np.argmax(rank, axis=1)]


def match_scores(views: np.ndarray, queries: np.ndarray, pad_id: int) -> np.ndarray:
    """(..., m) windows against (broadcastable) (..., m) query chunks -> (...) token-for-token
    matches weighted 1 .. m along the chunk (pad never matches); the maximum is m(m+1)/2."""
    m = queries.shape[-1]
    hit = (views == queries) & (queries != pad_id)
    return hit.astype(np.int64) @ np.arange(1, m + 1, dtype=np.int64)


def aligned_neighbour_tokens(train: Any, nbr_ids: np.ndarray, queries: np.ndarray, pad_id: int,
                             min_match: float = 0.0) -> np.ndarray:
    """Train chunk ids (..., k) (-1: none) and the chunks that retrieved them (..., m) ->
    (..., k, 2m) int64: each neighbour's 2m-token window realigned to its query chunk; with
    ``min_match`` > 0, a window whose first m tokens match the query by less than that share of
    the weighted maximum is all pad (the neighbour dropped)."""
    ids = np.asarray(nbr_ids, dtype=np.int64)
    m = int(train.chunk_size)
    n = int(train.num_chunks)
    flat = ids.reshape(-1)
    check_neighbour_ids(flat, n)
    q = np.asarray(queries, dtype=np.int64)
    if q.shape[:-1] != ids.shape[:-1] or q.shape[-1] != m:
        raise ValueError(f"queries {q.shape} do not match neighbour ids {ids.shape} and chunk size {m}")
    q = repeat(q.reshape(-1, m), "x m -> (x k) m", k=ids.shape[-1])
    windows = document_windows(train, flat, pad_id)
    start = m + best_offsets(windows, q, pad_id)                              # (x,)
    out = np.take_along_axis(windows, start[:, None] + np.arange(2 * m), axis=1)
    if min_match > 0:
        weak = match_scores(out[:, :m], q, pad_id) < min_match * (m * (m + 1) // 2)
        out[weak] = pad_id
    return out.reshape(*ids.shape, 2 * m)
