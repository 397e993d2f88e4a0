"""Generation latency with retrieval, exact vs overlapped (PipeRAG's stale query window), and the
quality cost of the stale query (issue 23).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_generation_overlap.py          # CPU, a few minutes
    python benchmarks/bench_generation_overlap.py --device cuda                         # the same on a GPU
    python benchmarks/bench_generation_overlap.py --timing-config configs/small.yaml    # latency at the paper's shape

What it builds (cached under --work, reused by a rerun): a real database (the standard library's
json, wsgiref and http packages cut into 30-line documents, each with a near-duplicate twin, see
write_twin_corpus; chunk_size 32, seq_len 128, embedded by the real default MiniLM, the index and
knn stages with their defaults) and a tiny RETRO trained on it by train.py (configs/tiny.yaml
shape at chunk_size 32, --steps steps).

What it measures:
* latency: ``RetroForCausalLM.generate`` (greedy) with a real ``Retriever`` over that database,
  per generated token, against the same model without retrieval, at batch 1 and 8: exact
  (``stale_tokens=0``, the fetch in line at each boundary) and overlapped (``stale_tokens=S``,
  the fetch on a background thread, S tokens early). ``wait`` is the decoding thread's time in
  fetches (exact) or waiting for them (overlapped), per generated token.
  With ``--timing-config`` the latency table is measured instead at that config's shape (random
  weights: timing does not depend on them) over the same Retriever and prompts; the config's
  vocab_size, pad_id and chunk_size are replaced by the DB's (as train.py's check demands), and
  the table says which changed. Why: at the tiny shape RETRO's own CCA + encoder already cost
  ~1.5x a plain step, so issue 23's 1.1x goal can only be judged at a realistic shape. On CUDA its
  weights are bf16 (as ``retro-serve --dtype bfloat16``), on CPU float32.
* quality: val bits per byte, teacher-forced, each chunk's neighbours retrieved by the real
  Retriever with the stale query (``hf_generation.stale_query``) for each window size; 0 = exact.
RETRO-pytorch has no retrieval-aware incremental generation path to put beside this (its
``generate`` recomputes the whole sequence and retrieves through its own faiss/autofaiss
pipeline); where it is not installed the table says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Plan:
    """What one benchmark run does (the CLI's options)."""

    work: Path
    device: str
    steps: int
    new_tokens: int
    prompt_tokens: int
    batches: tuple[int, ...]
    stale: tuple[int, ...]
    windows: tuple[int, ...]
    val_seqs: int
    repeats: int
    timing_config: str | None = None        # time latency at this config's shape (random weights)
    timing_sets: tuple[str, ...] = ()       # --set style overrides of that config (model.dim=256, ..)
    timing_new_tokens: int | None = None    # None: 64 on CPU, the tiny run's --new-tokens elsewhere
    timing_repeats: int | None = None       # None: 3 on CPU, --repeats elsewhere


def write_twin_corpus(folder: Path, packages: Sequence[str] = ("json", "wsgiref", "http"), lines: int = 30) -> Path:
    """The standard library's ``packages`` cut into documents of ``lines`` lines, each written twice
    (the twin with a one-line header, so it is not an exact duplicate and its chunk boundaries
    differ). Why: a val document's twin is usually in train, so retrieval is worth something even
    to a model trained for minutes, and what a stale query loses shows in bits per byte."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    folder.mkdir(parents=True, exist_ok=True)
    for pkg in packages:
        for src in sorted((stdlib / pkg).glob("*.py")):
            text = src.read_text(encoding="utf-8").splitlines(keepends=True)
            for j in range(0, len(text), lines):
                piece = "".join(text[j:j + lines])
                if len(piece.strip()) < 200:
                    continue
                stem = f"{pkg}_{src.stem}_{j:05d}"
                (folder / f"{stem}.py").write_text(piece, encoding="utf-8")
                (folder / f"{stem}_twin.py").write_text(f"# twin of {stem}\n{piece}", encoding="utf-8")
    return folder


def build_db(work: Path) -> Path:
    """The twin corpus chunked, embedded with the real MiniLM, indexed and knn'd (as the tests do)."""
    from chunk_store.layout import DBLayout
    from index_builder.embed.embedder import default_embedder
    from tests.fixtures import build_index_db, build_tiny_db

    db = work / "db"
    if DBLayout(db).neighbour_index("train").exists():
        return db
    corpus = write_twin_corpus(work / "corpus")
    build_tiny_db(db, corpus=corpus, vocab_size=1024, chunk_size=32, seq_len=128, val_fraction=0.1)
    build_index_db(db, default_embedder(), shard_size=4096)
    return db


def train(work: Path, db: Path, steps: int, device: str) -> Path:
    """A tiny RETRO trained by train.py (retrieval on every step, so it uses its neighbours)."""
    run = work / f"run{steps}"
    if (run / "checkpoints" / "latest").exists():
        return run
    sets = [f"max_steps={steps}", "seq_len=128", "batch_size=8", "micro_batch_size=8", "warmup_steps=20",
            f"eval_every={steps}", f"checkpoint_every={steps}", "eval_batches=4", "model.chunk_size=32", f"device={device}"]
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.yaml", "--db", str(db), "--out", str(run)]
    for s in sets:
        cmd += ["--set", s]
    print(f"training {run} ...", file=sys.stderr)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return run


def hf_model(model: torch.nn.Module) -> Any:
    """The trained RETRO as a RetroForCausalLM (the same weights), eval, on the model's device."""
    from retro.hf_model import RetroForCausalLM, RetroHFConfig

    cfg = model.cfg
    hf = RetroForCausalLM(RetroHFConfig(retro=cfg.to_dict(), vocab_size=cfg.vocab_size, pad_token_id=cfg.pad_id))
    hf.retro.load_state_dict(model.state_dict())
    return hf.to(next(model.parameters()).device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Instant:
    """A NeighbourFn that costs nothing: the same real neighbours (train chunks 0 and 1) for every
    query. Its row isolates RETRO's own retrieval compute (CCA, encoding) from the fetch."""

    def __init__(self, store: Any, k: int) -> None:
        self.out = store.neighbour_tokens(np.arange(k)).astype(np.int64)

    def __call__(self, chunk: Sequence[int]) -> np.ndarray:
        return self.out


Mode = Any  # None (no retrieval), "instant" (Instant neighbours, exact mode) or stale_tokens (int)


@contextmanager
def timed_encoder(model: torch.nn.Module, device: torch.device) -> Iterator[list[float]]:
    """Seconds spent in the neighbour encoder (``model._encode``, once per completed chunk),
    appended to the yielded list. Why: it splits RETRO's own overhead into the encoder and the
    CCA blocks. On CUDA each call is synchronised (two syncs per chunk, not per token)."""
    spent: list[float] = []
    encode = model._encode

    def timed(*args: Any) -> Any:
        sync(device)
        start = time.perf_counter()
        out = encode(*args)
        sync(device)
        spent.append(time.perf_counter() - start)
        return out

    model._encode = timed  # an instance attribute over the method: what the decoder calls
    try:
        yield spent
    finally:
        del model._encode


def generate_once(hf: Any, retriever: Any, prompts: torch.Tensor, new_tokens: int, mode: Mode
                  ) -> tuple[float, float, float]:
    """(seconds per generated token, decoding thread's fetch/wait seconds per token, encoder
    seconds per token) of one greedy ``generate``. Batch rows decode together: per step, not per
    row."""
    kw: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              return_dict_in_generate=True)
    if mode == "instant":
        kw.update(retriever=Instant(retriever.store, hf.retro.cfg.num_neighbours))
    elif mode is not None:
        kw.update(retriever=retriever, stale_tokens=mode)
    with timed_encoder(hf.retro, prompts.device) as enc:
        sync(prompts.device)
        start = time.perf_counter()
        out = hf.generate(prompts, **kw)
        sync(prompts.device)
    return ((time.perf_counter() - start) / new_tokens, getattr(out.past_key_values, "retro_wait_s", 0.0) / new_tokens,
            sum(enc) / new_tokens)


def latency(hf: Any, retriever: Any, prompts: torch.Tensor, new_tokens: int, modes: Sequence[Mode],
            repeats: int) -> dict[Mode, tuple[float, float, float]]:
    """Median (per-token seconds, per-token wait, per-token encoder seconds) per mode. The modes
    run round-robin, after one warm-up each, so a busy machine's load drifts into every mode alike."""
    runs: dict[Mode, list[tuple[float, float, float]]] = {mode: [] for mode in modes}
    for rep in range(repeats + 1):
        for mode in modes:
            res = generate_once(hf, retriever, prompts, new_tokens, mode)
            if rep:
                runs[mode].append(res)
    return {mode: tuple(statistics.median(r[i] for r in rs) for i in range(3))  # type: ignore[misc]
            for mode, rs in runs.items()}


def latency_rows(hf: Any, retriever: Any, seqs: np.ndarray, batches: Sequence[int], prompt_tokens: int,
                 new_tokens: int, stale: Sequence[int], repeats: int) -> list[str]:
    """The latency table (markdown lines): per batch size, every mode (no retrieval, instant
    neighbours, exact, overlapped at each ``stale`` window) against no retrieval. A batch larger
    than ``seqs`` is skipped."""
    device = next(hf.parameters()).device
    lines = ["| batch | mode | ms / token | x no retrieval | fetch wait ms / token | encoder ms / token |",
             "|---|---|---|---|---|---|"]
    for b in batches:
        prompts = torch.as_tensor(seqs[:b, :prompt_tokens], device=device)
        if prompts.shape[0] < b:
            continue
        res = latency(hf, retriever, prompts, new_tokens, (None, "instant", 0, *stale), repeats)
        base = res[None][0]
        lines.append(f"| {b} | no retrieval | {base * 1e3:.2f} | 1.00 | - | - |")
        for mode in ("instant", 0, *stale):
            t, w, e = res[mode]
            name = ("instant neighbours (CCA + encoding only)" if mode == "instant" else
                    "exact (stale_tokens=0)" if mode == 0 else f"overlapped (stale_tokens={mode})")
            lines.append(f"| {b} | {name} | {t * 1e3:.2f} | {t / base:.2f} | {w * 1e3:.2f} | {e * 1e3:.2f} |")
    return lines


def timing_model(config: str | Path, sets: Sequence[str], store: Any, device: torch.device
                 ) -> tuple[Any, Any, list[str]]:
    """(RetroForCausalLM with random weights at ``config``'s model shape after ``sets``, its
    RetroConfig, what was changed to fit the DB). vocab_size, pad_id and chunk_size become the DB's,
    as ``retro.dataset.check_compatible`` demands of any model over it. Weights are bf16 where the
    project computes in bf16 (CUDA), else float32: only the shape matters for timing."""
    from retro.config import RetroConfig
    from retro.dataset import check_compatible
    from retro.evaluate import compute_dtype
    from retro.hf_model import RetroForCausalLM, RetroHFConfig
    from retro.train_config import load_config

    _, mdict = load_config(config, sets)
    db = {"vocab_size": int(store.tokenizer.vocab_size), "pad_id": int(store.tokenizer.pad_id),
          "chunk_size": int(store.chunk_size)}
    changed = [f"{key} {mdict.get(key)} -> {val} (the DB's)" for key, val in db.items() if mdict.get(key) != val]
    cfg = RetroConfig.from_dict({**mdict, **db})
    check_compatible(store, cfg)
    torch.manual_seed(0)
    hf = RetroForCausalLM(RetroHFConfig(retro=cfg.to_dict(), vocab_size=cfg.vocab_size, pad_token_id=cfg.pad_id))
    dtype = getattr(torch, compute_dtype(device))
    return hf.to(device=device, dtype=dtype).eval(), cfg, changed


def describe(cfg: Any) -> str:
    """A RetroConfig's shape in one phrase."""
    return (f"dim {cfg.dim} x {cfg.depth} layers ({cfg.heads} heads of {cfg.dim_head}), CCA at "
            f"{cfg.resolved_cca_layers}, encoder {cfg.enc_depth} x {cfg.enc_dim}, vocab {cfg.vocab_size}, "
            f"chunk_size {cfg.chunk_size}, k {cfg.num_neighbours}")


def timing_sizes(plan: Plan) -> tuple[int, int]:
    """(new tokens, repeats) at the timing config: fewer on CPU, where a ~100M-parameter model at
    batch 8 takes ~0.1 s a token, so that the run stays within minutes; at least two chunk
    boundaries either way."""
    cpu = torch.device(plan.device).type == "cpu"
    new = plan.timing_new_tokens or (64 if cpu else plan.new_tokens)
    return new, plan.timing_repeats or (3 if cpu else plan.repeats)


def stale_bpb(model: torch.nn.Module, retriever: Any, seqs: np.ndarray, window: int | None,
              batch: int = 16) -> tuple[float, np.ndarray | None]:
    """Val bits per byte, teacher-forced, and the neighbour tokens used (n, chunks, k, 2m); each
    chunk's neighbours retrieved by ``retriever`` with ``stale_query(.., window)`` (one batched
    search per batch of sequences); None = no retrieval."""
    from retro.hf_generation import retriever_fetch, stale_query
    from retro.metrics import bits_per_byte, lm_loss, target_bytes

    cfg, store = model.cfg, retriever.store
    m, k = cfg.chunk_size, cfg.num_neighbours
    device = next(model.parameters()).device
    loss_sum, nbytes, used = 0.0, 0, []
    for lo in range(0, len(seqs), batch):
        part = seqs[lo:lo + batch]
        b, n = part.shape
        nb = None
        if window is not None:
            queries = [stale_query(row.tolist(), u, m, window) for row in part for u in range(n // m)]
            arrs, _ = retriever_fetch(retriever, k, queries)
            used.append(np.stack(arrs).reshape(b, n // m, k, 2 * m))
            nb = torch.as_tensor(used[-1], device=device)
        tokens = torch.as_tensor(part, dtype=torch.long, device=device)
        with torch.no_grad():
            logits = model(tokens, nb)
        loss_sum += float(lm_loss(logits[:, :-1], tokens[:, 1:], cfg.pad_id, reduction="sum"))
        nbytes += target_bytes(store.tokenizer, part[:, 1:], cfg.pad_id)
    return bits_per_byte(loss_sum, nbytes), (np.concatenate(used) if used else None)


def peer_status() -> str:
    if importlib.util.find_spec("retro_pytorch") is None:
        return "RETRO-pytorch is not installed here: no side-by-side generation numbers."
    return ("RETRO-pytorch is installed, but its generate recomputes the whole sequence per token and "
            "retrieves through its own faiss/autofaiss pipeline: no like-for-like path; not measured.")


def run(plan: Plan) -> str:
    from chunk_store import ChunkStore
    from index_builder import Retriever
    from retro.checkpoint import load_model

    device = torch.device(plan.device)
    plan.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    import faiss

    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    db = build_db(plan.work)
    run_dir = train(plan.work, db, plan.steps, plan.device)
    built = time.perf_counter() - t0
    torch.set_num_threads(threads)  # the in-process DB stages set their own; measure at the caller's
    faiss.omp_set_num_threads(faiss_threads)
    model, cfg = load_model(str(run_dir), device=device)
    model.eval()
    retriever = Retriever.open(db, device=str(device))
    val = ChunkStore.open(db, "val")
    cps = val.chunks_per_seq
    seqs = np.asarray(val.chunks[: (val.num_seqs * cps)]).astype(np.int64).reshape(val.num_seqs, -1)
    seqs = seqs[(seqs != cfg.pad_id).all(axis=1)][: plan.val_seqs]
    hf = hf_model(model)
    torch.set_grad_enabled(False)

    if plan.timing_config:
        t_hf, t_cfg, changed = timing_model(plan.timing_config, plan.timing_sets, retriever.store, device)
        new_tokens, repeats = timing_sizes(plan)
        print(f"timing {plan.timing_config} ({describe(t_cfg)}; random weights): {new_tokens} new tokens, "
              f"median of {repeats}, batches {plan.batches} ...", file=sys.stderr)
        lines = latency_rows(t_hf, retriever, seqs, plan.batches, plan.prompt_tokens, new_tokens, plan.stale, repeats)
        t_head = (f"Latency at {plan.timing_config}{' ' + ' '.join(plan.timing_sets) if plan.timing_sets else ''}: "
                  f"{describe(t_cfg)}, {sum(p.numel() for p in t_hf.parameters()) / 1e6:.1f}M parameters, "
                  f"RANDOM weights (timing only), {next(t_hf.parameters()).dtype}; "
                  f"{'; '.join(changed) or 'vocab_size, pad_id and chunk_size already the DB`s'}; "
                  f"{new_tokens} new tokens, median of {repeats}.")
        del t_hf
    else:
        lines = latency_rows(hf, retriever, seqs, plan.batches, plan.prompt_tokens, plan.new_tokens, plan.stale,
                             plan.repeats)
        t_head = ""

    qual = ["| stale window (tokens) | val bits/byte | vs exact | top-1 neighbour = exact's | "
            "all k neighbours = exact's |", "|---|---|---|---|---|"]
    exact, ex_nb = stale_bpb(model, retriever, seqs, 0)
    for w in plan.windows:
        bpb, nb = (exact, ex_nb) if w == 0 else stale_bpb(model, retriever, seqs, w)
        top1 = float((nb[:, :, 0] == ex_nb[:, :, 0]).all(-1).mean())
        allk = float((nb == ex_nb).all(-1).all(-1).mean())
        qual.append(f"| {w}{' (exact)' if w == 0 else ''} | {bpb:.4f} | {bpb - exact:+.4f} | {top1:.0%} | "
                    f"{allk:.0%} |")
    none, _ = stale_bpb(model, retriever, seqs, None)
    qual.append(f"| no retrieval | {none:.4f} | {none - exact:+.4f} | - | - |")

    latency_of = "the timing model below" if plan.timing_config else "this model"
    head = (f"Model: tiny RETRO (dim {cfg.dim}, depth {cfg.depth}, chunk_size {cfg.chunk_size}, k "
            f"{cfg.num_neighbours}) trained {plan.steps} steps; DB: {retriever.num_chunks} train chunks "
            f"(stdlib json+wsgiref+http, 30-line documents with twins, MiniLM, faiss); device {device}; "
            f"latency of {latency_of}: prompt {plan.prompt_tokens} tokens, greedy"
            f"{'' if plan.timing_config else f', {plan.new_tokens} new, median of {plan.repeats}'}; "
            f"quality (tiny model) over {len(seqs)} val sequences of {seqs.shape[1]} tokens. "
            f"(DB + training: {built:.0f} s, cached; whole run {time.perf_counter() - t0:.0f} s.)")
    return "\n".join([head, *([""] + [t_head] if t_head else []), "", *lines, "", *qual, "", peer_status(),
                      f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"])


def parse(argv: Sequence[str] | None = None) -> Plan:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bench_generation_overlap_twins"),
                   help="DB + run cache folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=300, help="training steps of the tiny model")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--stale", default="8,16", help="overlapped stale windows to time")
    p.add_argument("--windows", default="0,8,16,32", help="stale windows to score (0 = exact)")
    p.add_argument("--val-seqs", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timing-config", default=None,
                   help="time latency at this config's model shape (e.g. configs/small.yaml; random weights)")
    p.add_argument("--timing-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a --timing-config key, as train.py --set (repeatable)")
    p.add_argument("--timing-new-tokens", type=int, default=None, help="default: 64 on CPU, else --new-tokens")
    p.add_argument("--timing-repeats", type=int, default=None, help="default: 3 on CPU, else --repeats")
    a = p.parse_args(argv)
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    return Plan(Path(a.work), a.device, a.steps, a.new_tokens, a.prompt_tokens, ints(a.batches), ints(a.stale),
                ints(a.windows), a.val_seqs, a.repeats, a.timing_config, tuple(a.timing_set),
                a.timing_new_tokens, a.timing_repeats)


if __name__ == "__main__":
    print(run(parse()))
