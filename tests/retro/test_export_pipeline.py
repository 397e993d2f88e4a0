"""A trained run, exported by retro.export's command (its ``main``), generates through
``transformers.pipeline("text-generation", model=DIR, trust_remote_code=True)`` in a fresh
process, with a real Retriever passed through the pipeline and without one, and the tokens equal
``RetroForCausalLM.from_pretrained(DIR).generate`` here (test_export_remote_code covers an
untrained model with a neighbour function; test_hf_generation a pipeline in this process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import yaml

from chunk_store import ChunkStore
from retro.train_config import load_config
from tests.fixtures import shared_db
from tests.fixtures.train_db import REPO, tiny_model_sets

sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the script at the repository root)

PROMPT = "def parse(text):\n    return"
NEW = 24  # past the first chunk boundary (16): the retriever is asked

FRESH = textwrap.dedent("""
    import json, sys
    from transformers import pipeline
    from index_builder import Retriever

    folder, db, prompt, new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    class Counting:  # the real Retriever, counting the searches the pipeline's generate makes
        def __init__(self, retriever):
            self.retriever, self.store, self.calls = retriever, retriever.store, 0
        def search_text(self, texts, **kw):
            self.calls += 1
            return self.retriever.search_text(texts, **kw)

    pipe = pipeline("text-generation", model=folder, trust_remote_code=True)
    retriever = Counting(Retriever.open(db))
    out = {"module": type(pipe.model).__module__,
           "prompt_ids": pipe.tokenizer(prompt).input_ids}
    for name, extra in (("plain", {}), ("retrieval", {"retriever": retriever})):
        got = pipe(prompt, max_new_tokens=new, do_sample=False, return_tensors=True, **extra)
        out[name] = got[0]["generated_token_ids"]
    text = pipe(prompt, max_new_tokens=new, do_sample=False, retriever=retriever)[0]["generated_text"]
    out["text_starts_with_prompt"] = text.startswith(prompt)
    out["searches"] = retriever.calls
    print(json.dumps(out))
""")


def train_tiny_run(db: Path, out: Path) -> Path:
    """train.py (in process) for a few steps of a tiny native RETRO on ``db``."""
    store = ChunkStore.open(db, "train")
    keys = {"batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1,
            "max_steps": 2, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 0, "log_every": 1,
            "num_workers": 0, "seed": 5}
    sets = tiny_model_sets(vocab=store.tokenizer.vocab_size, pad_id=store.tokenizer.pad_id)
    data, model = load_config(None, sets, base=keys)
    config = out.parent / "cfg.yaml"
    config.write_text(yaml.safe_dump({**data.to_dict(), "model": model}))
    train.train(train.parse_args(["--config", str(config), "--db", str(db), "--out", str(out)]))
    return out


def test_trained_export_generates_through_a_pipeline_in_a_fresh_process(tmp_path: Path, tmp_path_factory) -> None:
    from index_builder import Retriever
    from retro.export import main as export_main
    from retro.hf_model import RetroForCausalLM

    db = shared_db(tmp_path_factory)
    run = train_tiny_run(db, tmp_path / "run")
    folder = tmp_path / "hf"
    assert export_main(["--run", str(run), "--out", str(folder)]) == 0  # in process: one fresh process is enough
    proc = subprocess.run([sys.executable, "-c", FRESH, str(folder), str(db), PROMPT, str(NEW)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["module"].startswith("transformers_modules")  # the export's own code, not this checkout's
    assert got["searches"] > 0 and got["text_starts_with_prompt"]

    model = RetroForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([got["prompt_ids"]])
    plain = model.generate(ids, max_new_tokens=NEW, do_sample=False)[0].tolist()
    retrieval = model.generate(ids, max_new_tokens=NEW, do_sample=False, retriever=Retriever.open(db))[0].tolist()
    assert got["plain"] == plain and got["retrieval"] == retrieval
    assert len(plain) > len(got["prompt_ids"])
