"""The embedded engine's life: crash mid-stream, restart, clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.conftest import MODEL_NAME
from tests.gateway import Gateway
from tests.sse import sse_payloads

LONG_STREAM = {
    "model": MODEL_NAME,
    "messages": [{"role": "user", "content": "Tell me everything about the harbour."}],
    # The longest answer the session gateway allows, so the kill lands mid-stream.
    "max_tokens": 512,
    "ignore_eos": True,
    "stream": True,
}


def test_engine_killed_mid_stream_ends_streams_cleanly_then_recovers(gateway):
    engine = gateway.engine()
    # Sixteen at once keep the engine busy for seconds; a stream that still finished before the
    # kill is fine, as long as the others break cleanly.
    results: list[dict] = [{} for _ in range(16)]
    started = [threading.Event() for _ in results]
    # Clients are built before the threads start: building one takes long enough (TLS setup)
    # that the first stream could finish before the last request is even sent.
    clients = [httpx.Client(timeout=60) for _ in results]

    def stream(result: dict, client: httpx.Client, first_chunk: threading.Event) -> None:
        with client.stream("POST", f"{gateway.url}/v1/chat/completions", json=LONG_STREAM) as response:
            result["status"] = response.status_code
            body = ""
            for text in response.iter_text():
                body += text
                first_chunk.set()
            result["body"] = body

    readers = [threading.Thread(target=stream, args=args) for args in zip(results, clients, started)]
    for reader in readers:
        reader.start()
    assert all(event.wait(30) for event in started), "a stream got no chunk"
    # Freeze the engine at once (the tiny model finishes a stream in about a second),
    # so the kill lands mid-stream whatever the machine's speed; then kill its API server.
    os.killpg(engine.pid, signal.SIGSTOP)
    engine.kill()
    os.killpg(engine.pid, signal.SIGCONT)  # let its workers notice and exit
    killed_at = time.monotonic()
    for reader in readers:
        reader.join(30)
        assert not reader.is_alive(), "a stream hung after the engine died"
    assert time.monotonic() - killed_at < 10
    for client in clients:
        client.close()

    broken = 0
    for result in results:
        if result["status"] == 503:  # reached the engine as it died: refused cleanly
            assert json.loads(result["body"])["error"]["code"] == "engine_unavailable"
            continue
        assert result["status"] == 200
        payloads = sse_payloads(result["body"])  # every frame whole
        assert payloads[-1] == "[DONE]"
        if "error" in payloads[-2]:
            assert payloads[-2]["error"]["code"] == "engine_stream_broken"
            broken += 1
        else:  # finished before the kill
            assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert broken >= 1, "no stream was open when the engine died"

    # Not ready while it is down, then back on its own within 120 s.
    assert httpx.get(f"{gateway.url}/readyz").status_code == 503
    down = httpx.post(f"{gateway.url}/v1/chat/completions", json={**LONG_STREAM, "stream": False, "max_tokens": 2})
    assert down.status_code == 503
    assert down.json()["error"]["code"] == "engine_unavailable"
    recovered_in = gateway.wait_ready(timeout=120)
    assert recovered_in < 120
    assert gateway.engine().pid != engine.pid
    again = httpx.post(f"{gateway.url}/v1/chat/completions", json={**LONG_STREAM, "stream": False, "max_tokens": 2})
    assert again.status_code == 200, again.text


def test_ctrl_c_stops_the_engine_and_its_workers(tiny_model, tmp_path):
    gw = Gateway(tiny_model, tmp_path).start()
    try:
        gw.wait_ready()
        assert gw.engine().children(recursive=True), "vLLM should have its engine-core workers"
    except BaseException:
        gw.stop(signal.SIGKILL)
        raise
    code, left = gw.stop(signal.SIGINT)
    assert code in (0, -signal.SIGINT), gw.log_tail()
    assert "Application shutdown complete" in gw.log_tail()
    assert not left, f"left behind: {left}"


def test_missing_model_directory_fails_fast_with_a_clear_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"],
        env={"LORAG_MODEL": str(tmp_path / "nowhere"), "LORAG_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "is not a model directory" in result.stderr
