"""Behaviour, digested: run the whole pipeline once and write one digest per artifact, so that two
checkouts (before and after a refactor) can be shown to do exactly the same thing.

    python benchmarks/behaviour_digest.py --work /tmp/digest-before --out before.json
    python benchmarks/behaviour_digest.py --work /tmp/digest-after --out after.json
    python benchmarks/behaviour_digest.py --compare before.json after.json

What runs (every step through its command-line entry point, as a user runs it): `retro-build-index
all` (deterministic index) on a few standard-library packages with the offline MiniLM embedder;
`search`; RETRO and its decoder-only baseline trained 8 steps, stopped, resumed to 16; evaluate
(with --baseline, --control, --overlap); generate (greedy and sampled, JSON); export. Every file
written is hashed; JSON files are hashed after dropping the keys that record a time or a speed
(VOLATILE), and printed output likewise. Compare on one machine: bf16 embedding and float
summation orders differ between CPUs. Use the same --work path for both runs: the tokenizer's
training sample visits files in the order of a hash of their absolute path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Keys whose values are wall-clock times, speeds, versions or this machine's paths and names; and
# "python", the state of Python's `random` in a checkpoint: train.py seeds numpy and torch, never
# Python's `random` (nothing draws from it), so that state differs between any two runs.
VOLATILE = {"started", "finished", "seconds", "tokens_per_s", "time", "elapsed", "wall_s", "mfu",
            "versions", "samples_per_s", "chunks_per_s", "step_time", "queries_per_s", "s", "ms",
            "load_s", "created", "host", "hostname", "path", "db", "run", "input", "inputs_root",
            "cwd", "mtime", "peak_rss_mb", "rss_mb", "throughput", "saved", "python", "embedder_path"}
TIMING = re.compile(r"\b\d+(\.\d+)?(s| chunks/s)\b")  # "in 24.9s (506.7 chunks/s)" in report lines
STAMP = re.compile(r"@\d{4}-\d\d-\d\dT[\d:+]+")  # ids made of a name and a finish time (embed_id, index_id)
PACKAGES = ("json", "email", "wsgiref", "http", "xmlrpc")


def scrub(obj: Any) -> Any:
    """``obj`` without volatile keys (recursively) and with absolute paths of the work folder cut."""
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items() if k not in VOLATILE and not k.startswith("seconds")
                and not k.endswith(("_seconds", "_s", "_per_s", "_time"))}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    if isinstance(obj, str):
        return STAMP.sub("@TIME", obj)
    return obj


def digest_text(text: str, is_json: bool) -> str:
    """sha256 of ``text``; JSON (one document or one a line) is scrubbed and canonicalised first."""
    if is_json:
        try:
            text = json.dumps(scrub(json.loads(text)), sort_keys=True)
        except json.JSONDecodeError:
            try:
                text = "\n".join(json.dumps(scrub(json.loads(line)), sort_keys=True)
                                 for line in text.splitlines() if line.strip())
            except json.JSONDecodeError:  # report lines, then a JSON summary (retro-build-index all)
                head, brace, tail = text.partition("\n{")
                if brace:
                    try:
                        tail = json.dumps(scrub(json.loads("{" + tail)), sort_keys=True)
                    except json.JSONDecodeError:
                        tail = "{" + tail
                text = TIMING.sub("T", head) + "\n" + tail
    return hashlib.sha256(text.encode()).hexdigest()


def digest_safetensors(data: bytes) -> str:
    """sha256 of a safetensors file with its JSON header's keys sorted: the metadata's key order
    comes from a Rust HashMap and changes from process to process."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True).encode()
    return hashlib.sha256(header + data[8 + n:]).hexdigest()


def digest_tree(root: Path, work: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or ".tmp-" in p.name:
            continue
        rel = p.relative_to(work).as_posix()
        if p.suffix in (".json", ".jsonl"):
            out[rel] = digest_text(p.read_text().replace(str(work), "WORK"), True)
        elif p.suffix == ".safetensors":
            out[rel] = digest_safetensors(p.read_bytes())
        elif p.suffix in (".yaml", ".txt", ".log"):
            out[rel] = digest_text(p.read_text().replace(str(work), "WORK"), False)
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(cmd: list[str], work: Path, log: Path) -> str:
    """Run one step; its stdout (the JSON a command prints) is returned; stderr goes to the log."""
    # PYTHONPATH: this checkout's packages, not those an editable install of another one points to
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONHASHSEED": "0", "PYTHONPATH": str(REPO)}
    with open(log, "a") as err:
        err.write("$ " + " ".join(cmd) + "\n")
        err.flush()
        res = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    if res.returncode != 0:
        sys.exit(f"step failed ({res.returncode}): {' '.join(cmd)}; see {log}")
    return res.stdout.replace(str(work), "WORK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, help="a fresh folder for the run (removed first)")
    p.add_argument("--out", type=Path, help="the digest JSON to write")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two digests")
    p.add_argument("--digest-only", action="store_true", help="digest a finished --work folder again")
    a = p.parse_args(argv)
    if a.compare:
        x, y = (json.loads(f.read_text()) for f in a.compare)
        diff = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
        for k in diff:
            print(f"differs: {k} ({'missing in A' if k not in x else 'missing in B' if k not in y else 'content'})")
        print(f"{len(set(x) | set(y)) - len(diff)} artifacts identical, {len(diff)} differ")
        return 1 if diff else 0
    if not a.work or not a.out:
        p.error("--work and --out (or --compare A B)")
    work = a.work.resolve()
    if a.digest_only:
        return write_digests(work, a.out)
    shutil.rmtree(work, ignore_errors=True)
    corpus = work / "corpus"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for pkg in PACKAGES:
        shutil.copytree(stdlib / pkg, corpus / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    bin_ = Path(sys.executable).parent
    py = sys.executable
    log = work / "steps.log"
    db, run_, base, export = work / "db", work / "run", work / "run-base", work / "export"
    printed: dict[str, str] = {}
    printed["build"] = run([str(bin_ / "retro-build-index"), "all", "--input", str(corpus), "--out", str(db),
                            "--glob", "*.py", "--vocab-size", "512", "--chunk-size", "32", "--seq-len", "128",
                            "--val-fraction", "0.1", "--workers", "2", "--deterministic"], work, log)
    printed["search"] = run([str(bin_ / "retro-build-index"), "search", "--db", str(db), "--k", "2",
                             "def dumps(obj):"], work, log)
    sets = ["--set", "seq_len=128", "--set", "model.vocab_size=512", "--set", "model.chunk_size=32",
            "--set", "max_steps=16", "--set", "warmup_steps=4", "--set", "batch_size=2",
            "--set", "micro_batch_size=2", "--set", "eval_every=8", "--set", "eval_batches=2",
            "--set", "checkpoint_every=8", "--set", "log_every=4"]
    for cfg, out in (("configs/tiny.yaml", run_), ("configs/tiny-baseline.yaml", base)):
        run([py, "train.py", "--config", cfg, "--db", str(db), "--out", str(out), *sets, "--set", "stop_at=8"],
            work, log)
        run([py, "train.py", "--db", str(db), "--out", str(out), "--resume", "--set", "stop_at=null"], work, log)
    printed["evaluate"] = run([py, "-m", "retro.evaluate", "--run", str(run_), "--db", str(db), "--split", "val",
                               "--baseline", str(base), "--control", "--overlap", "--max-sequences", "8",
                               "--no-progress"], work, log)
    printed["generate_greedy"] = run([py, "-m", "retro.generate", "--run", str(run_), "--db", str(db), "--prompt",
                                      "import json\n\ndef load(fp):\n", "--max-new-tokens", "40",
                                      "--temperature", "0", "--json"], work, log)
    printed["generate_sampled"] = run([py, "-m", "retro.generate", "--run", str(run_), "--db", str(db), "--prompt",
                                       "class Message:", "--max-new-tokens", "40", "--temperature", "0.8",
                                       "--top-k", "20", "--seed", "3", "--json"], work, log)
    run([py, "-m", "retro.export", "--run", str(run_), "--out", str(export)], work, log)
    (work / "printed").mkdir()
    for name, text in printed.items():  # what the commands printed, kept beside what they wrote
        (work / "printed" / f"{name}.json").write_text(text)
    return write_digests(work, a.out)


def write_digests(work: Path, out: Path) -> int:
    digests: dict[str, str] = {}
    for folder in ("printed", "db", "run", "run-base", "export"):
        digests.update(digest_tree(work / folder, work))
    out.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    print(f"{len(digests)} artifacts digested: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
