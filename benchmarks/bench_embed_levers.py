"""What makes chunk embedding faster on a CPU without native bf16, and what it costs in quality.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_embed_levers.py --db demo-db

On real chunks of a DB (the demo's: 64 sentencepiece tokens, ~46 BERT word pieces), the same
sample of train chunks is embedded by each setting, in interleaved rounds (order rotated, so a
burst of load from another process hits every setting alike); BERT tokenisation is done once
beforehand (the embed stage runs it in a worker process, overlapped with the model):

- fp32 at several batch sizes, batch widths rounded to a multiple of 8 (the default) or not;
- dynamic int8 quantisation of every Linear layer (torch.ao.quantization.quantize_dynamic, the
  CPU-only lever for a CPU without AVX512-BF16/AMX).

Quality of int8 against fp32: the cosine of each chunk's two embeddings, and recall@k of int8's
nearest neighbours (squared L2, the index's metric) against fp32's exact neighbours among the
sample (self excluded). Writes the `bench_embed_levers` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chunk_store import ChunkStore  # noqa: E402
from index_builder.embed.embedder import Embedder, EmbedderConfig  # noqa: E402
from report import machine, write_section  # noqa: E402  (benchmarks/report.py)

SECTION = "bench_embed_levers"


def cpu_name() -> str:
    """The CPU model and whether it has native bf16 (the fast path this benchmark does without)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU model unknown"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    return f"{name}, {'with' if native else 'no'} native bf16, {'AVX512' if 'avx512f' in flags else 'AVX2, no AVX512'}"


def exact_neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """(n, k) nearest rows of x by squared L2, each row itself excluded."""
    sq = (x * x).sum(1)
    d = sq[:, None] + sq[None, :] - 2.0 * x @ x.T
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def recall_at(ref: np.ndarray, got: np.ndarray, k: int) -> float:
    """Share of the reference's k nearest that the other embedding's k nearest contain."""
    return float(np.mean([len(set(r[:k]) & set(g[:k])) / k for r, g in zip(ref, got)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default="demo-db")
    ap.add_argument("--n", type=int, default=1024, help="train chunks sampled")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64],
                    help="batch sizes tried besides the old default (must include 32)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # torch.ao's migration notice

    store = ChunkStore.open(args.db, "train")
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(store.num_chunks, min(args.n, store.num_chunks), replace=False))
    texts = [store.tokenizer.decode(np.asarray(store.chunks[i]).astype(np.int64).tolist()) for i in idx]
    fp32 = Embedder(EmbedderConfig(device="cpu", dtype="fp32"))
    ids, _ = fp32.tokenize(texts)
    lengths = np.array([len(x) for x in ids])
    int8 = copy.copy(fp32)
    int8.model = int8._forward = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(fp32.model), {torch.nn.Linear}, dtype=torch.qint8)

    # (label, embedder, batch, pad multiple, same-length batches); the reference (first) is the
    # embed stage's CPU default before this benchmark: batch 128, mixed lengths, widths to x8
    settings = [("fp32, batch 128, mixed lengths, widths x8 (old default)", fp32, 128, 8, False)]
    settings += [(f"fp32, batch {b}, mixed lengths, widths x8", fp32, b, 8, False) for b in args.batch_sizes]
    settings += [("fp32, batch 32, mixed lengths, exact widths", fp32, 32, 1, False)]
    settings += [(f"fp32, batch {b}, one length a batch" + (" (new default)" if b == 32 else ""), fp32, b, 1, True)
                 for b in args.batch_sizes]
    settings += [("int8 dynamic, batch 32, one length a batch", int8, 32, 1, True)]
    seconds = {s[0]: 0.0 for s in settings}
    out: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        for j in range(len(settings)):
            label, emb, batch, multiple, same = settings[(j + r) % len(settings)]
            emb.pad_multiple, emb.same_length_batches = multiple, same
            t = time.perf_counter()
            out[label] = emb.embed_ids(ids, batch)
            seconds[label] += time.perf_counter() - t
            print(f"round {r}: {label}: {len(ids) / (time.perf_counter() - t):.1f} chunks/s", flush=True)
    ref_label, int8_label = settings[0][0], settings[-1][0]
    new_label = next(label for label, *_ in settings if label.endswith("(new default)"))
    base_rate = len(ids) * args.rounds / seconds[ref_label]
    a, b = out[ref_label], out[int8_label]
    same = float(np.abs(out[new_label] - a).max())
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    ref_nn, int8_nn = exact_neighbours(a, 10), exact_neighbours(b, 10)
    rows = ["| setting | chunks/s | vs the old default |", "|---|---:|---:|"]
    for label, *_ in settings:
        rate = len(ids) * args.rounds / seconds[label]
        rows.append(f"| {label} | {rate:.1f} | {rate / base_rate:.2f}x |")
    quality = (f"The new default's embeddings differ from the old default's by at most {same:.1e} "
               f"(float32; same model, other batch shapes).\n\n"
               f"int8 vs fp32 on the same {len(ids)} chunks: cosine min {cos.min():.4f}, mean "
               f"{cos.mean():.4f}; recall of fp32's exact neighbours among the sample: "
               + ", ".join(f"@{k} {recall_at(ref_nn, int8_nn, k):.3f}" for k in (1, 2, 10)))
    cmd = "OMP_NUM_THREADS=%s python benchmarks/bench_embed_levers.py %s" % (
        torch.get_num_threads(), " ".join(sys.argv[1:]))
    text = (f"## Chunk embedding on a CPU without native bf16: batch size, padding, int8\n\n"
            f"Command: `{cmd}`  \nMachine: {machine('cpu')}; {cpu_name()}  \n"
            f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
            f"{len(ids)} train chunks of `{args.db}` (BERT length mean {lengths.mean():.1f}, max "
            f"{lengths.max()} word pieces), {args.rounds} interleaved rounds, tokenisation excluded.\n\n"
            + "\n".join(rows) + "\n\n" + quality + "\n")
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
