"""Fair share: one tenant cannot take the whole engine. A real `lorag serve` with auth on, small
per-tenant limits, and keys for several tenants: a and b (their keys lift the token budget, so
only the in-flight limit binds), c and d (the settings' limits), e (a key with limits of its own,
made with the CLI)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from knowledge.database import Database
from service.auth.keys import ApiKey, KeyRefused, KeyStore
from service.chat.fair_share import FairShare
from service.errors import TenantLimited
from service.metrics import Metrics
from service.settings import Settings
from tests.conftest import LIMITS, MODEL_NAME
from tests.envelope import envelope_error
from tests.gateway import Gateway
from tests.metrics import sample
from tests.service.test_auth import lorag
from tests.sse import sse_payloads

MAX_INFLIGHT = 2
BUDGET = 100  # tokens per minute: a few short requests' worth
ASK = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "When does the pilotage fee change?"}]}
SHORT = {**ASK, "max_tokens": 8, "ignore_eos": True}
# The tiny model's weights are random: ignore_eos makes the output length exact.
LONG = {**ASK, "max_tokens": 500, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def fair_gateway(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """(gateway, tenant → token)."""
    home = tmp_path_factory.mktemp("fair-share-home")
    store = KeyStore(Database.sqlite(home / "lorag.db"))
    tokens = {t: store.create(t, ["chat"], tokens_per_minute=0)[1] for t in ("tenant-a", "tenant-b")}
    tokens |= {t: store.create(t, ["chat"])[1] for t in ("tenant-c", "tenant-d")}
    store.close()
    created = lorag(home, "keys", "create", "--tenant", "tenant-e", "--scopes", "chat",
                    "--max-inflight", "1", "--tokens-per-minute", "0")
    assert created.returncode == 0, created.stderr
    tokens["tenant-e"] = created.stdout.splitlines()[-1]
    env = {**LIMITS, "LORAG_MODEL_NAME": MODEL_NAME, "LORAG_AUTH": "on", "LORAG_ENGINE_MAX_MODEL_LEN": "1024",
           "LORAG_TENANT_MAX_INFLIGHT": str(MAX_INFLIGHT), "LORAG_TENANT_TOKENS_PER_MINUTE": str(BUDGET),
           # The counts are read from /metrics with the tenants' chat keys (test_tenancy checks the metrics key).
           "LORAG_METRICS_AUTH": "open"}
    gw = Gateway(tiny_model, home, env=env).start()
    try:
        gw.wait_ready()
    except BaseException:
        gw.stop(signal.SIGKILL)
        raise
    yield gw, tokens
    code, left = gw.stop(signal.SIGTERM)
    assert code in (0, -signal.SIGTERM), gw.log_tail()
    assert not left, f"engine processes left after lorag stopped: {left}"


@pytest.fixture(scope="module")
def clients(fair_gateway):
    gw, tokens = fair_gateway
    with ExitStack() as stack:
        yield {tenant: stack.enter_context(httpx.Client(base_url=gw.url, timeout=120, headers=auth(token)))
               for tenant, token in tokens.items()}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextmanager
def frozen(gw: Gateway) -> Iterator[None]:
    """The engine stopped: requests admitted meanwhile stay in flight until the block ends."""
    engine = gw.engine().pid
    os.killpg(engine, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(engine, signal.SIGCONT)


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    return sample((await client.get("/metrics")).text, name, missing=0.0, **labels)


async def until_in_flight(client: httpx.AsyncClient, tenant: str, count: int) -> None:
    """Until the tenant has `count` requests in flight; fails if it never does (for 0: a leak)."""
    deadline = time.monotonic() + 60
    while (now := await metric(client, "lorag_tenant_in_flight", tenant=tenant)) != count:
        assert time.monotonic() < deadline, f"{tenant} has {now} requests in flight, never {count}"
        await asyncio.sleep(0.1)


def tokens_used(response: httpx.Response) -> int:
    """Prompt plus completion tokens of an answer, streamed (with its usage chunk) or not."""
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("text/event-stream"):
        usage = next(p["usage"] for p in sse_payloads(response.text) if isinstance(p, dict) and p.get("usage"))
    else:
        usage = response.json()["usage"]
    return usage["prompt_tokens"] + usage["completion_tokens"]


def test_a_tenant_at_its_in_flight_limit_gets_429_while_another_is_admitted(fair_gateway):
    gw, tokens = fair_gateway
    chat = "/v1/chat/completions"

    async def run() -> httpx.Response:
        async with (httpx.AsyncClient(base_url=gw.url, timeout=120, headers=auth(tokens["tenant-a"])) as a,
                    httpx.AsyncClient(base_url=gw.url, timeout=120, headers=auth(tokens["tenant-b"])) as b):
            cancelled = await metric(a, "lorag_chat_requests_total", tenant="tenant-a", outcome="cancelled")
            with frozen(gw):
                held = [asyncio.create_task(a.post(chat, json=LONG)) for _ in range(MAX_INFLIGHT)]
                await until_in_flight(a, "tenant-a", MAX_INFLIGHT)
                refused = await a.post(chat, json=SHORT)
                served = asyncio.create_task(b.post(chat, json=SHORT))
                await until_in_flight(b, "tenant-b", 1)  # admitted while A holds its whole share
                for request in held:  # A's client leaves before the engine has answered
                    request.cancel()
                await asyncio.gather(*held, return_exceptions=True)
            assert (await served).status_code == 200
            await until_in_flight(a, "tenant-a", 0)  # their places came back
            # A's client leaves mid-stream: that place comes back too.
            async with a.stream("POST", chat, json=LONG) as response:
                assert response.status_code == 200
                await anext(response.aiter_bytes())  # generating; then the client goes away
            await until_in_flight(a, "tenant-a", 0)
            after = await metric(a, "lorag_chat_requests_total", tenant="tenant-a", outcome="cancelled")
            assert after == cancelled + MAX_INFLIGHT + 1
            again = await asyncio.gather(*(a.post(chat, json=SHORT) for _ in range(MAX_INFLIGHT)))
            assert [r.status_code for r in again] == [200] * MAX_INFLIGHT  # A's whole share again
            assert await metric(a, "lorag_tenant_refused_total", tenant="tenant-a", reason="inflight") == 1
            return refused

    refused = asyncio.run(run())
    gw.wait_ready(timeout=60)
    error = envelope_error(refused, 429)
    assert (error["type"], error["code"]) == ("rate_limit_error", "tenant_inflight_limit")
    assert refused.headers["retry-after"] == "1"
    assert f"'tenant-a' has {MAX_INFLIGHT} chat requests in flight" in error["message"]
    assert f"({MAX_INFLIGHT}, LORAG_TENANT_MAX_INFLIGHT)" in error["message"]


def test_a_tenant_that_used_its_tokens_gets_429_with_retry_after_while_another_is_served(fair_gateway, clients):
    gw, _ = fair_gateway
    c, d = clients["tenant-c"], clients["tenant-d"]
    spent, answered = 0, 0
    while spent < BUDGET:  # admitted while under the budget; streams are charged too
        body = SHORT if answered % 2 == 0 else {**SHORT, "stream": True, "stream_options": {"include_usage": True}}
        spent += tokens_used(c.post("/v1/chat/completions", json=body))
        answered += 1
    assert answered >= 2, f"one request used {spent} tokens: the test's budget of {BUDGET} is too small"
    refused = c.post("/v1/chat/completions", json=SHORT)
    error = envelope_error(refused, 429)
    assert (error["type"], error["code"]) == ("rate_limit_error", "tenant_token_limit")
    assert f"used {spent} tokens in the last 60 s, its limit of {BUDGET} per minute" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert f"retry in {refused.headers['retry-after']} s" in error["message"]
    assert c.post("/v1/chat/completions", json={**SHORT, "stream": True}).status_code == 429
    assert tokens_used(d.post("/v1/chat/completions", json=SHORT)) > 0  # d's minute is its own
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert sample(metrics, "lorag_tenant_refused_total", tenant="tenant-c", reason="tokens") == 2
    assert sample(metrics, "lorag_tenant_refused_total", tenant="tenant-d", reason="tokens", missing=0.0) == 0


def test_a_keys_own_limits_replace_the_settings(fair_gateway, clients):
    gw, tokens = fair_gateway
    e = clients["tenant-e"]
    assert "max_inflight=1 tokens_per_minute=0" in lorag(gw.home, "keys", "list").stdout
    spent = 0
    while spent < BUDGET:
        spent += tokens_used(e.post("/v1/chat/completions", json=SHORT))
    assert tokens_used(e.post("/v1/chat/completions", json=SHORT)) > 0  # past the setting's budget: none for this key

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=120, headers=auth(tokens["tenant-e"])) as client:
            with frozen(gw):
                held = asyncio.create_task(client.post("/v1/chat/completions", json=SHORT))
                await until_in_flight(client, "tenant-e", 1)  # this key's whole share (the setting's is 2)
                refused = await client.post("/v1/chat/completions", json=SHORT)
            return refused, await held

    refused, held = asyncio.run(run())
    gw.wait_ready(timeout=60)
    assert held.status_code == 200
    error = envelope_error(refused, 429)
    assert error["code"] == "tenant_inflight_limit" and "(1, this API key's max_inflight)" in error["message"]


def test_the_token_window_frees_what_is_a_minute_old():
    now = [1000.0]
    share = FairShare(Settings(tenant_tokens_per_minute=100), Metrics(), clock=lambda: now[0])
    share.take("a", None).release(60)
    now[0] += 20
    share.take("a", None).release(50)  # admitted at 60 of 100; now 110
    now[0] += 10
    with pytest.raises(TenantLimited) as refused:
        share.take("a", None)
    assert (refused.value.code, refused.value.retry_after) == ("tenant_token_limit", 30)  # the 60 age out at 1060
    share.take("b", None).release(0)  # another tenant's minute is its own
    now[0] += 30
    slot = share.take("a", None)  # 50 of 100 left in the window
    slot.release(0)
    slot.release(0)  # a second release gives nothing back twice
    share.take("a", None)


def test_keys_from_before_fair_share_still_work_and_new_keys_carry_limits(tmp_path):
    db = tmp_path / "lorag.db"
    secret = "s" * 43
    old = sqlite3.connect(db)  # the table, and a key, as the release before fair share made them
    old.execute("CREATE TABLE api_keys (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, scopes TEXT NOT NULL, "
                "secret_sha256 TEXT NOT NULL, created REAL NOT NULL, revoked REAL)")
    old.execute("INSERT INTO api_keys VALUES ('0123456789abcdef', 'acme', '[\"chat\"]', ?, 1.0, NULL)",
                (hashlib.sha256(secret.encode()).hexdigest(),))
    old.commit()
    old.close()
    store = KeyStore(Database.sqlite(db))
    old_key = ApiKey("0123456789abcdef", "acme", ("chat",), 1.0)  # no limits of its own: the settings'
    assert store.verify(f"lorag_0123456789abcdef_{secret}") == old_key
    new_key, new_token = store.create("acme", ["chat"], max_inflight=3, tokens_per_minute=0)
    store.close()
    store = KeyStore(Database.sqlite(db))  # opening again adds nothing twice
    assert store.verify(new_token) == new_key and (new_key.max_inflight, new_key.tokens_per_minute) == (3, 0)
    assert store.keys() == [old_key, new_key]
    with pytest.raises(KeyRefused, match="max_inflight must be 0"):
        store.create("acme", ["chat"], max_inflight=-1)
    store.close()
