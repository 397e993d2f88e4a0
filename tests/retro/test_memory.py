"""Issue 22, memory: a meta-device build materialised with the eager build's exact weights (one
process, and sharded over 2 gloo ranks by FSDP2 before any weight exists), fsdp_cpu_offload
(refused without fsdp; the same losses as without offload), and bench_memory's CPU run."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from chunk_store.framework.errors import UserError
from retro import RETRO, RetroConfig
from retro.materialize import materialize, on_meta
from retro.train_config import TrainConfig
from tests.fixtures.train_db import PY, REPO, TRAIN_KEYS, losses, tiny_db, torchrun, write_train_config

TINY = dict(vocab_size=512, pad_id=3, chunk_size=16, num_neighbours=2, dim=32, depth=3, heads=2, dim_head=16,
            enc_dim=48, enc_depth=2, enc_heads=2, enc_dim_head=16, cca_layers=[2, 3])


@pytest.mark.parametrize("changes", [{}, {"tie_embeddings": False}, {"enc_dim": 32}, {"cca_layers": []}])
def test_meta_build_materialised_equals_the_eager_build(changes):
    cfg = RetroConfig(**{**TINY, **changes})
    torch.manual_seed(11)
    eager = RETRO(cfg)
    torch.manual_seed(999)  # materialize seeds itself: the caller's RNG state does not matter
    model = on_meta(lambda: RETRO(cfg))
    assert all(p.is_meta for p in model.parameters())
    materialize(model, "cpu", seed=11)
    a, b = eager.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (model.to_logits.weight is model.token_emb.weight) == cfg.tie_embeddings
    for (name, x), y in zip(eager.named_buffers(), model.buffers()):  # rotary frequencies (not in state_dict)
        assert torch.equal(x, y), name
    tokens = torch.randint(0, 512, (2, 32))
    nbrs = torch.randint(0, 512, (2, 2, 2, 32))
    assert torch.equal(eager(tokens, nbrs), model(tokens, nbrs))


def test_fsdp_cpu_offload_needs_fsdp():
    with pytest.raises(UserError, match="fsdp_cpu_offload needs fsdp"):
        TrainConfig(fsdp_cpu_offload=True)
    assert TrainConfig(fsdp=True, fsdp_cpu_offload=True).fsdp_cpu_offload


WORKER = '''
import sys, torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from retro import RETRO, RetroConfig
from retro.distributed import setup, wrap_model
from retro.materialize import materialize, on_meta
from retro.distributed import exit_process, teardown


def main() -> int:  # ended by exit_process: a rank never aborts in interpreter finalization (issue 22)
    cfg = RetroConfig(**%r)
    info = setup("cpu")
    model = on_meta(lambda: RETRO(cfg))
    wrap_model(model, info, fsdp=True, cpu_offload=sys.argv[1] == "offload")
    materialize(model, info.device, seed=11)
    local = sum(p.to_local().numel() for p in model.parameters())
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    torch.manual_seed(11)
    eager = RETRO(cfg).state_dict()
    ok = full.keys() == eager.keys() and all(torch.equal(full[k], eager[k]) for k in eager)
    print(f"rank={info.rank} equal={ok} local={local} total={sum(p.numel() for p in model.parameters())}", flush=True)
    teardown()
    return 0


exit_process(main)
'''


@pytest.mark.parametrize("offload", ["none", "offload"])
def test_fsdp2_shards_the_meta_model_and_each_rank_materialises_its_shards(tmp_path, offload):
    script = tmp_path / "worker.py"
    script.write_text(WORKER % (TINY,))
    launcher = Path(PY).with_name("torchrun")
    cmd = [str(launcher)] if launcher.exists() else [PY, "-m", "torch.distributed.run"]
    cmd += ["--standalone", "--nproc_per_node", "2", str(script), offload]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the ranks' lines reach torchrun's stdout concurrently and may run into each other: match, not split
    ranks = re.findall(r"rank=(\d+) equal=(\w+) local=(\d+) total=(\d+)", proc.stdout)
    assert sorted(r[0] for r in ranks) == ["0", "1"] and all(r[1] == "True" for r in ranks), proc.stdout
    for _, _, local, total in ranks:  # each rank holds about half of the weights, never all of them
        assert int(local) <= int(total) // 2 + 4096


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return tiny_db(tmp_path_factory.mktemp("memory"))


# slow: test_fsdp2_shards_the_meta_model_and_each_rank_materialises_its_shards[offload] checks the
# offloaded shards by default
@pytest.mark.slow
def test_torchrun_fsdp2_cpu_offload_trains_the_same_as_without(db, tmp_path):
    config = write_train_config(tmp_path / "cfg.yaml", TRAIN_KEYS)
    sets = ("fsdp=true", "max_steps=4")
    torchrun(config, db, tmp_path / "plain", *sets)
    torchrun(config, db, tmp_path / "offload", *sets, "fsdp_cpu_offload=true")
    assert len(losses(tmp_path / "plain")) == 4
    np.testing.assert_allclose(losses(tmp_path / "offload"), losses(tmp_path / "plain"), rtol=1e-6)
    resolved = (tmp_path / "offload" / "config.yaml").read_text()
    assert "fsdp_cpu_offload: true" in resolved
