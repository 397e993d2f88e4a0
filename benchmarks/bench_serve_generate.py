"""retro-serve's POST /v1/generate under concurrent load on loopback: request latency (p50/p99) and
generated tokens/s for 1, 4, 8 concurrent clients, with batching (``--max-batch 8``) and without
(``--max-batch 1``).

    .venv/bin/python benchmarks/bench_serve_generate.py                  # CPU, a few minutes
    python benchmarks/bench_serve_generate.py --device cuda              # the same on a GPU
    python benchmarks/bench_serve_generate.py --db DB --run RUN          # a real database and run

The server is the real CLI (``python -m index_builder.server --db DB --run RUN``) in a
subprocess, one per batching setting; the clients are threads of this process, each sending its
requests one after another (greedy, ``--new`` tokens, retrieval on, prompts are val-split texts of
the DB, so every row retrieves at its chunk boundaries). Without ``--db``/``--run`` it builds a
small stand-in: the standard library's json + email packages chunked by the real chunk stage,
embedded by a tiny random BERT (the tests' fixture: a real index and search, cheap embeddings) and
a random native RETRO of ``--dim``/``--depth``, so the numbers show the serving path and what
batching buys, not a trained model's quality. Prints a markdown table (``--out FILE`` also writes
it there).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


@dataclass(frozen=True)
class LoadConfig:
    """One measured point: a batching setting and a number of concurrent clients."""

    max_batch: int
    clients: int
    requests_per_client: int
    new_tokens: int


@dataclass
class Point:
    cfg: LoadConfig
    latencies_s: list[float]
    tokens: int
    wall_s: float
    batch_rows: list[int]
    errors: int

    def row(self) -> str:
        lat = sorted(self.latencies_s)
        p50 = statistics.median(lat) * 1000
        p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))] * 1000
        mean_rows = statistics.mean(self.batch_rows) if self.batch_rows else float("nan")
        return (f"| {'on (' + str(self.cfg.max_batch) + ')' if self.cfg.max_batch > 1 else 'off (1)'} "
                f"| {self.cfg.clients} | {len(lat)} | {p50:.0f} | {p99:.0f} | {self.tokens / self.wall_s:.1f} "
                f"| {mean_rows:.2f} | {self.errors} |")


def build_stand_in(work: Path, dim: int, depth: int) -> tuple[Path, Path]:
    """A small DB (real chunk/embed/index/knn stages, tiny random BERT) and a random RETRO run."""
    import sysconfig

    import torch
    import yaml

    from chunk_store import ChunkStore
    from retro.checkpoint import save_checkpoint
    from retro.config import RetroConfig
    from retro.model import RETRO
    from tests.fixtures import make_tiny_bert, run_cli  # the suite's tiny BERT: cheap real embeddings

    db, run = work / "db", work / "run"
    if not (db / "train" / "neighbours" / "index.json").exists():  # knn done (DBLayout.neighbour_index)
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        assert run_cli(["chunk", "--out", db, "--glob", "*.py", "--input", stdlib / "json",
                        "--input", stdlib / "email", "--vocab-size", 512, "--chunk-size", 16,
                        "--seq-len", 64, "--val-fraction", 0.2, "--workers", 1]) == 0
        bert = make_tiny_bert(work / "tiny-bert")
        assert run_cli(["embed", "--db", db, "--embedder", bert, "--tokenize-workers", 0, "--device", "cpu"]) == 0
        assert run_cli(["index", "--db", db]) == 0
        assert run_cli(["knn", "--db", db, "--k", 2, "--device", "cpu"]) == 0
    store = ChunkStore.open(db, "train")
    tok = store.tokenizer
    cfg = RetroConfig(vocab_size=tok.vocab_size, pad_id=tok.pad_id, dim=dim, depth=depth, heads=max(1, dim // 64),
                      dim_head=64, cca_layers=list(range(2, depth + 1, 2)), enc_dim=dim // 2, enc_depth=2,
                      enc_heads=max(1, dim // 128), enc_dim_head=64, chunk_size=store.chunk_size, num_neighbours=2)
    torch.manual_seed(0)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"seq_len": store.seq_len, "model": cfg.to_dict()}))
    save_checkpoint(run, 1, RETRO(cfg), None, {"step": 1})
    return db, run


def prompts_of(db: Path, n: int, chars: int) -> list[str]:
    """Val-split document starts (never searched against themselves: the index holds train)."""
    from chunk_store import ChunkStore

    store = ChunkStore.open(db, "val")
    out = []
    for i in range(0, store.num_chunks, max(1, store.num_chunks // n)):
        text = store.text(i).strip()[:chars]
        if text:
            out.append(text)
    return (out * n)[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(db: Path, run: Path, max_batch: int, device: str, threads: int | None,
                 dtype: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "index_builder.server", "--db", str(db), "--run", str(run), "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", "256", "--device", device, "--log-level", "warning"]
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["--dtype", dtype] if dtype else []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"retro-serve exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/healthz", timeout=2).json().get("generate"):
                return proc, url
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("retro-serve did not start within 300 s")


def measure(url: str, cfg: LoadConfig, prompts: list[str]) -> Point:
    import httpx

    lat: list[float] = []
    rows: list[int] = []
    tokens, errors = 0, 0
    lock = threading.Lock()

    def client(c: int) -> None:
        nonlocal tokens, errors
        with httpx.Client(base_url=url, timeout=600) as http:
            for r in range(cfg.requests_per_client):
                prompt = prompts[(c * cfg.requests_per_client + r) % len(prompts)]
                t0 = time.perf_counter()
                resp = http.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": cfg.new_tokens})
                took = time.perf_counter() - t0
                with lock:
                    if resp.status_code != 200:
                        errors += 1
                        continue
                    body = resp.json()
                    lat.append(took)
                    tokens += body["num_tokens"]
                    rows.append(body["timings"]["batch_rows"])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(cfg.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Point(cfg, lat, tokens, time.perf_counter() - t0, rows, errors)


def main(argv: list[str] | None = None) -> int:
    from report import machine  # benchmarks/report.py

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", type=Path, default=None, help="a built DB (default: the stand-in, built once)")
    p.add_argument("--run", type=Path, default=None, help="a run or export trained on --db")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "retro-bench-serve-generate")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto (the model and the retriever's BERT)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads (default all cores)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-batch", type=int, default=8, help="the batching setting (compared with 1)")
    p.add_argument("--requests", type=int, default=3, help="requests per client")
    p.add_argument("--new", type=int, default=32, help="max_new_tokens per request")
    p.add_argument("--prompt-chars", type=int, default=200, help="prompt length in characters (at most)")
    p.add_argument("--dim", type=int, default=256, help="stand-in model width")
    p.add_argument("--depth", type=int, default=4, help="stand-in model depth")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = p.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    if args.db is None or args.run is None:
        db, run = build_stand_in(args.work, args.dim, args.depth)
        what = f"stand-in: stdlib json+email DB (tiny random BERT), random RETRO dim {args.dim} depth {args.depth}"
    else:
        db, run, what = args.db, args.run, f"{args.run} on {args.db}"
    prompts = prompts_of(db, 64, args.prompt_chars)
    points: list[Point] = []
    for max_batch in (args.max_batch, 1):
        proc, url = start_server(db, run, max_batch, args.device, args.threads, args.dtype)
        try:
            measure(url, LoadConfig(max_batch, 1, 1, 4), prompts)  # warm-up
            for clients in args.clients:
                point = measure(url, LoadConfig(max_batch, clients, args.requests, args.new), prompts)
                points.append(point)
                print(point.row(), file=sys.stderr, flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    points.sort(key=lambda q: (q.cfg.clients, -q.cfg.max_batch))
    cmd = "python benchmarks/bench_serve_generate.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    lines = [
        "## retro-serve: POST /v1/generate under concurrent load", "",
        f"`{cmd}` ({dt.date.today().isoformat()}; {machine(args.device)})", "",
        f"Model: {what}; greedy, {args.new} new tokens after prompts of <= {args.prompt_chars} characters, "
        f"retrieval on; each client sends {args.requests} "
        "requests one after another; latency is the whole HTTP request (queue + generate), tokens/s "
        "all generated tokens over the wall time of the load; batch rows: the mean rows of the "
        "generate call that answered a request.", "",
        "| batching (max_batch) | clients | requests | p50 ms | p99 ms | tokens/s | batch rows | errors |",
        "|---|---|---|---|---|---|---|---|",
        *(q.row() for q in points),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0 if all(q.errors == 0 for q in points) else 1


if __name__ == "__main__":
    sys.exit(main())
