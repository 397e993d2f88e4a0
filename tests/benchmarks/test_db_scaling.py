"""benchmarks/db_scaling.py at a tiny size: the plan fixed and refused when changed, the database
grown with retrieval-only data while the val data stay the same, the baseline trained once per
seed, RETRO and RETRO-fit (its decoder the baseline's, frozen) trained and evaluated at every size,
a re-run doing nothing, a new machine taking the runs recorded by an earlier session, and the
report's table and PNG."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from retro.checkpoint import checkpoint_dir, checkpoint_weights

from tests.fixtures import shared_tiny_bert
from tests.fixtures.train_db import tiny_model_sets

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import db_scaling  # noqa: E402
import db_scaling_report  # noqa: E402

PACKAGES = ("json", "email", "http", "wsgiref", "xmlrpc", "urllib", "logging", "concurrent")


def db_stages_in_process(run=subprocess.run):
    """``subprocess.run`` with the script's DB stages (``python -m index_builder ...``) run by the
    same CLI in this process: the same commands and arguments, without a process start-up
    (torch and transformers imports) for each of them. Training and evaluation runs stay
    subprocesses (they run two at a time, and their JSON goes to stdout)."""

    def dispatch(cmd, *args, **kwargs):
        cmd = [str(c) for c in cmd]
        if cmd[1:3] == ["-m", "index_builder"]:
            from index_builder.cli import main as cli

            return subprocess.CompletedProcess(cmd, cli(cmd[3:]))
        return run(cmd, *args, **kwargs)

    return dispatch


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("db-scaling")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = root / "corpus"
    for pkg in PACKAGES:
        shutil.copytree(stdlib / pkg, corpus / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    bert = shared_tiny_bert(tmp_path_factory)
    sets = [a for s in [*tiny_model_sets(), "max_steps=3", "warmup_steps=1", "batch_size=2", "micro_batch_size=2",
                        "eval_every=0", "checkpoint_every=0", "log_every=1", "num_workers=0",
                        "retrieval_dropout=0.5"] for a in ("--set", s)]  # RETRO's; RETRO-fit drops it
    argv = ["--work", str(root / "work"), "--corpus", str(corpus), "--glob", "*.py", "--pool-mb", "0.1",
            "--multiples", "1,3", "--seeds", "0", "--vocab-size", "512", "--chunk-size", "16", "--seq-len", "64",
            "--embed-args", f"--embedder {bert} --tokenize-workers 0 --device cpu --shard-size 256",
            "--index-args", "--index-key Flat --recall-sample 100", "--knn-args", "--k 2 --shard-size 256 --device cpu",
            "--eval-args", "--max-sequences 4", "--jobs", "2", *sets]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(db_scaling.subprocess, "run", db_stages_in_process())
        assert db_scaling.main(argv) == 0
    return root / "work", argv


def test_every_size_built_trained_and_evaluated(experiment) -> None:
    work, _ = experiment
    res = work / "results"
    assert sorted(p.name for p in res.glob("*.json")) == [
        "db-x1.json", "db-x3.json", "neighbour-distances.json", "retro-x1-seed0.json", "retro-x3-seed0.json",
        "retrofit-x1-seed0.json", "retrofit-x3-seed0.json"]
    small, large = (json.loads((res / f"db-x{m}.json").read_text()) for m in (1, 3))
    assert small["training_tokens"] == large["training_tokens"] == small["train_tokens"]
    assert 2.4 < large["train_tokens"] / large["training_tokens"] < 3.6
    assert small["val_tokens"] == large["val_tokens"]
    assert set(small["step_seconds"]) == {"embed", "index", "knn"} and "add" in large["step_seconds"]
    assert large["step_invocations"] == {"add": 1, "embed": 1, "index": 1, "knn": 1}
    assert large["wall_seconds"] == pytest.approx(sum(large["step_seconds"].values()), abs=0.5)
    # how close the val chunks' nearest chunks are, per size (exact): only the grown database
    # offers added data, and a larger database can only bring them closer
    near = json.loads((res / "neighbour-distances.json").read_text())
    assert near["1"]["share_from_retrieval_only"] == 0 < near["3"]["share_from_retrieval_only"] < 1
    assert near["3"]["mean_distance_by_rank"][0] <= near["1"]["mean_distance_by_rank"][0]
    assert near["1"]["train_chunks"] == small["train_chunks"] and near["1"]["val_chunks"] > 0
    ev = {m: json.loads((res / f"retro-x{m}-seed0.json").read_text()) for m in (1, 3)}
    # the same val tokens scored, and the same baseline on them: the val data did not move
    assert ev[1]["tokens"] == ev[3]["tokens"] and ev[1]["bits_per_byte_baseline"] == ev[3]["bits_per_byte_baseline"]
    assert all(len(e["overlap"]) == 5 for e in ev.values())
    assert sorted(p.name for p in (work / "runs").iterdir()) == [
        "baseline-seed0", "retro-x1-seed0", "retro-x3-seed0", "retrofit-x1-seed0", "retrofit-x3-seed0"]


def test_retrofit_keeps_the_baseline_decoder_frozen(experiment) -> None:
    work, _ = experiment

    def weights(run: str) -> dict:  # a RETRO-fit's checkpoint holds what trains; its base gives the rest
        return checkpoint_weights(checkpoint_dir(work / "runs" / run))

    base, fit, retro = weights("baseline-seed0"), weights("retrofit-x3-seed0"), weights("retro-x3-seed0")
    shared = [k for k in base if k in fit]
    assert len(shared) > 5 and len(fit) > len(base)  # the fit adds the encoder and CCA
    assert all((base[k] == fit[k]).all() for k in shared)
    saved = load_file(str(checkpoint_dir(work / "runs" / "retrofit-x3-seed0") / "model.safetensors"))
    assert set(saved) == set(fit) - set(shared)  # only what trains is saved
    assert any(not (base[k] == retro[k]).all() for k in shared)  # RETRO trains its decoder
    configs = {run: yaml.safe_load((work / "runs" / run / "config.yaml").read_text())
               for run in ("retro-x3-seed0", "retrofit-x3-seed0")}
    assert configs["retro-x3-seed0"]["retrieval_dropout"] == 0.5  # the plan's, for RETRO's decoder
    assert configs["retrofit-x3-seed0"]["retrieval_dropout"] == 0.0  # a frozen decoder: not applied


def test_a_rerun_does_nothing_and_another_plan_is_refused(experiment, monkeypatch) -> None:
    work, argv = experiment

    def no_run(*a, **k):
        raise AssertionError(f"ran {a[0][:4]} again")

    monkeypatch.setattr(db_scaling.subprocess, "run", no_run)
    assert db_scaling.main(argv) == 0
    monkeypatch.setattr(db_scaling.subprocess, "run", subprocess.run)
    changed = [*argv[:argv.index("--seeds") + 1], "0,1", *argv[argv.index("--seeds") + 2:]]
    with pytest.raises(SystemExit, match="planned with other values \\(seeds\\)"):
        db_scaling.main(changed)


def test_report_table_and_png(experiment, capsys) -> None:
    work, _ = experiment
    assert db_scaling_report.main([str(work)]) == 0
    text = (work / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) >= 2 * 4  # two sizes in each of the four tables
    assert "RETRO vs control" in text and "Goal, checked at the largest database" in text
    retrieved = text[text.index("| DB tokens | RETRO vs no retrieval"):].split("\n\n")[0].splitlines()[2:]
    twins = [line for line in retrieved if line[2].isdigit()]  # the retrieved-text table, one row a size
    assert len(twins) == 2 and all(line.endswith("| 0.0% |") for line in twins)  # slices of other files
    assert "python benchmarks/db_scaling.py --work WORK --corpus CORPORA/corpus --glob '*.py'" in text
    assert "--multiples 1,3" in text and "--knn-args '--k 2 --shard-size 256 --device cpu'" in text
    assert (work / "db_scaling.png").stat().st_size > 1000
    data = db_scaling_report.load(work)
    summary = db_scaling_report.summary(data)
    assert [r["multiple"] for r in summary] == [1, 3]
    r = summary[1]
    assert r["retro_gain"] == [pytest.approx(r["baseline"][0] - r["retro"][0])]
    ev = json.loads((work / "results" / "retro-x3-seed0.json").read_text())
    assert r["retro_vs_none"] == [pytest.approx(ev["bits_per_byte_no_retrieval"] - ev["bits_per_byte"])]
    assert r["retro_vs_control"] == [pytest.approx(ev["bits_per_byte_other_neighbours"] - ev["bits_per_byte"])]


def test_stage_seconds_say_what_they_count() -> None:
    """Summed over invocations (with their count when resumed); older records say they hold the
    last run of each step only; the oldest, the size's total."""
    summed = {"step_seconds": {"embed": 3600.0, "knn": 10.0}, "step_invocations": {"embed": 2, "knn": 1}}
    assert db_scaling_report.stage_seconds(summed) == "embed 3600 (2 runs), knn 10"
    last = {"step_seconds": {"embed": 5.0, "knn": 917.1}}
    assert db_scaling_report.stage_seconds(last) == "embed 5, knn 917 (last run of each step only)"
    assert db_scaling_report.stage_seconds({"wall_seconds": 121.2}) == "121 in all"


def test_goal_verdict() -> None:
    """The goal's lines say met / not met from the numbers alone."""
    def row(db, base, retro, low):
        over = {a: [{"bits_per_byte_baseline": b, "bits_per_byte_retrieval": b - g, "tokens": 10}
                    for b, g in zip(base, low)] for a in db_scaling_report.ALPHAS}
        return {"db_tokens": db, "baseline": base, "retro_seeds": len(base),
                "retro_gain": [b - x for b, x in zip(base, retro)], "retrofit_gain": [], "retro_overlap": over}

    rows = [row(100, [1.0, 1.01, 1.02], [0.99, 1.0, 1.01], [0.01] * 3),
            row(1000, [1.0, 1.01, 1.02], [0.9, 0.95, 0.96], [0.02, 0.01, 0.03])]
    lines = "\n".join(db_scaling_report.goal(rows))
    assert "RETRO: gain +5.88% to +10.00%" in lines and ">= 3% with every seed" in lines
    assert "(met: >= 3% with every seed)" in lines and "(met: >= 3x)" in lines and "(rising with each size)" in lines
    assert "RETRO-fit: not measured" in lines and "(met: above zero with every seed)" in lines
    assert "RETRO-fit at overlap" not in lines
    rows[1]["retrofit_overlap"] = {a: [dict(o, bits_per_byte_retrieval=o["bits_per_byte_baseline"] + 0.01)
                                       for o in rows[1]["retro_overlap"][a]] for a in db_scaling_report.ALPHAS}
    lines = "\n".join(db_scaling_report.goal(rows))
    assert "- RETRO-fit at overlap <= 12.5%: gain -0.0100 [-0.0100, -0.0100] (not met" in lines
    rows[1]["retro_gain"] = [0.005, 0.005, 0.005]
    lines = "\n".join(db_scaling_report.goal(rows))
    assert "(not met: >= 3% with every seed)" in lines and "(not rising with each size)" in lines


def test_slices_grow_to_each_size_and_refuse_a_short_corpus(tmp_path) -> None:
    files = []
    for i in range(10):
        f = tmp_path / f"f{i}.txt"
        f.write_bytes(b"x" * 100)
        files.append(f)
    pool, rest = db_scaling.split_files(files, 250)
    assert len(pool) == 3 and len(rest) == 7
    parts = db_scaling.slices(rest, [0, 200, 500])
    assert [len(p) for p in parts] == [0, 2, 3]
    with pytest.raises(SystemExit, match="bytes past the pool"):
        db_scaling.slices(rest, [800])
    order = db_scaling.ordered_files(tmp_path, "*.txt")
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("elsewhere"))
    assert [p.name for p in order] == [p.name for p in db_scaling.ordered_files(moved, "*.txt")]


def test_db_stages_use_every_core_and_parallel_runs_share_them(tmp_path, monkeypatch) -> None:
    """--jobs N splits the cores between the N training/evaluation runs beside each other, never a
    DB stage, which runs alone (embedding on one of two cores halved its speed)."""
    import io
    import types

    seen: list[tuple[str, dict | None]] = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(db_scaling.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(db_scaling.subprocess, "run",
                        lambda cmd, cwd, stdout, env: seen.append((cmd[-1], env)) or types.SimpleNamespace(returncode=0))
    runner = db_scaling.Runner(tmp_path, None, log=io.StringIO(), jobs=2)  # type: ignore[arg-type]
    runner.cli("embed")
    runner.run(["train.py"])
    assert seen[0] == ("embed", None)
    assert seen[1][0] == "train.py" and seen[1][1]["OMP_NUM_THREADS"] == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins everywhere
    runner.run(["train.py"])
    assert seen[2] == ("train.py", None)


def test_step_clock_sums_every_invocation_including_a_killed_one(tmp_path) -> None:
    """A step killed part-way and resumed counts both invocations: the killed one up to its last
    beat (written by a thread while the step runs), not only what the resume had left to do."""
    import threading

    clock = db_scaling.StepClock(tmp_path / "steps.json", beat=0.01)
    seen_beat = threading.Event()

    def killed() -> None:  # stands for a run the session's end killed: its journal stays unfinished
        while not seen_beat.is_set():
            runs = clock.load()["embed"]
            if runs[-1][1] > runs[-1][0]:
                seen_beat.set()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        clock.time("embed", killed)
    journal = clock.load()
    journal["embed"][0] = [100.0, 160.0, 0]  # as the kill left it: started, last alive 60 s later
    db_scaling.atomic_json(clock.path, journal)
    assert clock.time("embed", lambda: 7) == 7
    assert clock.time("knn", lambda: None) is None
    runs = clock.load()
    assert [r[2] for r in runs["embed"]] == [0, 1] and runs["knn"][0][2] == 1
    assert 60.0 <= clock.seconds()["embed"] < 61.0
    assert clock.invocations() == {"embed": 2, "knn": 1}
    assert not [t for t in threading.enumerate() if t.name.startswith("step-clock")]  # no beat left alive


def test_longer_training_at_the_largest_database_and_its_table(experiment) -> None:
    """--longer N (outside the plan): baseline and RETRO at the largest size trained N steps,
    evaluated like the sweep's runs, and the report's training-length table beside the sweep's."""
    work, argv = experiment
    assert db_scaling.main([*argv, "--longer", "5"]) == 0
    ev = json.loads((work / "results" / "longer" / "retro-x3-seed0-steps5.json").read_text())
    sweep = json.loads((work / "results" / "retro-x3-seed0.json").read_text())
    assert ev["tokens"] == sweep["tokens"]  # the same val tokens
    import yaml
    for run in ("baseline-seed0-steps5", "retro-x3-seed0-steps5"):
        cfg = yaml.safe_load((work / "runs" / run / "config.yaml").read_text())
        assert cfg["max_steps"] == 5 and cfg["seed"] == 0
        assert (cfg["model"]["cca_layers"] == []) == run.startswith("baseline")
        assert checkpoint_dir(work / "runs" / run).name == "step_00000005"
    assert ev["bits_per_byte_baseline"] != sweep["bits_per_byte_baseline"]  # the longer baseline
    assert db_scaling_report.main([str(work)]) == 0
    text = (work / "report.md").read_text()
    table = text[text.index("| steps | tokens trained on"):].split("\n\n")[0].splitlines()
    rows = [line for line in table if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[0] for r in rows] == ["| 3", "| 5"]
    assert rows[1].split(" | ")[1] == f"{5 * 2 * 64:,}"  # steps x batch x seq_len
    assert f"{ev['bits_per_byte']:.4f}" in rows[1] and f"{sweep['bits_per_byte']:.4f}" in rows[0]
    assert "--longer 5 --longer-seeds 1" in text


def test_disjoint_overlap_buckets_add_up_to_the_cumulative_ones(experiment) -> None:
    """Each bucket's bits are the difference of two cumulative ones: summed back (bytes-weighted)
    they give every cumulative bucket again; and the report's copying table shows each bucket."""
    work, _ = experiment
    ev = json.loads((work / "results" / "retro-x3-seed0.json").read_text())
    parts = db_scaling_report.disjoint_buckets(ev)
    assert [p["alpha"] for p in parts] == list(db_scaling_report.ALPHAS)
    for cum in ev["overlap"]:
        inside = [p for p in parts if p["alpha"] <= cum["alpha"] and p["bytes"]]
        assert sum(p["tokens"] for p in inside) == cum["tokens"]
        for v in ("retrieval", "no_retrieval", "baseline"):
            key = f"bits_per_byte_{v}"
            bits = sum(p[key] * p["bytes"] for p in inside)
            assert bits / cum["bytes"] == pytest.approx(cum[key], rel=1e-9)
    lines = db_scaling_report.copying(db_scaling_report.load(work))
    assert sum(line.startswith("| sweep | ") for line in lines) == len(parts)


def test_retrieval_corpus_gives_the_retrieval_only_data(tmp_path, monkeypatch) -> None:
    """--retrieval-corpus: the pool (training + val documents) comes from the corpus, every
    retrieval-only slice from the other folder, in its fixed order; the plan and the report's
    command record it."""
    def write(root: Path, names: list[str]) -> Path:
        for n in names:
            (root / n).parent.mkdir(parents=True, exist_ok=True)
            (root / n).write_text("x" * 1000)
        return root

    corpus = write(tmp_path / "v1", [f"a/{i}.c" for i in range(6)])
    newer = write(tmp_path / "v2", [f"a/{i}.c" for i in range(6)] + [f"b/{i}.c" for i in range(30)])
    plan = db_scaling.Plan(corpus=str(corpus), pool_mb=3000 / (1 << 20), multiples=(1, 3, 5),
                           retrieval_corpus=str(newer))
    def slice_dirs(plan: db_scaling.Plan, work: Path) -> list[Path | None]:
        """The folders each size adds, with every stage stubbed out (3,000 bytes a multiple)."""
        runner, slices = db_scaling.Runner(work, plan), []
        monkeypatch.setattr(runner, "build_database", lambda pool: None)
        monkeypatch.setattr(runner, "retrieval_bytes", lambda m: (m - 1) * 3000)
        monkeypatch.setattr(runner, "grow_to", lambda i, m, d: slices.append(d) or {})
        monkeypatch.setattr(runner, "neighbour_distances", lambda records: None)
        monkeypatch.setattr(runner, "parallel", lambda steps: None)
        runner.experiment(db_scaling.ordered_files(corpus, "*.c"), corpus)
        return slices

    slices = slice_dirs(plan, tmp_path / "work")
    pool = sorted(p.relative_to(tmp_path / "work" / "corpus" / "pool").as_posix()
                  for p in (tmp_path / "work" / "corpus" / "pool").rglob("*.c"))
    assert len(pool) == 3 and all((corpus / p).exists() for p in pool)
    assert slices[0] is None
    got = [sorted(p.relative_to(d) for p in d.rglob("*.c")) for d in slices[1:]]
    assert [len(g) for g in got] == [6, 6]  # 6,000 more bytes each: (3 - 1) x 3,000, then (5 - 3) x 3,000
    order = [p.relative_to(newer) for p in db_scaling.ordered_files(newer, "*.c")]
    assert got[0] + got[1] == sorted(order[:6]) + sorted(order[6:12])
    for d in slices[1:]:
        assert all(os.path.samefile(p, newer / p.relative_to(d)) for p in d.rglob("*.c"))
    text = db_scaling_report.command(dataclasses.asdict(plan))
    assert "--retrieval-corpus CORPORA/v2" in text and "--retrieval-order" not in text

    # --retrieval-order random: the same files at the largest size, each size a random subset of the next
    shuffled = dataclasses.replace(plan, retrieval_order="random")
    rand = [sorted(p.relative_to(d) for p in d.rglob("*.c")) for d in slice_dirs(shuffled, tmp_path / "work-random")[1:]]
    assert [len(g) for g in rand] == [6, 6]
    assert sorted(rand[0] + rand[1]) == sorted(got[0] + got[1])  # the largest database: the same files
    assert rand[0] != got[0]                                       # the first size: not the first files
    want = db_scaling.nested_random([newer / p for p in order[:12]], newer)[:6]  # nested: a seeded shuffle
    assert rand[0] == sorted(p.relative_to(newer) for p in want)
    assert "--retrieval-order random" in db_scaling_report.command(dataclasses.asdict(shuffled))
    # the pool's bytes whose file has a same-path file among each size's retrieval-only data
    largest = []
    for work, parts in ((tmp_path / "work", got), (tmp_path / "work-random", rand)):
        shares = db_scaling_report.same_path_shares(work, plan.multiples)
        held = [set(pool) & {p.as_posix() for p in parts[0]}, set(pool) & {p.as_posix() for p in parts[0] + parts[1]}]
        assert shares == {1: 0.0, 3: len(held[0]) / 3, 5: len(held[1]) / 3}  # 1,000-byte files
        largest.append(shares[5])
    assert largest[0] == largest[1] > 0  # the same files at the largest size, whatever the order
    with pytest.raises(SystemExit, match="--retrieval-order"):
        dataclasses.replace(plan, retrieval_order="sorted").validate()



def test_a_sweep_over_another_corpus_reports_into_its_own_section(experiment, tmp_path, monkeypatch) -> None:
    """--docs for a --retrieval-corpus sweep writes its own BENCHMARKS.md section and PNG: the
    sweep over the training corpus's own files (section "db-scaling") stays as it was."""
    import report

    work, _ = experiment
    docs = tmp_path / "BENCHMARKS.md"
    first = "<!-- BEGIN db-scaling -->\nthe first sweep\n<!-- END db-scaling -->\n"
    docs.write_text("# Benchmarks\n\n" + first)
    monkeypatch.setattr(report, "DOCS", docs)
    plan = json.loads((work / "plan.json").read_text())
    assert db_scaling_report.docs_names(plan)[0] == "db-scaling"
    other = {**plan, "retrieval_corpus": "/x/linux-source-6.12"}
    assert db_scaling_report.docs_names(other) == (
        "db-scaling-linux-source-6.12", "db_scaling_linux_source_6_12.png",
        "Retrieval against database size, retrieval-only data from linux-source-6.12")
    aligned = {**other, "sets": ["model.neighbour_alignment=content"]}
    assert db_scaling_report.docs_names(aligned)[0] == "db-scaling-linux-source-6.12"
    assert db_scaling_report.docs_names(aligned, "neighbour-alignment-content") == (
        "db-scaling-linux-source-6.12-neighbour-alignment-content",
        "db_scaling_linux_source_6_12_neighbour_alignment_content.png",
        "Retrieval against database size, retrieval-only data from linux-source-6.12, "
        "with model.neighbour_alignment=content")
    real_load = db_scaling_report.load
    monkeypatch.setattr(db_scaling_report, "load", lambda w: {**real_load(w), "plan": other})
    assert db_scaling_report.main([str(work), "--docs"]) == 0
    text = docs.read_text()
    assert first in text  # the first sweep's section, untouched
    assert "<!-- BEGIN db-scaling-linux-source-6.12 -->" in text and "from linux-source-6.12" in text
    assert "--retrieval-corpus CORPORA/linux-source-6.12" in text
    assert (tmp_path / "db_scaling_linux_source_6_12.png").stat().st_size > 1000


@pytest.mark.slow  # rebuilds the whole tiny database: 30-45 s
def test_a_new_machine_rebuilds_the_database_and_takes_the_recorded_runs(experiment, tmp_path, monkeypatch) -> None:
    """--record DIR holds a session's results; a fresh work folder (a new machine) with the same
    plan rebuilds the database, restores the recorded runs instead of training them again, and
    --train-at leaves the other sizes untrained."""
    work, argv = experiment
    record = tmp_path / "record"
    shutil.copytree(work / "results", record)
    (record / "retro-x3-seed0.json").unlink()  # a run the earlier session did not finish
    (record / "retrofit-x3-seed0.json").unlink()
    ran: list[list[str]] = []
    real = db_stages_in_process()

    def spy(cmd, *a, **k):
        ran.append([str(c) for c in cmd])
        return real(cmd, *a, **k)

    monkeypatch.setattr(db_scaling.subprocess, "run", spy)
    fresh = [*argv[:argv.index("--work") + 1], str(tmp_path / "work"), *argv[argv.index("--work") + 2:]]
    assert db_scaling.main([*fresh, "--record", str(record), "--train-at", "1"]) == 0
    assert not [c for c in ran if "train.py" in c or "retro.evaluate" in c]  # x1 recorded, x3 not this time
    assert {c[c.index("index_builder") + 1] for c in ran if "index_builder" in c} >= {"chunk", "embed", "index", "knn", "add"}
    got = tmp_path / "work" / "results"
    assert (got / "retro-x1-seed0.json").read_bytes() == (work / "results" / "retro-x1-seed0.json").read_bytes()
    assert not (got / "retro-x3-seed0.json").exists()
    assert (record / "db-x3.json").exists() and (record / "steps" / "db-x3.json").exists()


def test_a_size_left_untrained_cannot_be_trained_once_the_database_has_grown(experiment, tmp_path) -> None:
    """x1's runs missing in a WORK whose database is at x3: refused, not trained against x3's neighbours."""
    work, argv = experiment
    copy = tmp_path / "work"
    shutil.copytree(work, copy, symlinks=True)
    (copy / "results" / "retro-x1-seed0.json").unlink()
    moved = [*argv[:argv.index("--work") + 1], str(copy), *argv[argv.index("--work") + 2:]]
    with pytest.raises(SystemExit, match="has grown past x1"):
        db_scaling.main(moved)


def test_variants_are_parsed_merged_and_refused_when_malformed() -> None:
    got = db_scaling.parse_variants(["retrofit:zero-null:model.cca_null_value=zero", "retro:drop.3:retrieval_dropout=0.3",
                                     "retrofit:zero-null:model.cca_layers=[2,4]"])
    assert got == [db_scaling.Variant("retrofit", "zero-null", ("model.cca_null_value=zero", "model.cca_layers=[2,4]")),
                   db_scaling.Variant("retro", "drop.3", ("retrieval_dropout=0.3",))]
    for bad in ("baseline:x:seed=1", "retrofit:Zero:a=1", "retrofit:zero", "retrofit:zero:novalue", "retrofit::a=1"):
        with pytest.raises(SystemExit, match="--variant wants KIND:NAME:KEY=VALUE"):
            db_scaling.parse_variants([bad])


def test_a_variant_at_the_largest_database_beside_the_plans_run(experiment) -> None:
    """--variant KIND:NAME:KEY=VALUE (outside the plan): the plan's RETRO-fit with a setting on top,
    at the largest size on the seed's own baseline, evaluated as the plan's runs are; its settings
    may not change under the same name; the report's variant table and goal lines show it."""
    work, argv = experiment
    assert db_scaling.main([*argv, "--variant", "retrofit:zero-null:model.cca_null_value=zero"]) == 0
    ev = json.loads((work / "results" / "variants" / "retrofit-zero-null-x3-seed0.json").read_text())
    plan_run = json.loads((work / "results" / "retrofit-x3-seed0.json").read_text())
    assert ev["tokens"] == plan_run["tokens"] and ev["bits_per_byte_baseline"] == plan_run["bits_per_byte_baseline"]
    cfg = yaml.safe_load((work / "runs" / "retrofit-zero-null-x3-seed0" / "config.yaml").read_text())
    assert cfg["model"]["cca_null_value"] == "zero" and cfg["freeze_decoder"] is True
    assert cfg["init_from"] == str(work / "runs" / "baseline-seed0") and cfg["retrieval_dropout"] == 0.0
    with pytest.raises(SystemExit, match="was run with \\['model.cca_null_value=zero'\\]"):
        db_scaling.main([*argv, "--variant", "retrofit:zero-null:model.cca_null_value=learned"])
    assert db_scaling_report.main([str(work)]) == 0
    text = (work / "report.md").read_text()
    table = text[text.index("| run | settings on top of the plan's"):].split("\n\n")[0].splitlines()[2:]
    assert [r.split(" | ")[0] for r in table] == ["| RETRO-fit (the plan's)", "| RETRO-fit zero-null"]
    assert f"{ev['bits_per_byte']:.4f}" in table[1] and f"{plan_run['bits_per_byte']:.4f}" in table[0]
    low = next(o for o in ev["overlap"] if o["alpha"] == 0.125)
    assert f"{low['bits_per_byte_baseline'] - low['bits_per_byte_retrieval']:.4f}" in table[1]
    assert "- RETRO-fit zero-null (variant, 1 seeds): gain " in text
    assert "--variant retrofit:zero-null:model.cca_null_value=zero" in text


def test_eval_min_match_scores_the_same_weights_again_and_reports_them(experiment) -> None:
    """--eval-min-match S (outside the plan): the plan's runs at the largest size, and the variant
    runs given with it, scored again with retro.evaluate --neighbour-min-match S. At the share the
    runs trained with (0 here) the scores are the plan's own, to the bit; the report's table puts
    each run as trained beside it, and its command is listed."""
    work, argv = experiment
    variant = ["--variant", "retrofit:zero-null:model.cca_null_value=zero"]
    assert db_scaling.main([*argv, *variant, "--eval-min-match", "0"]) == 0
    got = work / "results" / db_scaling.MIN_MATCH_DIR
    assert sorted(f.name for f in got.glob("*.json")) == [
        "retro-x3-seed0-mm0.json", "retrofit-x3-seed0-mm0.json", "retrofit-zero-null-x3-seed0-mm0.json"]
    for name, trained in (("retro-x3-seed0", work / "results" / "retro-x3-seed0.json"),
                          ("retrofit-zero-null-x3-seed0", work / "results" / "variants" / "retrofit-zero-null-x3-seed0.json")):
        ev, plan_ev = json.loads((got / f"{name}-mm0.json").read_text()), json.loads(trained.read_text())
        assert ev["neighbour_min_match"] == 0.0 and "trained_neighbour_min_match" not in ev
        for key in ("bits_per_byte", "bits_per_byte_no_retrieval", "bits_per_byte_baseline", "tokens"):
            assert ev[key] == plan_ev[key], (name, key)
        assert ev["overlap"] == plan_ev["overlap"] and "bits_per_byte_other_neighbours" not in ev
    assert db_scaling_report.main([str(work)]) == 0
    text = (work / "report.md").read_text()
    table = text[text.index("| run | neighbour_min_match |"):].split("\n\n")[0].splitlines()[2:]
    assert [r.split(" | ")[:2] for r in table] == [
        ["| RETRO", "0 (trained)"], ["| RETRO", "0"], ["| RETRO-fit", "0 (trained)"], ["| RETRO-fit", "0"],
        ["| RETRO-fit zero-null", "0 (trained)"], ["| RETRO-fit zero-null", "0"]]
    assert table[0].split(" | ")[3:] == table[1].split(" | ")[3:]  # the same weights, the same filter
    assert "--eval-min-match 0 --variant retrofit:zero-null:model.cca_null_value=zero" in text
    for bad in ("1.5", "x", "0.5,-1"):
        with pytest.raises(SystemExit, match="--eval-min-match wants shares in"):
            db_scaling.parse_shares(bad)


def test_a_recorded_variant_is_restored_on_a_new_machine(tmp_path) -> None:
    record = tmp_path / "record"
    (record / "variants").mkdir(parents=True)
    for name in ("retrofit-x3-seed0.json", "variants/retrofit-zero-null.json", "variants/retrofit-zero-null-x3-seed0.json"):
        (record / name).write_text("{}")
    runner = db_scaling.Runner(tmp_path / "work", db_scaling.Plan(corpus=str(tmp_path)), record=record)
    runner.restore_record()
    got = sorted(p.relative_to(runner.results).as_posix() for p in runner.results.rglob("*.json"))
    assert got == ["retrofit-x3-seed0.json", "variants/retrofit-zero-null-x3-seed0.json", "variants/retrofit-zero-null.json"]
