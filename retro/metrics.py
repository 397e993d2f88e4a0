"""Loss accounting shared by training and evaluation: masked cross-entropy, bits per byte, MFU,
and the RUN/metrics.jsonl (+ optional TensorBoard) logger.

Bits per byte makes models with different tokenizers comparable: the summed loss in nats over
the evaluated target tokens, divided by ln 2 and by the UTF-8 byte length of the source text of
those same tokens: their decoded text (pad excluded) where the tokenizer gives text back as it
was, else scaled to the source bytes (SourceBytes).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from chunk_store.framework.errors import UserError
from chunk_store.framework.atomic import atomic_write_bytes
from retro.run_layout import RunLayout

# dense bf16 peak FLOP/s by GPU name fragment (the MFU denominator); RETRO_PEAK_FLOPS overrides
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L4": 121e12,
    "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int,
            reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in float32 over (b, n, vocab) logits, pad targets ignored."""
    return F.cross_entropy(rearrange(logits.float(), "b n v -> (b n) v"),
                           rearrange(targets, "b n -> (b n)"), ignore_index=pad_id, reduction=reduction)


def target_bytes(tokenizer: Any, targets: np.ndarray | torch.Tensor, pad_id: int) -> int:
    """UTF-8 bytes of each row of target tokens decoded (pad excluded), summed over rows.

    Rows are decoded whole, not token by token, so detokenisation (e.g. SentencePiece's word
    boundary marker) counts the bytes a user would see.
    """
    arr = targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    total = 0
    for row in arr.reshape(-1, arr.shape[-1]):
        ids = [int(t) for t in row if t != pad_id]
        if ids:
            total += len(tokenizer.decode(ids).encode("utf-8"))
    return total


class SourceBytes:
    """UTF-8 bytes of target tokens counted on the source text, for any tokenizer.

    Why: bits per byte divide by the bytes of the text the model is scored on. Where the tokenizer
    gives a document back as it was (sentencepiece here, byte-level BPE), decoding the targets
    counts exactly those bytes (``target_bytes``, unchanged). Where it does not (lower-casing,
    accent stripping, unknown tokens, collapsed whitespace: the chunk stage lists such documents,
    ChunkStore.altered_documents), the decoded bytes of a document's tokens are scaled by its
    source / decoded bytes, so a whole document counts exactly its source bytes and a part of one
    its share (by tokens where nothing decodes).
    """

    def __init__(self, store: Any) -> None:
        self.tokenizer, self.pad_id = store.tokenizer, store.pad_id
        self.altered: dict[int, dict[str, int]] = store.altered_documents()
        self.doc_ids = store.doc_ids

    def __call__(self, targets: np.ndarray | torch.Tensor, chunk_ids: np.ndarray) -> int:
        """``targets`` (b, n) token ids; ``chunk_ids`` (b, n) the chunk of each (-1: past the end)."""
        arr = targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
        if not self.altered:
            return target_bytes(self.tokenizer, arr, self.pad_id)
        cids = np.asarray(chunk_ids, dtype=np.int64).reshape(arr.shape)
        docs = np.full(cids.shape, -1, dtype=np.int64)
        docs[cids >= 0] = np.asarray(self.doc_ids[cids[cids >= 0]], dtype=np.int64)
        total = 0.0
        for row, row_docs in zip(arr, docs):
            if not any(int(d) in self.altered for d in np.unique(row_docs)):
                total += target_bytes(self.tokenizer, row[None, :], self.pad_id)
                continue
            cuts = np.flatnonzero(np.diff(row_docs)) + 1
            for seg, seg_docs in zip(np.split(row, cuts), np.split(row_docs, cuts)):
                total += self._segment(seg, int(seg_docs[0]))
        return int(round(total))

    def scale_chunks(self, nbytes: np.ndarray, chunk_ids: np.ndarray, targets: np.ndarray, chunk_size: int) -> np.ndarray:
        """(b, l + 1) decoded bytes per target chunk (retro.leakage.chunk_bytes; target chunk c is
        the sample's chunk c, ``chunk_ids`` (b, l + 1)) -> the same counted on the source text
        (float: a chunk's share of a document's bytes need not be whole; LeakageSums sums them)."""
        if not self.altered:
            return nbytes
        out = np.asarray(nbytes, dtype=np.float64).copy()
        targets = np.asarray(targets)
        for (r, c), cid in np.ndenumerate(np.asarray(chunk_ids)):
            rec = self.altered.get(int(self.doc_ids[int(cid)])) if cid >= 0 else None
            if rec is None:
                continue
            if rec["decoded_bytes"] > 0:
                out[r, c] *= rec["bytes"] / rec["decoded_bytes"]
            else:
                ids = targets[r, max(c * chunk_size - 1, 0):(c + 1) * chunk_size - 1]
                n = int(((ids != self.pad_id) & (ids != self.tokenizer.eos_id)).sum())
                out[r, c] = n * rec["bytes"] / max(rec["tokens"], 1)
        return out

    def _segment(self, ids: np.ndarray, doc: int) -> float:
        """Source bytes of one document's run of tokens."""
        kept = [int(t) for t in ids if t != self.pad_id]
        decoded = len(self.tokenizer.decode(kept).encode("utf-8", "surrogatepass")) if kept else 0
        rec = self.altered.get(doc)
        if rec is None:
            return float(decoded)
        if rec["decoded_bytes"] > 0:
            return decoded * rec["bytes"] / rec["decoded_bytes"]
        n = sum(1 for t in kept if t != self.tokenizer.eos_id)
        return n * rec["bytes"] / max(rec["tokens"], 1)


def target_chunk_ids(chunk_ids: np.ndarray, seq_len: int, chunk_size: int) -> np.ndarray:
    """(b, l + 1) chunk ids of samples (RetroDataset.chunk_ids) -> (b, seq_len) the chunk of each
    target token (targets are tokens 1..seq_len of a sample)."""
    return np.asarray(chunk_ids)[:, np.arange(1, seq_len + 1) // chunk_size]


def bits_per_byte(loss_sum_nats: float, num_bytes: int) -> float:
    """Summed loss (nats over all evaluated target tokens) -> bits per UTF-8 byte."""
    if num_bytes <= 0:
        return float("nan")
    return loss_sum_nats / (num_bytes * math.log(2))


# dense fp32 peak FLOP/s: TF32 tensor cores where the GPU has them (train.py turns TF32 on for
# float32 runs), plain fp32 on V100 / T4
PEAK_FP32_FLOPS = {
    "H200": 494e12, "H100": 494e12, "A100": 156e12, "A10G": 31.2e12, "L40S": 90.5e12, "L4": 30e12,
    "4090": 82.6e12, "3090": 35.6e12, "V100": 15.7e12, "T4": 8.1e12,
}


def peak_flops(device: torch.device, dtype: str = "bfloat16") -> float | None:
    """Peak dense FLOP/s of ``device`` in the dtype its matmuls run in ("bfloat16" under autocast,
    else "float32" = TF32), MFU's denominator; None where unknown (CPU). A float32 run divided by
    the bf16 peak would report half (or less) of its true utilisation."""
    env = os.environ.get("RETRO_PEAK_FLOPS")
    if env:
        return float(env)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = PEAK_BF16_FLOPS if dtype == "bfloat16" else PEAK_FP32_FLOPS
    for key, value in table.items():
        if key in name:
            return value
    return None


class MetricsLogger:
    """Append-only RUN/metrics.jsonl (rank 0), one JSON object per event, plus TensorBoard scalars.

    On resume, lines with a step beyond the checkpoint's are dropped first, so the file is the
    history of the run that actually continued, with no duplicated or orphaned steps.
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = False) -> None:
        self.path = RunLayout(run_dir).metrics
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) <= resume_step]
            atomic_write_bytes(self.path, "".join(line + "\n" for line in kept).encode())
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("tensorboard=true needs the tensorboard package: pip install '.[tensorboard]'") from None
            self.tb = SummaryWriter(str(RunLayout(run_dir).tensorboard), purge_step=resume_step)

    def log(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # a torn last line from a crash: drop it


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every well-formed record of RUN/metrics.jsonl (a torn last line is skipped)."""
    path = RunLayout(run_dir).metrics
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
