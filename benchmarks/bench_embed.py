"""Chunk embedding throughput: our Embedder vs a plain Hugging Face loop, side by side.

    .venv/bin/python benchmarks/bench_embed.py                  # CPU: real MiniLM on stdlib chunks
    python benchmarks/bench_embed.py --device cuda              # GPU: random BERT-base / MiniLM-L6 shapes

CPU: the offline all-MiniLM-L6-v2 on ~64-token chunks of the Python standard library (texts of
realistic, varying length). The peer is the plain loop users write: tokenizer(padding=True) on
batches in corpus order, fp32, torch.no_grad, masked mean; it runs at each batch size in
--peer-batch-sizes and its best is the baseline. Ours = Embedder.embed (bucketing by length,
inference_mode, SDPA, bf16 where the CPU has it), tokenisation included in both.

GPU: randomly initialised BertModels of the BERT-base and MiniLM-L6 shapes, 64-token chunks,
ours at batch 1024 vs the plain HF bf16 loop (model.to(bfloat16)) at its best batch size.
`--random-bert` runs that path on any device (the gpu-check smoke test: `--shapes tiny`);
`--tokenizer DIR` takes MiniLM's tokenizer files where the MiniLM package is absent.

Appends/replaces the `bench_embed_cpu` / `bench_embed_gpu` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from index_builder.embed.embedder import Embedder, EmbedderConfig, default_embedder, quiet_transformers  # noqa: E402
from report import machine, write_section  # noqa: E402  (benchmarks/report.py)

SECTION = "bench_embed"


@dataclass
class Row:
    setting: str
    impl: str
    batch: int
    n: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.n / self.seconds


def stdlib_chunks(n: int, chars: int = 230, seed: int = 0) -> list[str]:
    """~64 sentencepiece tokens of Python source each (about 230 characters), cut on line ends."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py"))
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for f in rng.permutation(len(files)):
        text = files[f].read_text(errors="replace")
        buf = ""
        for line in text.splitlines(keepends=True):
            buf += line
            if len(buf) >= chars:
                out.append(buf[: chars + 40])
                buf = ""
        if buf.strip():
            out.append(buf)  # a document's short last chunk, as in a real store
        if len(out) >= n:
            break
    return out[:n]


def plain_hf_loop(model: torch.nn.Module, tokenizer, texts: Sequence[str], batch: int,
                  device: str, dtype: torch.dtype) -> np.ndarray:
    """What a user writes: padded batches in order, no_grad, masked mean."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tokenizer(list(texts[i:i + batch]), padding=True, truncation=True,
                            return_tensors="pt").to(device)
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            outs.append(((h * m).sum(1) / m.sum(1)).float().cpu().numpy())
    return np.concatenate(outs)


def plain_hf_ids(model: torch.nn.Module, ids: torch.Tensor, batch: int, device: str) -> None:
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            x = ids[i:i + batch].to(device, non_blocking=True)
            h = model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
            h.mean(1).float().cpu()


def timed(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_cpu(args: argparse.Namespace) -> tuple[list[Row], str]:
    from transformers import AutoModel, AutoTokenizer

    path = default_embedder()
    texts = stdlib_chunks(args.n)
    tok = AutoTokenizer.from_pretrained(path)
    lens = [len(x) for x in tok(texts)["input_ids"]]
    with quiet_transformers():
        peer = AutoModel.from_pretrained(path).eval()
    impls: dict[tuple[str, int], Callable[[Sequence[str]], object]] = {}
    for b in args.peer_batch_sizes:
        impls[("plain HF fp32 loop", b)] = (
            lambda t, b=b: plain_hf_loop(peer, tok, t, b, "cpu", torch.float32))
    for dtype in ("fp32", "bf16"):
        ours = Embedder(EmbedderConfig(device="cpu", dtype=dtype, batch_size=args.batch_size))
        impls[(f"ours ({dtype})", args.batch_size)] = ours.embed
    for fn in impls.values():
        fn(texts[:64])  # warm-up
    # interleaved rounds, rotating the order: the machine's load drifts over minutes, so each
    # implementation sees the same slices under the same conditions
    seconds = dict.fromkeys(impls, 0.0)
    keys = list(impls)
    rounds = max(1, args.rounds)
    step = -(-len(texts) // rounds)
    for r in range(rounds):
        part = texts[r * step:(r + 1) * step]
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            seconds[key] += timed(lambda: impls[key](part), "cpu")
    rows = [Row("MiniLM-L6, stdlib chunks", name, b, len(texts), seconds[(name, b)])
            for name, b in keys]
    note = (f"{len(texts)} chunks of stdlib Python (~230 characters; BERT length mean "
            f"{np.mean(lens):.0f}, p10 {np.percentile(lens, 10):.0f}, p90 {np.percentile(lens, 90):.0f} "
            f"word pieces); {torch.get_num_threads()} torch threads; {args.rounds} interleaved rounds "
            "(each implementation embeds the same slices, order rotated). The plain loop's pooling "
            "includes [CLS]/[SEP] (it is the users' loop, not ours); speed is unaffected.")
    return rows, note


SHAPES = {
    "BERT-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "MiniLM-L6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
}


def bench_gpu(args: argparse.Namespace) -> tuple[list[Row], str]:
    from transformers import AutoTokenizer, BertConfig, BertModel

    device = args.device
    rows: list[Row] = []
    n = args.n
    tok = AutoTokenizer.from_pretrained(args.tokenizer or default_embedder())
    g = torch.Generator().manual_seed(0)
    body = torch.randint(1000, tok.vocab_size, (n, args.seq - 2), generator=g)
    ids = torch.cat([torch.full((n, 1), tok.cls_token_id), body, torch.full((n, 1), tok.sep_token_id)], 1)
    id_lists = ids.tolist()
    for name in args.shapes:
        shape = SHAPES[name]
        cfg = BertConfig(vocab_size=tok.vocab_size, max_position_embeddings=512, **shape)
        with tempfile.TemporaryDirectory() as tmp, quiet_transformers():
            torch.manual_seed(0)
            BertModel(cfg).save_pretrained(tmp)
            tok.save_pretrained(tmp)
            peer = BertModel.from_pretrained(tmp, attn_implementation="sdpa").to(device, torch.bfloat16).eval()
            best = None
            for b in args.peer_batch_sizes:
                plain_hf_ids(peer, ids[:b], b, device)  # warm-up at this shape
                s = timed(lambda: plain_hf_ids(peer, ids, b, device), device)
                rows.append(Row(f"{name}, {args.seq}-token chunks", "plain HF bf16 loop", b, n, s))
                best = s if best is None else min(best, s)
            del peer
            for compile_ in (False, True) if args.compile else (False,):
                ours = Embedder(EmbedderConfig(name_or_path=tmp, device=device, dtype="bf16",
                                               batch_size=args.batch_size, compile=compile_))
                ours.embed_ids(id_lists[: 2 * args.batch_size])  # warm-up (and compile)
                s = timed(lambda: ours.embed_ids(id_lists), device)
                rows.append(Row(f"{name}, {args.seq}-token chunks",
                                "ours (bf16" + (", compiled)" if compile_ else ")"), args.batch_size, n, s))
                del ours
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    where = torch.cuda.get_device_name() if device.startswith("cuda") else device
    note = f"{n} chunks of {args.seq} random word pieces per shape; {where}."
    return rows, note


def table(rows: list[Row]) -> str:
    lines = ["| setting | implementation | batch | chunks | seconds | chunks/s | vs best plain |",
             "|---|---|---|---|---|---|---|"]
    best: dict[str, float] = {}
    for r in rows:
        if r.impl.startswith("plain"):
            best[r.setting] = max(best.get(r.setting, 0.0), r.rate)
    for r in rows:
        ratio = r.rate / best[r.setting] if best.get(r.setting) else float("nan")
        lines.append(f"| {r.setting} | {r.impl} | {r.batch} | {r.n} | {r.seconds:.2f} | "
                     f"{r.rate:.1f} | {ratio:.2f}x |")
    return "\n".join(lines)






def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--n", type=int, default=None, help="chunks (default 768 on CPU, 32768 on CUDA)")
    ap.add_argument("--batch-size", type=int, default=None, help="ours (default 128 CPU, 1024 CUDA)")
    ap.add_argument("--peer-batch-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--rounds", type=int, default=6, help="CPU: interleaved rounds")
    ap.add_argument("--seq", type=int, default=64, help="GPU: word pieces per chunk incl. [CLS]/[SEP]")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    ap.add_argument("--random-bert", action="store_true", help="the GPU path (random BERTs) on any device")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["BERT-base", "MiniLM-L6"])
    ap.add_argument("--tokenizer", default=None, help="word-piece tokenizer folder (default: MiniLM's)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="random BERTs: eager only")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda" or args.random_bert
    args.n = args.n or (32768 if gpu else 768)
    args.batch_size = args.batch_size or (1024 if gpu else 128)
    args.peer_batch_sizes = args.peer_batch_sizes or ([256, 512, 1024, 2048] if gpu else [32, 128])
    rows, note = bench_gpu(args) if gpu else bench_cpu(args)
    tab = table(rows)
    print(tab)
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r), "rate": r.rate} for r in rows]))
    cmd = ("python benchmarks/bench_embed.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    text = (f"## Chunk embedding: `Embedder` vs a plain Hugging Face loop ({'GPU' if args.device == 'cuda' else 'CPU, random BERTs' if gpu else 'CPU'})\n\n"
            f"Command: `{cmd}`  \nMachine: {machine(args.device)}  \n"
            f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{note}\n\n{tab}\n")
    if not args.no_write:
        write_section(f"{SECTION}_{'gpu' if args.device == 'cuda' else 'cpu-random' if gpu else 'cpu'}", text)


if __name__ == "__main__":
    main()
