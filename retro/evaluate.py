"""Evaluation with and without retrieval: loss and bits per byte of one model on one split.

``python -m retro.evaluate --run RUN --db DB --split val`` prints JSON. "Without retrieval" is
the same weights called with ``neighbours=None``: the baseline that says what retrieval buys.
``--control`` adds a third score, with the neighbours of *other* sequences: a model that merely
leans on its CCA layers scores the same with them as with its own, so the gain over this control
is what the retrieved text itself buys. ``--baseline RUN_BASE`` scores a decoder-only model
trained on the same data for the same steps (``configs/*-baseline.yaml``): the paper's comparison,
which a model that never trained without neighbours cannot give by itself. ``--overlap`` adds
the leakage analysis (retro.leakage, paper section 4.4): bits per byte over the chunks whose
overlap with their neighbours is at most alpha.
The same function runs inside training (every rank evaluates its shard; sums are all-reduced).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

from chunk_store.framework.argtypes import count_int, positive_int
from chunk_store.framework.errors import UserError, run_main
from retro.distributed import all_reduce_sum
from retro.leakage import LeakageSums, chunk_bytes, chunk_overlaps, per_chunk
from retro.metrics import SourceBytes, bits_per_byte, lm_loss, target_chunk_ids

if TYPE_CHECKING:
    from retro.dataset import RetroDataset

EXIT_NO_GAIN = 3  # --require-gain: retrieval did not lower bits per byte (2 is a user error)


@dataclass
class EvalResult:
    """One model on one split: per-token loss and bits per byte with its own neighbours, without
    retrieval and (``control``) with other sequences' neighbours; NaN where not measured."""

    loss: float  # nats per target token, with retrieval
    bits_per_byte: float
    loss_no_retrieval: float
    bits_per_byte_no_retrieval: float
    tokens: int  # non-pad target tokens evaluated
    bytes: int  # UTF-8 bytes of those tokens decoded
    sequences: int
    loss_other_neighbours: float | None = None  # the control: neighbours of other sequences
    bits_per_byte_other_neighbours: float | None = None
    loss_baseline: float | None = None  # a trained decoder-only model (--baseline)
    bits_per_byte_baseline: float | None = None
    overlap: list[dict[str, Any]] | None = None  # the leakage analysis, one record per alpha

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if v is not None}
        d["retrieval_gain_bits_per_byte"] = self.bits_per_byte_no_retrieval - self.bits_per_byte
        if self.bits_per_byte_baseline is not None:
            d["gain_over_baseline_bits_per_byte"] = self.bits_per_byte_baseline - self.bits_per_byte
        if self.bits_per_byte_other_neighbours is not None:
            d["gain_over_other_neighbours_bits_per_byte"] = (
                self.bits_per_byte_other_neighbours - self.bits_per_byte)
        return d


@dataclass
class EvalSums:
    """What evaluation adds up, batch by batch and then over ranks, before it divides: summed
    losses in nats (so that shards of any size combine exactly) and the counts behind them."""

    loss: float = 0.0  # with each sequence's own neighbours
    loss_no_retrieval: float = 0.0
    loss_other_neighbours: float = 0.0  # the control
    loss_baseline: float = 0.0  # the trained decoder-only baseline
    tokens: int = 0  # non-pad target tokens
    bytes: int = 0  # UTF-8 bytes of those tokens decoded
    sequences: int = 0

    def all_reduced(self, device: torch.device) -> EvalSums:
        """The sums over every rank (one float64 all-reduce; the identity in one process)."""
        loss, plain, other, base, tokens, nbytes, seqs = all_reduce_sum(
            [self.loss, self.loss_no_retrieval, self.loss_other_neighbours, self.loss_baseline,
             self.tokens, self.bytes, self.sequences], device)
        return EvalSums(loss, plain, other, base, int(tokens), int(nbytes), int(seqs))

    def result(self, *, retrieval: bool, control: bool, baseline: bool = False) -> EvalResult:
        """Per-token losses and bits per byte; NaN / None for what was not scored."""
        per_token = max(self.tokens, 1)
        nan = float("nan")
        return EvalResult(
            loss=self.loss / per_token if retrieval else nan,
            bits_per_byte=bits_per_byte(self.loss, self.bytes) if retrieval else nan,
            loss_no_retrieval=self.loss_no_retrieval / per_token,
            bits_per_byte_no_retrieval=bits_per_byte(self.loss_no_retrieval, self.bytes),
            tokens=self.tokens,
            bytes=self.bytes,
            sequences=self.sequences,
            loss_other_neighbours=self.loss_other_neighbours / per_token if control else None,
            bits_per_byte_other_neighbours=bits_per_byte(self.loss_other_neighbours, self.bytes) if control else None,
            loss_baseline=self.loss_baseline / per_token if baseline else None,
            bits_per_byte_baseline=bits_per_byte(self.loss_baseline, self.bytes) if baseline else None,
        )


def eval_indices(num_sequences: int, max_sequences: int | None, world_size: int = 1) -> np.ndarray:
    """Which sequences to evaluate: all, or ``max_sequences`` spread evenly over the split, trimmed
    to a multiple of the world size so every rank runs the same number of forward passes."""
    n = num_sequences if not max_sequences else min(num_sequences, max_sequences)
    n -= n % world_size
    if n <= 0:
        raise UserError(f"nothing to evaluate: {num_sequences} sequence(s) for {world_size} rank(s)")
    if n == num_sequences:
        return np.arange(n)
    return np.unique(np.linspace(0, num_sequences - 1, n).round().astype(np.int64))[: n - n % world_size]


def compute_dtype(device: torch.device, dtype: str = "auto") -> str:
    """The dtype matmuls actually run in: "bfloat16" under autocast, else "float32"."""
    return "bfloat16" if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda") else "float32"


def autocast_for(device: torch.device, dtype: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (or where asked for), nothing on CPU fp32."""
    use_bf16 = compute_dtype(device, dtype) == "bfloat16"
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def token_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, neighbours: torch.Tensor | None,
                 pad_id: int, dtype: str = "auto") -> torch.Tensor:
    """(b, n) cross-entropy of each target in nats, 0 at pad: summed (never averaged) over
    batches, ranks or chunks, so any grouping adds up exactly."""
    with autocast_for(x.device, dtype):
        logits = model(x, neighbours)
    return rearrange(lm_loss(logits, y, pad_id, reduction="none"), "(b n) -> b n", b=y.shape[0])


def summed_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, neighbours: torch.Tensor | None,
                pad_id: int, dtype: str = "auto") -> float:
    """Cross-entropy of one batch summed (not averaged) over its non-pad targets, in nats."""
    return token_losses(model, x, y, neighbours, pad_id, dtype).sum().item()


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: RetroDataset, *, device: torch.device, micro_batch_size: int = 8,
             max_sequences: int | None = None, rank: int = 0, world_size: int = 1, dtype: str = "auto",
             retrieval: bool = True, progress: bool = False, control: bool = False,
             baseline: torch.nn.Module | None = None, overlap: bool = False) -> EvalResult:
    """Summed masked cross-entropy with and without neighbours over a fixed set of sequences.

    ``control`` also scores every sequence i with the neighbours of sequence
    (i + len // 2) mod len (deterministic; another sequence whenever there are two or more).
    ``baseline`` (a decoder-only model) is scored on the same tokens; ``overlap`` adds the
    leakage analysis per alpha (retro.leakage).
    Collective under torch.distributed (every rank calls it; each scores its shard).
    """
    pad_id = dataset.pad_id
    tokenizer = dataset.store.tokenizer
    retrieval = retrieval and dataset.retrieval
    control = control and retrieval
    idx = eval_indices(len(dataset), max_sequences, world_size)[rank::world_size]
    was_training = model.training
    model.eval()
    if baseline is not None:
        baseline.eval()
    sums = EvalSums()
    source_bytes = SourceBytes(dataset.store)
    leak = LeakageSums() if overlap else None
    for start in tqdm(range(0, len(idx), micro_batch_size), desc="eval", disable=not progress, leave=False):
        rows = idx[start:start + micro_batch_size]
        batch = dataset.get_batch(rows)
        tokens = torch.from_numpy(batch["tokens"]).to(device)
        x, y = tokens[:, :-1], tokens[:, 1:]
        per_token = {"no_retrieval": token_losses(model, x, y, None, pad_id, dtype)}
        if retrieval:
            nbrs = torch.from_numpy(batch["neighbours"]).to(device)
            per_token["retrieval"] = token_losses(model, x, y, nbrs, pad_id, dtype)
            sums.loss += per_token["retrieval"].sum().item()
        if baseline is not None:
            per_token["baseline"] = token_losses(baseline, x, y, None, pad_id, dtype)
            sums.loss_baseline += per_token["baseline"].sum().item()
        sums.loss_no_retrieval += per_token["no_retrieval"].sum().item()
        if control:
            other = (rows + len(dataset) // 2) % len(dataset)
            nbrs = torch.from_numpy(dataset.get_batch(other)["neighbours"]).to(device)
            sums.loss_other_neighbours += summed_loss(model, x, y, nbrs, pad_id, dtype)
        sums.tokens += int((y != pad_id).sum().item())
        sums.bytes += source_bytes(batch["tokens"][:, 1:],
                                   target_chunk_ids(dataset.chunk_ids(rows), dataset.seq_len, dataset.chunk_size))
        sums.sequences += len(tokens)
        if leak is not None:
            m = dataset.chunk_size
            leak.add(chunk_overlaps(batch["tokens"], batch.get("neighbours"), m, pad_id),
                     {k: per_chunk(v, m) for k, v in per_token.items()},
                     per_chunk(y != pad_id, m),
                     source_bytes.scale_chunks(chunk_bytes(tokenizer, batch["tokens"][:, 1:], m, pad_id),
                                               dataset.chunk_ids(rows), batch["tokens"][:, 1:], m))
    model.train(was_training)
    res = sums.all_reduced(device).result(retrieval=retrieval, control=control, baseline=baseline is not None)
    if leak is not None:
        res.overlap = leak.all_reduced(device).report(tuple(per_token))
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m retro.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="training run directory (RUN)")
    p.add_argument("--db", required=True, help="retrieval database directory")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--step", type=count_int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--base", default=None, metavar="PATH",
                   help="a RETRO-fit's frozen base (init_from's checkpoint, or the model.hf_decoder "
                        "folder) where it moved; checked against the hash the checkpoint records")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass")
    p.add_argument("--max-sequences", type=count_int, default=0, help="evaluate at most this many (0: all)")
    p.add_argument("--k", type=positive_int, default=None, help="neighbours per chunk (default: the model's)")
    p.add_argument("--neighbour-min-match", type=float, default=None, metavar="SHARE",
                   help="score with this model.neighbour_min_match instead of the run's (needs "
                        "neighbour_alignment: content): weak neighbours dropped at evaluation only, "
                        "the same weights")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--control", action="store_true",
                   help="also score with the neighbours of other sequences: what the retrieved text "
                        "itself buys, beyond having CCA layers at all")
    p.add_argument("--baseline", default=None, metavar="RUN_BASE",
                   help="a decoder-only run trained on the same data for the same steps "
                        "(configs/*-baseline.yaml): scored on the same tokens")
    p.add_argument("--baseline-step", type=int, default=None,
                   help="the baseline's checkpoint step (default: latest; match RETRO's --step)")
    p.add_argument("--overlap", action="store_true",
                   help="leakage analysis (paper 4.4): bits per byte over the chunks whose overlap with "
                        "their neighbours is <= alpha, alpha in 12.5%%, 25%%, 50%%, 75%%, 100%%")
    p.add_argument("--require-gain", nargs="?", const="all", default=None, choices=("all", "retrieval"),
                   help="exit with status 3 unless bits per byte with retrieval is lower than without "
                        "(and, with --control, lower than with other sequences' neighbours; with "
                        "--baseline, lower than the baseline's). '--require-gain retrieval' leaves the "
                        "baseline out of the verdict (still reported): what holds across seeds at a "
                        "demo's size, where baseline seeds differ by more than RETRO's gain")
    return p


def run(args: argparse.Namespace) -> int:
    """Load RUN's checkpoint, check it against the DB, evaluate, print JSON (stdout) and a summary
    line (stderr). Returns the exit status: 3 when ``--require-gain`` is not met, else 0."""
    from chunk_store import ChunkStore
    from chunk_store.framework.runtime import resolve_device
    from retro.checkpoint import checkpoint_dir, load_model, read_state
    from retro.dataset import RetroDataset, check_compatible, check_same_split
    from retro.run_layout import trained_db

    device = resolve_device(args.device)
    model, cfg = load_model(args.run, device=device, step=args.step, base=args.base)
    trained_min_match = cfg.neighbour_min_match
    if args.neighbour_min_match is not None:  # the dataset reads it; the weights do not depend on it
        try:
            cfg = replace(cfg, neighbour_min_match=args.neighbour_min_match)  # validated again
        except UserError as e:
            raise UserError(f"--neighbour-min-match {args.neighbour_min_match}: {e}") from None
    store = ChunkStore.open(args.db, args.split)
    check_compatible(store, cfg)
    db_info = {}
    trained = trained_db(args.run)
    if trained is not None and trained.resolve() != Path(args.db).resolve():
        check_same_split(store, trained)  # another database: the same split's sequences, byte for byte
        db_info = {"trained_db": str(trained)}
    k = args.k or cfg.num_neighbours
    dataset = RetroDataset.for_model(store, args.split, cfg, k=k)
    step = read_state(checkpoint_dir(args.run, args.step)).get("step")
    baseline, base_info = None, {}
    if args.baseline:
        baseline, base_cfg = load_model(args.baseline, device=device, step=args.baseline_step)
        check_compatible(store, base_cfg)
        base_step = read_state(checkpoint_dir(args.baseline, args.baseline_step)).get("step")
        base_info = {"baseline": str(args.baseline), "baseline_step": base_step}
        if base_step != step:
            print(f"retro.evaluate: warning: the baseline is at step {base_step}, RETRO at {step}: "
                  "the paper's comparison trains both for the same steps", file=sys.stderr)
    res = evaluate(model, dataset, device=device, micro_batch_size=args.batch_size,
                   max_sequences=args.max_sequences or None, progress=not args.no_progress,
                   control=args.control, baseline=baseline, overlap=args.overlap)
    min_match = {"neighbour_min_match": cfg.neighbour_min_match}
    if cfg.neighbour_min_match != trained_min_match:
        min_match["trained_neighbour_min_match"] = trained_min_match
    out = {"run": str(args.run), "db": str(args.db), **db_info, "split": args.split, "step": step, "k": k,
           **min_match,
           **base_info, **res.to_dict()}
    print(json.dumps(out, indent=2))
    gain = res.bits_per_byte_no_retrieval - res.bits_per_byte
    print(f"{args.split} bits per byte: {res.bits_per_byte:.4f} with retrieval, "
          f"{res.bits_per_byte_no_retrieval:.4f} without (retrieval gain {gain:+.4f}) "
          f"over {res.tokens:,} tokens of {res.sequences} sequences", file=sys.stderr)
    if res.bits_per_byte_other_neighbours is not None:
        print(f"{args.split} bits per byte with other sequences' neighbours (control): "
              f"{res.bits_per_byte_other_neighbours:.4f} (the retrieved text buys "
              f"{res.bits_per_byte_other_neighbours - res.bits_per_byte:+.4f})", file=sys.stderr)
    if res.bits_per_byte_baseline is not None:
        print(f"{args.split} bits per byte of the trained baseline: {res.bits_per_byte_baseline:.4f} "
              f"(RETRO's gain over it {res.bits_per_byte_baseline - res.bits_per_byte:+.4f})", file=sys.stderr)
    for row in res.overlap or []:
        print(f"  overlap <= {row['alpha']:>5.1%}: {row['tokens']:>7,} tokens, bpb "
              + ", ".join(f"{name} {row[f'bits_per_byte_{name}']:.4f}" for name in ("retrieval", "no_retrieval", "baseline")
                          if f"bits_per_byte_{name}" in row), file=sys.stderr)
    failure = gain_failure(res, over_baseline=args.require_gain == "all") if args.require_gain else None
    if failure:
        print(f"retro.evaluate: {failure}", file=sys.stderr)
        return EXIT_NO_GAIN
    return 0


def gain_failure(res: EvalResult, over_baseline: bool = True) -> str | None:
    """--require-gain's verdict: why the retrieval gain does not hold up, or None. Retrieval must
    lower bits per byte; when scored, also below the control and (``over_baseline``) below the
    trained baseline."""
    if not res.bits_per_byte_no_retrieval - res.bits_per_byte > 0:
        return "retrieval did not lower bits per byte"
    if res.bits_per_byte_other_neighbours is not None and not res.bits_per_byte_other_neighbours > res.bits_per_byte:
        return "the retrieved neighbours did no better than other sequences' neighbours"
    if over_baseline and res.bits_per_byte_baseline is not None and not res.bits_per_byte_baseline > res.bits_per_byte:
        return "RETRO did not beat the trained baseline"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = 0

    def cli() -> None:
        nonlocal status  # run_main reports errors; the --require-gain verdict is run()'s
        status = run(args)

    return run_main("retro.evaluate", cli) or status


if __name__ == "__main__":
    sys.exit(main())
