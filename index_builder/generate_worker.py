"""The generation worker behind retro-serve's ``POST /v1/generate`` (index_builder.serve_generate):
a trained RETRO run behind a bounded queue and one batching worker thread.

Why one worker: the model (and its device memory) is owned by a single thread, so concurrent
requests never race on it; instead of running them one after another, the worker takes up to
``max_batch`` queued rows whose sampling parameters agree, left-pads them and runs one
``RetroForCausalLM.generate`` (each row of a left-padded batch generates exactly as it would
alone: retro.hf_generation). Why a bounded queue: a request that cannot be served soon gets a
503 with ``Retry-After`` at once instead of waiting without bound.

A row's tokens reach its request through ``RowStreamer`` (a transformers ``BaseStreamer`` that
splits the batch's tokens per row), which feeds both the JSON answer and the server-sent events
of ``stream: true``; ``RowStop`` ends a row at its own ``max_new_tokens`` or when its client left.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from chunk_store.framework.errors import UserError

log = logging.getLogger("retro.serve")

@dataclass(frozen=True)
class GenerateLimits:
    """Bounds of /v1/generate: what one request may cost, and how much may wait."""

    max_prompts: int = 8            # prompts in one request
    max_prompt_chars: int = 20_000
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    max_batch: int = 8              # rows in one generate call (1 = no batching)
    max_queue: int = 64             # requests waiting for the worker; one more gets a 503
    request_timeout_s: float = 600.0
    retry_after_s: int = 1


@dataclass(frozen=True)
class SamplingParams:
    """What must agree for requests to share one generate call (the batch key)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0            # 0: no top-k filter
    top_p: float = 1.0        # 1.0: no nucleus filter
    repetition_penalty: float = 1.0
    seed: int | None = None   # only with sampling (greedy ignores it, so greedy requests batch)
    retrieval: bool = True
    k: int = 0                # neighbours per chunk (0: the model's)


class QueueFull(Exception):
    """The queue holds max_queue requests: answer 503 + Retry-After."""


@dataclass
class Job:
    """One request: its prompts (token ids), how far to generate, and where the answer goes."""

    prompts: list[list[int]]
    max_new_tokens: int
    params: SamplingParams
    want_neighbours: bool = False
    sink: Callable[[dict[str, Any]], None] | None = None  # stream=True: gets each event (worker thread)
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)


class _Row:
    """One prompt's generated tokens, text so far, and when it is done (eos or its length)."""

    def __init__(self, job: Job, index: int, decode: Callable[[list[int]], str], eos_id: int | None) -> None:
        self.job, self.index, self.decode, self.eos_id = job, index, decode, eos_id
        self.tokens: list[int] = []
        self.text = ""        # text already sent (the decoded prefix of tokens)
        self.done = False
        self.stop_reason = "length"

    def _visible(self) -> list[int]:
        return self.tokens[:-1] if self.stop_reason == "eos" else self.tokens

    def add(self, token: int) -> None:
        if self.done:
            return
        self.tokens.append(token)
        if self.eos_id is not None and token == self.eos_id:
            self.done, self.stop_reason = True, "eos"
        elif len(self.tokens) >= self.job.max_new_tokens:
            self.done = True
        elif self.job.cancelled.is_set():
            self.done, self.stop_reason = True, "cancelled"
        full = self.decode(self._visible())
        # hold text back while the decoded prefix is unstable (a partial UTF-8 sequence); the last
        # token flushes the rest, so a stream's pieces always concatenate to the final text
        delta = ""
        if full.startswith(self.text) and (self.done or not full.endswith("\ufffd")):
            delta, self.text = full[len(self.text):], full
        if self.job.sink is not None:
            self.job.sink({"index": self.index, "token": token, "text": delta})

    def result(self, neighbours: list[dict[str, Any]] | None) -> dict[str, Any]:
        out = {"index": self.index, "text": self.decode(self._visible()), "tokens": list(self.tokens),
               "num_tokens": len(self.tokens), "stop_reason": self.stop_reason}
        if neighbours is not None:
            out["neighbours"] = neighbours
        return out


def _row_stop_criteria(rows: list[_Row], width: int) -> Any:
    from transformers import StoppingCriteria

    class RowStop(StoppingCriteria):
        """Per row: done at its own max_new_tokens, or when its client has gone."""

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            new = input_ids.shape[1] - width
            return torch.tensor([new >= r.job.max_new_tokens or r.job.cancelled.is_set() for r in rows],
                                dtype=torch.bool, device=input_ids.device)

    return RowStop()


def _row_streamer(rows: list[_Row]) -> Any:
    from transformers.generation.streamers import BaseStreamer

    class RowStreamer(BaseStreamer):
        """Splits each step's (batch,) tokens into the rows' own sinks; the first put (the padded
        prompts) is not generated text."""

        def __init__(self) -> None:
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for row, token in zip(rows, value.reshape(-1).tolist()):
                row.add(int(token))

        def end(self) -> None:
            pass

    return RowStreamer()


class _TopK:
    """The Retriever with at most ``k`` hits per query: the model's other neighbour slots are
    then padding (as a chunk with fewer neighbours in the database is)."""

    def __init__(self, retriever: Any, k: int) -> None:
        self.retriever, self.k, self.store = retriever, k, retriever.store

    def search_text(self, texts: Sequence[str], k: int, **kwargs: Any) -> Any:
        return [row[: self.k] for row in self.retriever.search_text(texts, k=min(k, self.k), **kwargs)]


def load_generation_model(run: str | Path, device: str | torch.device = "cpu",
                          dtype: torch.dtype | None = None) -> Any:
    """A RetroForCausalLM (eval) from an exported folder (config.json) or a training run / checkpoint
    folder (its latest weights), on ``device`` in ``dtype`` (None: as saved)."""
    from retro.hf_model import RetroForCausalLM, RetroHFConfig

    run = Path(run)
    if (run / "config.json").is_file():
        model = RetroForCausalLM.from_pretrained(run, dtype=dtype) if dtype is not None \
            else RetroForCausalLM.from_pretrained(run)
    else:
        from retro.checkpoint import load_model

        inner, cfg = load_model(run, device="cpu")
        decoder = inner.decoder.config.to_dict() if cfg.hf_decoder else None  # type: ignore[union-attr]
        config = RetroHFConfig(retro=cfg.to_dict(), decoder=decoder, vocab_size=cfg.vocab_size,
                               pad_token_id=cfg.pad_id, architectures=["RetroForCausalLM"])
        with torch.device("meta"):  # the wrapper's own modules are replaced: build them without memory
            model = RetroForCausalLM(config)
        model.retro = inner
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()


class GenerationService:
    """The loaded model + the DB's tokenizer and Retriever, a bounded queue and the one worker
    thread that runs batched generate calls. ``batch_sizes`` records each call's rows (tests and
    benchmarks read it)."""

    def __init__(self, model: Any, retriever: Any, limits: GenerateLimits = GenerateLimits()) -> None:
        from retro.dataset import check_compatible

        self.model, self.retriever, self.limits = model, retriever, limits
        self.cfg = model.retro_config
        self.store = retriever.store
        check_compatible(self.store, self.cfg)
        self.tokenizer = self.store.tokenizer
        self.eos_id = int(self.tokenizer.eos_id) if self.tokenizer.eos_id is not None and \
            int(self.tokenizer.eos_id) >= 0 else None
        self.device = next(model.parameters()).device
        self.batch_sizes: list[int] = []
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._paused = False
        self._stop = False
        self._thread: threading.Thread | None = None

    @classmethod
    def load(cls, run: str | Path, retriever: Any, limits: GenerateLimits = GenerateLimits(),
             device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "GenerationService":
        try:
            model = load_generation_model(run, device, dtype)
        except (OSError, ValueError) as e:
            raise UserError(f"--run {run}: cannot load a model: {e}") from None
        return cls(model, retriever, limits)

    # ------------------------------------------------------------------ text

    def encode(self, text: str) -> list[int]:
        from chunk_store.tokenization.protocol import document_ids

        return document_ids(self.tokenizer, text)  # BOS first where the DB's documents have one

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # ------------------------------------------------------------------ queue

    def start(self) -> "GenerationService":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="retro-generate", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def pause(self) -> None:
        """Hold the worker (queued requests wait): tests fill the queue deterministically."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, job: Job) -> Job:
        with self._cond:
            if len(self._queue) >= self.limits.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (the limit is {self.limits.max_queue})")
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def _take(self) -> list[Job] | None:
        """The oldest job and the queued jobs that can share its generate call (same params,
        at most max_batch rows in all; the oldest always goes, whatever its size)."""
        with self._cond:
            while not self._stop and (self._paused or not self._queue):
                self._cond.wait()
            if self._stop:
                return None
            first = self._queue.popleft()
            batch, rows = [first], len(first.prompts)
            for job in list(self._queue):
                if job.params == first.params and rows + len(job.prompts) <= self.limits.max_batch:
                    self._queue.remove(job)
                    batch.append(job)
                    rows += len(job.prompts)
            return batch

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            jobs = [j for j in jobs if not j.cancelled.is_set()]
            if not jobs:
                continue
            try:
                self._run(jobs)
            except Exception as e:  # the worker keeps serving; each request gets the error
                log.exception("generate failed")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
                    if job.sink is not None:
                        job.sink({"error": f"{type(e).__name__}: {e}"})

    # ------------------------------------------------------------------ one batch

    @torch.no_grad()
    def _run(self, jobs: list[Job]) -> None:
        from transformers import StoppingCriteriaList

        p = jobs[0].params
        started = time.perf_counter()
        rows = [_Row(job, i, self.decode, self.eos_id) for job in jobs for i in range(len(job.prompts))]
        prompts = [prompt for job in jobs for prompt in job.prompts]
        width = max(len(x) for x in prompts)
        pad = int(self.cfg.pad_id)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, x in enumerate(prompts):
            ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, width - len(x):] = 1
        kwargs: dict[str, Any] = {"do_sample": p.do_sample, "repetition_penalty": p.repetition_penalty}
        if p.do_sample:
            kwargs.update(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed)
        k = p.k or int(self.cfg.num_neighbours)
        retriever = None
        if p.retrieval:
            retriever = self.retriever if k >= self.cfg.num_neighbours else _TopK(self.retriever, k)
        self.batch_sizes.append(len(prompts))
        out = self.model.generate(
            ids.to(self.device), attention_mask=mask.to(self.device), retriever=retriever,
            max_new_tokens=max(job.max_new_tokens for job in jobs), eos_token_id=self.eos_id, pad_token_id=pad,
            streamer=_row_streamer(rows), stopping_criteria=StoppingCriteriaList([_row_stop_criteria(rows, width)]),
            return_dict_in_generate=True, **kwargs)
        took = time.perf_counter() - started
        logs = None
        if retriever is not None:  # per row, per completed chunk: the query and its hits
            logs = [[entry for entry in row if entry is not None]
                    for row in getattr(out.past_key_values, "retro_logs", None) or []]
        at = 0
        for job in jobs:
            results = []
            for i in range(len(job.prompts)):
                row = rows[at + i]
                nb = (logs[at + i] if logs and at + i < len(logs) else []) if job.want_neighbours else None
                results.append({**row.result(nb), "prompt_tokens": len(job.prompts[i])})
            at += len(job.prompts)
            generated = sum(r["num_tokens"] for r in results)
            answer = {"results": results, "timings": {
                "queue_ms": round((started - job.enqueued) * 1000, 3), "generate_ms": round(took * 1000, 3),
                "total_ms": round((time.perf_counter() - job.enqueued) * 1000, 3),
                "tokens_per_s": round(generated / took, 3) if took > 0 else None, "batch_rows": len(prompts)}}
            if len(results) == 1:
                answer.update({key: results[0][key] for key in ("text", "tokens", "num_tokens", "stop_reason")})
                if "neighbours" in results[0]:
                    answer["neighbours"] = results[0]["neighbours"]
            if not job.future.done():  # a request that timed out cancelled its future
                job.future.set_result(answer)
            if job.sink is not None:
                job.sink({"done": True, **answer})
