"""An export carries its modeling code and an ``auto_map``: in a fresh process that cannot import
retro (nor chunk_store, index_builder), ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` loads it and generates the same greedy tokens as the model loaded here,
with a retriever (a neighbour function) and without, for a native and a RETRO-fitted model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from retro.export import AUTO_MAP, remote_code, write_model_folder
from tests.fixtures.retro_hf import FakeNeighbours, left_pad, tiny_retro_hf

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [2, 9]]
NEW = 10

FRESH = textwrap.dedent("""
    import json, sys

    class Refuse:  # the project must not be needed: its packages cannot be imported here
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("retro", "chunk_store", "index_builder"):
                raise ImportError("blocked: " + name)
            return None

    sys.meta_path.insert(0, Refuse())
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    M, K, V = 4, 2, 41
    def neighbours(pad):
        def fn(chunk):
            base = (np.arange(K * 2 * M).reshape(K, 2 * M) * 7 + sum(chunk)) %% V
            base[1, M:] = pad
            return base
        return fn

    result = {}
    for folder, ids, mask in json.loads(sys.argv[1]):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        ids, mask = torch.tensor(ids), torch.tensor(mask)
        pad = model.config.pad_token_id
        result[folder] = {
            "module": type(model).__module__,
            "plain": model.generate(ids, attention_mask=mask, max_new_tokens=%d).tolist(),
            "retrieval": model.generate(ids, attention_mask=mask, max_new_tokens=%d,
                                        retriever=neighbours(pad)).tolist(),
        }
    assert not [m for m in sys.modules if m.split(".")[0] in ("retro", "chunk_store", "index_builder")]
    print(json.dumps(result))
""" % (NEW, NEW))


def test_shipped_code_imports_nothing_of_the_project(tmp_path: Path) -> None:
    """transformers' own import scan (the one trust_remote_code runs) finds no project package."""
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    files = remote_code()
    assert set(files) >= {"modeling_retro.py", "retro_model.py", "retro_hf_generation.py"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for name in files:
        assert not {"retro", "chunk_store", "index_builder"} & set(get_imports(tmp_path / name)), name
        assert {f"{r}.py" for r in get_relative_imports(tmp_path / name)} <= set(files), name


def test_export_loads_with_trust_remote_code_in_a_fresh_process(tmp_path: Path) -> None:
    from retro.hf_model import RetroForCausalLM

    jobs, expected = [], {}
    for family in ("native", "gpt2"):
        pad = 3 if family == "native" else 40
        folder = tmp_path / family
        model = tiny_retro_hf(family, pad_id=pad).float()
        write_model_folder(folder, model.config, model.state_dict(), {})
        assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP
        here = RetroForCausalLM.from_pretrained(folder)
        ids, mask = left_pad(PROMPTS, pad)
        expected[str(folder)] = {
            "plain": here.generate(ids, attention_mask=mask, max_new_tokens=NEW).tolist(),
            "retrieval": here.generate(ids, attention_mask=mask, max_new_tokens=NEW,
                                       retriever=FakeNeighbours(pad)).tolist(),
        }
        if family == "native":  # retrieval shows (the RETRO-fit's effect is too weak to tell here)
            assert expected[str(folder)]["plain"] != expected[str(folder)]["retrieval"]
        jobs.append([str(folder), ids.tolist(), mask.tolist()])
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", FRESH, json.dumps(jobs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for folder, want in expected.items():
        assert got[folder]["module"].startswith("transformers_modules"), got[folder]["module"]
        assert got[folder]["plain"] == want["plain"] and got[folder]["retrieval"] == want["retrieval"], folder
