"""The engine answers only its gateway: the embedded vLLM gets a key made at start (external
mode: LORAG_ENGINE_API_KEY), in its environment, and refuses every route but /health without it."""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service import Settings, create_app
from service.engine.guard import KEY_VARIABLE, EngineGuard
from service.engine.launcher import engine_key, launch_spec
from tests.adapters import make_adapter
from tests.conftest import MODEL_NAME

ASK = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_the_embedded_engine_refuses_whoever_lacks_its_key(gateway, tiny_model, tmp_path):
    engine, key = gateway.engine_url(), gateway.engine_key()
    assert key not in " ".join(gateway.engine().cmdline())  # argv is readable by every local user
    adapter = make_adapter(tiny_model, tmp_path / "intruder", seed=5)
    # vLLM's /v1 routes, and those its own key check leaves open: /adapters (its SageMaker route)
    # loads an adapter from any path, /invocations generates.
    attempts = [
        ("POST", "/v1/load_lora_adapter", {"lora_name": "intruder", "lora_path": str(adapter)}),
        ("POST", "/adapters", {"name": "intruder", "src": str(adapter)}),
        ("POST", "/invocations", {"model": MODEL_NAME, "prompt": "The", "max_tokens": 1}),
        ("POST", "/v1/chat/completions", ASK),
        ("GET", "/v1/models", None),
        ("GET", "/metrics", None),  # vLLM's metrics name the loaded adapters
    ]
    for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": key}):
        for method, path, body in attempts:
            refused = httpx.request(method, f"{engine}{path}", json=body, headers=headers, timeout=30)
            assert refused.status_code == 401, (method, path, headers, refused.text)
    assert httpx.get(f"{engine}/health").status_code == 200  # the liveness probe stays open
    loaded = httpx.get(f"{engine}/v1/models", headers=gateway.engine_headers()).json()["data"]
    assert "intruder" not in {m["id"] for m in loaded}
    answered = httpx.post(f"{gateway.url}/v1/chat/completions", json=ASK, timeout=60)  # the gateway has it
    assert answered.status_code == 200, answered.text


def test_a_gateway_with_the_wrong_engine_key_is_not_ready_and_says_why(gateway, tiny_model, tmp_path, caplog):
    settings = Settings(engine_urls=gateway.engine_url(), engine_api_key="not-the-key", model=tiny_model,
                        model_name=MODEL_NAME, home=tmp_path, query_encoder="torch")
    with caplog.at_level(logging.WARNING, logger="lorag.engine"), TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["engines"] == [{"name": "engine-0", "ready": False}]
        assert client.post("/v1/chat/completions", json=ASK).json()["error"]["code"] == "engine_unavailable"
    assert "refused lorag's engine key: set LORAG_ENGINE_API_KEY" in caplog.text, caplog.text
    assert "not-the-key" not in caplog.text


def test_the_key_is_made_at_start_or_taken_from_the_setting_and_passed_in_the_environment(tmp_path):
    embedded = Settings(model=tmp_path)
    first, second = engine_key(embedded), engine_key(embedded)
    assert first != second and len(first) >= 32  # a new one at every start
    assert engine_key(Settings(engine_urls="http://10.0.0.5:8000", engine_api_key="shared")) == "shared"
    assert engine_key(Settings(engine_urls="http://10.0.0.5:8000")) is None  # external engines without one
    assert "shared" not in repr(Settings(engine_api_key="shared"))  # a secret: never in a log line
    with pytest.raises(ValidationError):
        Settings(engine_api_key="")  # would send no key at all
    spec = launch_spec(embedded, first)
    assert spec.env[KEY_VARIABLE] == first and first not in " ".join(spec.argv)
    assert "--middleware service.engine.guard.EngineGuard" in " ".join(spec.argv)


def test_an_engine_without_a_key_does_not_start(monkeypatch):
    monkeypatch.delenv(KEY_VARIABLE, raising=False)
    with pytest.raises(RuntimeError, match=KEY_VARIABLE):
        EngineGuard(app=None)
