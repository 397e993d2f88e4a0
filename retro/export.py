"""``python -m retro.export --run RUN --out DIR``: a training run -> a Hugging Face model folder.

DIR gets ``config.json`` (``RetroHFConfig``: the RETRO shape, and for a RETRO-fit the base
decoder's config; an ``auto_map`` to the modeling code shipped beside it, so
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` needs no ``import retro``),
``model.safetensors`` (the checkpoint's weights under ``retro.``), the
tokenizer the database was built with (a Hugging Face tokenizer's files, or the sentencepiece
``tokenizer.model`` with a ``tokenizer.json`` converted from it, so ``AutoTokenizer`` loads it)
and a README model card (training data, steps, evaluation numbers), so
``RetroForCausalLM.from_pretrained(DIR)`` loads it anywhere ``transformers`` runs and scores
exactly as the checkpoint does (tests/test_export.py checks the logits).

Why write the weights ourselves: safetensors refuses tensors that share memory (the native
model's tied embedding), and the checkpoint's names are already the module's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from chunk_store.framework.errors import UserError, run_main
from chunk_store.layout import TOKENIZER
from chunk_store.framework.atomic import atomic_write_bytes
from retro.run_layout import WEIGHTS_INDEX, WEIGHTS_PATTERN, RunLayout, trained_db


def _db_of(run: Path, db: str | None) -> Path | None:
    return Path(db) if db else trained_db(run)


def _last_eval(run: Path) -> dict[str, Any]:
    from retro.metrics import read_metrics

    evals = [r for r in read_metrics(run) if "val_bpb" in r or "val_loss" in r]
    return evals[-1] if evals else {}


def model_card(cfg: Any, step: int, base: str | None, db: Path | None, manifest: dict[str, Any] | None,
               evaluation: dict[str, Any]) -> str:
    """The README: what was trained, on what, for how long, and how well."""
    kind = f"RETRO-fitted `{base}` (frozen decoder; trained: neighbour encoder + CCA)" if base else "RETRO (native)"
    lines = [
        "---", "library_name: transformers", "tags: [retro, retrieval-augmented, causal-lm]", "---", "",
        f"# RETRO model: {kind}", "",
        "Exported with `python -m retro.export` from a training run of the retro project "
        "(Borgeaud et al. 2022). Load it with:", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from index_builder import Retriever  # the retro project's, over the run's database",
        "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)  # the folder's modeling code",
        "prompt_ids = AutoTokenizer.from_pretrained(DIR)(\"def main():\", return_tensors=\"pt\").input_ids",
        "ids = model.generate(prompt_ids, max_new_tokens=64, retriever=Retriever.open(DB))",
        "```", "",
        "## Model", "",
        f"- chunk size {cfg.chunk_size}, {cfg.num_neighbours} neighbours per chunk, CCA after decoder layers "
        f"{cfg.resolved_cca_layers}",
        f"- decoder: dim {cfg.dim}, {cfg.depth} layers; encoder: dim {cfg.enc_dim}, {cfg.enc_depth} layers",
        f"- vocabulary {cfg.vocab_size}, pad id {cfg.pad_id}", "",
        "## Training", "",
        f"- optimizer steps: {step}",
    ]
    if db is not None:
        lines.append(f"- retrieval database: `{db}`")
    if manifest:
        for split, c in (manifest.get("counts") or {}).items():
            lines.append(f"- {split}: {c.get('docs')} documents, {c.get('chunks')} chunks, {c.get('tokens')} tokens")
        tok = manifest.get("tokenizer") or {}
        lines.append(f"- tokenizer: {tok.get('kind', 'sentencepiece')} (sha256 {str(tok.get('sha256'))[:16]}...)")
    lines += ["", "## Evaluation (val split, the run's last evaluation)", ""]
    if evaluation:
        lines.append("| metric | value |")
        lines.append("|---|---|")
        for key in ("step", "val_loss", "val_bpb", "val_loss_no_retrieval", "val_bpb_no_retrieval"):
            if key in evaluation:
                value = evaluation[key]
                lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    else:
        lines.append("No evaluation was recorded.")
    return "\n".join(lines) + "\n"


def export(run: str | os.PathLike, out: str | os.PathLike, db: str | None = None, step: int | None = None,
           max_shard_size: int | str | None = None, base: str | None = None) -> Path:
    """Write the Hugging Face folder ``out`` from RUN's checkpoint (latest or ``step``); weights
    in shards of at most ``max_shard_size`` (see write_model_folder). A RETRO-fit's checkpoint
    holds only what trained: its frozen base (recorded, or ``base`` where it moved) fills in the
    rest, so the folder always has the full model."""
    from chunk_store.tokenization.hugging_face import HFTokenizer, load_hf_tokenizer, open_db_tokenizer
    from chunk_store.manifest import load_manifest
    from retro.checkpoint import checkpoint_dir, load_model, read_state
    from retro.hf_model import RetroHFConfig

    run, out = Path(run), Path(out)
    model, cfg = load_model(run, step=step, base=base)
    ckpt_step = int(read_state(checkpoint_dir(run, step)).get("step", 0))
    db_path = _db_of(run, db)
    manifest = load_manifest(db_path) if db_path is not None else None
    if cfg.hf_decoder:
        tok: Any = load_hf_tokenizer(str(RunLayout(run).decoder_dir))
        decoder = model.decoder.config.to_dict()  # type: ignore[union-attr]
    else:
        if manifest is None:
            raise UserError(f"{run} does not say which database it trained on: pass --db DB (its tokenizer is exported)")
        tok = open_db_tokenizer(db_path, manifest.get("tokenizer"))  # type: ignore[arg-type]
        decoder = None
    out.mkdir(parents=True, exist_ok=True)
    hf_config = RetroHFConfig(retro=cfg.to_dict(), decoder=decoder, vocab_size=cfg.vocab_size,
                              pad_token_id=cfg.pad_id, eos_token_id=tok.eos_id,
                              architectures=["RetroForCausalLM"])
    write_model_folder(out, hf_config, {f"retro.{k}": v for k, v in model.state_dict().items()},
                       {"step": str(ckpt_step)}, max_shard_size)
    if isinstance(tok, HFTokenizer):
        tok.save(out)
    else:
        shutil.copyfile(Path(tok.source), out / TOKENIZER)  # the sentencepiece model, under its DB name
        _write_auto_tokenizer(tok, out)
    card = model_card(cfg, ckpt_step, cfg.hf_decoder, db_path, manifest, _last_eval(run))
    atomic_write_bytes(out / "README.md", card.encode())
    return out


# the modules an export ships as remote code (``trust_remote_code``), and their names there
REMOTE_CODE = {"retro.config": "retro_config", "retro.layers": "retro_layers", "retro.model": "retro_model",
               "retro.hf_retrofit": "retro_hf_retrofit", "retro.hf_generation": "retro_hf_generation",
               "retro.hf_model": "modeling_retro"}
AUTO_MAP = {"AutoConfig": "modeling_retro.RetroHFConfig", "AutoModelForCausalLM": "modeling_retro.RetroForCausalLM"}
_USER_ERROR = "from chunk_store.framework.errors import UserError"
_PROJECT_IMPORT = re.compile(r"^\s*(from|import)\s+(retro|chunk_store|index_builder)\b", re.M)


def remote_code() -> dict[str, str]:
    """File name -> source of each shipped module: imports of this package made relative, the
    project's UserError replaced by a local class. Refuses a module that still imports the
    project (it would not load without it)."""
    import importlib

    files = {}
    for module, stem in REMOTE_CODE.items():
        text = Path(importlib.import_module(module).__file__).read_text()  # type: ignore[arg-type]
        for other, other_stem in REMOTE_CODE.items():
            text = re.sub(rf"\bfrom {re.escape(other)} import", f"from .{other_stem} import", text)
        text = text.replace(_USER_ERROR, "class UserError(Exception):\n"
                            "    \"\"\"A problem the user can fix (the retro project's UserError).\"\"\"")
        bad = _PROJECT_IMPORT.search(text)
        if bad:
            raise UserError(f"{module} imports {bad.group(2)}: it cannot ship in an export")
        files[f"{stem}.py"] = f"# shipped by retro.export from {module}; loaded by trust_remote_code\n{text}"
    return files


def write_model_folder(out: Path, hf_config: Any, weights: dict[str, Any], metadata: dict[str, str],
                       max_shard_size: int | str | None = None) -> None:
    """config.json (with ``auto_map``), the weights and the modeling code into ``out``.

    Weights: one ``model.safetensors``, or with ``max_shard_size`` (bytes, or "500MB", "5GB")
    transformers' shards and index where they do not fit in one. Weight files of an earlier
    export into ``out`` are removed first (the loader must not mix two)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from retro.checkpoint import _dedup_for_safetensors

    out.mkdir(parents=True, exist_ok=True)
    hf_config.auto_map = dict(AUTO_MAP)
    hf_config.save_pretrained(out)
    for old in [*out.glob(WEIGHTS_PATTERN.format(suffix="*")), out / WEIGHTS_INDEX]:
        old.unlink(missing_ok=True)
    weights = _dedup_for_safetensors(weights)
    split = split_torch_state_dict_into_shards(weights, filename_pattern=WEIGHTS_PATTERN,
                                               max_shard_size=max_shard_size or 2**62)
    for filename, names in split.filename_to_tensors.items():
        tmp = out / f".{filename}.tmp"
        save_file({n: weights[n] for n in names}, str(tmp), metadata={"format": "pt", **metadata})
        os.replace(tmp, out / filename)
    if split.is_sharded:
        index = {"metadata": {**metadata, "total_size": sum(t.numel() * t.element_size() for t in weights.values())},
                 "weight_map": split.tensor_to_filename}
        atomic_write_bytes(out / WEIGHTS_INDEX, json.dumps(index, indent=2, sort_keys=True).encode())
    for name, text in remote_code().items():
        atomic_write_bytes(out / name, text.encode())


def _write_auto_tokenizer(tok: Any, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json beside tokenizer.model, so that
    ``AutoTokenizer.from_pretrained(out)`` loads it (alone, transformers cannot place a
    sentencepiece file and fell back to tiktoken). A model the converter does not take (bpe)
    is exported as before, with a warning."""
    from chunk_store.tokenization.sentencepiece_to_hf import hf_tokenizer_files

    try:
        files = hf_tokenizer_files(tok)
    except UserError as e:
        print(f"retro.export: warning: no tokenizer.json ({e}); load {TOKENIZER} with "
              f"chunk_store.tokenization.sentencepiece.Tokenizer.from_file", file=sys.stderr)
        return
    for name, data in files.items():
        atomic_write_bytes(out / name, data)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m retro.export", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="training run directory (RUN)")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write")
    p.add_argument("--db", default=None, help="the run's database (default: the one RUN/db.json names)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--max-shard-size", default=None,
                   help="split the weights into safetensors shards of at most this size (bytes, or 500MB, 5GB); "
                        "default: one model.safetensors")
    p.add_argument("--base", default=None, metavar="PATH",
                   help="a RETRO-fit's frozen base (init_from's checkpoint, or the model.hf_decoder "
                        "folder) where it moved; checked against the hash the checkpoint records")
    return p


def _shard_size(text: str | None) -> int | str | None:
    """--max-shard-size: bytes, or a size with a unit as transformers writes it ("5GB")."""
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    if not re.fullmatch(r"\d+\s*[KMGT]B", text.strip(), re.I):
        raise UserError(f"--max-shard-size {text!r}: give bytes or a size such as 500MB or 5GB")
    return text.strip().upper()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def cli() -> None:
        path = export(args.run, args.out, db=args.db, step=args.step, max_shard_size=_shard_size(args.max_shard_size),
                      base=args.base)
        print(f"retro.export: wrote {path} (config.json, weights, modeling code, tokenizer, README.md)", file=sys.stderr)

    return run_main("retro.export", cli)


if __name__ == "__main__":
    sys.exit(main())
