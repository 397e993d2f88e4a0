"""RETRO-fitting's frozen base (paper section 4.4): which parameters train, and the base's
identity that lets a RETRO-fit's checkpoints hold only what trains (retro.checkpoint writes and
rebuilds them: ``save_checkpoint(frozen_base=...)``, ``checkpoint_weights``).

A RETRO-fit freezes a trained decoder and trains only the neighbour encoder and the CCA blocks.
Storing the frozen decoder again in every checkpoint would cost its full size each time, so a
RETRO-fit whose base can be found again (``init_from``'s checkpoint, or ``model.hf_decoder``'s
pretrained weights) saves only the trainable tensors, and its ``state.json`` records the base:

    "frozen_base": {"kind": "checkpoint" | "hf", "path": ..., "sha256": ..., "dtype": ..., "tensors": N}

``sha256`` covers every frozen tensor as the run held it (name, dtype, shape and bytes, in
sorted name order), computed once when the run starts. Loading rebuilds the base from ``path``
(or a ``--base`` given where the base moved), checks the hash and only then adds the trained
tensors: a missing or different base is a one-line error, never a silent load of other weights.
Checkpoints without the record (any other run, or a RETRO-fit saved before it existed) hold the
full state and load as they always did.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from chunk_store.framework.errors import UserError
from retro.run_layout import checkpoint_dir

if TYPE_CHECKING:
    from retro.config import RetroConfig
    from retro.train_config import TrainConfig

# parameter-name components that belong to retrieval (trained when RETRO-fitting)
RETRIEVAL_PARTS = frozenset({"encoder", "enc_in", "cca", "cca_norm"})
KINDS = ("checkpoint", "hf")


def is_retrieval_param(name: str) -> bool:
    return bool(RETRIEVAL_PARTS.intersection(name.split(".")))


def freeze_decoder(model: torch.nn.Module) -> int:
    """RETRO-fitting (paper section 4.4): train only the neighbour encoder and CCA blocks."""
    trainable = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_retrieval_param(name))
        trainable += p.numel() if p.requires_grad else 0
    if trainable == 0:
        raise UserError("freeze_decoder=true but the model has no encoder/CCA parameters to train")
    return trainable


def trainable_names(model: torch.nn.Module) -> set[str]:
    """The state-dict names of the parameters that train (tied aliases included, so a name is
    frozen exactly when its tensor is)."""
    return {n.removeprefix("_orig_mod.").removeprefix("module.")
            for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def state_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over name, dtype, shape and bytes of each tensor in sorted name order: the same
    weights give the same hash wherever they were loaded from."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


@dataclass(frozen=True)
class FrozenBase:
    """Where a RETRO-fit's frozen tensors come from, and their hash as the run froze them."""

    kind: str  # "checkpoint": init_from's checkpoint folder; "hf": model.hf_decoder's weights
    path: str  # the checkpoint folder (absolute), or the Hugging Face name / folder
    sha256: str  # state_sha256 of the frozen tensors
    dtype: str | None  # the frozen tensors' dtype in training (bfloat16: a GPU RETRO-fit of a HF decoder)
    tensors: int  # how many frozen tensors

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Any, where: str) -> FrozenBase:
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(obj, dict) or set(obj) != fields or obj.get("kind") not in KINDS:
            raise UserError(f"corrupt {where}: frozen_base is {obj!r}")
        return cls(**obj)

    def moved(self, base: str | None) -> FrozenBase:
        """This identity with the base looked for at ``base`` (a moved base; the hash stays)."""
        return self if not base else dataclasses.replace(self, path=_resolve(self.kind, base))


def _resolve(kind: str, path: str) -> str:
    """A checkpoint base's folder as an absolute path; a Hugging Face folder too (a hub name stays)."""
    if kind == "checkpoint":
        try:
            return str(checkpoint_dir(path).resolve())
        except UserError:  # not there: loading says so, naming the checkpoint that needs it
            return str(Path(path).resolve())
    return str(Path(path).resolve()) if Path(path).exists() else path


def _frozen_dtype(tensors: Mapping[str, torch.Tensor]) -> str | None:
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    return dtypes.pop() if len(dtypes) == 1 else None


def identify_base(model: torch.nn.Module, tcfg: TrainConfig, mcfg: RetroConfig) -> FrozenBase | None:
    """At the start of a RETRO-fit (after init_from and freezing, before any step): the base's
    identity, or None where nothing could rebuild the frozen part (no freezing, or a frozen
    random decoder), whose checkpoints then hold the full state. One pass over the frozen bytes."""
    if not tcfg.freeze_decoder or not (tcfg.init_from or mcfg.hf_decoder):
        return None
    train = trainable_names(model)
    frozen = {k: v for k, v in model.state_dict().items() if k not in train}
    kind, path = ("checkpoint", tcfg.init_from) if tcfg.init_from else ("hf", mcfg.hf_decoder)
    assert path
    return FrozenBase(kind=kind, path=_resolve(kind, path), sha256=state_sha256(frozen),
                      dtype=_frozen_dtype(frozen), tensors=len(frozen))
