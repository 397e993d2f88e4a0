"""Sampling from a RETRO model, retrieving at every chunk boundary.

Tokens are generated one at a time through the decoder's KV cache. When a chunk of
``chunk_size`` tokens completes, its neighbours are fetched (a ``Retriever`` over the database,
or any function passed in) and encoded once; CCA uses them from the chunk's last token on,
exactly as in training (``RETRO.forward_incremental`` equals ``RETRO.forward``).

``stale_tokens`` > 0 (CLI ``--stale-tokens N``) overlaps retrieval with decoding (PipeRAG): each
chunk's neighbours are fetched in the background from the chunk_size tokens ending N tokens
before its boundary; 0 (the default) is the exact behaviour above.

CLI: ``python -m retro.generate --run RUN --db DB --prompt "..."``.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from chunk_store.framework.argtypes import count_int, float_in, positive_int, utf8_text
from chunk_store.framework.errors import UserError, run_main
from retro.hf_generation import RetrieverNeighbours, query_ready, stale_query
from retro.model import RETRO

# chunk tokens (chunk_size,) -> neighbour tokens (k, 2 * chunk_size): each neighbour chunk
# followed by its continuation, pad_id where missing
NeighbourFn = Callable[[Sequence[int]], "np.ndarray | Tensor"]


@dataclass
class GenerationResult:
    tokens: list[int]                  # prompt + generated
    new_tokens: list[int]              # generated only
    stop_reason: str                   # "eos" or "length"
    neighbours: list[np.ndarray] = field(default_factory=list)  # per completed chunk, (k, 2m)


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. logits (b, vocab), float.

    top-p keeps the smallest set of most likely tokens whose probability reaches top_p (always at
    least the most likely token).
    """
    logits = logits.clone()
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs          # mass of strictly more likely tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """logits (b, vocab) -> next token ids (b,). temperature 0 = greedy (argmax)."""
    logits = logits.float()
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _neighbour_tensor(raw: Any, k: int | None, width: int, device: torch.device) -> Tensor:
    arr = torch.as_tensor(np.asarray(raw).astype(np.int64), device=device)
    if arr.ndim != 2 or arr.shape[1] != width or (k is not None and arr.shape[0] != k):
        want = f"({k if k is not None else 'k'}, {width})"
        raise ValueError(f"neighbour function must return shape {want}, got {tuple(arr.shape)}")
    return arr


@torch.no_grad()
def generate(
    model: RETRO,
    prompt: Sequence[int],
    *,
    max_new_tokens: int = 128,
    neighbour_fn: NeighbourFn | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    stale_tokens: int = 0,
) -> GenerationResult:
    """Sample up to ``max_new_tokens`` after ``prompt`` (one sequence).

    ``neighbour_fn`` None generates without retrieval (the same weights as a plain decoder).
    Stops after ``eos_id`` (included in the result). bf16 autocast on CUDA.
    ``stale_tokens`` > 0 overlaps retrieval with decoding (PipeRAG): chunk u's neighbours are
    fetched on a background thread from ``hf_generation.stale_query`` (the chunk_size tokens
    ending ``stale_tokens`` before its boundary) as soon as it is known; 0 is the exact query.
    """
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if stale_tokens < 0:
        raise ValueError(f"stale_tokens must be >= 0, got {stale_tokens}")
    cfg = model.cfg
    if min(prompt) < 0 or max(prompt) >= cfg.vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size})")
    was_training = model.training
    model.eval()
    device = model.token_emb.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    m = cfg.chunk_size
    tokens = list(prompt)
    cache = model.new_cache(1, len(prompt) + max_new_tokens, device=device)
    retrieved: list[Tensor] = []
    pending: dict[int, Future] = {}  # chunk -> its fetch (overlapped mode)
    pool = ThreadPoolExecutor(1, thread_name_prefix="retro-fetch") if stale_tokens and neighbour_fn else None

    def neighbours_for(length: int) -> Tensor | None:
        """Fetch neighbours of every chunk completed within ``length`` tokens; all so far.
        Overlapped: first issue the fetch of every chunk whose stale query is now known."""
        if neighbour_fn is None:
            return None
        if pool is not None:
            u = len(retrieved) + len(pending)
            while query_ready(u, m, stale_tokens) <= length:
                pending[u] = pool.submit(neighbour_fn, stale_query(tokens, u, m, stale_tokens))
                u += 1
        while len(retrieved) < length // m:
            u = len(retrieved)
            k = retrieved[0].shape[0] if retrieved else None
            raw = pending.pop(u).result() if pool is not None else neighbour_fn(tokens[u * m:(u + 1) * m])
            retrieved.append(_neighbour_tensor(raw, k, 2 * m, device))
        if not retrieved:  # no chunk complete yet: an empty (1, 0, k, 2m) tensor
            return torch.zeros(1, 0, cfg.num_neighbours, 2 * m, dtype=torch.long, device=device)
        return torch.stack(retrieved)[None]

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    stop_reason = "length"
    try:
        with autocast:
            feed = torch.tensor([prompt], dtype=torch.long, device=device)
            logits = model.forward_incremental(feed, cache, neighbours_for(len(tokens)))
            for _ in range(max_new_tokens):
                nxt = int(sample_next(logits[:, -1], temperature, top_k, top_p, generator)[0])
                tokens.append(nxt)
                if eos_id is not None and nxt == eos_id:
                    stop_reason = "eos"
                    break
                if len(tokens) == cache.max_len:
                    break  # the last token is sampled; no need to feed it
                feed = torch.tensor([[nxt]], dtype=torch.long, device=device)
                logits = model.forward_incremental(feed, cache, neighbours_for(len(tokens)))
    finally:
        model.train(was_training)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return GenerationResult(
        tokens=tokens,
        new_tokens=tokens[len(prompt):],
        stop_reason=stop_reason,
        neighbours=[t.cpu().numpy() for t in retrieved],
    )


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m retro.generate",
        description="Generate text with a trained RETRO run, retrieving at every chunk boundary.",
    )
    p.add_argument("--run", required=True, help="training run directory (config.yaml + checkpoints)")
    p.add_argument("--db", required=True, help="retrieval database directory")
    p.add_argument("--prompt", required=True, type=utf8_text, help="prompt text")
    p.add_argument("--max-new-tokens", type=count_int, default=128)
    p.add_argument("--temperature", type=float_in(0.0, 100.0), default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=count_int, default=50, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=0.95,
                   help="1.0 = no nucleus filter")
    p.add_argument("--k", type=positive_int, default=None,
                   help="neighbours per chunk (default: the model's; at most the database's)")
    p.add_argument("--seed", type=count_int, default=0)
    p.add_argument("--step", type=count_int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--base", default=None, metavar="PATH",
                   help="a RETRO-fit's frozen base (init_from's checkpoint, or the model.hf_decoder "
                        "folder) where it moved; checked against the hash the checkpoint records")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-retrieval", action="store_true", help="generate without neighbours (baseline)")
    p.add_argument("--stale-tokens", type=count_int, default=0, metavar="N",
                   help="overlap retrieval with decoding (PipeRAG): fetch each chunk's neighbours in the "
                        "background from the chunk_size tokens ending N tokens before its boundary; "
                        "0 (default) = the exact query at the boundary")
    p.add_argument("--json", action="store_true", help="print a JSON record (text, tokens, neighbours)")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    from chunk_store import ChunkStore
    from chunk_store.framework.runtime import resolve_device
    from chunk_store.tokenization.protocol import document_ids
    from retro.checkpoint import load_model
    from retro.dataset import check_compatible

    device = resolve_device(args.device)
    model, cfg = load_model(args.run, device=device, step=args.step, base=args.base)
    store = ChunkStore.open(args.db, split="train")
    check_compatible(store, cfg)
    tok = store.tokenizer
    prompt = document_ids(tok, args.prompt)  # BOS first where the DB's documents start with one
    if not prompt:
        raise UserError("the prompt encodes to no tokens")
    fetcher: RetrieverNeighbours | None = None
    if not args.no_retrieval:
        from index_builder import Retriever

        retriever = Retriever.open(args.db, device=str(device))
        k = args.k or cfg.num_neighbours
        if args.k and args.k > cfg.num_neighbours:
            raise UserError(f"--k {args.k}: the model was trained with {cfg.num_neighbours} neighbours "
                            f"per chunk; ask for at most that many")
        if k > retriever.num_chunks:
            raise UserError(f"--k {k}: the database has only {retriever.num_chunks} train chunks")
        fetcher = RetrieverNeighbours(retriever, k, cfg.neighbour_alignment, cfg.neighbour_min_match)
    result = generate(
        model, prompt, max_new_tokens=args.max_new_tokens, neighbour_fn=fetcher,
        temperature=args.temperature, top_k=args.top_k or None,
        top_p=args.top_p if args.top_p < 1.0 else None, eos_id=tok.eos_id, seed=args.seed,
        stale_tokens=args.stale_tokens,
    )
    completion = tok.decode(result.new_tokens)
    record = {
        "prompt": args.prompt,
        "completion": completion,
        "tokens": result.tokens,
        "stop_reason": result.stop_reason,
        "retrieval": fetcher is not None,
        "chunks": fetcher.log if fetcher is not None else [],
    }
    if args.json:
        print(json.dumps(record, ensure_ascii=False, indent=2))
    else:
        print(args.prompt + completion)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("retro.generate", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
