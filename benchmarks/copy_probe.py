"""Issue 21, "find out why": can a model of a config learn to copy from neighbours on real text?

The DB sweep (benchmarks/db_scaling.py) found RETRO barely reading neighbours that hold half its
val chunks nearly verbatim. This probe separates the two things copying needs. Every chunk u of a
training sequence gets as its first neighbour *its own text* from ``u * m + s`` for 2m tokens
(the chunk, shifted by s, and what follows it: chunk u + 1 lies inside), the second neighbour a
random chunk of the split and its continuation (a distractor, as k = 2 in the sweep). s is drawn
per chunk from [-shift, shift]:

- ``--shifts 0``: the continuation is aligned with the query block: a head attending at a fixed
  relative position copies it (the architecture's easiest case).
- ``--shifts 32``: the copy must find its place by content, as a near-duplicate cut at its own
  chunk boundaries must (the sweep's real neighbours).

Measured (configs/tiny.yaml, the sweep's 2 MB pool, 2026-12-07; benchmarks/results/copy_probe/):
aligned, the model's own neighbours are worth 1.3 bits a token at step 200 and 3.3 at step 500;
shifted by up to 32, 0.004 at step 400. That is why ``model.neighbour_alignment: content``
(retro.neighbour_alignment) exists.

The same config, optimiser (train.py's AdamW groups) and schedule (train.py's ``lr_at``) as a
training run; batches are read from the DB's train chunks, scored on its val chunks with the
same construction. Printed and written per eval: val loss per token with neighbours, the same
weights without (the decoder alone), and the difference in bits per token. A model that copies
drives the first towards 0 on chunks 1.. (chunk 0 has nothing to copy from).

    python benchmarks/copy_probe.py --db DB --config configs/tiny.yaml --shifts 0,32 --steps 600
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chunk_store import ChunkStore  # noqa: E402
from retro.config import RetroConfig  # noqa: E402
from retro.model import RETRO  # noqa: E402
from retro.train_config import load_config  # noqa: E402
from train import build_optimizer, lr_at  # noqa: E402


class CopyBatches:
    """Batches of (tokens (b, n + 1), neighbours (b, l, 2, 2m)) from one split's chunk stream."""

    def __init__(self, db: str, split: str, seq_len: int, shift: int, seed: int) -> None:
        store = ChunkStore.open(db, split)
        self.stream = np.asarray(store.chunks[:], dtype=np.int64).reshape(-1)
        self.m = int(store.chunk_size)
        self.n, self.shift = seq_len, shift
        self.rng = np.random.default_rng(seed)
        if len(self.stream) < seq_len + 4 * self.m + 2 * shift:
            raise SystemExit(f"copy_probe: the {split} split of {db} holds {len(self.stream)} tokens, too few")

    def __call__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        m, n, s = self.m, self.n, self.shift
        chunks = n // m
        hi = len(self.stream) - (n + 3 * m + s)
        starts = self.rng.integers(s, hi, size=b)
        tok = self.stream[starts[:, None] + np.arange(n + 1)]
        shift = self.rng.integers(-s, s + 1, size=(b, chunks))
        own = starts[:, None, None] + (np.arange(chunks) * m)[None, :, None] + shift[..., None] + np.arange(2 * m)
        other = self.rng.integers(0, len(self.stream) - 2 * m, size=(b, chunks))[..., None] + np.arange(2 * m)
        nbrs = np.stack([self.stream[own], self.stream[other]], axis=2)            # (b, l, 2, 2m)
        return torch.from_numpy(tok), torch.from_numpy(nbrs)


def val_losses(model: RETRO, batches: CopyBatches, b: int, rounds: int) -> dict[str, float]:
    """Mean val loss (nats per token) with neighbours and without, past chunk 0's query block."""
    m = model.cfg.chunk_size
    sums = {"with": 0.0, "without": 0.0}
    model.eval()
    with torch.no_grad():
        for _ in range(rounds):
            tok, nbrs = batches(b)
            for key, arg in (("with", nbrs), ("without", None)):
                loss = F.cross_entropy(model(tok[:, :-1], arg).transpose(1, 2), tok[:, 1:], reduction="none")
                sums[key] += float(loss[:, m - 1:].mean()) / rounds
    model.train()
    return sums


def probe(db: str, config: str, shift: int, steps: int, eval_every: int, seed: int) -> list[dict[str, Any]]:
    tcfg, mdict = load_config(config, [f"max_steps={steps}"])
    cfg = RetroConfig.from_dict(mdict)
    torch.manual_seed(seed)
    model = RETRO(cfg)
    opt = build_optimizer(model, tcfg, torch.device("cpu"))
    train = CopyBatches(db, "train", tcfg.seq_len, shift, seed)
    val = CopyBatches(db, "val", tcfg.seq_len, shift, seed + 1000)
    rows, t0 = [], time.time()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, tcfg)
        tok, nbrs = train(tcfg.batch_size)
        loss = F.cross_entropy(model(tok[:, :-1], nbrs).flatten(0, 1), tok[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % eval_every == 0 or step == steps:
            got = val_losses(model, val, tcfg.batch_size, rounds=8)
            row = {"shift": shift, "step": step, "train_loss": loss.item(), "val_loss_with": got["with"],
                   "val_loss_without": got["without"],
                   "copy_gain_bits_per_token": (got["without"] - got["with"]) / math.log(2),
                   "wall_s": round(time.time() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", required=True, help="a chunked DB (train and val splits); no index needed")
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    p.add_argument("--shifts", default="0,32", help="largest |shift| of the copied neighbour, one run each")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every eval row here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for shift in (int(s) for s in a.shifts.split(",")):
        rows += probe(a.db, a.config, shift, a.steps, a.eval_every, a.seed)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
