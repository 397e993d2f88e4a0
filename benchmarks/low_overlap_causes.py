"""Issue 21, "find out why": where does RETRO lose at low overlap?

The leakage analysis (retro.leakage) buckets each val chunk C_c by its *target overlap*: the
longest run it shares with the neighbours it is predicted from, Ret(C_{c-1}). At overlap <= 12.5%
the content-aligned 6.12 sweep's RETRO is behind its baseline. Two different chunks land there:

- the neighbours are unrelated to the text (the query chunk C_{c-1} does not match them either);
- the neighbours matched what the model had just read (C_{c-1} shares a long run with them: a
  near-duplicate, e.g. the same file in the kernel's next version) and then diverge: the text was
  edited between versions, and a model that copies is confidently wrong.

This script splits the low-overlap bucket by *query match*: the longest run the query chunk
C_{c-1} shares with its own neighbours. The same sums as retro.evaluate (nats per chunk, source
bytes per chunk) for RETRO with its neighbours, the same weights without, and a trained baseline.

    python benchmarks/low_overlap_causes.py --run RUN --baseline RUN_BASE --db DB [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retro.leakage import chunk_bytes, chunk_overlaps, per_chunk, query_overlaps  # noqa: E402
from retro.metrics import SourceBytes, bits_per_byte  # noqa: E402

TARGET_EDGES = (0.125, 1.0)          # target overlap: <= 12.5% (the paper's lowest alpha), above
QUERY_EDGES = (0.125, 0.5, 1.0)      # query match: unrelated, partial, a near-duplicate of the query
VARIANTS = ("retrieval", "no_retrieval", "baseline")


def bucket(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Index of the first edge each value is at most (edges rise, the last is 1.0)."""
    return np.searchsorted(np.asarray(edges) + 1e-9, values, side="left")


class CauseSums:
    """Nats per variant, tokens and bytes summed per (target bucket, query bucket) cell."""

    def __init__(self) -> None:
        self.sums = np.zeros((len(TARGET_EDGES), len(QUERY_EDGES), len(VARIANTS) + 2))

    def add(self, target: np.ndarray, query: np.ndarray, losses: dict[str, np.ndarray],
            tokens: np.ndarray, nbytes: np.ndarray) -> None:
        t, q = bucket(target, TARGET_EDGES), bucket(query, QUERY_EDGES)
        for i in range(len(TARGET_EDGES)):
            for j in range(len(QUERY_EDGES)):
                keep = (t == i) & (q == j)
                for v, name in enumerate(VARIANTS):
                    if name in losses:
                        self.sums[i, j, v] += float(losses[name][keep].sum())
                self.sums[i, j, -2] += float(tokens[keep].sum())
                self.sums[i, j, -1] += float(nbytes[keep].sum())

    def report(self) -> list[dict[str, Any]]:
        rows = []
        for i, t_hi in enumerate(TARGET_EDGES):
            for j, q_hi in enumerate(QUERY_EDGES):
                nbytes = int(self.sums[i, j, -1])
                row: dict[str, Any] = {"target_overlap": [TARGET_EDGES[i - 1] if i else 0.0, t_hi],
                                       "query_match": [QUERY_EDGES[j - 1] if j else 0.0, q_hi],
                                       "tokens": int(self.sums[i, j, -2]), "bytes": nbytes}
                if nbytes:
                    for v, name in enumerate(VARIANTS):
                        row[f"bits_per_byte_{name}"] = bits_per_byte(self.sums[i, j, v], nbytes)
                    row["gain_over_baseline"] = row["bits_per_byte_baseline"] - row["bits_per_byte_retrieval"]
                    row["gain_over_no_retrieval"] = (row["bits_per_byte_no_retrieval"]
                                                     - row["bits_per_byte_retrieval"])
                rows.append(row)
        return rows


@torch.no_grad()
def analyse(run: str, baseline_run: str, db: str, *, batch_size: int = 8, max_sequences: int = 0,
            progress: bool = True) -> list[dict[str, Any]]:
    from chunk_store import ChunkStore
    from retro.checkpoint import load_model
    from retro.dataset import RetroDataset, check_compatible
    from retro.evaluate import eval_indices, token_losses

    model, cfg = load_model(run)
    baseline, _ = load_model(baseline_run)
    store = ChunkStore.open(db, "val")
    check_compatible(store, cfg)
    dataset = RetroDataset.for_model(store, "val", cfg)
    m, pad_id = dataset.chunk_size, dataset.pad_id
    source_bytes = SourceBytes(store)
    sums = CauseSums()
    idx = eval_indices(len(dataset), max_sequences or None)
    for start in tqdm(range(0, len(idx), batch_size), desc="low-overlap causes", disable=not progress):
        rows = idx[start:start + batch_size]
        batch = dataset.get_batch(rows)
        tokens = torch.from_numpy(batch["tokens"])
        x, y = tokens[:, :-1], tokens[:, 1:]
        nbrs = torch.from_numpy(batch["neighbours"])
        losses = {"retrieval": token_losses(model, x, y, nbrs, pad_id),
                  "no_retrieval": token_losses(model, x, y, None, pad_id),
                  "baseline": token_losses(baseline, x, y, None, pad_id)}
        nbytes = source_bytes.scale_chunks(chunk_bytes(store.tokenizer, batch["tokens"][:, 1:], m, pad_id),
                                           dataset.chunk_ids(rows), batch["tokens"][:, 1:], m)
        sums.add(chunk_overlaps(batch["tokens"], batch["neighbours"], m, pad_id),
                 query_overlaps(batch["tokens"], batch["neighbours"], m, pad_id),
                 {k: per_chunk(v, m) for k, v in losses.items()}, per_chunk(y != pad_id, m), nbytes)
    return sums.report()


def span(name: str, lo: float, hi: float) -> str:
    return f"{name} <= {hi:.1%}" if lo == 0 else f"{lo:.1%} < {name} <= {hi:.1%}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| target overlap | query match | val tokens | RETRO | no retrieval | baseline | gain over baseline |",
             "|---|---|---:|---|---|---|---|"]
    for r in rows:
        if not r["bytes"]:
            continue
        lines.append(f"| {span('o', *r['target_overlap'])} | {span('q', *r['query_match'])} | {r['tokens']:,} | "
                     f"{r['bits_per_byte_retrieval']:.4f} | {r['bits_per_byte_no_retrieval']:.4f} | "
                     f"{r['bits_per_byte_baseline']:.4f} | {r['gain_over_baseline']:+.4f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="RETRO (or RETRO-fit) run directory")
    p.add_argument("--baseline", required=True, help="the decoder-only run trained for the same steps")
    p.add_argument("--db", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-sequences", type=int, default=0, help="0: every val sequence")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)
    rows = analyse(a.run, a.baseline, a.db, batch_size=a.batch_size, max_sequences=a.max_sequences)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"run": a.run, "baseline": a.baseline, "db": a.db, "rows": rows}, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
