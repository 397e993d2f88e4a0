"""retro-serve: the Retriever over HTTP (FastAPI + uvicorn).

    retro-serve --db DB [--host 127.0.0.1] [--port 8000] [--device cpu]

``POST /v1/neighbours {"texts": ["..."], "k": 2, "exclude_doc_ids": [..]}`` ->
``{"neighbours": [[{chunk_id, doc_id, distance, text, continuation}, ...], ...]}``;
``GET /healthz``; the OpenAPI schema at ``/openapi.json`` and docs at ``/docs``.
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

from chunk_store.framework.errors import UserError
from chunk_store.chunk.text_files import visible

log = logging.getLogger("retro.serve")


@dataclass(frozen=True)
class ServerLimits:
    """Request bounds: a request can cost at most max_texts embeddings of max_chars each."""

    max_texts: int = 256
    max_chars: int = 20_000
    max_k: int = 100


def create_app(retriever: Any, limits: ServerLimits = ServerLimits()) -> Any:
    """The ASGI app around an open Retriever (anything with search_text/num_chunks/db)."""
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
                if not visible(t):
                    raise ValueError(f"texts[{i}] is empty (no visible characters)")
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(f"texts[{i}] is not valid Unicode (a lone surrogate at {e.start})") from None
                if len(t) > limits.max_chars:
                    raise ValueError(f"texts[{i}] has {len(t)} characters, the limit is {limits.max_chars}")
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
        return {"status": "ok", "db": str(retriever.db), "chunks": int(retriever.num_chunks)}

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

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)})

    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retro-serve", description="Serve a retro database's Retriever over HTTP.")
    p.add_argument("--db", required=True, help="database directory (after `retro-build-index index`)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="where BERT runs")
    p.add_argument("--embedder", default=None, help="the DB's embedder, if its recorded folder moved")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/faiss CPU threads (1 is steadier on a busy machine; default all cores)")
    p.add_argument("--max-texts", type=int, default=ServerLimits.max_texts)
    p.add_argument("--max-chars", type=int, default=ServerLimits.max_chars)
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
    app = create_app(retriever, ServerLimits(max_texts=args.max_texts, max_chars=args.max_chars))
    print(f"retro-serve: {retriever.num_chunks} chunks from {args.db} on http://{args.host}:{args.port}",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
