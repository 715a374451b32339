"""Chat through the gateway against the session's real vLLM engine."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import time

import httpx
import openai
import psutil
import pytest

from tests.conftest import LIMITS, MODEL_NAME
from tests.metrics import sample
from tests.sse import sse_payloads

# The tiny model's weights are random: ignore_eos (a vLLM extension the gateway
# passes through) makes the output length exact.
ASK = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "When does the pilotage fee change?"}]}


def test_chat_non_streaming_returns_a_vllm_completion(gateway):
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json={**ASK, "max_tokens": 7, "ignore_eos": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL_NAME
    assert body["system_fingerprint"].startswith("vllm-")
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 7


def test_chat_without_max_tokens_gets_the_service_limit(gateway):
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json={**ASK, "ignore_eos": True}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 512  # LORAG_MAX_TOKENS in conftest


def test_chat_streaming_sends_whole_sse_chunks_then_done(gateway):
    with httpx.stream(
        "POST", f"{gateway.url}/v1/chat/completions",
        json={**ASK, "max_tokens": 5, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    payloads = sse_payloads(body)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL_NAME for c in chunks)
    # About one chunk per token after the role chunk: vLLM merges a request's tokens into one
    # chunk when its server falls behind (seen under load), so the usage chunk counts them.
    tokens = [c for c in chunks if c["choices"] and "role" not in c["choices"][0]["delta"]]
    assert 1 <= len(tokens) <= 5
    assert tokens[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_official_openai_client_chats_streams_and_lists_models(gateway):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)

    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]

    completion = client.chat.completions.create(
        model=MODEL_NAME, messages=ASK["messages"], max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens == 4

    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=ASK["messages"], max_tokens=4, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and not chunk.choices[0].delta.role]
    assert 1 <= len(pieces) <= 4 and "".join(pieces)  # vLLM may merge tokens into one chunk under load
    assert chunks[-1].usage.completion_tokens == 4


def test_openai_client_sees_gateway_errors_as_api_errors(gateway):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=ASK["messages"], max_tokens=2)
    assert MODEL_NAME in caught.value.message


def _messages(count: int) -> list[dict]:
    return [{"role": "user", "content": "hi"}] * count


LIMIT_CASES = [
    # (what is wrong, request body, status, param)
    ("max_tokens over the limit", {**ASK, "max_tokens": 513}, 400, "max_tokens"),
    ("max_completion_tokens over the limit", {**ASK, "max_completion_tokens": 513}, 400, "max_completion_tokens"),
    ("n over the limit", {**ASK, "max_tokens": 2, "n": 3}, 400, "n"),
    ("too many messages", {**ASK, "messages": _messages(9)}, 400, "messages"),
    ("message too long", {**ASK, "messages": [{"role": "user", "content": "x" * 2001}]}, 400, "messages.0.content"),
    ("content parts too long", {**ASK, "messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 2001}]}]},
     400, "messages.0.content"),
    ("no messages", {**ASK, "messages": []}, 400, "messages"),
    ("unknown role", {**ASK, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("max_tokens zero", {**ASK, "max_tokens": 0}, 400, "max_tokens"),
    ("model missing", {"messages": ASK["messages"]}, 400, "model"),
    ("unknown model", {**ASK, "model": "gpt-4"}, 404, "model"),
    ("body too large", {**ASK, "messages": [{"role": "user", "content": "x" * 70_000}]}, 413, None),
    # Only documented fields reach vLLM; these change the prompt's rendering, the scheduling or the caches.
    *((f"{field} is not forwarded", {**ASK, field: value}, 400, field) for field, value in [
        ("kv_transfer_params", {"do_remote_prefill": True}), ("priority", -100), ("cache_salt", "shared"),
        ("add_special_tokens", True), ("chat_template", "{{ messages }}"), ("chat_template_kwargs", {"x": 1}),
        ("add_generation_prompt", False), ("continue_final_message", True), ("documents", [{"text": "x"}]),
        ("mm_processor_kwargs", {}), ("request_id", "mine"), ("truncate_prompt_tokens", 2),
        ("prompt_logprobs", 1), ("return_prompt_text", True), ("return_tokens_as_token_ids", True),
        ("vllm_xargs", {"a": 1}), ("no_such_field", 1),
    ]),
    ("unknown message key", {**ASK, "messages": [{"role": "user", "content": "hi", "prefix": True}]}, 400,
     "messages.0.prefix"),
    *((f"stream_options {value!r}", {**ASK, "stream": True, "stream_options": value}, 400, "stream_options")
      for value in ("x", [True], 3)),
    ("stream_options unknown key", {**ASK, "stream": True, "stream_options": {"usage": True}}, 400,
     "stream_options.usage"),
]


@pytest.mark.parametrize(("case", "body", "status", "param"), LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
def test_limits_and_bad_requests_get_a_4xx_envelope(gateway, case, body, status, param):
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["message"]


def test_documented_vllm_fields_still_reach_the_engine(gateway):
    body = {**ASK, "max_tokens": 8, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "seed": 7, "temperature": 0.5, "stop": ["zzz"],
            "structured_outputs": {"choice": ["yes", "no"]}, "stream_options": None}
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()["choices"][0]
    assert answer["message"]["content"] in ("yes", "no")  # structured_outputs reached vLLM
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", timeout=60, json={
        **ASK, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": False},
    }) as stream:
        payloads = sse_payloads(stream.read().decode())
    assert payloads[-2]["usage"]["completion_tokens"] == 2


def test_the_schema_lists_the_forwarded_fields(gateway):
    schemas = httpx.get(f"{gateway.url}/openapi.json").json()["components"]["schemas"]
    request = schemas["ChatCompletionRequest"]
    assert request["additionalProperties"] is False
    assert {"top_k", "min_p", "structured_outputs", "stream_options", "ignore_eos"} <= set(request["properties"])
    assert not {"priority", "cache_salt", "kv_transfer_params", "chat_template"} & set(request["properties"])
    assert schemas["ChatMessage"]["additionalProperties"] is False


def test_limits_are_enforced_before_the_engine_sees_the_request(gateway):
    def engine_requests() -> float:
        metrics = httpx.get(f"{gateway.engine_url()}/metrics", headers=gateway.engine_headers()).text
        return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("vllm:request_success_total"))

    httpx.post(f"{gateway.url}/v1/chat/completions", json={**ASK, "max_tokens": 1})
    before = engine_requests()
    for _, body, _, _ in LIMIT_CASES:
        httpx.post(f"{gateway.url}/v1/chat/completions", json=body)
    httpx.post(f"{gateway.url}/v1/chat/completions", json={**ASK, "max_tokens": 1})
    # Only the last, valid request reached vLLM.
    assert engine_requests() == before + 1


def engine_metric(gateway, name: str) -> float:
    """A metric of the session's engine (vLLM's own /metrics)."""
    return sample(httpx.get(f"{gateway.engine_url()}/metrics", headers=gateway.engine_headers()).text, name)


def wait_engine_idle(gateway) -> None:
    deadline = time.monotonic() + 60
    while engine_metric(gateway, "vllm:num_requests_running") > 0:  # ended: aborted, or ran to its max_tokens
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_client_that_leaves_mid_stream_aborts_the_engine_request(gateway):
    generated = engine_metric(gateway, "vllm:generation_tokens_total")
    body = {**ASK, "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_bytes())  # generating; then the client goes away
    wait_engine_idle(gateway)
    # ignore_eos: only an abort ends it before its 500 tokens.
    assert engine_metric(gateway, "vllm:generation_tokens_total") - generated < 500


def test_a_client_that_leaves_before_a_non_streamed_answer_aborts_the_engine_request(gateway):
    generated = engine_metric(gateway, "vllm:generation_tokens_total")
    body = json.dumps({**ASK, "max_tokens": 500, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", gateway.port)) as client:
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: lorag\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 60
        while engine_metric(gateway, "vllm:num_requests_running") < 1:  # generating; then the client goes away
            assert time.monotonic() < deadline, "the request never reached the engine"
    wait_engine_idle(gateway)
    assert engine_metric(gateway, "vllm:generation_tokens_total") - generated < 500


def test_one_engine_connection_serves_request_after_request(gateway):
    """A stream is read to the end of its body, not dropped at [DONE]: dropping it closed the
    connection, and every request paid for a new one (the gateway's connect, the engine's accept)."""
    opened = sample(httpx.get(f"{gateway.url}/metrics").text, "lorag_engine_connections_opened_total")
    for n in range(4):
        body = {**ASK, "max_tokens": 3, "ignore_eos": True, "stream": n % 2 == 0}
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        if body["stream"]:
            assert sse_payloads(response.text)[-1] == "[DONE]"
    # One sequential caller needs one connection; the first request may reuse one already open.
    assert sample(httpx.get(f"{gateway.url}/metrics").text, "lorag_engine_connections_opened_total") - opened <= 1


def test_the_request_id_names_the_engine_request(gateway):
    given = httpx.post(f"{gateway.url}/v1/chat/completions", json={**ASK, "max_tokens": 2},
                       headers={"X-Request-ID": "trace-chat-7"})
    assert given.status_code == 200, given.text
    assert given.json()["id"] == "chatcmpl-trace-chat-7"
    made = httpx.post(f"{gateway.url}/v1/chat/completions", json={**ASK, "max_tokens": 2})
    assert made.json()["id"] == f"chatcmpl-{made.headers['x-request-id']}"
    streamed = httpx.post(f"{gateway.url}/v1/chat/completions", json={**ASK, "max_tokens": 2, "stream": True},
                          headers={"X-Request-ID": "trace-chat-8"})
    chunks = [p for p in sse_payloads(streamed.text) if isinstance(p, dict)]
    assert chunks and {c["id"] for c in chunks} == {"chatcmpl-trace-chat-8"}


def test_invalid_json_is_a_400(gateway):
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_engine_rejections_keep_their_4xx(gateway):
    # Longer than the engine's context (LORAG_ENGINE_MAX_MODEL_LEN=1024): only vLLM knows the token count.
    words = " ".join(["harbour"] * 1900)
    body = {**ASK, "max_tokens": 8, "messages": [{"role": "user", "content": words[:1999]}] * 8}
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "engine_rejected"


@pytest.mark.parametrize("path", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/tokenize", "/v1/completions"])
def test_vllm_admin_and_raw_routes_are_not_reachable_through_the_gateway(gateway, path):
    response = httpx.post(f"{gateway.url}{path}", json={"lora_name": "x", "lora_path": "/tmp"})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_engine_listens_on_loopback_only(gateway):
    listening = [c for c in gateway.engine().net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert listening
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}


def test_health_and_readiness(gateway):
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["engines"] == [{"name": "engine-0", "ready": True}]


def test_stream_frames_survive_unicode_line_separators_in_the_text(gateway):
    # vLLM's JSON leaves U+2028, U+2029 and U+0085 raw inside strings; a text line reader would
    # cut the frame there. vLLM echoes the final assistant message, so the text is exact.
    text = "one\u2028two\u2029three\u0085four\rfive"
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}],
            "echo": True, "max_tokens": 2, "stream": True}
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200
    frames = response.content.split(b"\n\n")
    assert frames[-2:] == [b"data: [DONE]", b""]
    chunks = [json.loads(frame[len(b"data: "):]) for frame in frames[:-2]]  # every frame whole JSON
    assert text in "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_past_the_in_flight_limit_requests_get_429_with_retry_after(gateway):
    # The engine is frozen so that admitted requests stay in flight; the limit is 24 (conftest).
    limit = int(LIMITS["LORAG_MAX_INFLIGHT_PER_ENGINE"])
    body = {**ASK, "max_tokens": 2}

    def in_flight() -> float:
        line = next(l for l in httpx.get(f"{gateway.url}/metrics").text.splitlines() if l.startswith("lorag_chat_in_flight "))
        return float(line.split()[1])

    async def run() -> tuple[list[int], httpx.Response]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
            held = [asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(limit)]
            deadline = time.monotonic() + 30
            while in_flight() < limit:
                assert time.monotonic() < deadline, f"only {in_flight()} requests in flight"
                await asyncio.sleep(0.1)
            refused = await client.post("/v1/chat/completions", json=body)
            os.killpg(engine, signal.SIGCONT)
            return [r.status_code for r in await asyncio.gather(*held)], refused

    engine = gateway.engine().pid
    os.killpg(engine, signal.SIGSTOP)
    try:
        statuses, refused = asyncio.run(run())
    finally:
        os.killpg(engine, signal.SIGCONT)
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    assert statuses == [200] * limit  # the admitted ones were served once the engine thawed
    assert in_flight() == 0
    gateway.wait_ready(timeout=60)


def test_an_engine_slow_to_answer_health_checks_keeps_serving(gateway):
    # Frozen, vLLM answers nothing: /health times out as it does when a loaded engine is busy.
    # One missed check is load, not an outage: still ready, and a request waits rather than 503.
    engine = gateway.engine().pid
    os.killpg(engine, signal.SIGSTOP)
    try:
        with httpx.Client(base_url=gateway.url, timeout=60) as client:
            ready = client.get("/readyz")  # answers after the health check's own timeout
            assert ready.status_code == 200, ready.text
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pending = pool.submit(client.post, "/v1/chat/completions", json={**ASK, "max_tokens": 2})
                time.sleep(1)  # the request is with the frozen engine
                os.killpg(engine, signal.SIGCONT)
                answer = pending.result()
    finally:
        os.killpg(engine, signal.SIGCONT)
    assert answer.status_code == 200, answer.text
    gateway.wait_ready(timeout=60)
