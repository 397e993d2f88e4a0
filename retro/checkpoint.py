"""Checkpoints: atomic, pickle-free, exactly resumable.

Layout of ``RUN/checkpoints/step_XXXXXXXX/``:

- ``model.safetensors``      the full (unsharded) weights, keyed by parameter name
- ``optimizer.safetensors``  every optimizer state tensor, keyed ``<param name>::<state key>``
- ``state.json``             step, optimizer param groups and scalar state, scheduler and data
                             position, and each rank's RNG states (bytes as base64, never pickle)

A checkpoint is written into a hidden temporary directory and renamed into place, then the
``checkpoints/latest`` pointer is replaced atomically: a crash leaves the previous checkpoint
intact and pointed to. Loading reads only safetensors and JSON, so a checkpoint from
elsewhere cannot run code (the guarantee ``torch.load(weights_only=True)`` aims at).

Optimizer state is keyed by parameter *name* (via ``torch.distributed.checkpoint.state_dict``),
so the same files load into a plain, DDP, compiled or FSDP2-sharded model.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from chunk_store.framework.errors import UserError
from chunk_store.framework.atomic import atomic_write_bytes, atomic_write_json
from chunk_store.manifest import now_iso
from retro.run_layout import (CONFIG, RunLayout, is_checkpoint, optimizer_file, state_file, step_dirname,
                              weights_file)

if TYPE_CHECKING:
    from retro.config import RetroConfig
    from retro.model import RETRO

SEP = "::"
STATE_VERSION = 1


# ----------------------------------------------------------------------------- JSON without pickle


def _to_json(obj: Any) -> Any:
    """Plain JSON for optimizer hyper-parameters; tuples are tagged so they come back as tuples."""
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(x) for x in obj]}
    if isinstance(obj, list):
        return [_to_json(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        if obj.numel() != 1:
            raise TypeError(f"cannot store a tensor of shape {tuple(obj.shape)} in JSON")
        return obj.item()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint's JSON")


def _from_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tuple__"}:
            return tuple(_from_json(x) for x in obj["__tuple__"])
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(x) for x in obj]
    return obj


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().contiguous().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """This process's Python, numpy, torch (and CUDA) RNG states as JSON-safe values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [_unb64(s) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- state dicts


def _dedup_for_safetensors(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): give each its own copy."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in sd.items():
        v = v.detach()
        if v.device.type != "cpu":
            v = v.cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen or not v.is_contiguous():
            v = v.clone().contiguous()
        elif v.numel():
            seen.add(ptr)
        out[k] = v
    return out


def _full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                      ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Unsharded, CPU, name-keyed model and optimizer state (on rank 0; empty on others)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def _split_optimizer(osd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pname, st in osd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{pname}{SEP}{key}"] = val
            else:
                scalars.setdefault(pname, {})[key] = _to_json(val)
    return tensors, {"param_groups": _to_json(osd["param_groups"]), "scalars": scalars}


def _join_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, val in tensors.items():
        pname, _, skey = key.rpartition(SEP)
        state.setdefault(pname, {})[skey] = val
    for pname, st in meta.get("scalars", {}).items():
        state.setdefault(pname, {}).update(st)
    return {"state": state, "param_groups": _from_json(meta["param_groups"])}


# ----------------------------------------------------------------------------- save / load


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, state: Mapping[str, Any]) -> Path | None:
    """Write ``checkpoints/step_XXXXXXXX`` atomically and point ``latest`` at it.

    Collective: every rank must call it (sharded state is gathered and every rank's RNG state is
    recorded); only rank 0 writes. ``state`` holds JSON-able training state (scheduler, data
    position, config...). Returns the directory on rank 0, None elsewhere.
    """
    import torch.distributed as dist

    rank, world = _dist()
    msd, osd = _full_state_dicts(model, optimizer)
    rngs = [rng_state()]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rngs[0])  # in-memory between ranks; never on disk
        rngs = gathered
    path = None
    if rank == 0:
        layout = RunLayout(run_dir)
        ckpts, final = layout.checkpoints, layout.step_dir(step)
        tmp = ckpts / f".tmp-{step_dirname(step)}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(_dedup_for_safetensors(msd), str(weights_file(tmp)), metadata={"step": str(step)})
        meta: dict[str, Any] = {
            "version": STATE_VERSION,
            "step": step,
            "saved": now_iso(),
            "world_size": world,
            "rng": rngs,
            **{k: _to_json(v) for k, v in state.items()},
        }
        if osd is not None:
            tensors, meta["optimizer"] = _split_optimizer(osd)
            save_file(_dedup_for_safetensors(tensors), str(optimizer_file(tmp)))
        atomic_write_json(state_file(tmp), meta)
        for f in tmp.iterdir():  # make the files durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
            old = ckpts / f".old-{step_dirname(step)}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        atomic_write_bytes(layout.latest, (final.name + "\n").encode())
        path = final
    if world > 1:
        dist.barrier()
    return path


def checkpoint_dir(run_dir: str | os.PathLike, step: int | None = None) -> Path:
    """The directory of checkpoint ``step`` (default: the one ``latest`` points to)."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    ckpts = layout.checkpoints
    if is_checkpoint(run_dir):  # already a checkpoint directory
        return run_dir
    if step is not None:
        path = layout.step_dir(step)
        if not path.is_dir():
            have = [p.name for p in layout.step_dirs()]
            raise UserError(f"no checkpoint for step {step} in {ckpts} (have: {', '.join(have) or 'none'})")
        return path
    pointer = layout.latest
    if not pointer.is_file():
        raise UserError(f"no checkpoint in {run_dir}: {pointer} is missing (did training save one?)")
    path = ckpts / pointer.read_text().strip()
    if not is_checkpoint(path):
        raise UserError(f"{pointer} points to {path.name}, which has no {weights_file(path).name}")
    return path


def read_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    """state.json, checked for the shape every reader relies on (an object with an integer step)."""
    path = state_file(ckpt)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"missing {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"corrupt {path}: {e}") from None
    if not isinstance(state, dict):
        raise UserError(f"corrupt {path}: not a JSON object")
    step = state.get("step")
    if "step" in state and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise UserError(f"corrupt {path}: step is {step!r}, not a count")
    return state


def check_fits(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse weights of another model shape in one line naming the first tensor that differs
    (``load_state_dict`` would raise a multi-line "size mismatch" RuntimeError)."""
    own = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in model.state_dict().items()}
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise UserError(f"{what} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in own.items():
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise UserError(f"{what} does not fit the model: {key} has shape {tuple(weights[key].shape)} "
                            f"in the checkpoint, {tuple(tensor.shape)} in the model (another model config?)")


def load_weights(ckpt: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = weights_file(ckpt)
    if not path.is_file():
        raise UserError(f"missing {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # truncated or foreign file
        raise UserError(f"corrupt {path}: {type(e).__name__}: {e}") from None


def load_checkpoint(ckpt: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load weights (and optimizer state) into a plain/DDP/compiled/FSDP model; restore RNG.

    Every rank calls it and reads the files itself. Returns the JSON state (step, data position...).
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    ckpt = Path(ckpt)
    meta = read_state(ckpt)
    opts = StateDictOptions(full_state_dict=True, strict=True)
    weights = load_weights(ckpt)
    check_fits(model, weights, str(weights_file(ckpt)))
    set_model_state_dict(model, weights, options=opts)
    if optimizer is not None:
        if "optimizer" not in meta:
            raise UserError(f"{ckpt} has no optimizer state: cannot resume from it")
        path = optimizer_file(ckpt)
        try:
            tensors = load_file(str(path))
            state = _join_optimizer(tensors, meta["optimizer"])
        except Exception as e:  # truncated file, or state.json's optimizer record of another shape
            raise UserError(f"corrupt {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                            ) from None
        try:
            set_optimizer_state_dict(model, optimizer, state, options=opts)
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(f"{path} does not fit this model's optimizer: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    rank, world = _dist()
    rngs = meta.get("rng") or []
    if rank < len(rngs) and len(rngs) == world:
        set_rng_state(rngs[rank])
    return meta


def load_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu",
               step: int | None = None) -> tuple[RETRO, RetroConfig]:
    """(RETRO, RetroConfig) with the latest (or ``step``'s) weights of RUN, in eval mode."""
    from retro.build import model_from_config
    from retro.config import RetroConfig

    run_dir = Path(run_dir)
    ckpt = checkpoint_dir(run_dir, step)
    cfg_path = RunLayout(run_dir).config
    if not cfg_path.is_file():  # a bare checkpoint directory: config two levels up
        cfg_path = RunLayout(ckpt.parent.parent).config
    if not cfg_path.is_file():
        raise UserError(f"no {CONFIG} in {run_dir}: not a training run directory")
    cfg = RetroConfig.from_yaml(cfg_path)
    # a RETRO-fitted Hugging Face decoder is rebuilt from RUN/hf_decoder/
    model = model_from_config(cfg, run_dir=cfg_path.parent)
    weights = load_weights(ckpt)
    check_fits(model, weights, f"{weights_file(ckpt)} (with {cfg_path})")
    model.load_state_dict(weights, strict=False)  # check_fits: same keys and shapes
    model.to(device).eval()
    return model, cfg
