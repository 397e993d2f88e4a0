"""Does retrieval pay, and more so with a larger database? Val bits per byte against database size
for RETRO, RETRO-fit and the trained baseline, over seeds, on real text.

The paper (Borgeaud et al. 2022, Figure 1 and section 4.1) trains on a fixed set of documents and
grows the database it retrieves from. This script does the same at a size this project's machines
run in hours:

1. The plan is fixed before any run and written to WORK/plan.json (a re-run with another plan is
   refused): the corpus's files in the order of a sha256 of their relative path; the first
   ``--pool-mb`` of them are the training and validation documents (split by the chunk stage's
   text hash, ``--val-fraction``); the following files are the retrieval-only data, taken by the
   sizes in that order, or (``--retrieval-order random``) the largest size's files shuffled, so
   each size is a random subset of the next, as the paper's smaller databases are of its largest.
2. One database grows through the sizes (``--multiples``: database tokens as multiples of the
   training tokens; 1 is the training data alone). At each size: ``add --retrieval-only`` the next
   files, embed (new chunks only), index (rebuilt), knn (refreshed: every row sees the grown
   database). Training and validation sequences stay byte for byte the same at every size.
3. At each size, for every seed: RETRO trained and evaluated with that database; RETRO-fit (the
   same seed's baseline decoder, frozen, with encoder and CCA trained against that database). The
   decoder-only baseline is trained once per seed (it does not depend on the database).
   Every evaluation scores the val split with ``--baseline --control --overlap``.
4. ``python benchmarks/db_scaling_report.py WORK`` writes the table and the PNG.

Every step is skipped when its result is on disk and every stage it calls resumes, so the same
command continues after a crash or in a later session. A later session on a fresh machine (nothing
of WORK left) rebuilds the database (the same chunks; embeddings and neighbours equal on the same kind of
CPU) and takes the runs already measured from ``--record DIR`` (results copied there as they
land, e.g. into the repository: benchmarks/results/); ``--train-at`` limits this session's
trainings to the sizes it has time for:

    bash benchmarks/fetch_corpora.sh CORPORA
    python benchmarks/db_scaling.py --work WORK --corpus CORPORA/linux-source --glob '*.c' \
        --pool-mb 2 --val-fraction 0.4 --multiples 1,10,30,100 --seeds 0,1,2 \
        --config configs/tiny.yaml --vocab-size 1024 --chunk-size 64 --seq-len 512 --jobs 2
    python benchmarks/db_scaling_report.py WORK --docs

Training length (``--longer STEPS``, after the sweep, outside the plan): is the gain limited by
how long the model trains? The baseline and RETRO at the largest database, ``--longer-seeds`` of
the seeds, trained STEPS steps instead of the plan's (same data, the learning-rate schedule
stretched to STEPS), evaluated as the sweep's runs are: WORK/results/longer/.

Variants (``--variant KIND:NAME:KEY=VALUE``, repeatable, outside the plan as ``--longer`` is): a
RETRO or RETRO-fit with other settings at the largest database, for every seed, on the seeds' own
baselines, evaluated as the plan's runs are (WORK/results/variants/), so the report and its goal
check set it beside the plan's run of the same kind; e.g. ``retrofit:zero-null:model.cca_null_value=zero``.

A stricter neighbour filter at evaluation only (``--eval-min-match S[,S...]``, outside the plan):
the plan's runs at the largest database, and the runs of the ``--variant``s given with it, scored
again with ``retro.evaluate --neighbour-min-match S`` (the same weights; runs trained with
``model.neighbour_alignment=content``): WORK/results/min-match/NAME-mmS.json, a table in the report.

That plan (the run of record) gives 867,913 training tokens (1,699 sequences of 512) and 370,711
val tokens in 53 held-out kernel source files; the largest database holds about 100x the training
tokens (~87M tokens, ~1.36M chunks of 64).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
KINDS = ("retro", "retrofit")
PLAN_VERSION = 1
MIN_MATCH_DIR = "min-match"  # WORK/results/min-match/: --eval-min-match's evaluations
RETRIEVAL_ORDERS = (None, "random")  # Plan.retrieval_order (None: the corpus order, "--retrieval-order corpus")


@dataclass(frozen=True)
class Plan:
    """Everything fixed before any run (WORK/plan.json)."""

    corpus: str
    glob: str = "*.c"
    pool_mb: float = 3.0  # training + validation documents
    val_fraction: float = 0.2
    multiples: tuple[int, ...] = (1, 10, 30, 100)  # database tokens / training tokens
    seeds: tuple[int, ...] = (0, 1, 2)
    config: str = "configs/tiny.yaml"
    sets: tuple[str, ...] = ()  # --set overrides for every training run
    vocab_size: int = 4096
    chunk_size: int = 64
    seq_len: int = 512
    embed_args: tuple[str, ...] = ()  # e.g. --embedder DIR --device cuda
    index_args: tuple[str, ...] = ()
    knn_args: tuple[str, ...] = ()
    eval_args: tuple[str, ...] = ()  # e.g. --max-sequences N
    retrofit: bool = True
    version: int = PLAN_VERSION
    # retrieval-only data from this folder (same --glob, the same fixed order) instead of the
    # corpus's files past the pool: e.g. the code base's next version (linux-source-6.12)
    retrieval_corpus: str | None = None
    # None: the sizes take the retrieval-only files in the fixed order above, so the first size
    # takes the first files; "random": the largest size's files in a seeded random order, so every
    # size is a random subset of the next (the paper's smaller databases are subsets of its largest).
    # Why it matters: the fixed order is the same path hash for both kernel versions, so x10 took
    # the 6.12 versions of 125 of the pool's 131 files and x30, x100 only files with no twin.
    retrieval_order: str | None = None

    def validate(self) -> None:
        if list(self.multiples) != sorted(set(self.multiples)) or self.multiples[0] < 1:
            raise SystemExit("db_scaling: --multiples must rise and start at 1 or more (1: the training data alone)")
        if not self.seeds:
            raise SystemExit("db_scaling: give at least one seed")
        if self.retrieval_order not in RETRIEVAL_ORDERS:
            raise SystemExit(f"db_scaling: --retrieval-order must be one of corpus, random, not {self.retrieval_order!r}")


@dataclass(frozen=True)
class Variant:
    """A run beside the plan's at the largest database (``--variant KIND:NAME:KEY=VALUE``): the
    plan's run of KIND with these ``--set`` overrides on top, named NAME in its files."""

    kind: str
    name: str
    sets: tuple[str, ...]

    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "sets": list(self.sets)}


def parse_variants(texts: Sequence[str]) -> list[Variant]:
    """``KIND:NAME:KEY=VALUE`` arguments as variants; the settings of one KIND:NAME are merged in
    order (a value may hold commas, so each setting is its own argument)."""
    merged: dict[tuple[str, str], list[str]] = {}
    for text in texts:
        kind, _, rest = text.partition(":")
        name, _, setting = rest.partition(":")
        if kind not in KINDS or not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", name) or "=" not in setting:
            raise SystemExit(f"db_scaling: --variant wants KIND:NAME:KEY=VALUE (KIND retro or retrofit, NAME of "
                             f"a-z, 0-9, '.' and '-'), not {text!r}")
        merged.setdefault((kind, name), []).append(setting)
    return [Variant(kind, name, tuple(sets)) for (kind, name), sets in merged.items()]


def ordered_files(corpus: Path, glob: str) -> list[Path]:
    """The corpus's files in a fixed order that does not depend on where the corpus lies."""
    files = [p for p in corpus.rglob(glob) if p.is_file()]
    return sorted(files, key=lambda p: hashlib.sha256(p.relative_to(corpus).as_posix().encode()).digest())


def nested_random(files: Sequence[Path], root: Path) -> list[Path]:
    """``files`` in a random order fixed by their relative paths (a salted sha256, unlike
    :func:`ordered_files`'s): consecutive slices of it are nested random subsets."""
    salt = b"db_scaling.retrieval_order=random:"
    return sorted(files, key=lambda p: hashlib.sha256(salt + p.relative_to(root).as_posix().encode()).digest())


def link_files(files: Sequence[Path], corpus: Path, dest: Path) -> None:
    """``files`` under ``dest`` at their relative paths (hard links; copies across file systems),
    made under a temporary name and renamed: the folder exists only whole."""
    if dest.exists():
        return
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for f in files:
        out = tmp / f.relative_to(corpus)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, out)
        except OSError:
            shutil.copyfile(f, out)
    tmp.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)


def split_files(files: Sequence[Path], pool_bytes: int) -> tuple[list[Path], list[Path]]:
    """(the pool: the first files up to ``pool_bytes``, the rest: retrieval-only candidates)."""
    total, cut = 0, 0
    for cut, f in enumerate(files):
        if total >= pool_bytes:
            break
        total += f.stat().st_size
    else:
        cut = len(files)
    return list(files[:cut]), list(files[cut:])


def slices(rest: Sequence[Path], need_bytes: Sequence[int]) -> list[list[Path]]:
    """Consecutive slices of ``rest``, the i-th growing the retrieval-only bytes to need_bytes[i]."""
    out, i, total = [], 0, 0
    for need in need_bytes:
        cur = []
        while total < need and i < len(rest):
            cur.append(rest[i])
            total += rest[i].stat().st_size
            i += 1
        if total < need:
            raise SystemExit(f"db_scaling: the corpus holds {total:,} bytes past the pool, {need:,} needed "
                             "for the largest database: a larger corpus or smaller --multiples")
        out.append(cur)
    return out


class StepClock:
    """Each step's seconds summed over every invocation, kept in a journal (JSON) beside the results.

    Why: a step killed part-way (a session's end) resumes in the next invocation, which alone
    would time only what was left (x30's embed once read "5 s"). While a step runs, a thread
    writes its invocation's last-alive time every ``beat`` seconds, so a killed invocation still
    counts, up to one beat."""

    def __init__(self, path: Path, beat: float = 15.0) -> None:
        self.path, self.beat = path, beat

    def load(self) -> dict[str, list[list[float]]]:
        """step -> [[start, last alive or end, 1 if it ended (0: killed, or running)], ...]"""
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def _mark(self, step: str, i: int, t: float, finished: bool) -> None:
        journal = self.load()
        journal[step][i][1:] = [round(t, 1), int(finished)]
        atomic_json(self.path, journal)

    def time(self, step: str, fn: Any) -> Any:
        """Run ``fn()`` as an invocation of ``step``; its value."""
        journal = self.load()
        t0 = time.time()
        journal.setdefault(step, []).append([round(t0, 1), round(t0, 1), 0])
        i = len(journal[step]) - 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_json(self.path, journal)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.beat):
                self._mark(step, i, time.time(), False)

        thread = threading.Thread(target=beat, daemon=True, name=f"step-clock-{step}")
        thread.start()
        try:
            return fn()
        finally:
            stop.set()
            thread.join()
            self._mark(step, i, time.time(), True)

    def seconds(self) -> dict[str, float]:
        """step -> seconds over all its invocations (a killed one up to its last beat)."""
        return {step: round(sum(b - a for a, b, _ in runs), 1) for step, runs in self.load().items()}

    def invocations(self) -> dict[str, int]:
        return {step: len(runs) for step, runs in self.load().items()}


class Runner:
    """The experiment's steps, each skipped when its result is on disk."""

    def __init__(self, work: Path, plan: Plan, *, python: str = sys.executable, log: Any = sys.stderr,
                 jobs: int = 1, train_at: Sequence[int] | None = None, record: Path | None = None) -> None:
        self.work, self.plan, self.py, self.log, self.jobs = work, plan, python, log, max(1, jobs)
        self.train_at, self.record = (None if train_at is None else set(train_at)), record
        self.db = work / "db"
        self.results = work / "results"
        self.runs = work / "runs"

    # -- commands
    def cli(self, *args: str) -> float:
        # a DB stage runs alone: every core (embed and index are the experiment's longest steps)
        return self.run([self.py, "-m", "index_builder", *args], shares_cores=False)

    def run(self, cmd: Sequence[str], stdout: Path | None = None, *, shares_cores: bool = True) -> float:
        """Run one step; its wall seconds. ``shares_cores``: a training or evaluation run, which
        runs beside ``jobs - 1`` others and gets its share of the cores as OMP_NUM_THREADS."""
        print("$ " + " ".join(cmd), file=self.log, flush=True)
        t0 = time.time()
        out = open(stdout.with_name(stdout.name + ".tmp"), "w") if stdout else None
        env = self.step_env(shares_cores)
        try:
            res = subprocess.run(list(cmd), cwd=REPO, stdout=out, env=env)
        finally:
            if out:
                out.close()
        if res.returncode != 0:
            raise SystemExit(f"db_scaling: step failed (exit {res.returncode}): {' '.join(cmd)}")
        if stdout:
            os.replace(stdout.with_name(stdout.name + ".tmp"), stdout)
        took = time.time() - t0
        print(f"  ({took:.0f} s)", file=self.log, flush=True)
        return took

    def step_env(self, shares_cores: bool) -> dict[str, str] | None:
        """The environment of a step: None (inherit) unless it shares the cores with other jobs."""
        if shares_cores and self.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
            return {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // self.jobs))}
        return None

    # -- the database at each size
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.db / "manifest.json").read_text())

    def build_database(self, pool: Path) -> None:
        p = self.plan
        self.cli("chunk", "--input", str(pool), "--out", str(self.db), "--glob", p.glob,
                 "--vocab-size", str(p.vocab_size), "--chunk-size", str(p.chunk_size), "--seq-len", str(p.seq_len),
                 "--val-fraction", str(p.val_fraction))

    def retrieval_bytes(self, multiple: int) -> int:
        """Retrieval-only bytes for a database of ``multiple`` x the training tokens, from the
        pool's bytes per token (files of one corpus tokenise alike)."""
        chunk = self.manifest()["stages"]["chunk"]["stats"]
        bytes_per_token = chunk["bytes"] / max(1, chunk["tokens"])
        return int((multiple - 1) * chunk["counts"]["train"]["tokens"] * bytes_per_token)

    def training_chunks(self) -> int:
        """Train chunks of the training data alone: retrieval-only chunks are numbered after them."""
        return int(self.manifest()["stages"]["chunk"]["stats"]["counts"]["train"]["chunks"])

    def grow_to(self, index: int, multiple: int, slice_dir: Path | None) -> dict[str, Any]:
        """The database at its index-th size: add (if any), embed, index, knn; its record."""
        done = self.results / f"db-x{multiple}.json"
        if done.exists():
            return json.loads(done.read_text())
        p = self.plan
        clock = StepClock(self.results / "steps" / f"db-x{multiple}.json")  # every invocation, killed ones too
        if slice_dir is not None:
            clock.time("add", lambda: self.cli("add", "--db", str(self.db), "--input", str(slice_dir),
                                               "--glob", p.glob, "--retrieval-only"))
        clock.time("embed", lambda: self.cli("embed", "--db", str(self.db), *p.embed_args))
        clock.time("index", lambda: self.cli("index", "--db", str(self.db), *(["--rebuild"] if index else []),
                                             *p.index_args))
        clock.time("knn", lambda: self.cli("knn", "--db", str(self.db), *(["--refresh"] if index else []),
                                           *p.knn_args))
        m = self.manifest()
        record = {"multiple": multiple, "train_tokens": m["counts"]["train"]["tokens"],
                  "train_chunks": m["counts"]["train"]["chunks"], "val_tokens": m["counts"]["val"]["tokens"],
                  "training_tokens": m["stages"]["chunk"]["stats"]["counts"]["train"]["tokens"],
                  "knn": m["stages"]["knn"].get("stats", {}), "index": m["stages"]["index"].get("stats", {}),
                  "step_seconds": clock.seconds(), "step_invocations": clock.invocations(),
                  "wall_seconds": round(sum(clock.seconds().values()), 1)}
        self.results.mkdir(parents=True, exist_ok=True)
        atomic_json(done, record)
        return record

    def neighbour_distances(self, records: Sequence[dict[str, Any]]) -> None:
        """How close the val chunks' nearest database chunks are at each size measured so far:
        exact search (faiss, flat L2) of the val embeddings against the first ``train_chunks``
        train embeddings of each size (the database only grows by appending, so every size is a
        prefix of the current one; sizes passed earlier are measured retroactively). Independent
        of the index's recall: what the database offers, not what knn found. WORK/results/
        neighbour-distances.json, one entry per size: the mean squared L2 by rank (the
        embedder's space; lower is closer) and the share of rank-1 neighbours from
        retrieval-only data."""
        import faiss

        from index_builder.embed.stage import open_embeddings, read_rows

        path = self.results / "neighbour-distances.json"
        done = json.loads(path.read_text()) if path.exists() else {}
        todo = [r for r in records if str(r["multiple"]) not in done]
        if not todo:
            return
        train, val = open_embeddings(self.db, "train"), open_embeddings(self.db, "val")
        queries = read_rows(val, 0, sum(a.shape[0] for a in val))
        first_added = self.training_chunks()
        for r in todo:
            index = faiss.IndexFlatL2(queries.shape[1])
            for lo in range(0, r["train_chunks"], 1 << 18):
                index.add(read_rows(train, lo, min(r["train_chunks"], lo + (1 << 18))))
            dist, ids = index.search(queries, 2)
            done[str(r["multiple"])] = {"train_chunks": r["train_chunks"], "val_chunks": int(queries.shape[0]),
                                        "mean_distance_by_rank": [round(float(d), 4) for d in dist.mean(axis=0)],
                                        "share_from_retrieval_only": round(float((ids[:, 0] >= first_added).mean()), 4)}
            atomic_json(path, done)

    # -- the runs
    def train(self, out: Path, seed: int, *extra: str) -> None:
        if (out / "checkpoints" / "latest").exists() and self.finished(out):
            return
        resume = ["--resume"] if (out / "checkpoints" / "latest").exists() else ["--config", self.plan.config]
        sets = [a for s in (*self.plan.sets, f"seed={seed}", *extra) for a in ("--set", s)]
        self.run([self.py, "train.py", "--db", str(self.db), "--out", str(out), *resume,
                  *(sets if resume[0] == "--config" else [])])

    def finished(self, run: Path) -> bool:
        """The run reached its max_steps (its last checkpoint's step)."""
        import yaml

        cfg = yaml.safe_load((run / "config.yaml").read_text())
        latest = (run / "checkpoints" / "latest").read_text().strip()
        state = json.loads((run / "checkpoints" / latest / "state.json").read_text())
        return int(state["step"]) >= int(cfg["max_steps"])

    def evaluate(self, run: Path, base: Path, result: Path, *, min_match: float | None = None) -> None:
        """Score ``run`` against the database and ``base``; with ``min_match``, the same weights with
        that neighbour_min_match (no control: the question is the gain and its overlap buckets)."""
        if result.exists():
            return
        extra = ["--control"] if min_match is None else ["--neighbour-min-match", str(min_match)]
        self.run([self.py, "-m", "retro.evaluate", "--run", str(run), "--db", str(self.db), "--split", "val",
                  "--baseline", str(base), *extra, "--overlap", "--no-progress", *self.plan.eval_args],
                 stdout=result)

    def experiment(self, files: Sequence[Path], corpus: Path) -> None:
        p = self.plan
        pool, rest = split_files(files, int(p.pool_mb * (1 << 20)))
        link_files(pool, corpus, self.work / "corpus" / "pool")
        root = corpus
        if p.retrieval_corpus is not None:
            root = Path(p.retrieval_corpus)
            rest = ordered_files(root, p.glob)
        if not (self.db / "manifest.json").exists() or "chunk" not in self.manifest()["stages"]:
            self.build_database(self.work / "corpus" / "pool")
        need = [self.retrieval_bytes(m) for m in p.multiples]
        if p.retrieval_order == "random":  # the largest size's files, then shuffled among the sizes
            rest = nested_random(slices(rest, need[-1:])[0], root)
        parts = slices(rest, need)
        records: list[dict[str, Any]] = []
        for i, (multiple, part) in enumerate(zip(p.multiples, parts)):
            slice_dir = None
            if part:
                slice_dir = self.work / "corpus" / f"retrieval-x{multiple}"
                link_files(part, root, slice_dir)
            records.append(self.grow_to(i, multiple, slice_dir))
            self.neighbour_distances(records)
            self.save_record()
            todo = [(kind, seed) for seed in p.seeds for kind in KINDS[:1 + p.retrofit]
                    if not (self.results / f"{kind}-x{multiple}-seed{seed}.json").exists()]
            if not todo or (self.train_at is not None and multiple not in self.train_at):
                continue  # measured (here or in a recorded session), or not this session's size
            size = records[-1].get("train_chunks")  # this size's record (tests stub it out)
            if size is not None and self.manifest()["counts"]["train"]["chunks"] != size:
                raise SystemExit(f"db_scaling: x{multiple} has runs to train but WORK's database has grown past "
                                 f"x{multiple}: train them in a fresh WORK with --record (the database "
                                 "is rebuilt size by size)")
            self.parallel([lambda seed=seed: self.train(self.runs / f"baseline-seed{seed}", seed, "model.cca_layers=[]")
                           for seed in sorted({s for _, s in todo})])
            self.parallel([lambda seed=seed, kind=kind: self.train_and_evaluate(kind, multiple, seed)
                           for kind, seed in todo])

    def restore_record(self) -> None:
        """The runs a recorded session measured (--record DIR: their result files), so they are not
        trained again; the database is rebuilt whole (its records are this machine's)."""
        if self.record is None or not self.record.is_dir():
            return
        self.results.mkdir(parents=True, exist_ok=True)
        for f in [*self.record.glob("retro*-x*-seed*.json"), *self.record.glob("variants/*.json"),
                  *self.record.glob(f"{MIN_MATCH_DIR}/*.json")]:
            out = self.results / f.relative_to(self.record)
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, out)

    def save_record(self) -> None:
        """Every result file into --record DIR (e.g. a folder of the repository), which outlives the
        machine: the next session restores the runs from it (:meth:`restore_record`)."""
        if self.record is None:
            return
        for f in self.results.rglob("*.json"):
            out = self.record / f.relative_to(self.results)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, out)

    def longer(self, steps: int, seeds: Sequence[int]) -> None:
        """Baseline and RETRO at the largest database trained ``steps`` steps (see the docstring)."""
        largest = max(self.plan.multiples)
        if not (self.results / f"db-x{largest}.json").exists():
            raise SystemExit(f"db_scaling: --longer needs the database at its largest size (x{largest}) built first")
        sets = (f"max_steps={steps}", f"eval_every={max(100, steps // 4)}", f"checkpoint_every={max(100, steps // 10)}")
        out = self.results / "longer"
        out.mkdir(parents=True, exist_ok=True)

        def both(seed: int) -> list[Any]:
            base = self.runs / f"baseline-seed{seed}-steps{steps}"
            run = self.runs / f"retro-x{largest}-seed{seed}-steps{steps}"
            return [lambda: self.train(base, seed, "model.cca_layers=[]", *sets),
                    lambda: self.train(run, seed, *sets)]

        self.parallel([step for seed in seeds for step in both(seed)])
        for seed in seeds:
            self.evaluate(self.runs / f"retro-x{largest}-seed{seed}-steps{steps}",
                          self.runs / f"baseline-seed{seed}-steps{steps}",
                          out / f"retro-x{largest}-seed{seed}-steps{steps}.json")

    def variants(self, variants: Sequence[Variant]) -> None:
        """Each variant at the largest database, for every seed (see the module docstring); a
        variant's settings are recorded (WORK/results/variants/KIND-NAME.json) and may not change."""
        largest = max(self.plan.multiples)
        if not (self.results / f"db-x{largest}.json").exists():
            raise SystemExit(f"db_scaling: --variant needs the database at its largest size (x{largest}) built first")
        out = self.results / "variants"
        out.mkdir(parents=True, exist_ok=True)
        for v in variants:
            spec = out / f"{v.kind}-{v.name}.json"
            if spec.exists() and json.loads(spec.read_text()) != v.spec:
                raise SystemExit(f"db_scaling: variant {v.kind}:{v.name} was run with "
                                 f"{json.loads(spec.read_text())['sets']}, not {list(v.sets)}: give it another name")
            atomic_json(spec, v.spec)
        self.save_record()
        seeds = self.plan.seeds
        self.parallel([lambda seed=seed: self.train(self.runs / f"baseline-seed{seed}", seed, "model.cca_layers=[]")
                       for seed in seeds])
        self.parallel([lambda v=v, seed=seed: self.train_and_evaluate(v.kind, largest, seed, v)
                       for v in variants for seed in seeds])

    def eval_min_match(self, shares: Sequence[float], variants: Sequence[Variant]) -> None:
        """The plan's runs at the largest database, and ``variants``' runs, scored again with each
        neighbour_min_match in ``shares`` (the same weights; see the module docstring)."""
        largest = max(self.plan.multiples)
        out = self.results / MIN_MATCH_DIR
        out.mkdir(parents=True, exist_ok=True)
        names = [f"{kind}-x{largest}-seed{seed}" for kind in KINDS[:1 + self.plan.retrofit] for seed in self.plan.seeds]
        names += [f"{v.kind}-{v.name}-x{largest}-seed{seed}" for v in variants for seed in self.plan.seeds]
        steps = []
        for share in shares:
            for name in names:
                result = out / f"{name}-mm{share:g}.json"
                if result.exists():
                    continue
                if not (self.runs / name / "checkpoints" / "latest").exists():
                    raise SystemExit(f"db_scaling: --eval-min-match needs the trained run {self.runs / name} "
                                     "(train it first: the sweep, or its --variant)")
                base = self.runs / f"baseline-seed{name.rsplit('-seed', 1)[1]}"
                steps.append(lambda name=name, base=base, result=result, share=share:
                             self.evaluate(self.runs / name, base, result, min_match=share))
        self.parallel(steps)
        self.save_record()

    def train_and_evaluate(self, kind: str, multiple: int, seed: int, variant: Variant | None = None) -> None:
        """RETRO, or RETRO-fit on the seed's baseline decoder, at one size (a variant's settings on
        top); then its evaluation."""
        base = self.runs / f"baseline-seed{seed}"
        name = f"{kind}-x{multiple}-seed{seed}" if variant is None else f"{kind}-{variant.name}-x{multiple}-seed{seed}"
        # RETRO-fit: the frozen decoder has nothing to learn from a step without neighbours, so a plan's
        # retrieval_dropout (for RETRO's decoder) does not apply (train.py refuses the two together)
        self.train(self.runs / name, seed, *([f"init_from={base}", "freeze_decoder=true", "retrieval_dropout=0.0"]
                                             if kind == "retrofit" else []), *(variant.sets if variant else ()))
        self.evaluate(self.runs / name, base,
                      self.results / (f"{name}.json" if variant is None else f"variants/{name}.json"))
        self.save_record()

    def parallel(self, steps: Sequence[Any]) -> None:
        """Run independent steps, ``jobs`` at a time (each runs subprocesses); the first failure
        is raised once the running steps end."""
        if self.jobs == 1:
            for step in steps:
                step()
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.jobs) as pool:
            for f in [pool.submit(step) for step in steps]:
                f.result()


def atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def fixed_plan(work: Path, plan: Plan) -> Plan:
    """WORK/plan.json: written by the first run; a later run must ask for the same plan."""
    path = work / "plan.json"
    mine = dataclasses.asdict(plan)
    if path.exists():
        recorded = json.loads(path.read_text())
        diff = sorted(k for k in set(mine) | set(recorded) if json.dumps(mine.get(k)) != json.dumps(recorded.get(k)))
        if diff:
            raise SystemExit(f"db_scaling: {work} was planned with other values ({', '.join(diff)}): "
                             "the plan is fixed before any run; use a new --work")
    else:
        work.mkdir(parents=True, exist_ok=True)
        atomic_json(path, mine)
    return plan


def build_parser() -> argparse.ArgumentParser:
    d = Plan(corpus="")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="the experiment's folder (resumable)")
    p.add_argument("--corpus", required=True, help="a folder of documents (benchmarks/fetch_corpora.sh)")
    p.add_argument("--glob", default=d.glob)
    p.add_argument("--retrieval-corpus", default=None,
                   help="take the retrieval-only data from this folder instead of the corpus past the pool")
    p.add_argument("--retrieval-order", choices=("corpus", "random"), default="corpus",
                   help="corpus: each size takes the next retrieval-only files in the fixed order; random: the "
                        "largest size's files shuffled (seeded), so each size is a random subset of the next")
    p.add_argument("--pool-mb", type=float, default=d.pool_mb, help="training + validation documents")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--multiples", default=",".join(map(str, d.multiples)),
                   help="database tokens as multiples of the training tokens, rising (1: training data alone)")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)))
    p.add_argument("--config", default=d.config)
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--chunk-size", type=int, default=d.chunk_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    for stage in ("embed", "index", "knn", "eval"):
        p.add_argument(f"--{stage}-args", default="", help=f"extra arguments of every {stage} call, one string")
    p.add_argument("--no-retrofit", action="store_true")
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs (with their evaluations) at a time, each with cores/jobs threads "
                        "unless OMP_NUM_THREADS is set; not part of the plan (a tiny model's step gains "
                        "little from a second thread, a second run gains all of it)")
    p.add_argument("--train-at", default=None, metavar="MULTIPLES",
                   help="train and evaluate only at these sizes this time (the database still grows through "
                        "every size); not part of the plan: a session does what fits, a later one the rest")
    p.add_argument("--record", type=Path, default=None, metavar="DIR",
                   help="copy every result into DIR as it lands, and take runs already recorded there "
                        "as done (a fresh machine rebuilds the database, not the measured runs)")
    p.add_argument("--longer", type=int, default=0, metavar="STEPS",
                   help="after the sweep: baseline and RETRO at the largest database trained STEPS steps "
                        "(is the gain limited by training length?); not part of the plan")
    p.add_argument("--longer-seeds", type=int, default=1, help="how many of the seeds --longer trains")
    p.add_argument("--variant", action="append", default=[], dest="variants", metavar="KIND:NAME:KEY=VALUE",
                   help="after the sweep: a RETRO or RETRO-fit with this --set on top, at the largest database, "
                        "every seed (repeat to add settings or variants); not part of the plan")
    p.add_argument("--eval-min-match", default="", metavar="SHARES",
                   help="after the sweep: the plan's runs at the largest database (and the --variant runs "
                        "given with it) evaluated again with each model.neighbour_min_match in SHARES "
                        "(comma-separated, in [0, 1]), the same weights; not part of the plan")
    return p


def parse_shares(text: str) -> list[float]:
    """--eval-min-match's shares: comma-separated numbers in [0, 1]."""
    try:
        shares = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        shares = [-1.0]
    if any(not 0.0 <= x <= 1.0 for x in shares):
        raise SystemExit(f"db_scaling: --eval-min-match wants shares in [0, 1] separated by commas, not {text!r}")
    return shares


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    variants = parse_variants(a.variants)
    shares = parse_shares(a.eval_min_match)
    corpus = Path(a.corpus).resolve()
    plan = Plan(corpus=str(corpus), glob=a.glob, pool_mb=a.pool_mb, val_fraction=a.val_fraction,
                multiples=tuple(int(x) for x in a.multiples.split(",")),
                seeds=tuple(int(x) for x in a.seeds.split(",")), config=a.config, sets=tuple(a.sets),
                vocab_size=a.vocab_size, chunk_size=a.chunk_size, seq_len=a.seq_len,
                embed_args=tuple(a.embed_args.split()), index_args=tuple(a.index_args.split()),
                knn_args=tuple(a.knn_args.split()), eval_args=tuple(a.eval_args.split()),
                retrofit=not a.no_retrofit,
                retrieval_corpus=str(Path(a.retrieval_corpus).resolve()) if a.retrieval_corpus else None,
                retrieval_order=None if a.retrieval_order == "corpus" else a.retrieval_order)
    plan.validate()
    work = a.work.resolve()
    fixed_plan(work, plan)
    if plan.retrieval_corpus is not None and not Path(plan.retrieval_corpus).is_dir():
        raise SystemExit(f"db_scaling: --retrieval-corpus {plan.retrieval_corpus} is not a folder")
    files = ordered_files(corpus, plan.glob)
    if not files:
        raise SystemExit(f"db_scaling: no {plan.glob} files under {corpus}")
    runner = Runner(work, plan, jobs=a.jobs, record=a.record,
                    train_at=None if a.train_at is None else [int(x) for x in a.train_at.split(",")])
    runner.restore_record()
    runner.experiment(files, corpus)
    if a.longer:
        runner.longer(a.longer, plan.seeds[: max(1, a.longer_seeds)])
    if variants:
        runner.variants(variants)
    if shares:
        runner.eval_min_match(shares, variants)
    print(f"db_scaling: done; the report: python benchmarks/db_scaling_report.py {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
