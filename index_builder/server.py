"""retro-serve: the Retriever over HTTP (FastAPI + uvicorn).

    retro-serve --db DB [--run RUN] [--host 127.0.0.1] [--port 8000] [--device cpu]

``POST /v1/neighbours {"texts": ["..."], "k": 2, "exclude_doc_ids": [..]}`` ->
``{"neighbours": [[{chunk_id, doc_id, distance, text, continuation}, ...], ...]}``;
``POST /v1/generate {"prompt": "...", "max_new_tokens": 64, "stream": false}`` -> the
continuation of a trained run (``--run``; see index_builder.serve_generate), JSON or server-sent
events; ``GET /healthz``; the OpenAPI schema at ``/openapi.json`` and docs at ``/docs``.
Bound to loopback unless ``--host`` says otherwise: the server has no authentication.
Invalid requests get a 4xx with a message; an internal error is a 500 and the server keeps
serving.
"""

# no `from __future__ import annotations`: FastAPI must see the request model classes, which
# are local to create_app (their limits are per app), not strings it cannot resolve.

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from typing import Annotated, Any, Sequence

from chunk_store.framework.argtypes import positive_int
from chunk_store.framework.errors import UserError
from index_builder.text_checks import checked_text
from index_builder.generate_worker import GenerateLimits

log = logging.getLogger("retro.serve")


@dataclass(frozen=True)
class ServerLimits:
    """Request bounds: a request can cost at most max_texts embeddings of max_chars each."""

    max_texts: int = 256
    max_chars: int = 20_000
    max_k: int = 100
    max_body_bytes: int | None = None  # None: what the largest valid request can need (body_limit)

    def body_limit(self, max_prompt_chars: int = 0, max_prompts: int = 0) -> int:
        """Bytes a request body may have: the largest valid request of either endpoint, each
        character escaped in JSON (at most 12 bytes: a surrogate pair), plus 64 KiB of the rest."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return 12 * max(self.max_texts * self.max_chars, max_prompts * max_prompt_chars) + 65536


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets a 413 before any handler reads it
    (a declared Content-Length is refused at once; a chunked body once it passes the limit)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        if declared is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            body, more = b"", True
            while more:  # read it here, within the limit, and replay it to the app
                message = await receive()
                if message["type"] != "http.request":
                    break
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_bytes:
                    return await self._refuse(send)
            done = False

            async def replay() -> Any:
                nonlocal done
                if not done:
                    done = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)

    async def _refuse(self, send: Any) -> None:
        import json

        body = json.dumps({"error": f"request body: larger than {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(retriever: Any, limits: ServerLimits = ServerLimits(), generation: Any = None,
               generate_limits: Any = None) -> Any:
    """The ASGI app around an open Retriever (anything with search_text/num_chunks/db), with
    ``POST /v1/generate`` served by ``generation`` (a started serve_generate.GenerationService;
    None: the endpoint says no model is loaded)."""
    from index_builder.serve_generate import add_generate_routes

    if generate_limits is None:
        generate_limits = generation.limits if generation is not None else GenerateLimits()
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, Field, field_validator

    from index_builder.retriever import Neighbour

    class NeighboursRequest(BaseModel):
        texts: list[str] = Field(..., min_length=1, max_length=limits.max_texts,
                                 description="query texts (non-empty strings)")
        k: int = Field(2, ge=1, le=limits.max_k, description="neighbours per text")
        exclude_doc_ids: list[Annotated[int, Field(ge=0, le=2**63 - 1)]] | None = Field(
            None, max_length=10_000, description="train document ids never to return")

        model_config = {"extra": "forbid"}

        @field_validator("texts")
        @classmethod
        def _texts_ok(cls, texts: list[str]) -> list[str]:
            for i, t in enumerate(texts):
                checked_text(t, f"texts[{i}]", limits.max_chars)
            return texts

    class NeighboursResponse(BaseModel):
        neighbours: list[list[Neighbour]]  # the Retriever's own type: one definition of a neighbour
        k: int
        took_ms: float

    app = FastAPI(title="retro neighbour lookup", version="1",
                  description="Nearest train chunks (RETRO retrieval database) of query texts.")

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            msgs.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse(status_code=422, content={"error": "; ".join(msgs), "detail": msgs})

    @app.middleware("http")
    async def _internal(request: Request, call_next: Any) -> Any:
        # caught here, inside Starlette's error middleware: the traceback is logged once (an
        # exception handler for Exception would log it and let the server log it again)
        try:
            return await call_next(request)
        except Exception as exc:
            log.exception("internal error on %s", request.url.path)
            return JSONResponse(status_code=500, content={"error": f"internal error: {type(exc).__name__}"})

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "db": str(retriever.db), "chunks": int(retriever.num_chunks),
                "generate": generation is not None}

    @app.post("/v1/neighbours", response_model=NeighboursResponse)
    def neighbours(req: NeighboursRequest) -> dict[str, Any]:
        # a plain def: FastAPI runs it in its threadpool, so the event loop keeps serving
        t0 = time.perf_counter()
        try:
            results = retriever.search_text(req.texts, k=req.k, exclude_doc_ids=req.exclude_doc_ids)
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        return {"neighbours": [[n.to_dict() for n in row] for row in results], "k": req.k,
                "took_ms": round((time.perf_counter() - t0) * 1000, 3)}

    add_generate_routes(app, generation, generate_limits, max_k=limits.max_k)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)},
                            headers=getattr(exc, "headers", None))

    app.add_middleware(BodyLimit, max_bytes=limits.body_limit(generate_limits.max_prompt_chars,
                                                              generate_limits.max_prompts))
    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retro-serve", description="Serve a retro database's Retriever over HTTP.")
    p.add_argument("--db", required=True, help="database directory (after `retro-build-index index`)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                   help="where BERT (and the --run model) runs")
    p.add_argument("--embedder", default=None, help="the DB's embedder, if its recorded folder moved")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/faiss CPU threads (1 is steadier on a busy machine; default all cores)")
    p.add_argument("--max-texts", type=int, default=ServerLimits.max_texts)
    p.add_argument("--max-chars", type=int, default=ServerLimits.max_chars)
    g = p.add_argument_group("generation (POST /v1/generate)")
    g.add_argument("--run", default=None, metavar="DIR",
                   help="a training run (latest checkpoint) or an exported folder to generate with; "
                        "trained on --db's tokenizer (without it /v1/generate answers 503)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="the model's dtype (default: as saved)")
    g.add_argument("--max-batch", type=positive_int, default=GenerateLimits.max_batch,
                   help="rows in one batched generate call (1: no batching)")
    g.add_argument("--max-queue", type=positive_int, default=GenerateLimits.max_queue,
                   help="requests that may wait; one more gets 503 + Retry-After")
    g.add_argument("--max-new-tokens", type=positive_int, default=GenerateLimits.max_new_tokens)
    g.add_argument("--max-prompt-tokens", type=positive_int, default=GenerateLimits.max_prompt_tokens)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from index_builder.retriever import Retriever

    args = build_parser().parse_args(argv)
    try:
        retriever = Retriever.open(args.db, device=args.device, embedder=args.embedder,
                                   threads=args.threads)
    except UserError as e:
        print(f"retro-serve: error: {e}", file=sys.stderr)
        return 2
    generation = None
    if args.run is not None:
        import torch

        from chunk_store.framework.runtime import resolve_device
        from index_builder.generate_worker import GenerationService

        glimits = GenerateLimits(max_batch=args.max_batch, max_queue=args.max_queue,
                                 max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens)
        try:
            generation = GenerationService.load(args.run, retriever, glimits, device=resolve_device(args.device),
                                                dtype=getattr(torch, args.dtype) if args.dtype else None)
        except UserError as e:
            print(f"retro-serve: error: {e}", file=sys.stderr)
            return 2
        generation.start()
    app = create_app(retriever, ServerLimits(max_texts=args.max_texts, max_chars=args.max_chars), generation)
    print(f"retro-serve: {retriever.num_chunks} chunks from {args.db} on http://{args.host}:{args.port}"
          + (f", generating with {args.run}" if args.run else ""), file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        if generation is not None:
            generation.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
