"""Schemathesis fuzzes every operation of the gateway's OpenAPI schema: no input may earn a 5xx.

A second pass takes the schema's valid bodies and makes each hostile in one place, the ways
that once crashed the gateway or earned a 500: a lone surrogate, NaN/Infinity/1e400, an
object of thousands of keys, a thousand levels of nesting, a body cut short.

The schema and the requests go over HTTP to a real `lorag serve` (the app's heavy
objects exist only after its lifespan ran). The gateway is this module's own, so
fuzzed DELETEs and uploads cannot disturb the session's shared one.

schemathesis's pytest integration is not used: its fixture-backed schemas
(`schemathesis.pytest.from_fixture`) write `Node._nodeid`, which pytest 9.2 no
longer has, and an eagerly loaded schema would need the server at collection time.
Its strategies (`operation.as_strategy`) under Hypothesis's `@given` do the same work.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from knowledge.database import Database
from service.auth.keys import SCOPES, KeyStore
from tests.adapters import make_adapter, pack
from tests.envelope import envelope_error
from tests.conftest import LIMITS, MODEL_NAME
from tests.gateway import Gateway

# One name for the seeded collection and the seeded adapter: fuzzed `{name}`s hit both.
SEEDED = "fuzzed"
DOC_ID = "harbour"
# Cases per operation and generation mode (positive: valid by the schema; negative: not).
MAX_EXAMPLES = 25

# The bulk endpoint's body is text (JSON lines); schemathesis has no serializer for the type.
schemathesis.serializer.alias("application/x-ndjson", "text/plain")

# Any JSON value, NaN and infinities included (Python's json module reads them).
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
# JSON lines as the bulk endpoint reads them, mixed with lines that are JSON but not documents.
DOCUMENT_LINES = st.lists(
    st.fixed_dictionaries({"id": st.text(max_size=20), "text": st.text(max_size=200)}, optional={"metadata": JSON_VALUES})
    | JSON_VALUES,
    min_size=1,
    max_size=4,
).map(lambda rows: "\n".join(json.dumps(row) for row in rows))
# schemathesis names a file part after its leading bytes: these make it `file.pdf`, so the PDF reader runs.
PDF_LIKE = st.binary(max_size=200).map(lambda tail: b"%PDF-1.4\n" + tail)


@pytest.fixture(scope="module")
def fuzz_gateway(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """A gateway with auth on, one all-scope key, a collection with a document and an active adapter."""
    home = tmp_path_factory.mktemp("fuzz-home")
    store = KeyStore(Database.sqlite(home / "lorag.db"))
    _, token = store.create("fuzz", list(SCOPES))
    store.close()
    # A small output cap: chat cases run the real model, and short answers keep the fuzz fast.
    env = {**LIMITS, "LORAG_MAX_TOKENS": "16", "LORAG_MODEL_NAME": MODEL_NAME, "LORAG_AUTH": "on",
           "LORAG_ENGINE_MAX_MODEL_LEN": "1024"}
    adapter = pack(make_adapter(tiny_model, tmp_path_factory.mktemp("fuzz-adapter") / SEEDED, seed=1))
    gw = Gateway(tiny_model, home, env=env).start()
    try:
        gw.wait_ready()
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=gw.url, headers=headers, timeout=120) as client:
            assert client.post("/v1/collections", json={"name": SEEDED}).status_code == 201
            body = {"text": "Pilotage fees change on 1 March. Harbour dues are paid monthly.",
                    "metadata": {"port": "rotterdam", "year": 2025}}
            assert client.put(f"/v1/collections/{SEEDED}/documents/{DOC_ID}", json=body).status_code == 201
            uploaded = client.post(f"/v1/adapters/{SEEDED}/versions", params={"activate": "true"},
                                   files={"file": ("adapter.tar.gz", adapter)})
            assert uploaded.status_code == 201, uploaded.text
            version = uploaded.json()["version"]["version"]
    except BaseException:
        gw.stop(signal.SIGKILL)
        raise
    yield gw, headers, version
    code, left = gw.stop(signal.SIGTERM)
    assert code in (0, -signal.SIGTERM), gw.log_tail()
    assert not left, f"engine processes left after lorag stopped: {left}"


@pytest.fixture(scope="module")
def api_schema(fuzz_gateway):
    gw, headers, version = fuzz_gateway
    config = schemathesis.Config.from_dict({"headers": headers, "request-timeout": 60})
    schema = schemathesis.openapi.from_url(f"{gw.url}/openapi.json", config=config)
    known = {"name": SEEDED, "doc_id": DOC_ID, "version": version}

    # Names the fuzzer makes up never exist, so every lookup would end in a 404: half the
    # time the seeded ones are used instead, so the handlers behind the lookups run too.
    @schema.hook
    def flatmap_path_parameters(context, path_parameters):
        if not isinstance(path_parameters, dict):
            return st.just(path_parameters)
        return st.fixed_dictionaries({
            key: st.sampled_from([value, known[key]]) if key in known else st.just(value)
            for key, value in path_parameters.items()
        })

    # The same for bodies: chat with models that exist, and bodies the schema cannot describe.
    @schema.hook
    def flatmap_body(context, body):
        path = context.operation.path
        if path == "/v1/chat/completions" and isinstance(body, dict):
            # Served models, within the output limits (a random max_tokens is nearly always over them).
            served = {key: value for key, value in body.items()
                      if key not in ("max_tokens", "max_completion_tokens", "n")}
            if isinstance(body.get("rag"), dict):
                served["rag"] = {**body["rag"], "collection": SEEDED}
            models = (MODEL_NAME, SEEDED, f"{SEEDED}@{version}")
            return st.sampled_from([body, *({**served, "model": model} for model in models)])
        if path.endswith("/documents/bulk"):
            return st.just(body) | DOCUMENT_LINES
        if path.endswith("/files") and isinstance(body, dict):
            return st.just(body) | PDF_LIKE.map(lambda data: {**body, "file": data})
        return st.just(body)

    return schema


def test_no_input_earns_a_server_error(api_schema):
    """Every operation, positive and negative cases: every answer is below 500."""
    server_errors: dict[tuple[str, int], str] = {}
    refused: set[str] = set()  # operations that answered 401/403: the key did not get the case to its handler
    succeeded: set[str] = set()  # operations that answered 2xx at least once
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20
    # Deletes last, deepest first, so the seeded collection and adapter live while the rest runs.
    operations.sort(key=lambda op: (op.method.upper() == "DELETE", -op.path.count("/")))

    # derandomize: the same cases on every run, so CI is reproducible. Failures are
    # collected, not raised, so Hypothesis does not shrink against a slow real server
    # and one run names every operation that fails.
    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(data=st.data())
    def fuzz(operation, mode, data):
        case = data.draw(operation.as_strategy(generation_mode=mode))
        response = case.call(timeout=60)
        if response.status_code in (401, 403):
            refused.add(operation.label)
        if response.status_code < 300:
            succeeded.add(operation.label)
        if response.status_code >= 500:
            server_errors.setdefault((operation.label, response.status_code),
                                     f"{case.as_curl_command()}\n-> {response.text[:500]}")

    for operation in operations:
        fuzz(operation, GenerationMode.POSITIVE)
        try:
            fuzz(operation, GenerationMode.NEGATIVE)
        except Unsatisfiable:
            pass  # nothing in it can be invalid (no body, free-form string parameters): no negative case exists
    assert not server_errors, "\n\n".join(f"{label} answered {status}:\n{repro}"
                                         for (label, status), repro in server_errors.items())
    # A fuzz that never got past auth, or never past the lookups, would pass while testing nothing.
    assert not refused, f"the all-scope key was refused on {sorted(refused)}"
    assert len(succeeded) >= len(operations) // 2, f"only these operations ever succeeded: {sorted(succeeded)}"


# Hostile edits, each made at one node of an otherwise valid body (the whole body included).
HOSTILE = ("surrogate", "non_standard_number", "wide_object", "deep_nesting", "truncated")
HOSTILE_EXAMPLES = 6  # per operation and edit
_MARK = "lorag-hostile-mark"
_RAW = {
    "non_standard_number": st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]),
    "wide_object": st.sampled_from([
        "{" + ",".join(f'"k{i}":{i}' for i in range(12_000)) + "}",  # one object, the 1.0 segfault's size
        "[" + ",".join(f'{{"k{i}":{{"$in":[1,2]}}}}' for i in range(2_000)) + "]",
    ]),
    "deep_nesting": st.sampled_from(["[" * 1000 + "]" * 1000, '{"a":' * 1000 + "0" + "}" * 1000]),
}


def _nodes(value: object, path: tuple = ()):
    """Every node's path in a JSON value: keys and indices from the root, the root first."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _nodes(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _nodes(item, (*path, i))


def _replaced(value: object, path: tuple, new: object) -> object:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(copy[path[0]], path[1:], new)
    return copy


def hostile_text(body: object, kind: str, data: st.DataObject) -> str:
    """`body` as JSON text, with one hostile edit of `kind` at a node drawn from `data`."""
    text = json.dumps(body)
    if kind == "truncated":
        return text[: data.draw(st.integers(0, max(len(text) - 1, 0)))]
    path = data.draw(st.sampled_from(list(_nodes(body))))
    if kind == "surrogate":  # json.dumps writes it as the escape "\ud800", as a hostile client would
        node = body
        for step in path:
            node = node[step]
        return json.dumps(_replaced(body, path, (node if isinstance(node, str) else "") + "\ud800"))
    return json.dumps(_replaced(body, path, _MARK)).replace(json.dumps(_MARK), data.draw(_RAW[kind]), 1)


def test_hostile_bodies_earn_a_4xx_never_a_5xx(fuzz_gateway, api_schema):
    """Every operation with a JSON body (and each bulk line, and the upload's metadata part): a
    valid body made hostile in one place is a 4xx in the envelope, and the gateway stays up."""
    gw, headers, _ = fuzz_gateway
    failures: dict[tuple[str, str], str] = {}
    answered: set[str] = set()
    client = httpx.Client(base_url=gw.url, headers=headers, timeout=120)

    @settings(max_examples=HOSTILE_EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(data=st.data())
    def attack(operation, kind, data):
        case = data.draw(operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
        url = case.formatted_path
        if operation.path.endswith("/documents/bulk"):
            line = data.draw(st.fixed_dictionaries({"id": st.text(min_size=1, max_size=12), "text": st.text(min_size=1)}))
            good = json.dumps({"id": "fine", "text": "A line that is fine."})
            sent = f"{good}\n{hostile_text(line, kind, data)}"
            request = client.build_request("POST", url, params=case.query, content=sent,
                                           headers={"content-type": "application/x-ndjson"})
        elif operation.path.endswith("/files"):
            sent = hostile_text({"source": "fuzz", "year": 2025}, kind, data)
            request = client.build_request("POST", url, params=case.query, files={"file": ("a.txt", b"Some text.")},
                                           data={"metadata": sent})
        else:
            sent = hostile_text(case.body, kind, data)
            request = client.build_request(operation.method.upper(), url, params=case.query, content=sent,
                                           headers={"content-type": "application/json"})
        try:
            response = client.send(request)
        except httpx.TransportError as exc:  # the gateway broke the connection (or died): the worst answer
            failures.setdefault((operation.label, kind), f"{request.method} {request.url} {sent[:300]!r}\n-> {exc!r}")
            return
        answered.add(operation.label)
        if response.status_code >= 500 or (response.status_code >= 400 and not _is_envelope(response)):
            failures.setdefault((operation.label, kind), f"{request.method} {request.url} "
                                f"{sent[:300]!r}\n-> {response.status_code} {response.text[:300]}")

    operations = [result.ok() for result in api_schema.get_all_operations()]
    with_bodies = [op for op in operations if op.body and op.method.upper() != "DELETE"]
    assert len(with_bodies) >= 6, [op.label for op in with_bodies]
    for operation in with_bodies:
        for kind in HOSTILE:
            attack(operation, kind)
    client.close()
    assert not failures, "\n\n".join(f"{label} with {kind}:\n{repro}" for (label, kind), repro in failures.items())
    assert answered == {op.label for op in with_bodies}
    assert httpx.get(f"{gw.url}/healthz").status_code == 200, gw.log_tail()


def _is_envelope(response: httpx.Response) -> bool:
    try:
        envelope_error(response, response.status_code)
    except (AssertionError, ValueError, KeyError, TypeError):
        return False
    return True
