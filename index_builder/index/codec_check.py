"""How well a trained index's codes hold the rows added to it since (``index`` after ``add``).

Why: ``add`` never retrains. An SQ8 codec by residual learns its ranges from the training
sample's residuals; rows from another distribution (a new corpus, new topics) fall outside them
and are clipped, and a search ranks them by distances off by that error. Measured on a 16-d test
DB: the added rows' error 1,400x the old rows', knn's recall@2 0.99 -> 0.77. One check for both
layouts: a parts index's new part (index_builder.index.parts) and a single file grown in place
(index_builder.index.update).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np

CODEC_SAMPLE = 2048  # rows a side the codec check encodes
CODEC_WARN_RATIO = 10.0  # added rows' error over the old rows': past this, `index --rebuild` pays


def codec_error(index: Any, x: np.ndarray) -> float:
    """Mean squared error of ``x`` (n, dim) encoded and decoded by the trained ``index`` (its
    quantizer, codec and transforms: faiss's standalone codec, ``sa_encode`` / ``sa_decode``)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return float(((index.sa_decode(index.sa_encode(x)) - x) ** 2).sum(1).mean())


def added_rows_check(index: Any, shards: Sequence[np.ndarray], n_old: int, n_new: int,
                     seed: int = 0) -> dict[str, Any] | None:
    """The codec's error on a sample of the added rows [n_old, n_new) against one of the rows
    before them, and whether a rebuild is advised (warned on stderr); None where nothing was
    added or the index has no standalone codec (HNSW over full vectors: nothing is lost)."""
    if n_old <= 0 or n_new <= n_old:
        return None
    from index_builder.index.ivf_build import gather_rows  # the sampled-rows reader the k-means uses

    rng = np.random.default_rng(seed)
    errors = []
    for a, b in ((0, n_old), (n_old, n_new)):
        rows = np.sort(rng.choice(np.arange(a, b), min(CODEC_SAMPLE, b - a), replace=False))
        try:
            errors.append(codec_error(index, gather_rows(shards, rows)))
        except RuntimeError:  # faiss: this index type has no sa_encode
            return None
    ratio = errors[1] / max(errors[0], 1e-12)
    check = {"old_rows_error": errors[0], "added_rows_error": errors[1], "ratio": round(ratio, 2),
             "rebuild_advised": ratio > CODEC_WARN_RATIO}
    if check["rebuild_advised"]:
        print(f"index: the added rows' codes are {ratio:.0f}x less accurate than the old rows' (codec trained "
              "before the add; search recall suffers): run `retro-build-index index --rebuild`", file=sys.stderr)
    return check
