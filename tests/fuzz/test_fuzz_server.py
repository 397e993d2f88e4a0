"""Fuzzing retro-serve's payloads (issue 12): any JSON body gets a 200 with real neighbours or a
4xx with a message, never a 500; an internal error is logged once. In-process (ASGI transport)."""

from __future__ import annotations

import json
import logging

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.fixtures import shared_db
from index_builder import Retriever
from index_builder.server import ServerLimits, create_app

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])
ODD_TEXT = st.sampled_from(["\ud800", "\u200b", "\u200d", "\ufeff", "\x00", "\u200b\u200d\ufeff\x00",
                            " \t\n", "ok \ud800", "def f(x): return x", "é" * 50, "\U0001F600"])
TEXTS = st.lists(st.one_of(ODD_TEXT, st.text(max_size=40)), max_size=5)
IDS = st.lists(st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**70, -1])),
               max_size=4)
BODY = st.fixed_dictionaries({"texts": TEXTS}, optional={
    "k": st.one_of(st.integers(-5, 200), st.floats(), st.text(max_size=3), st.none()),
    "exclude_doc_ids": st.one_of(IDS, st.none(), st.text(max_size=3), st.lists(IDS, max_size=2)),
    "surprise": st.integers()})


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    return Retriever.open(shared_db(tmp_path_factory))


@pytest.fixture(scope="module")
def client(retriever):
    import asyncio

    app = create_app(retriever, ServerLimits(max_texts=4, max_chars=500))
    loop = asyncio.new_event_loop()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    ac = httpx.AsyncClient(transport=transport, base_url="http://test")

    def post(body: bytes) -> httpx.Response:
        return loop.run_until_complete(ac.post("/v1/neighbours", content=body,
                                               headers={"content-type": "application/json"}))

    yield post
    loop.run_until_complete(ac.aclose())
    loop.close()


def check(resp: httpx.Response, retriever: Retriever) -> None:
    assert resp.status_code == 200 or 400 <= resp.status_code < 500, (resp.status_code, resp.text)
    body = resp.json()
    if resp.status_code != 200:
        assert body["error"]
        return
    content = retriever.store.content_mask()
    for row in body["neighbours"]:
        assert row, "an accepted query got no neighbours"
        for n in row:
            assert content[n["chunk_id"]] and np.isfinite(n["distance"])


@FUZZ
@given(body=BODY)
def test_any_payload_is_answered_or_refused_with_a_4xx(client, retriever, body):
    check(client(json.dumps(body).encode()), retriever)


@pytest.mark.parametrize("body", [{"texts": ["\ud800"]}, {"texts": ["ok"], "exclude_doc_ids": [2**70]},
                                  {"texts": ["\u200b"]}, {"texts": ["\u200d\ufeff"]}, {"texts": ["\x00"]}])
def test_the_reported_payloads_are_4xx(client, retriever, body):
    resp = client(json.dumps(body).encode())
    assert 400 <= resp.status_code < 500, resp.text


def test_an_internal_error_is_a_500_logged_once(caplog):
    import asyncio

    class Broken:
        db, num_chunks = "x", 1

        def search_text(self, *a, **k):
            raise RuntimeError("boom")

    app = create_app(Broken())

    async def go() -> httpx.Response:
        # raise_app_exceptions: an exception that leaves the app is what the server logs a second time
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            return await ac.post("/v1/neighbours", json={"texts": ["ok"]})

    with caplog.at_level(logging.ERROR):
        resp = asyncio.run(go())
    assert resp.status_code == 500 and resp.json()["error"] == "internal error: RuntimeError"
    assert sum(1 for r in caplog.records if r.exc_info) == 1
