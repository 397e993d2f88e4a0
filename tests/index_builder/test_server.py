"""retro-serve: a real uvicorn server on loopback; valid lookups, malformed requests get a 4xx
with a message, and the server keeps serving."""

from __future__ import annotations

import subprocess
import sys

import pytest

from index_builder import Retriever
from index_builder.server import ServerLimits, build_parser, create_app
from tests.fixtures import shared_db
from tests.fixtures.loopback import serve


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    retriever = Retriever.open(shared_db(tmp_path_factory))
    app = create_app(retriever, ServerLimits(max_texts=4, max_chars=500))
    for client in serve(app, timeout=30):
        yield client, retriever


def test_lookup_matches_the_python_api(server):
    client, retriever = server
    text = retriever.store.text(7)
    r = client.post("/v1/neighbours", json={"texts": [text, "def f(x): return x"], "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["k"] == 3 and len(body["neighbours"]) == 2
    expect = retriever.search_text([text, "def f(x): return x"], k=3)
    for got_row, exp_row in zip(body["neighbours"], expect):
        assert [n["chunk_id"] for n in got_row] == [n.chunk_id for n in exp_row]
        assert set(got_row[0]) == {"chunk_id", "doc_id", "distance", "text", "continuation"}
    doc = body["neighbours"][0][0]["doc_id"]
    r = client.post("/v1/neighbours", json={"texts": [text], "k": 3, "exclude_doc_ids": [doc]})
    assert r.status_code == 200 and all(n["doc_id"] != doc for n in r.json()["neighbours"][0])


@pytest.mark.parametrize("payload, fragment", [
    ({"texts": [], "k": 2}, "texts"),
    ({"texts": ["ok", ""], "k": 2}, "texts[1] is empty"),
    ({"texts": ["   "]}, "is empty"),
    ({"texts": "not a list"}, "texts"),
    ({"texts": [1, 2]}, "texts"),
    ({"texts": ["a"] * 5}, "texts"),
    ({"texts": ["x" * 501]}, "limit is 500"),
    ({"texts": ["ok"], "k": 0}, "k"),
    ({"texts": ["ok"], "k": 101}, "k"),
    ({"texts": ["ok"], "k": "two"}, "k"),
    ({"texts": ["ok"], "surprise": 1}, "surprise"),
    ({"k": 2}, "texts"),
])
def test_malformed_requests_get_4xx_with_message_and_server_keeps_serving(server, payload, fragment):
    client, _ = server
    r = client.post("/v1/neighbours", json=payload)
    assert 400 <= r.status_code < 500
    assert fragment in r.json()["error"], r.json()
    assert client.get("/healthz").json()["status"] == "ok"


def test_not_json_wrong_method_and_schema(server):
    client, retriever = server
    r = client.post("/v1/neighbours", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]
    assert client.get("/v1/neighbours").status_code == 405
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["chunks"] == retriever.num_chunks
    schema = client.get("/openapi.json").json()
    assert "/v1/neighbours" in schema["paths"] and "/healthz" in schema["paths"]


def test_cli_defaults_to_loopback_and_reports_bad_db(tmp_path):
    args = build_parser().parse_args(["--db", "x"])
    assert args.host == "127.0.0.1" and args.port == 8000
    p = subprocess.run([sys.executable, "-m", "index_builder.server", "--db", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no database directory" in p.stderr
