"""Checkpoints: atomic, pickle-free, exactly resumable.

Layout of ``RUN/checkpoints/step_XXXXXXXX/``:

- ``model.safetensors``      the full (unsharded) weights, keyed by parameter name; a RETRO-fit's
                             only the trainable ones (its frozen base is named in state.json and
                             rebuilt on load: retro.frozen_base)
- ``optimizer.safetensors``  every optimizer state tensor, keyed ``<param name>::<state key>``
- ``state.json``             step, optimizer param groups and scalar state, scheduler and data
                             position, and each rank's RNG states (bytes as base64, never pickle)

A checkpoint is written into a hidden temporary directory and renamed into place, then the
``checkpoints/latest`` pointer is replaced atomically: a crash leaves the previous checkpoint
intact and pointed to. Loading reads only safetensors and JSON, so a checkpoint from
elsewhere cannot run code (the guarantee ``torch.load(weights_only=True)`` aims at).

Optimizer state is keyed by parameter *name* (via ``torch.distributed.checkpoint.state_dict``),
so the same files load into a plain, DDP, compiled or FSDP2-sharded model.

A *sharded* checkpoint (``checkpoint_format: sharded``; retro.sharded_checkpoint writes and
resumes it) holds ``dcp/`` (torch.distributed.checkpoint) instead of the two safetensors
files; :func:`load_weights` reads its full weights too, so export, evaluation and generation
take either kind.
"""

from __future__ import annotations

import base64
import dataclasses
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
from retro.frozen_base import FrozenBase, is_retrieval_param, state_sha256, trainable_names
from retro.run_layout import (CONFIG, RunLayout, checkpoint_dir, is_sharded, optimizer_file,  # noqa: F401
                              shards_dir, state_file, step_dirname, weights_file)

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
                    optimizer: torch.optim.Optimizer | None, state: Mapping[str, Any],
                    frozen_base: FrozenBase | None = None) -> Path | None:
    """Write ``checkpoints/step_XXXXXXXX`` atomically and point ``latest`` at it.

    Collective: every rank must call it (sharded state is gathered and every rank's RNG state is
    recorded); only rank 0 writes. ``state`` holds JSON-able training state (scheduler, data
    position, config...). With ``frozen_base`` (a RETRO-fit) only the trainable weights are
    written, and the base's identity beside them. Returns the directory on rank 0, None elsewhere.
    """
    import torch.distributed as dist

    rank, world = _dist()
    msd, osd = _full_state_dicts(model, optimizer)
    if frozen_base is not None:
        keep = trainable_names(model)
        msd = {k: v for k, v in msd.items() if k in keep}
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
        if frozen_base is not None:
            meta["frozen_base"] = frozen_base.to_json()
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


MODEL_KEY, OPTIM_KEY = "model", "optim"  # the top-level keys of a sharded checkpoint's state dict


def read_shards(ckpt: str | os.PathLike, key: str = MODEL_KEY) -> dict[str, Any]:
    """One part (``model``: the full weights) of a sharded checkpoint, gathered from every rank's
    shards into this process's memory, with no process group (export, evaluation, a RETRO-fit's
    base). DCP's own reader, as ``format_utils.dcp_to_torch_save`` uses it, without its file."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = shards_dir(ckpt)
    sd: dict[str, Any] = {}
    try:  # dcp.load would hand back only the keys it was given: none
        _load_state_dict(sd, storage_reader=FileSystemReader(str(path)),
                         planner=_EmptyStateDictLoadPlanner(keys={key}), no_dist=True)
    except Exception as e:  # a truncated or foreign shard
        raise UserError(f"corrupt {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return dict(sd.get(key, {}))


def load_weights(ckpt: str | os.PathLike) -> dict[str, torch.Tensor]:
    if is_sharded(ckpt):
        return read_shards(ckpt)
    path = weights_file(ckpt)
    if not path.is_file():
        raise UserError(f"missing {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # truncated or foreign file
        raise UserError(f"corrupt {path}: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- a RETRO-fit's frozen base


def _base_weights(base: FrozenBase, cfg: RetroConfig | None, where: str) -> dict[str, torch.Tensor]:
    """The base's weights in the model's names and the run's dtype (a missing base: one line)."""
    dtype = getattr(torch, base.dtype) if base.dtype else None
    hint = "pass --base PATH where it is now"
    try:
        if base.kind == "checkpoint":
            weights = checkpoint_weights(checkpoint_dir(base.path), cfg)
        else:
            from retro.hf_decoder import load_pretrained

            if cfg is None:
                raise UserError("a RETRO-fit of a Hugging Face decoder needs the run's model config")
            with torch.random.fork_rng(devices=[]):  # building the CCA/encoder draws random numbers
                model = load_pretrained(dataclasses.replace(cfg, hf_decoder=base.path), dtype=dtype)
            weights = {k: v for k, v in model.state_dict().items() if k.startswith("decoder.")}
    except UserError as e:
        raise UserError(f"{where} is a RETRO-fit saved without its frozen base, and the base {base.path} "
                        f"cannot be loaded ({str(e).splitlines()[0]}): {hint}") from None
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in weights.items()}


def full_weights(trained: Mapping[str, torch.Tensor], base: FrozenBase, cfg: RetroConfig | None,
                 where: str, recorded: str | None = None) -> dict[str, torch.Tensor]:
    """The full state of a RETRO-fit: its base's frozen tensors (hash checked) + ``trained``.
    ``recorded``: the path the checkpoint names, when ``base`` is looked for elsewhere."""
    weights = _base_weights(base, cfg, where)
    frozen = {k: v for k, v in weights.items() if k not in trained}
    got = state_sha256(frozen)
    if got != base.sha256:
        was = f" (recorded: {recorded})" if recorded and recorded != base.path else ""
        raise UserError(f"{where}: the frozen base {base.path}{was} has sha256 {got[:16]} ({len(frozen)} tensors), "
                        f"the run froze {base.sha256[:16]} ({base.tensors} tensors): another base; "
                        f"pass --base PATH with the one the run started from")
    return {**frozen, **trained}


def checkpoint_weights(ckpt: str | os.PathLike, cfg: RetroConfig | None = None,
                       base: str | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's full weights: the file's, plus for a RETRO-fit its frozen base's (from
    ``base`` when given: the base moved)."""
    trained = load_weights(ckpt)
    record = read_state(ckpt).get("frozen_base")
    if record is None:
        return trained
    frozen_base = FrozenBase.from_json(record, str(state_file(ckpt)))
    return full_weights(trained, frozen_base.moved(base), cfg, str(Path(ckpt)), recorded=frozen_base.path)


def init_from(model: torch.nn.Module, path: str) -> dict[str, int]:
    """Load a (decoder-only) checkpoint's weights (a RETRO-fit's with its base's); only retrieval
    parameters may be missing."""
    weights = checkpoint_weights(checkpoint_dir(path), getattr(model, "cfg", None))
    own = model.state_dict()
    unexpected = sorted(set(weights) - set(own))
    if unexpected:
        raise UserError(f"init_from {path}: weights the model does not have: {unexpected[:5]}")
    bad = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in weights if weights[k].shape != own[k].shape]
    if bad:
        raise UserError(f"init_from {path}: shape mismatch (checkpoint vs model): {bad[:3]}")
    missing = sorted(k for k in set(own) - set(weights) if not is_retrieval_param(k))
    if missing:
        raise UserError(f"init_from {path}: the checkpoint lacks decoder weights {missing[:5]}")
    model.load_state_dict(weights, strict=False)
    return {"loaded": len(weights), "new": len(set(own) - set(weights))}


def load_checkpoint(ckpt: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, base: str | None = None) -> dict[str, Any]:
    """Load weights (and optimizer state) into a plain/DDP/compiled/FSDP model; restore RNG.

    Every rank calls it and reads the files itself. A RETRO-fit's frozen base is rebuilt from its
    recorded path, or from ``base`` (it moved), and checked against the recorded hash. Returns the
    JSON state (step, data position...); a moved base's new path is in its ``frozen_base``.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    ckpt = Path(ckpt)
    meta = read_state(ckpt)
    opts = StateDictOptions(full_state_dict=True, strict=True)
    weights = checkpoint_weights(ckpt, getattr(model, "cfg", None), base)
    if base and "frozen_base" in meta:
        meta["frozen_base"] = FrozenBase.from_json(meta["frozen_base"], str(ckpt)).moved(base).to_json()
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
               step: int | None = None, base: str | None = None) -> tuple[RETRO, RetroConfig]:
    """(RETRO, RetroConfig) with the latest (or ``step``'s) weights of RUN, in eval mode; a
    RETRO-fit's frozen base from its recorded path, or from ``base`` where it moved."""
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
    weights = checkpoint_weights(ckpt, cfg, base)
    check_fits(model, weights, f"{weights_file(ckpt)} (with {cfg_path})")
    model.load_state_dict(weights, strict=False)  # check_fits: same keys and shapes
    model.to(device).eval()
    return model, cfg
