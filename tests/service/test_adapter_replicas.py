"""Several vLLM replicas (external mode) kept in the registry's desired state, through faults and restarts."""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service import Settings, create_app
from tests.adapters import make_adapter, pack
from tests.conftest import MODEL_NAME
from tests.gateway import Replica


@pytest.fixture(scope="module")
def replicas(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    logs = tmp_path_factory.mktemp("replicas")
    key = secrets.token_urlsafe()  # LORAG_ENGINE_API_KEY is one key for every replica
    started = [Replica(tiny_model, MODEL_NAME, key).start(logs) for _ in range(2)]
    try:
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        for replica in started:
            replica.stop()


def eventually(check: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


def ready_engines(client: TestClient) -> set[str]:
    return {e["name"] for e in client.get("/readyz").json()["engines"] if e["ready"]}


def test_replicas_follow_activations_drop_strays_and_recover_after_a_kill(replicas, tiny_model, tmp_path):
    v1_dir = make_adapter(tiny_model, tmp_path / "v1", seed=1)
    v2_dir = make_adapter(tiny_model, tmp_path / "v2", seed=2)
    settings = Settings(engine_urls=",".join(r.url for r in replicas), engine_api_key=replicas[0].key,
                        model=tiny_model, model_name=MODEL_NAME, home=tmp_path / "home")
    ask = {"model": "fleet", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

    with TestClient(create_app(settings)) as client:
        assert ready_engines(client) == {"engine-0", "engine-1"}
        up = client.post("/v1/adapters/fleet/versions", params={"activate": "true"}, files={"file": ("a", pack(v1_dir))})
        assert up.status_code == 201, up.text
        v1 = up.json()["version"]["version"]
        assert up.json()["activation"]["engines"] == {"engine-0": True, "engine-1": True}
        assert all(r.adapters() == {f"fleet@{v1}"} for r in replicas)

        v2 = client.post("/v1/adapters/fleet/versions", files={"file": ("a", pack(v2_dir))}).json()["version"]["version"]
        assert all(r.adapters() == {f"fleet@{v1}"} for r in replicas)  # the canary left nothing behind
        assert client.post("/v1/adapters/fleet/activate", json={"version": v2}).status_code == 200
        eventually(lambda: all(r.adapters() == {f"fleet@{v2}"} for r in replicas), what="v1 unloaded everywhere")
        for _ in range(4):  # round-robin: both replicas answer with the new version
            response = client.post("/v1/chat/completions", json=ask)
            assert response.status_code == 200 and response.json()["model"] == f"fleet@{v2}", response.text

        # Drift: an adapter loaded behind the gateway's back is unloaded by the sync loop.
        stray = httpx.post(f"{replicas[0].url}/v1/load_lora_adapter", headers=replicas[0].headers,
                           json={"lora_name": "stray", "lora_path": str(v1_dir)}, timeout=60)
        assert stray.status_code == 200, stray.text
        eventually(lambda: "stray" not in replicas[0].adapters(), what="stray adapter unloaded")

        # A replica killed and restarted gets the active version back before it takes traffic.
        replicas[1].stop(signal.SIGKILL)
        eventually(lambda: ready_engines(client) == {"engine-0"}, what="killed replica marked down")
        for _ in range(3):
            response = client.post("/v1/chat/completions", json=ask)
            assert response.status_code == 200, response.text
        replicas[1].start(tmp_path)
        replicas[1].wait_ready()
        eventually(lambda: "engine-1" in ready_engines(client), timeout=60, what="restarted replica ready")
        assert replicas[1].adapters() == {f"fleet@{v2}"}

    # lorag restarted over fresh replicas: the registry is kept and the active version reloaded.
    for replica in replicas:
        httpx.post(f"{replica.url}/v1/unload_lora_adapter", json={"lora_name": f"fleet@{v2}"}, headers=replica.headers,
                   timeout=60)
        assert replica.adapters() == set()
    with TestClient(create_app(settings)) as client:
        state = client.get("/v1/adapters/fleet").json()
        assert state["active"] == v2 and {v["version"] for v in state["versions"]} == {v1, v2}
        assert ready_engines(client) == {"engine-0", "engine-1"}
        assert all(r.adapters() == {f"fleet@{v2}"} for r in replicas)
        assert client.post("/v1/chat/completions", json=ask).json()["model"] == f"fleet@{v2}"
