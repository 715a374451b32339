"""Adapter registry and hot-swap through the session's real gateway and vLLM engine."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from knowledge.fingerprint import fingerprint
from service.engine.launcher import free_port
from tests.adapters import make_adapter, pack
from tests.conftest import MODEL_NAME
from tests.gateway import knowledge_gateway
from tests.sse import sse_payloads
from training.demo.base import build_base

PROMPT = [{"role": "user", "content": "When does the pilotage fee change?"}]


@pytest.fixture(scope="module")
def made(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real peft adapters: two good versions, and one of every kind the registry must refuse."""
    root = tmp_path_factory.mktemp("adapters")
    out = {
        "v1": make_adapter(tiny_model, root / "v1", seed=1),
        "v2": make_adapter(tiny_model, root / "v2", seed=2),
        "noop": make_adapter(tiny_model, root / "noop", nonzero=False),
        "rank16": make_adapter(tiny_model, root / "rank16", rank=16, seed=3),
    }
    other = build_base(tmp_path_factory.mktemp("models") / "other", variant="tiny", seed=1)
    out["other_base"] = make_adapter(other, root / "other_base", seed=4)
    (out["other_base"] / "lorag.json").write_text(json.dumps({"base_fingerprint": fingerprint(other)}))
    out["pickle"] = shutil.copytree(out["v1"], root / "pickle")
    (out["pickle"] / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    out["corrupt"] = shutil.copytree(out["v1"], root / "corrupt")
    weights = out["corrupt"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    out["no_such_module"] = shutil.copytree(out["v1"], root / "no_such_module")
    config = out["no_such_module"] / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "target_modules": ["no_such_proj"]}))
    return out


@pytest.fixture(scope="module", autouse=True)
def clean_registry(gateway):
    """The gateway is shared: leave it with no adapters, as other modules expect."""
    yield
    for adapter in httpx.get(f"{gateway.url}/v1/adapters").json()["data"]:
        assert httpx.delete(f"{gateway.url}/v1/adapters/{adapter['name']}").status_code == 200


def url(gateway, path: str) -> str:
    return f"{gateway.url}{path}"


def upload(gateway, name: str, archive: bytes, **params) -> httpx.Response:
    return httpx.post(url(gateway, f"/v1/adapters/{name}/versions"), params=params,
                      files={"file": ("adapter.tar.gz", archive)}, timeout=120)


def uploaded(gateway, name: str, folder: Path, **params) -> str:
    response = upload(gateway, name, pack(folder), **params)
    assert response.status_code == 201, response.text
    return response.json()["version"]["version"]


def chat(gateway, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": PROMPT, "max_tokens": 6, "temperature": 0, **extra}
    return httpx.post(url(gateway, "/v1/chat/completions"), json=body, timeout=60)


def answer(gateway, model: str, **extra) -> tuple[str, str]:
    response = chat(gateway, model, **extra)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["model"], body["choices"][0]["message"]["content"]


def engine_adapters(gateway) -> set[str]:
    models = httpx.get(f"{gateway.engine_url()}/v1/models", headers=gateway.engine_headers(), timeout=10).json()["data"]
    return {m["id"] for m in models if m.get("parent")}


def error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_upload_activate_route_roll_back_and_delete(gateway, made, tiny_model):
    v1 = uploaded(gateway, "legal", made["v1"])
    assert upload(gateway, "legal", pack(made["v1"], "zip")).json()["status"] == "unchanged"  # same files
    assert error(chat(gateway, "legal"), 409)["code"] == "no_active_version"  # nothing active yet
    assert httpx.post(url(gateway, "/v1/adapters/legal/activate"), json={"version": v1}).status_code == 200

    response = upload(gateway, "legal", pack(made["v2"]), activate="true")
    assert response.status_code == 201, response.text
    v2 = response.json()["activation"]["active"]
    assert v2 == response.json()["version"]["version"] != v1

    base_text = answer(gateway, MODEL_NAME)[1]
    served, text = answer(gateway, "legal")
    assert served == f"legal@{v2}"
    assert (served, text) == answer(gateway, f"legal@{v2}")
    pinned, pinned_text = answer(gateway, f"legal@{v1}")  # a pinned, inactive version still answers
    assert pinned == f"legal@{v1}"
    assert len({base_text, text, pinned_text}) == 3  # base, v1 and v2 really answer differently

    ids = [m["id"] for m in httpx.get(url(gateway, "/v1/models")).json()["data"]]
    assert {"legal", f"legal@{v1}", f"legal@{v2}"} <= set(ids)
    unknown = error(chat(gateway, "legal@000000000000"), 404)
    assert unknown["code"] == "model_not_found" and f"legal@{v2}" in unknown["message"]

    back = httpx.post(url(gateway, "/v1/adapters/legal/rollback"))
    assert back.status_code == 200, back.text
    assert (back.json()["active"], back.json()["previous"]) == (v1, v2)
    assert answer(gateway, "legal") == (f"legal@{v1}", pinned_text)

    assert error(httpx.delete(url(gateway, f"/v1/adapters/legal/versions/{v1}")), 409)["code"] == "version_active"
    assert httpx.delete(url(gateway, f"/v1/adapters/legal/versions/{v2}")).status_code == 200
    assert error(chat(gateway, f"legal@{v2}"), 404)["code"] == "model_not_found"
    state = httpx.get(url(gateway, "/v1/adapters/legal")).json()
    assert state["active"] == v1 and [v["version"] for v in state["versions"]] == [v1]
    assert state["versions"][0]["engines"] == {"engine-0": True}
    assert state["versions"][0]["base_fingerprint"] == fingerprint(tiny_model)  # the base it was checked on
    assert f"legal@{v2}" not in engine_adapters(gateway)

    metrics = httpx.get(url(gateway, "/metrics")).text
    assert f'lorag_chat_requests_total{{adapter="legal",outcome="ok",tenant="default",version="{v1}"}}' in metrics
    assert f'version="{v2}"' not in metrics  # a deleted version's series are gone
    assert 'lorag_adapter_load_seconds_count{adapter="legal",tenant="default"' in metrics


def test_an_adapter_declaring_a_collection_its_tenant_lacks_is_refused_at_upload(gateway, made, tmp_path):
    # Accepted, every chat with it would be a 404 for the collection: refused now, with the name to fix.
    # (Once the collection exists the upload is accepted: test_rag_chat's adapter declares one.)
    folder = shutil.copytree(made["v1"], tmp_path / "archivist")
    (folder / "lorag.json").write_text(json.dumps({"rag": {"collection": "not-made-yet", "top_k": 2}}))
    refused = error(upload(gateway, "archivist", pack(folder)), 422)
    assert refused["code"] == "unknown_collection" and "'not-made-yet'" in refused["message"], refused
    assert error(httpx.get(url(gateway, "/v1/adapters/archivist")), 404)["code"] == "adapter_not_found"
    assert not (gateway.home / "adapters" / "archivist").exists()  # nothing stored
    assert not any("archivist" in name for name in engine_adapters(gateway))  # refused before the canary


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = len(data), kind, link
    return info, data


def test_every_bad_adapter_is_refused_while_good_traffic_flows(gateway, made):
    version = uploaded(gateway, "steady", made["v1"], activate="true")
    config = (made["v1"] / "adapter_config.json").read_bytes()
    bad = {
        "pickle_file": pack(made["pickle"]),
        "corrupt_safetensors": pack(made["corrupt"]),
        "base_mismatch": pack(made["other_base"]),
        "rank_too_high": pack(made["rank16"]),
        "unknown_target_module": pack(made["no_such_module"]),
        "unsafe_path": _tar(_member("../adapter_config.json", config)),
        "link_in_archive": _tar(_member("adapter_config.json", kind=tarfile.SYMTYPE, link="/etc/passwd")),
        "canary_no_change": pack(made["noop"]),
        "not_an_archive": b"this is not an archive",
    }
    before = httpx.get(url(gateway, "/v1/adapters/steady")).json()
    loaded_before = engine_adapters(gateway)

    async def run() -> tuple[dict[str, httpx.Response], list[str]]:
        failures: list[str] = []
        done = asyncio.Event()
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:

            async def traffic() -> None:
                while not done.is_set():
                    body = {"model": "steady", "messages": PROMPT, "max_tokens": 4, "stream": True}
                    response = await client.post("/v1/chat/completions", json=body)
                    text = response.text
                    if response.status_code != 200 or '"error"' in text or not text.endswith("data: [DONE]\n\n"):
                        failures.append(f"{response.status_code}: {text[-300:]}")

            clients = [asyncio.create_task(traffic()) for _ in range(4)]
            answers = {}
            for code, archive in bad.items():
                answers[code] = await client.post("/v1/adapters/bad/versions", files={"file": ("a.tgz", archive)})
            answers["too_large"] = await client.post(
                "/v1/adapters/bad/versions", files={"file": ("a.tgz", b"\0" * 1_100_000)}
            )
            answers["path_outside_root"] = await client.post("/v1/adapters/bad/versions", data={"path": "../../"})
            done.set()
            await asyncio.gather(*clients)
        return answers, failures

    answers, failures = asyncio.run(run())
    assert not failures, failures[:3]
    for code, response in answers.items():
        if code == "too_large":
            assert response.status_code == 413, response.text
        elif code == "path_outside_root":
            assert response.status_code == 400 and "not inside your adapters folder" in response.text
        else:
            assert response.status_code == 422, (code, response.text)
            assert response.json()["error"]["code"] == code, response.text
    assert error(httpx.get(url(gateway, "/v1/adapters/bad")), 404)["code"] == "adapter_not_found"
    assert httpx.get(url(gateway, "/v1/adapters/steady")).json() == before
    assert engine_adapters(gateway) == loaded_before  # no canary or refused upload left anything loaded
    assert answer(gateway, "steady")[0] == f"steady@{version}"


def test_twenty_activations_under_sixteen_streaming_clients_lose_nothing(gateway, made):
    v1 = uploaded(gateway, "swap", made["v1"], activate="true")
    v2 = uploaded(gateway, "swap", made["v2"])
    body = {"messages": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    # Greedy output identifies the version that produced it.
    expected = {}
    for v in (v1, v2):
        expected[f"swap@{v}"] = answer(gateway, f"swap@{v}", max_tokens=body["max_tokens"])[1]
    assert expected[f"swap@{v1}"] != expected[f"swap@{v2}"]

    async def run() -> tuple[list[tuple[str, str]], list[str], list[dict]]:
        served: list[tuple[str, str]] = []
        failures: list[str] = []
        reports: list[dict] = []
        done = asyncio.Event()
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60,
                                     limits=httpx.Limits(max_connections=32)) as client:

            async def stream() -> None:
                while not done.is_set():
                    response = await client.post("/v1/chat/completions", json={**body, "model": "swap"})
                    text = response.text
                    if response.status_code != 200 or '"error"' in text or not text.endswith("data: [DONE]\n\n"):
                        failures.append(f"{response.status_code}: {text[-300:]}")
                        continue
                    chunks = [p for p in sse_payloads(text) if p != "[DONE]"]
                    models = {c["model"] for c in chunks}
                    assert len(models) == 1, models
                    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
                    served.append((models.pop(), content))

            clients = [asyncio.create_task(stream()) for _ in range(16)]
            await asyncio.sleep(1)
            for i in range(20):
                target = v2 if i % 2 == 0 else v1
                response = await client.post("/v1/adapters/swap/activate", json={"version": target})
                assert response.status_code == 200, response.text
                reports.append(response.json())
                await asyncio.sleep(0.3)
            done.set()
            await asyncio.gather(*clients)
        return served, failures, reports

    served, failures, reports = asyncio.run(run())
    assert not failures, failures[:3]
    assert all(r["changed"] for r in reports)
    assert {model for model, _ in served} == set(expected)  # both versions served during the swaps
    wrong = [(model, text) for model, text in served if text != expected[model]]
    assert not wrong, f"{len(wrong)} of {len(served)} answers did not come from their resolved version: {wrong[:3]}"
    assert httpx.get(url(gateway, "/v1/adapters/swap")).json()["active"] == v1


def lorag(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_pushes_lists_activates_rolls_back_and_deletes(gateway, made, tmp_path):
    folder = shutil.copytree(made["v1"], tmp_path / "trained")
    (folder / "README.md").write_text("peft's model card: not part of the upload")
    pushed = lorag("adapters", "--url", gateway.url, "push", str(folder), "--name", "cli", "--activate")
    assert pushed.returncode == 0, pushed.stderr
    v1 = httpx.get(url(gateway, "/v1/adapters/cli")).json()["active"]
    assert pushed.stdout.splitlines() == [f"cli@{v1} created", pushed.stdout.splitlines()[1]]
    assert pushed.stdout.splitlines()[1].startswith(f"cli@{v1} active (was nothing) in ")

    pushed = lorag("adapters", "--url", gateway.url, "push", str(made["v2"]), "--name", "cli")
    assert pushed.returncode == 0, pushed.stderr
    v2 = pushed.stdout.split()[0].split("@")[1]
    listing = lorag("adapters", "--url", gateway.url, "list").stdout
    assert f"* cli@{v1}" in listing and f"  cli@{v2}" in listing

    assert lorag("adapters", "--url", gateway.url, "activate", "cli", v2).returncode == 0
    back = lorag("adapters", "--url", gateway.url, "rollback", "cli")
    assert back.returncode == 0 and back.stdout.startswith(f"cli@{v1} active (was cli@{v2})"), back.stdout
    assert lorag("adapters", "--url", gateway.url, "delete", "cli", v2).returncode == 0

    refused = lorag("adapters", "--url", gateway.url, "push", str(made["noop"]), "--name", "cli")
    assert refused.returncode == 1 and "422 (canary_no_change)" in refused.stderr, refused.stderr
    gone = lorag("adapters", "--url", gateway.url, "activate", "cli", v2)
    assert gone.returncode == 1 and "404 (adapter_not_found)" in gone.stderr, gone.stderr
    unreachable = lorag("adapters", "--url", f"http://127.0.0.1:{free_port()}", "list")
    assert unreachable.returncode == 2 and "cannot reach the service" in unreachable.stderr
    assert [v["version"] for v in httpx.get(url(gateway, "/v1/adapters/cli")).json()["versions"]] == [v1]


def test_malformed_names_paths_and_archives_are_4xx_not_500(gateway, made):
    assert error(upload(gateway, "legal%0A", pack(made["v1"])), 400)["param"] == "name"  # a trailing newline
    assert error(upload(gateway, "Upper", pack(made["v1"])), 400)["param"] == "name"
    nul = httpx.post(url(gateway, "/v1/adapters/odd/versions"), data={"path": "a\x00b"})
    assert error(nul, 400)["param"] == "path"
    long = httpx.post(url(gateway, "/v1/adapters/odd/versions"), data={"path": "x" * 5000})
    assert error(long, 400)["param"] == "path"
    for archive in (_tar(_member(".", b"x")), _tar(_member("a/./", b"x")), b"\x1f\x8b" + b"\0" * 64):
        assert error(upload(gateway, "odd", archive), 422)["code"]
    assert error(httpx.get(url(gateway, "/v1/adapters/odd")), 404)["code"] == "adapter_not_found"


def test_a_client_that_leaves_releases_its_version(gateway, made):
    version = uploaded(gateway, "leaver", made["v1"], activate="true")
    body = {"model": "leaver", "messages": PROMPT, "max_tokens": 512, "ignore_eos": True, "stream": True}

    def in_flight() -> int:
        return httpx.get(url(gateway, "/v1/adapters/leaver")).json()["versions"][0]["in_flight"]

    # The tiny model answers faster than a test can leave, so the engine is frozen first:
    # the request is admitted and waits, holding its version, and the client gives up.
    engine = gateway.engine().pid
    os.killpg(engine, signal.SIGSTOP)
    try:
        with pytest.raises(httpx.ReadTimeout):
            with httpx.stream("POST", url(gateway, "/v1/chat/completions"), json=body, timeout=2) as response:
                response.read()
        assert in_flight() == 1
    finally:
        os.killpg(engine, signal.SIGCONT)
    deadline = time.monotonic() + 15
    while in_flight():  # the engine answers into a closed connection: the relay stops and lets go
        assert time.monotonic() < deadline, "the version is still held after the client left"
        time.sleep(0.1)
    metrics = httpx.get(url(gateway, "/metrics")).text
    leaver = [line for line in metrics.splitlines() if line.startswith("lorag_chat_requests_total") and "leaver" in line]
    assert leaver == [
        f'lorag_chat_requests_total{{adapter="leaver",outcome="cancelled",tenant="default",version="{version}"}} 1.0'
    ]
    assert answer(gateway, "leaver")[0] == f"leaver@{version}"


def test_request_ids_are_echoed_and_carried_by_log_lines(gateway, made):
    response = httpx.post(url(gateway, "/v1/adapters/traced/versions"), files={"file": ("a.tgz", pack(made["v1"]))},
                          headers={"X-Request-ID": "trace-me-42"}, timeout=120)
    assert response.status_code == 201 and response.headers["x-request-id"] == "trace-me-42"
    served = response.json()["version"]["served_name"]
    assert f"[trace-me-42]: adapter {served} registered" in gateway.log_path.read_text()

    made_up = {httpx.get(url(gateway, "/healthz"), headers=h).headers["x-request-id"]
               for h in ({}, {}, {"X-Request-ID": "spaces and\ttabs"}, {"X-Request-ID": "x" * 129})}
    assert len(made_up) == 4 and all(len(i) == 32 for i in made_up)  # new ids, never the caller's junk
    refused = httpx.post(url(gateway, "/v1/chat/completions"), content=b"x" * 70_000,
                         headers={"X-Request-ID": "big-1", "content-type": "application/json"})
    assert refused.status_code == 413 and refused.headers["x-request-id"] == "big-1"


def test_an_upload_in_its_canary_holds_up_no_other_adapters_activation(gateway, made):
    bystander = uploaded(gateway, "bystander", made["v1"], activate="true")
    engine = gateway.engine().pid
    log_start = gateway.log_path.stat().st_size
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # Frozen, the engine keeps the latecomer's canary waiting for as long as this test needs.
        os.killpg(engine, signal.SIGSTOP)
        try:
            latecomer = pool.submit(upload, gateway, "latecomer", pack(made["v2"]))
            deadline = time.monotonic() + 60
            while b"canary of latecomer@" not in gateway.log_path.read_bytes()[log_start:]:
                assert not latecomer.done(), latecomer.result().text
                assert time.monotonic() < deadline, "the upload never reached its canary"
                time.sleep(0.1)
            # Another adapter's activation goes ahead (it needs nothing from the engine: already active).
            activated = httpx.post(url(gateway, "/v1/adapters/bystander/activate"), json={"version": bystander},
                                   timeout=30)
            assert activated.status_code == 200 and activated.json()["changed"] is False, activated.text
            assert not latecomer.done(), "the canary finished on a frozen engine"
        finally:
            os.killpg(engine, signal.SIGCONT)
        assert latecomer.result().status_code == 201, latecomer.result().text
    deadline = time.monotonic() + 60
    while httpx.get(url(gateway, "/readyz")).status_code != 200:  # the engine may have missed a health check
        assert time.monotonic() < deadline
        time.sleep(0.5)


def put_eval(gateway, name: str, version: str, body) -> httpx.Response:
    return httpx.put(url(gateway, f"/v1/adapters/{name}/versions/{version}/eval"), json=body)


def evals(gateway, name: str) -> list[dict]:
    return httpx.get(url(gateway, f"/v1/adapters/{name}")).json()["versions"][0]["evals"]


def test_eval_results_are_stored_by_suite_replaced_and_shown_with_their_version(gateway, made, tmp_path):
    version = uploaded(gateway, "gated", made["v1"])
    report = {"cells": {"gated+rag": {"facts": {"rate": 0.82, "n": 50}}}, "url": "http://x"}
    first = {"suite": "legal house style", "passed": False, "failures": ["gated+rag: facts 0.82 < 0.90"],
             "report": report}
    stored = put_eval(gateway, "gated", version, first)
    assert stored.status_code == 200, stored.text
    assert {k: stored.json()[k] for k in first} == first and stored.json()["stored"] > 0

    again = put_eval(gateway, "gated", version, {**first, "passed": True, "failures": [], "report": {"v": 2}})
    assert again.status_code == 200, again.text  # the same suite: replaced, not added
    assert put_eval(gateway, "gated", version, {"suite": "citations", "passed": True}).status_code == 200
    shown = evals(gateway, "gated")
    assert [(e["suite"], e["passed"], e["failures"], e["report"]) for e in shown] == [
        ("citations", True, [], {}), ("legal house style", True, [], {"v": 2})]
    assert shown[1]["stored"] >= stored.json()["stored"]
    listed = next(a for a in httpx.get(url(gateway, "/v1/adapters")).json()["data"] if a["name"] == "gated")
    # The list keeps each verdict and leaves the full reports to GET /v1/adapters/{name}.
    assert [(e["suite"], e["passed"], e["report"]) for e in listed["versions"][0]["evals"]] == [
        ("citations", True, None), ("legal house style", True, None)]
    listing = lorag("adapters", "--url", gateway.url, "list").stdout
    assert f"gated@{version}" in listing and "evals citations:passed legal house style:passed" in listing

    # Unknown names are 404s; bad bodies 4xx that name the field; none of them changes what is stored.
    assert error(put_eval(gateway, "nobody", version, first), 404)["code"] == "adapter_not_found"
    missing = error(put_eval(gateway, "gated", "000000000000", first), 404)
    assert missing["code"] == "adapter_not_found" and version in missing["message"]
    bad = {
        "passed": {**first, "passed": "yes"},
        "suite": {"passed": True},
        "suite ": {**first, "suite": " padded"},
        "failures": {**first, "failures": ["x"] * 201},
        "failures.0": {**first, "failures": ["x" * 2001]},
        "report": {**first, "report": ["not", "an", "object"]},
        "verdict": {**first, "verdict": "pass"},
    }
    for param, body in bad.items():
        refused = error(put_eval(gateway, "gated", version, body), 400)
        assert refused["param"].startswith(param.strip()), (param, refused)
    nan = httpx.put(url(gateway, f"/v1/adapters/gated/versions/{version}/eval"),
                    content=b'{"suite": "s", "passed": true, "report": {"rate": NaN}}',
                    headers={"content-type": "application/json"})
    assert error(nan, 400)["code"] == "non_finite_number"
    huge = put_eval(gateway, "gated", version, {**first, "report": {"answers": ["x" * 1000] * 70}})
    assert error(huge, 413)["code"] == "body_too_large"  # LORAG_MAX_BODY_BYTES: 64 KiB in the tests
    assert evals(gateway, "gated") == shown

    # Persisted with the version: a new process over the same store shows them (the store is copied,
    # so the session's gateway and its engine keep running), with the adapter's retrieval defaults.
    assert httpx.post(url(gateway, "/v1/collections"), json={"name": "gated-docs"}).status_code in (201, 409)
    assert httpx.put(url(gateway, "/v1/adapters/gated/rag"), json={"collection": "gated-docs"}).status_code == 200
    home = tmp_path / "restarted"
    home.mkdir()
    with sqlite3.connect(gateway.home / "lorag.db") as live, sqlite3.connect(home / "lorag.db") as copy:
        live.backup(copy)
    restarted = knowledge_gateway(home).start()
    try:
        restarted.wait_up()
        after = httpx.get(f"{restarted.url}/v1/adapters/gated").json()
        assert after["versions"][0]["evals"] == shown
        assert after["rag"] == {"collection": "gated-docs", "top_k": None, "mode": None}  # None: LORAG_RAG_*
    finally:
        restarted.stop(signal.SIGTERM)

    # Deleting the version deletes its results: the same files uploaded again start with none.
    assert httpx.delete(url(gateway, f"/v1/adapters/gated/versions/{version}")).status_code == 200
    assert uploaded(gateway, "gated", made["v1"]) == version
    assert evals(gateway, "gated") == []
