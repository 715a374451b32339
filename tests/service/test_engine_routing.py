"""Routing over engines: least outstanding requests (ties in turn), only engines that hold the
asked adapter, and a request whose engine cannot be reached goes to another before any byte of
it reaches the client."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from service import Settings, create_app
from service.engine.launcher import free_port
from service.engine.pool import EnginePool
from service.errors import EngineUnavailable
from tests.conftest import MODEL_NAME

ASK = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def pool(count: int) -> EnginePool:
    engines = EnginePool.external(httpx.AsyncClient(), [f"http://127.0.0.1:{9000 + i}" for i in range(count)])
    for engine in engines.engines:
        engine.up = True
    return engines


def test_the_least_busy_engine_is_picked_and_ties_take_turns():
    engines = pool(3)
    a, b, c = engines.engines
    a.inflight, b.inflight, c.inflight = 4, 1, 2
    assert {engines.pick().name for _ in range(5)} == {"engine-1"}
    b.inflight = 2
    assert {engines.pick().name for _ in range(6)} == {"engine-1", "engine-2"}  # tied: both, in turn
    assert {engines.pick(avoid=[b]).name for _ in range(4)} == {"engine-2"}


def test_an_adapter_goes_only_where_it_is_loaded_however_busy():
    engines = pool(2)
    idle, busy = engines.engines
    busy.inflight, busy.loaded = 9, {"legal@abc"}
    assert {engines.pick("legal@abc").name for _ in range(4)} == {busy.name}
    assert engines.pick().name == idle.name
    with pytest.raises(EngineUnavailable, match="not loaded on any engine yet"):
        engines.pick("legal@abc", avoid=[busy])
    idle.up = busy.up = False
    with pytest.raises(EngineUnavailable):
        engines.pick()


def test_a_request_whose_engine_went_away_is_answered_by_another(gateway, tiny_model, tmp_path):
    # Both engines answered the last probe; the first has gone since. Its requests fail to connect,
    # so they go to the second, and the first is out until a probe finds it again.
    settings = Settings(engine_urls=f"http://127.0.0.1:{free_port()}, {gateway.engine_url()}",
                        engine_api_key=gateway.engine_key(), model_name=MODEL_NAME, home=tmp_path, model=tiny_model)
    with TestClient(create_app(settings)) as client:
        engines: EnginePool = client.app.state.engines
        gone, live = engines.engines
        gone.up = True
        for stream in (False, True, False):
            gone.up = True  # as if a probe had just seen it
            if stream:
                with client.stream("POST", "/v1/chat/completions", json={**ASK, "stream": True}) as response:
                    assert response.status_code == 200
                    assert response.read().decode().endswith("data: [DONE]\n\n")
            else:
                response = client.post("/v1/chat/completions", json=ASK)
                assert response.status_code == 200, response.text
            assert not gone.up
        assert (gone.inflight, live.inflight) == (0, 0)  # every request's count was given back
        live.up = False
        gone.up = True
        response = client.post("/v1/chat/completions", json=ASK)
        assert response.status_code == 503 and "not reachable" in response.json()["error"]["message"]
