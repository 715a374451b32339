"""External mode: the gateway in-process, pointed at vLLM servers it did not start."""

from __future__ import annotations

import os

from fastapi.testclient import TestClient

from service import Settings, create_app
from service.engine.launcher import free_port
from tests.conftest import MODEL_NAME
from tests.gateway import engine_children

ASK = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_external_mode_serves_through_listed_engines_and_starts_none(gateway, tiny_model, tmp_path):
    # LORAG_MODEL: the served tokenizer, which tells the gateway the special tokens to keep out of text.
    settings = Settings(engine_urls=f"http://127.0.0.1:{free_port()}, {gateway.engine_url()}",
                        engine_api_key=gateway.engine_key(), model_name=MODEL_NAME, home=tmp_path, model=tiny_model)
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["engines"] == [{"name": "engine-0", "ready": False}, {"name": "engine-1", "ready": True}]
        for _ in range(3):  # round-robin only over engines that are up
            response = client.post("/v1/chat/completions", json=ASK)
            assert response.status_code == 200, response.text
        with client.stream("POST", "/v1/chat/completions", json={**ASK, "stream": True}) as stream:
            assert stream.read().decode().endswith("data: [DONE]\n\n")
    assert not engine_children(os.getpid())


def test_external_mode_without_the_served_tokenizer_refuses_chat(gateway, tmp_path):
    # Without it the gateway cannot know which text would tokenize as a turn marker: 503, not a forged turn.
    settings = Settings(engine_urls=gateway.engine_url(), engine_api_key=gateway.engine_key(), model_name=MODEL_NAME,
                        home=tmp_path)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        response = client.post("/v1/chat/completions", json=ASK)
        assert response.status_code == 503
        assert "LORAG_MODEL" in response.json()["error"]["message"]


def test_external_mode_with_no_engine_up_is_not_ready_and_chat_gets_503(tiny_model, tmp_path):
    settings = Settings(engine_urls=f"http://127.0.0.1:{free_port()}", model_name=MODEL_NAME, home=tmp_path,
                        model=tiny_model)
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["error"]["type"] == "engine_unavailable"
        response = client.post("/v1/chat/completions", json=ASK)
        assert response.status_code == 503
        assert response.headers["retry-after"]
        assert response.json()["error"]["code"] == "engine_unavailable"
