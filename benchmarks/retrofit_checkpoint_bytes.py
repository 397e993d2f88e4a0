"""Checkpoint bytes of a RETRO-fit, full state vs only what trains (retro.frozen_base), at a
config's shape: model construction and one zero-gradient AdamW step (so the optimizer has its
state); no data, no training. Also times hashing the frozen tensors (done once per run).

    python benchmarks/retrofit_checkpoint_bytes.py [--config configs/small.yaml]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from retro import RETRO, RetroConfig
from retro.checkpoint import save_checkpoint
from retro.frozen_base import freeze_decoder, identify_base
from retro.train_config import load_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/small.yaml")
    args = p.parse_args()
    tcfg, mdict = load_config(args.config, ["freeze_decoder=true"])
    cfg = RetroConfig.from_dict(mdict)
    torch.manual_seed(0)
    model = RETRO(cfg)
    freeze_decoder(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for param in opt.param_groups[0]["params"]:
        param.grad = torch.zeros_like(param)
    opt.step()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_checkpoint(root / "base", 0, model, None, {})  # the decoder run the RETRO-fit starts from
        start = time.perf_counter()
        base = identify_base(model, dataclasses.replace(tcfg, init_from=str(root / "base")), cfg)
        hash_s = time.perf_counter() - start
        assert base is not None
        for name, frozen_base in (("full state", None), ("what trains", base)):
            ckpt = save_checkpoint(root / name.replace(" ", "-"), 1, model, opt, {}, frozen_base=frozen_base)
            assert ckpt is not None
            sizes = {f.name: f.stat().st_size for f in sorted(ckpt.iterdir())}
            print(f"{name:12s} " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()) + f"; total {sum(sizes.values()):,}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{model.num_params():,} parameters, {trainable:,} trainable; {base.tensors} frozen tensors "
          f"hashed in {hash_s:.2f} s")


if __name__ == "__main__":
    main()
