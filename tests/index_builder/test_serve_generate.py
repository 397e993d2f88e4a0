"""retro-serve's POST /v1/generate on a real uvicorn server (loopback): answers equal
RetroForCausalLM.generate's, streams concatenate to them, bad requests get a 4xx naming the
field, a full queue a 503 with Retry-After, and concurrent requests share one batched call."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Iterator

import httpx
import pytest
import torch

from chunk_store.tokenization.protocol import document_ids
from index_builder import Retriever
from index_builder.generate_worker import GenerateLimits, GenerationService, load_generation_model
from index_builder.server import ServerLimits, build_parser, create_app
from tests.fixtures import shared_db
from tests.fixtures.loopback import serve
from tests.fixtures.served_run import make_run

LIMITS = GenerateLimits(max_prompts=4, max_prompt_chars=400, max_prompt_tokens=60, max_new_tokens=40,
                        max_batch=4, max_queue=2, request_timeout_s=120)
PROMPTS = ["def f(x):\n    return x + 1\n", "the retrieval model"]
NEW = 24  # crosses a chunk boundary (16) after each prompt: retrieval happens


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    db = shared_db(tmp_path_factory)
    run = make_run(tmp_path_factory.mktemp("gen") / "run", db)
    retriever = Retriever.open(db)
    # float64: a left-padded row's logits equal the row alone's exactly, so greedy never flips
    model = load_generation_model(run, dtype=torch.float64)
    service = GenerationService(model, retriever, LIMITS).start()
    app = create_app(retriever, ServerLimits(max_texts=4, max_chars=500), service)
    for client in serve(app):
        yield client, service, retriever, run
    service.stop()


def alone(service: GenerationService, retriever: Any, prompt: str, new: int = NEW,
          retrieval: bool = True) -> list[int]:
    """RetroForCausalLM.generate's greedy tokens for one prompt, cut after eos."""
    ids = document_ids(retriever.store.tokenizer, prompt)
    out = service.model.generate(torch.tensor([ids]), retriever=retriever if retrieval else None,
                                 max_new_tokens=new, do_sample=False, eos_token_id=service.eos_id,
                                 pad_token_id=service.cfg.pad_id)[0, len(ids):].tolist()
    eos = retriever.store.tokenizer.eos_id
    return out[:out.index(eos) + 1] if eos in out else out


def post(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/v1/generate", json=body)


def test_json_answer_equals_generate_greedy(setup) -> None:
    client, service, retriever, _ = setup
    for prompt in PROMPTS:
        r = post(client, prompt=prompt, max_new_tokens=NEW, return_neighbours=True)
        assert r.status_code == 200, r.text
        body = r.json()
        want = alone(service, retriever, prompt)
        assert body["tokens"] == want and body["num_tokens"] == len(want)
        assert body["text"] == retriever.store.tokenizer.decode([t for t in want if t != service.eos_id])
        assert body["timings"]["generate_ms"] > 0 and body["results"][0]["prompt_tokens"] > 0
        n_prompt = body["results"][0]["prompt_tokens"]
        chunks = (n_prompt + len(want)) // service.cfg.chunk_size  # completed chunks got neighbours
        assert 1 <= len(body["neighbours"]) <= chunks
        assert all(len(c["neighbours"]) == 2 and "query" in c for c in body["neighbours"])


def test_without_retrieval_and_with_fewer_neighbours(setup) -> None:
    client, service, retriever, _ = setup
    r = post(client, prompt=PROMPTS[0], max_new_tokens=NEW, retrieval=False)
    assert r.status_code == 200 and r.json()["tokens"] == alone(service, retriever, PROMPTS[0], retrieval=False)
    assert "neighbours" not in r.json()
    r = post(client, prompt=PROMPTS[0], max_new_tokens=NEW, k=1, return_neighbours=True)
    assert r.status_code == 200, r.text
    assert all(len(c["neighbours"]) == 1 for c in r.json()["neighbours"])


def test_sse_stream_concatenates_to_the_json_text_and_ends_with_done(setup) -> None:
    client, service, retriever, _ = setup
    events = []
    with client.stream("POST", "/v1/generate", json={"prompt": PROMPTS[0], "max_new_tokens": NEW,
                                                      "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: ")
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    tokens, final = [e for e in parsed if "token" in e], parsed[-1]
    assert final["done"] and final["num_tokens"] == len(tokens)
    want = alone(service, retriever, PROMPTS[0])
    assert [e["token"] for e in tokens] == want == final["tokens"]
    assert "".join(e["text"] for e in tokens) == final["text"] == post(client, prompt=PROMPTS[0],
                                                                       max_new_tokens=NEW).json()["text"]


def test_seeded_sampling_repeats(setup) -> None:
    client, _, _, _ = setup
    body = dict(prompt=PROMPTS[1], max_new_tokens=12, do_sample=True, temperature=1.5, top_k=50, top_p=0.95,
                repetition_penalty=1.1, seed=7)
    a, b = post(client, **body).json(), post(client, **body).json()
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) >= 1


@pytest.mark.parametrize("payload, fragment", [
    ({"prompt": "x", "max_new_tokens": -1}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 41}, "max_new_tokens"),
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "  \n"}, "prompt is empty"),
    ({"prompt": "x" * 401}, "limit is 400"),
    ({"prompt": "word " * 80}, "tokens, the limit is 60"),
    ({"prompts": ["ok", ""]}, "prompts[1] is empty"),
    ({"prompts": ["ok"] * 5}, "prompts"),
    ({"prompt": "x", "prompts": ["y"]}, "prompt"),
    ({"max_new_tokens": 4}, "prompt"),
    ({"prompt": "x", "do_sample": True, "temperature": 0}, "temperature"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "k": 3}, "k"),
    ({"prompt": "x", "seed": -2}, "seed"),
    ({"prompt": "x", "surprise": 1}, "surprise"),
])
def test_bad_requests_get_4xx_naming_the_field(setup, payload, fragment) -> None:
    client, _, _, _ = setup
    r = client.post("/v1/generate", json=payload)
    assert 400 <= r.status_code < 500, r.text
    assert fragment in r.json()["error"], r.json()


def test_a_body_over_the_limit_is_refused(setup) -> None:
    client, _, _, _ = setup
    limit = ServerLimits(max_texts=4, max_chars=500).body_limit(LIMITS.max_prompt_chars, LIMITS.max_prompts)
    r = client.post("/v1/generate", content=b'{"prompt": "' + b"x" * limit + b'"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        yield b'{"prompt": "'
        for _ in range(limit // 1000 + 1):
            yield b"x" * 1000
        yield b'"}'

    r = client.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get("/healthz").json()["generate"] is True


def _in_threads(client: httpx.Client, bodies: list[dict[str, Any]]) -> tuple[list[threading.Thread], list[Any]]:
    answers: list[Any] = [None] * len(bodies)

    def go(i: int) -> None:
        answers[i] = client.post("/v1/generate", json=bodies[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    return threads, answers


def _wait_queued(service: GenerationService, n: int) -> None:
    deadline = time.time() + 30
    while service.queued() < n and time.time() < deadline:
        time.sleep(0.02)
    assert service.queued() == n


def test_concurrent_requests_share_one_batched_call_and_equal_alone(setup) -> None:
    client, service, retriever, _ = setup
    service.pause()
    try:
        before = len(service.batch_sizes)
        # different prompt lengths (left padding) and different max_new_tokens (each row its own)
        threads, answers = _in_threads(client, [{"prompt": PROMPTS[0], "max_new_tokens": NEW},
                                                {"prompt": PROMPTS[1], "max_new_tokens": NEW - 5}])
        _wait_queued(service, 2)
    finally:
        service.resume()
    for t in threads:
        t.join(60)
    assert service.batch_sizes[before:] == [2]
    assert answers[0].status_code == 200 and answers[1].status_code == 200
    assert answers[0].json()["timings"]["batch_rows"] == 2
    assert answers[0].json()["tokens"] == alone(service, retriever, PROMPTS[0])
    assert answers[1].json()["tokens"] == alone(service, retriever, PROMPTS[1], NEW - 5)


def test_incompatible_requests_are_not_batched(setup) -> None:
    client, service, _, _ = setup
    service.pause()
    try:
        before = len(service.batch_sizes)
        threads, answers = _in_threads(client, [{"prompt": PROMPTS[0], "max_new_tokens": 4},
                                                {"prompt": PROMPTS[1], "max_new_tokens": 4, "retrieval": False}])
        _wait_queued(service, 2)
    finally:
        service.resume()
    for t in threads:
        t.join(60)
    assert service.batch_sizes[before:] == [1, 1] and all(a.status_code == 200 for a in answers)


def test_a_full_queue_answers_503_with_retry_after_and_recovers(setup) -> None:
    client, service, _, _ = setup
    service.pause()
    try:
        threads, answers = _in_threads(client, [{"prompt": PROMPTS[0], "max_new_tokens": 2}] * LIMITS.max_queue)
        _wait_queued(service, LIMITS.max_queue)
        t0 = time.perf_counter()
        r = post(client, prompt=PROMPTS[1], max_new_tokens=2)
        assert time.perf_counter() - t0 < 10  # answered at once, never waits
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]
        r = client.post("/v1/generate", json={"prompt": PROMPTS[1], "max_new_tokens": 2, "stream": True})
        assert r.status_code == 503
    finally:
        service.resume()
    for t in threads:
        t.join(60)
    assert all(a.status_code == 200 for a in answers)
    assert post(client, prompt=PROMPTS[1], max_new_tokens=2).status_code == 200


def test_several_prompts_in_one_request(setup) -> None:
    client, service, retriever, _ = setup
    r = post(client, prompts=PROMPTS, max_new_tokens=NEW, return_neighbours=True)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["tokens"] for x in results] == [alone(service, retriever, p) for p in PROMPTS]
    # each row's neighbours are its own: every query is a chunk of that row's prompt + output
    tok = retriever.store.tokenizer
    for prompt, x in zip(PROMPTS, results):
        whole = prompt + tok.decode([t for t in x["tokens"] if t != service.eos_id])
        assert x["neighbours"] and all(c["query"].strip() in whole for c in x["neighbours"])


def test_an_export_folder_serves_the_same_answers(setup, tmp_path) -> None:
    from retro.export import export

    _, service, retriever, run = setup
    out = export(run, tmp_path / "hf")
    other = GenerationService(load_generation_model(out, dtype=torch.float64), retriever, LIMITS)
    ids = document_ids(retriever.store.tokenizer, PROMPTS[0])
    got = other.model.generate(torch.tensor([ids]), retriever=retriever, max_new_tokens=8, do_sample=False)
    want = service.model.generate(torch.tensor([ids]), retriever=retriever, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


def test_without_run_the_server_starts_and_generate_says_no_model(tmp_path_factory) -> None:
    assert build_parser().parse_args(["--db", "x"]).run is None
    retriever = Retriever.open(shared_db(tmp_path_factory))
    for client in serve(create_app(retriever, ServerLimits())):
        r = post(client, prompt="hello", max_new_tokens=4)
        assert r.status_code == 503 and "no model is loaded" in r.json()["error"] and "--run" in r.json()["error"]
        assert client.get("/healthz").json()["generate"] is False
        assert client.post("/v1/neighbours", json={"texts": ["hello"]}).status_code == 200


def test_a_run_that_does_not_load_is_a_clear_start_up_error(tmp_path_factory, tmp_path, capsys) -> None:
    from index_builder.server import main

    db = shared_db(tmp_path_factory)
    assert main(["--db", str(db), "--run", str(tmp_path / "missing")]) == 2
    assert "retro-serve: error:" in capsys.readouterr().err


class GatedRetriever:
    """The Retriever, each search held until ``gate`` is set (at most 60 s): a generation that
    cannot end before the server has seen its client leave, however loaded the machine is."""

    def __init__(self, retriever: Any, gate: Any) -> None:
        self.retriever, self.store, self.gate = retriever, retriever.store, gate

    def search_text(self, texts: Any, **kwargs: Any) -> Any:
        self.gate()
        return self.retriever.search_text(texts, **kwargs)


def test_a_stream_client_that_leaves_cancels_its_row(setup, monkeypatch) -> None:
    client, service, _, _ = setup
    jobs: list[Any] = []
    submit = service.submit
    monkeypatch.setattr(service, "submit", lambda job: jobs.append(job) or submit(job))

    monkeypatch.setattr(service, "retriever", GatedRetriever(service.retriever, lambda: jobs[0].cancelled.wait(60)))
    with client.stream("POST", "/v1/generate", json={"prompt": PROMPTS[1], "max_new_tokens": 40,
                                                      "stream": True}) as r:
        assert r.status_code == 200
        assert next(r.iter_lines()).startswith("data: ")  # one token, then the client leaves
    answer = jobs[0].future.result(timeout=60)
    assert jobs[0].cancelled.is_set()
    assert answer["stop_reason"] == "cancelled" and answer["num_tokens"] < 40
