"""retro-serve's ``POST /v1/generate``: validation (a 4xx naming the field, as /v1/neighbours),
then the bounded queue of index_builder.generate_worker, whose one worker thread batches
compatible requests into one ``RetroForCausalLM.generate``; the answer is one JSON object or,
with ``stream: true``, server-sent events (``data: {...}`` per token, a final event with the
totals, then ``data: [DONE]``).
"""

# no `from __future__ import annotations`: FastAPI must see the request model class, which is
# local to add_generate_routes (its limits are per app).

import asyncio
import json
import time
from typing import Any, AsyncIterator

from index_builder.generate_worker import GenerateLimits, GenerationService, Job, QueueFull, SamplingParams

NO_MODEL = ("no model is loaded: start retro-serve with --run RUN (a training run folder or a "
            "folder written by python -m retro.export) to enable /v1/generate")


def sse(event: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    body = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
    return f"data: {body}\n\n".encode()


def add_generate_routes(app: Any, service: "GenerationService | None", limits: GenerateLimits,
                        max_k: int = 100) -> None:
    """``POST /v1/generate`` on ``app``: validation as /v1/neighbours (a 4xx naming the field),
    then the queue; without ``service`` a 503 saying no model is loaded."""
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, Field, field_validator, model_validator

    from index_builder.text_checks import checked_text

    def check_text(text: str, where: str) -> str:
        return checked_text(text, where, limits.max_prompt_chars)

    class GenerateRequest(BaseModel):
        prompt: str | None = Field(None, description="the text to continue (or give prompts)")
        prompts: list[str] | None = Field(None, min_length=1, max_length=limits.max_prompts,
                                          description="several texts, answered together")
        max_new_tokens: int = Field(64, ge=1, le=limits.max_new_tokens)
        do_sample: bool = Field(False, description="sample (else greedy)")
        temperature: float = Field(1.0, ge=0.0, le=100.0, description="> 0 when do_sample")
        top_k: int | None = Field(None, ge=0, le=100_000, description="0/None: no top-k filter")
        top_p: float | None = Field(None, gt=0.0, le=1.0, description="None/1: no nucleus filter")
        repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
        seed: int | None = Field(None, ge=0, le=2**63 - 1, description="seeds sampling")
        k: int | None = Field(None, ge=1, le=max_k, description="neighbours per chunk (default the model's)")
        retrieval: bool = Field(True, description="retrieve at every chunk boundary (else plain decoder)")
        return_neighbours: bool = Field(False, description="include what was retrieved per chunk")
        stream: bool = Field(False, description="server-sent events, one per token, then [DONE]")

        model_config = {"extra": "forbid"}

        @field_validator("prompt")
        @classmethod
        def _prompt_ok(cls, text: str | None) -> str | None:
            return None if text is None else check_text(text, "prompt")

        @field_validator("prompts")
        @classmethod
        def _prompts_ok(cls, texts: list[str] | None) -> list[str] | None:
            for i, t in enumerate(texts or []):
                check_text(t, f"prompts[{i}]")
            return texts

        @model_validator(mode="after")
        def _consistent(self) -> "GenerateRequest":
            if (self.prompt is None) == (self.prompts is None):
                raise ValueError("prompt: give exactly one of prompt or prompts")
            if self.do_sample and self.temperature <= 0.0:
                raise ValueError("temperature must be > 0 when do_sample is true (greedy: do_sample false)")
            return self

    @app.post("/v1/generate")
    async def generate(req: GenerateRequest) -> Any:
        # async: a waiting request holds no thread, so however many wait, a new one still reaches
        # the queue check (a full queue answers at once; a blocking def would wait for a thread)
        from fastapi.concurrency import run_in_threadpool

        if service is None:
            return JSONResponse(status_code=503, content={"error": NO_MODEL})
        texts = [req.prompt] if req.prompt is not None else list(req.prompts or [])
        encoded = await run_in_threadpool(lambda: [service.encode(t) for t in texts])  # bounded: max_prompt_chars
        prompts = []
        for i, ids in enumerate(encoded):
            where = "prompt" if req.prompt is not None else f"prompts[{i}]"
            if not ids:
                raise HTTPException(status_code=422, detail=f"{where} encodes to no tokens")
            if len(ids) > limits.max_prompt_tokens:
                raise HTTPException(status_code=422, detail=f"{where} has {len(ids)} tokens, "
                                                            f"the limit is {limits.max_prompt_tokens}")
            prompts.append(ids)
        nk = int(service.cfg.num_neighbours)
        if req.k is not None and req.k > nk:
            raise HTTPException(status_code=422, detail=f"k: the model uses {nk} neighbours per chunk; "
                                                        f"ask for at most that many")
        params = SamplingParams(
            do_sample=req.do_sample, temperature=req.temperature if req.do_sample else 1.0,
            top_k=(req.top_k or 0) if req.do_sample else 0,
            top_p=(req.top_p or 1.0) if req.do_sample else 1.0,
            repetition_penalty=req.repetition_penalty, seed=req.seed if req.do_sample else None,
            retrieval=req.retrieval, k=min(req.k or nk, nk) if req.retrieval else 0)
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Job(prompts, req.max_new_tokens, params, want_neighbours=req.return_neighbours and req.retrieval,
                  sink=(lambda e: loop.call_soon_threadsafe(events.put_nowait, e)) if req.stream else None)
        try:
            service.submit(job)
        except QueueFull as e:
            return JSONResponse(status_code=503, headers={"Retry-After": str(limits.retry_after_s)},
                                content={"error": f"busy: {e}; retry later"})
        if req.stream:
            return StreamingResponse(_events(job, events, limits.request_timeout_s), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job.future), limits.request_timeout_s)
        except asyncio.TimeoutError:
            job.cancelled.set()
            return JSONResponse(status_code=504, content={"error": "generation timed out"})
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        except Exception as e:
            return JSONResponse(status_code=500, content={"error": f"internal error: {type(e).__name__}"})


async def _events(job: Job, events: "asyncio.Queue[dict[str, Any]]", timeout_s: float) -> AsyncIterator[bytes]:
    """The job's events as SSE; a client that leaves cancels its rows (the batch goes on)."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                yield sse({"error": "generation timed out"})
                break
            yield sse(event)
            if event.get("done") or "error" in event:
                break
        yield sse("[DONE]")
    finally:
        if not job.future.done():
            job.cancelled.set()
