"""What every benchmark prints and records: the machine in one line, and its own section of
docs/BENCHMARKS.md (between `<!-- BEGIN name -->` / `<!-- END name -->`, others' sections kept)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

# RETRO_BENCHMARKS_MD: another file to write to (the gpu-check smoke test writes a scratch copy)
DOCS = Path(os.environ.get("RETRO_BENCHMARKS_MD") or Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md")


def machine(device: str = "cpu") -> str:
    """GPU name on CUDA; on CPU the cores, torch threads and load (absolute CPU times are noisy)."""
    try:
        import torch

        torch_part = f"torch {torch.__version__}"
        if str(device).startswith("cuda") and torch.cuda.is_available():
            return f"{torch.cuda.get_device_name()}, {torch_part}"
        threads = f", {torch.get_num_threads()} torch threads"
    except ImportError:
        torch_part, threads = "no torch", ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores{threads}, no GPU, Python "
            f"{platform.python_version()}, {torch_part}, load average {load:.1f} "
            "(the machine is shared: absolute numbers are noisy)")


def write_section(section: str, text: str, path: Path = DOCS) -> None:
    """Replace (or append) this benchmark's own marked section, atomically."""
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + block
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(doc)
    os.replace(tmp, path)
