"""Chunking throughput and peak memory: `retro-build-index chunk` vs a naive baseline.

The baseline is written like RETRO-pytorch's ``text_folder_to_chunks_``: one process, files in
sorted order, read a file, encode it, write its rows into a memmap preallocated for the worst
case. Both use the same sentencepiece model (trained once per corpus, outside the timings), so
the comparison is the pipeline, not the tokenizer. Every run is a subprocess; its peak memory is
the peak of the summed RSS of its process tree and of its largest single process (both sampled
every 20 ms). Both implementations also run on a 4x copy of the corpus (hard links) to show
that our peak RSS stays flat as the corpus grows. Each run is repeated (``--repeat``) and the
fastest kept: the development machine is shared, so the slowest runs measure the neighbours.

    .venv/bin/python benchmarks/bench_chunk.py            # stdlib + linux-doc-6.1 (fetched if absent)

Chunking is CPU work: ``--device`` is accepted for a uniform benchmark command line and ignored.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chunk_store.chunk.input_formats import iter_sample_text  # noqa: E402
from chunk_store.chunk.text_files import walk_inputs  # noqa: E402
from chunk_store.tokenization.sentencepiece import TokenizerTrainConfig, train_tokenizer  # noqa: E402
from report import machine, write_section  # noqa: E402  (benchmarks/report.py)

SECTION = "bench_chunk"
LINUX_DOC_DEB = "linux-doc-6.1"


@dataclass
class Corpus:
    name: str
    inputs: list[str]
    globs: list[str]
    excludes: list[str]


@dataclass
class Result:
    corpus: str
    impl: str
    mb: float
    seconds: float
    cpu_seconds: float
    tok_seconds: float | None
    peak_tree_mb: float
    peak_proc_mb: float
    chunks: int

    @property
    def mbps(self) -> float:
        return self.mb / self.seconds


# ----------------------------------------------------------------------------- measuring


def _tree_stats(pid: int) -> list[tuple[int, int, int, int]]:
    """(pid, VmRSS bytes, utime+stime ticks, RssAnon bytes) of ``pid`` and its descendants (Linux
    /proc). RssAnon is the private memory; the rest of VmRSS is mapped files (memmaps, an mmapped
    index), pages the kernel can drop and re-read."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            rss = anon = 0
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024
                    elif line.startswith("RssAnon:"):
                        anon = int(line.split()[1]) * 1024
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out.append((p, rss, int(fields[11]) + int(fields[12]), anon))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError, ValueError):
            continue
    return out


def run_measured(cmd: list[str], env: dict[str, str] | None = None,
                 rank_anon_mb: dict[str, float] | None = None) -> tuple[float, float, float, float, str, float]:
    """Run ``cmd``; return (wall s, CPU s, peak tree RSS MB, peak single-process RSS MB, stderr,
    peak tree anonymous RSS MB).

    ``rank_anon_mb``: filled with the peak private memory (RssAnon, MB) of each torchrun rank's
    processes, keyed by the RANK in their environment ("launcher" for processes without one:
    torchrun's agent, or the whole command when it is not run under torchrun).

    Everything is sampled from /proc every 20 ms over the whole process tree (``ru_maxrss``
    would count the pre-exec copy of this process made by fork; forkserver workers are not our
    children). CPU seconds (user + system, summed over the tree) do not depend on how busy
    the shared machine is, unlike wall time.
    """
    errf = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf, env=env)
    peak = peak_one = peak_anon = 0
    cpu_ticks: dict[int, int] = {}
    labels: dict[int, str] = {}
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak, peak_one, peak_anon
        while not stop.is_set():
            stats = _tree_stats(proc.pid)
            peak = max(peak, sum(r for _, r, _, _ in stats))
            peak_one = max([peak_one] + [r for _, r, _, _ in stats])
            peak_anon = max(peak_anon, sum(a for _, _, _, a in stats))
            if rank_anon_mb is not None:
                now: dict[str, float] = {}
                for p, _, _, a in stats:
                    label = labels.get(p) or _rank_of(p)
                    if label != "launcher":  # (a process forked but not yet exec'd shows its parent's)
                        labels[p] = label
                    now[label] = now.get(label, 0.0) + a / 2**20
                for label, mb in now.items():
                    rank_anon_mb[label] = max(rank_anon_mb.get(label, 0.0), mb)
            for p, _, ticks, _ in stats:
                cpu_ticks[p] = max(cpu_ticks.get(p, 0), ticks)
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, _ = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    errf.seek(0)
    err = errf.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    # sampled for every process, the main one included (wait4's figure would add the children
    # it reaped a second time); a process's last <= 20 ms may be missed
    cpu = sum(cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")
    return seconds, cpu, peak / 2**20, peak_one / 2**20, err, peak_anon / 2**20


def _rank_of(pid: int) -> str:
    """The torchrun RANK in ``pid``'s environment, "launcher" where it has none (or is gone)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return "launcher"
    rank = next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)
    return rank if rank is not None else "launcher"


# ----------------------------------------------------------------------------- the naive baseline


def naive_main(argv: list[str]) -> None:
    """RETRO-pytorch's text_folder_to_chunks_, with our tokenizer instead of BERT's."""
    import sentencepiece as spm

    ap = argparse.ArgumentParser()
    ap.add_argument("--files", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=2048)
    a = ap.parse_args(argv)
    sp = spm.SentencePieceProcessor(model_file=a.tokenizer)
    paths = sorted(json.loads(Path(a.files).read_text()))
    total_bytes = sum(os.path.getsize(p) for p in paths)
    cs = a.chunk_size
    max_chunks = total_bytes // cs + len(paths) + 1  # worst case: one token per byte, plus EOS
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    chunks_mm = np.memmap(out / "chunks.dat", dtype=np.int32, mode="w+", shape=(max_chunks, cs + 1))
    seqs_mm = np.memmap(out / "seqs.dat", dtype=np.int32, mode="w+", shape=(max_chunks,))
    doc_mm = np.memmap(out / "doc_ids.dat", dtype=np.int32, mode="w+", shape=(max_chunks,))
    total_chunks = total_seqs = 0
    for doc_id, path in enumerate(paths):
        ids = np.array(sp.encode(Path(path).read_text(errors="replace")) + [sp.eos_id()], dtype=np.int32)
        padding = cs - ((len(ids) - 1) % cs)
        ids = np.pad(ids, (0, padding), constant_values=sp.pad_id())
        ids, last = ids[:-1], ids[-1:]
        ids = ids.reshape(-1, cs)
        extra = np.concatenate([ids[1:, 0], last])[:, None]
        chunks = np.concatenate([ids, extra], axis=1)
        seq = np.arange(0, len(chunks), a.seq_len // cs)
        chunks_mm[total_chunks:total_chunks + len(chunks)] = chunks
        seqs_mm[total_seqs:total_seqs + len(seq)] = seq + total_chunks
        doc_mm[total_chunks:total_chunks + len(chunks)] = doc_id
        total_chunks += len(chunks)
        total_seqs += len(seq)
    for mm in (chunks_mm, seqs_mm, doc_mm):
        mm.flush()
    (out / "count.json").write_text(json.dumps({"chunks": total_chunks, "seqs": total_seqs}))


# ----------------------------------------------------------------------------- corpora


def linux_doc_root(fetch: bool) -> Path | None:
    base = Path("/tmp/linuxdoc/usr/share/doc/linux-doc-6.1/html/_sources")
    if base.is_dir():
        return base
    if not fetch or not shutil.which("apt-get"):
        return None
    try:
        subprocess.run(["apt-get", "download", LINUX_DOC_DEB], cwd="/tmp", check=True,
                       capture_output=True, timeout=600)
        deb = sorted(Path("/tmp").glob(f"{LINUX_DOC_DEB}_*.deb"))[-1]
        subprocess.run(["dpkg", "-x", str(deb), "/tmp/linuxdoc"], check=True, timeout=600)
    except (subprocess.SubprocessError, IndexError, OSError) as e:
        print(f"linux-doc unavailable ({e}); skipping it", file=sys.stderr)
        return None
    return base if base.is_dir() else None


def corpora(fetch: bool) -> list[Corpus]:
    out = [Corpus("stdlib *.py", [sysconfig.get_paths()["stdlib"]], ["*.py"],
                  ["site-packages/*", "test/*", "idlelib/*"])]
    ld = linux_doc_root(fetch)
    if ld is not None:
        out.append(Corpus("linux-doc-6.1 en .rst.txt", [str(ld)], ["*.rst.txt"], ["translations/*"]))
    return out


def replicate(c: Corpus, times: int, dest: Path) -> Corpus:
    """``times`` hard-linked copies of the corpus's files (no extra disk, distinct paths)."""
    files = walk_inputs(c.inputs, c.globs, c.excludes).files
    root = Path(c.inputs[0]).resolve()
    for k in range(times):
        for f in files:
            target = dest / f"copy{k}" / os.path.relpath(f.path, root)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f.path, target)
            except OSError:
                shutil.copyfile(f.path, target)
    return Corpus(f"{c.name} x{times}", [str(dest)], c.globs, c.excludes)


# ----------------------------------------------------------------------------- main


def bench(c: Corpus, tok_path: Path, work: Path, impls: list[str], args) -> list[Result]:
    files = walk_inputs(c.inputs, c.globs, c.excludes).files
    mb = sum(f.size for f in files) / 1e6
    results = []
    for impl in impls:
        out = work / f"out-{impl}"
        shutil.rmtree(out, ignore_errors=True)
        if impl == "naive":
            listing = work / "files.json"
            listing.write_text(json.dumps([f.path for f in files]))
            cmd = [sys.executable, __file__, "--naive-worker", "--files", str(listing), "--tokenizer",
                   str(tok_path), "--out", str(out), "--chunk-size", str(args.chunk_size),
                   "--seq-len", str(args.seq_len)]
        else:
            workers = impl.split("-w")[1]
            cmd = [sys.executable, "-m", "index_builder", "chunk", "--out", str(out), "--tokenizer",
                   str(tok_path), "--chunk-size", str(args.chunk_size), "--seq-len", str(args.seq_len),
                   "--val-fraction", "0.02", "--workers", workers]
            for i in c.inputs:
                cmd += ["--input", i]
            for g in c.globs:
                cmd += ["--glob", g]
            for e in c.excludes:
                cmd += ["--exclude", e]
        seconds, cpu, tok_s, tree, proc = float("inf"), float("inf"), None, 0.0, 0.0
        for _ in range(args.repeat):
            shutil.rmtree(out, ignore_errors=True)
            sec, cpu_s, tr, pr, _, _ = run_measured(cmd)
            tree, proc = max(tree, tr), max(proc, pr)  # memory: the worst run
            if impl == "naive":
                chunks = json.loads((out / "count.json").read_text())["chunks"]
                run_tok = None
            else:
                stats = json.loads((out / "manifest.json").read_text())["stages"]["chunk"]["stats"]
                chunks, run_tok = stats["chunks"], stats["seconds_tokenising_this_run"]
            if sec < seconds:  # time: the fastest run (the machine is shared)
                seconds, tok_s = sec, run_tok
            cpu = min(cpu, cpu_s)
        results.append(Result(c.name, impl, mb, seconds, cpu, tok_s, tree, proc, chunks))
        print(f"  {c.name:32s} {impl:10s} {mb:7.1f} MB {seconds:7.2f} s {mb / seconds:6.2f} MB/s "
              f"CPU {cpu:6.2f} s peak tree {tree:7.1f} MB", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
    return results


def table(results: list[Result]) -> str:
    head = ("| corpus | implementation | MB | wall s | MB/s (wall) | MB/s (tokenising phase) "
            "| CPU s | MB per CPU s | peak RSS, process tree (MB) | peak RSS, largest process (MB) | chunks |")
    lines = [head, "|" + "---|" * 11]
    for r in results:
        tok = f"{r.mb / r.tok_seconds:.2f}" if r.tok_seconds else "-"
        lines.append(f"| {r.corpus} | {r.impl} | {r.mb:.1f} | {r.seconds:.2f} | {r.mbps:.2f} | {tok} "
                     f"| {r.cpu_seconds:.2f} | {r.mb / r.cpu_seconds:.2f} "
                     f"| {r.peak_tree_mb:.0f} | {r.peak_proc_mb:.0f} | {r.chunks} |")
    return "\n".join(lines)






def main() -> None:
    if "--naive-worker" in sys.argv:
        sys.argv.remove("--naive-worker")
        naive_main(sys.argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="ignored: chunking runs on CPU")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--scale", type=int, default=4, help="copies of the largest corpus for the RSS check")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; the fastest is kept")
    ap.add_argument("--sample-mb", type=float, default=4.0, help="tokenizer training sample (MB)")
    ap.add_argument("--no-fetch", action="store_true", help="do not apt-get download linux-doc-6.1")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/BENCHMARKS.md")
    args = ap.parse_args()

    print(machine(), file=sys.stderr)
    started = dt.datetime.now(dt.timezone.utc)
    mach = machine()
    results: list[Result] = []
    tok_notes = []
    with tempfile.TemporaryDirectory(prefix="bench_chunk-") as tmp:
        work = Path(tmp)
        cs = corpora(not args.no_fetch)
        for i, c in enumerate(cs):
            files = walk_inputs(c.inputs, c.globs, c.excludes).files
            t0 = time.perf_counter()
            proto = train_tokenizer(iter_sample_text(files, int(args.sample_mb * (1 << 20))),
                                    TokenizerTrainConfig(args.vocab_size))
            tok_notes.append(f"{c.name}: {time.perf_counter() - t0:.1f} s")
            tok_path = work / f"tok{i}.model"
            tok_path.write_bytes(proto)
            results += bench(c, tok_path, work, ["naive", "ours-w1", "ours-w2"], args)
            if i == len(cs) - 1 and args.scale > 1:
                big = replicate(c, args.scale, work / "scaled")
                results += bench(big, tok_path, work, ["naive", "ours-w2"], args)
    tab = table(results)
    print(tab)
    cmd = "python benchmarks/bench_chunk.py" + "".join(f" {a}" for a in sys.argv[1:])
    text = (f"## Chunking: `retro-build-index chunk` vs a naive RETRO-pytorch-style loop\n\n"
            f"Command: `{cmd}`  \nMachine: {mach}  \nDate: {started:%Y-%m-%d %H:%M} UTC\n\n"
            f"Same sentencepiece unigram model (vocab {args.vocab_size}) for both, trained once per "
            f"corpus on a {args.sample_mb:g} MB sample and excluded from the timings ({'; '.join(tok_notes)}). "
            f"Best of {args.repeat} runs. `ours-wN` = `--workers N`; wall time includes process start, walk, hashing, the "
            f"val split and the merge; the tokenising phase is the parallel part alone. "
            f"CPU s = user + system time of the whole process tree (independent of the machine's "
            f"load; MB per CPU s is the efficiency). "
            f"Peak RSS of the process tree is sampled every 20 ms (workers included). The `xN` rows "
            f"run on N hard-linked copies of the corpus: ours stays flat, the naive loop's grows "
            f"with its memmap.\n\n{tab}\n")
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
