"""Tenants see only their own: another tenant's resource answers exactly as a missing one does,
and no answer carries anything of it. A real `lorag serve` with auth on and one key per tenant.

The matrix walks the gateway's OpenAPI paths, so a new route under a family's prefix is checked
as soon as it exists. Each route family is one `Family` row: what tenant A owns (path parameter
→ A's value, plus a name nothing has for the "missing" comparison) and the request each route
needs to get past validation; `setup` in the fixture makes A's resources.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from knowledge.database import Database
from service.auth.keys import SCOPES, KeyStore
from tests.adapters import make_adapter, pack
from tests.conftest import LIMITS, MODEL_NAME
from tests.envelope import envelope_error
from tests.gateway import Gateway

# Tenant A's data; none of these strings may appear in anything tenant B is told.
COLLECTION = "contracts"
SECRET = "SECRET-7f3c: the harbour lease runs until 2031 at 41 000 EUR"
A_DOCS = {
    "lease-2031": {"text": f"{SECRET}. Renewal needs board approval.", "metadata": {"client": "acme-private"}},
    "fees-2030": {"text": "Mooring fees for acme rise by 4 percent in 2030.", "metadata": {"client": "acme-private"}},
}
LEAKS = [SECRET, "board approval", "Mooring fees", "acme-private", *A_DOCS]

# Tenant B's own collection of the same name.
B_TEXT = "Tenant B rents a warehouse by the river."
# What a tenant is given: every scope but the operator's `metrics` (every tenant's series).
TENANT_SCOPES = [scope for scope in SCOPES if scope != "metrics"]


@dataclass(frozen=True)
class Family:
    prefix: str  # every route whose path starts with it is in the family
    owned: dict[str, str]  # path parameter → the value naming A's resource
    missing: dict[str, str]  # path parameter → a value naming nothing of anyone's
    # (method, OpenAPI path) → httpx request arguments (json, content, files, ...)
    requests: dict[tuple[str, str], dict] = field(default_factory=dict)
    # Routes without a parameter naming A's resource (listing, creating): checked on their own.
    unnamed: frozenset[tuple[str, str]] = frozenset()


FAMILIES = {
    "knowledge": Family(
        prefix="/v1/collections",
        owned={"name": COLLECTION, "doc_id": "lease-2031"},
        missing={"name": "nothing-here", "doc_id": "lease-2031"},
        requests={
            ("POST", "/v1/collections/{name}/search"): {"json": {"query": "harbour lease"}},
            ("POST", "/v1/collections/{name}/documents/bulk"): {
                "content": json.dumps({"id": "lease-2031", "text": "B overwrites"}).encode(),
                "headers": {"content-type": "application/x-ndjson"},
            },
            ("POST", "/v1/collections/{name}/files"): {
                "files": {"file": ("lease-2031.txt", b"B overwrites")}, "data": {"doc_id": "lease-2031"},
            },
            ("PUT", "/v1/collections/{name}/documents/{doc_id}"): {"json": {"text": "B overwrites"}},
        },
        unnamed=frozenset({("GET", "/v1/collections"), ("POST", "/v1/collections")}),
    ),
    "adapters": Family(
        prefix="/v1/adapters",
        owned={"name": "legal", "version": "<A's version>"},  # the version is made by the fixture
        missing={"name": "nothing-here", "version": "<A's version>"},
        requests={
            ("POST", "/v1/adapters/{name}/activate"): {"json": {"version": "<A's version>"}},
            # Valid bodies naming B's own collection: only the adapter's tenant can refuse them.
            ("PUT", "/v1/adapters/{name}/rag"): {"json": {"collection": "b-docs"}},
            ("PUT", "/v1/adapters/{name}/versions/{version}/eval"): {"json": {"suite": "B's verdict", "passed": True}},
        },
        # Uploading to a name creates the caller's own adapter of that name (a test below).
        unnamed=frozenset({("GET", "/v1/adapters"), ("POST", "/v1/adapters/{name}/versions")}),
    ),
}


@pytest.fixture(scope="module")
def tenancy_gateway(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """A gateway with auth on, a key with every tenant scope for each of two tenants and the
    operator's metrics key; A's resources made: (gateway, tokens, A's adapter version)."""
    home = tmp_path_factory.mktemp("tenancy-home")
    store = KeyStore(Database.sqlite(home / "lorag.db"))
    tokens = {tenant: store.create(tenant, TENANT_SCOPES)[1] for tenant in ("tenant-a", "tenant-b")}
    tokens["operator"] = store.create("ops", ["metrics"])[1]
    store.close()
    env = {**LIMITS, "LORAG_MODEL_NAME": MODEL_NAME, "LORAG_AUTH": "on", "LORAG_ENGINE_MAX_MODEL_LEN": "1024"}
    gw = Gateway(tiny_model, home, env=env).start()
    try:
        gw.wait_ready()
        with httpx.Client(base_url=gw.url, headers=auth(tokens["tenant-a"]), timeout=120) as a:
            assert a.post("/v1/collections", json={"name": COLLECTION}).status_code == 201
            for doc_id, doc in A_DOCS.items():
                assert a.put(f"/v1/collections/{COLLECTION}/documents/{doc_id}", json=doc).status_code == 201
            archive = pack(make_adapter(tiny_model, home / "a-legal", seed=1))
            pushed = a.post("/v1/adapters/legal/versions", params={"activate": "true"},
                            files={"file": ("legal.tar.gz", archive)})
            assert pushed.status_code == 201, pushed.text
    except BaseException:
        gw.stop(signal.SIGKILL)
        raise
    yield gw, tokens, pushed.json()["version"]["version"]
    code, left = gw.stop(signal.SIGTERM)
    assert code in (0, -signal.SIGTERM), gw.log_tail()
    assert not left, f"engine processes left after lorag stopped: {left}"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def as_a(tenancy_gateway):
    gw, tokens, _ = tenancy_gateway
    with httpx.Client(base_url=gw.url, headers=auth(tokens["tenant-a"]), timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def as_b(tenancy_gateway):
    gw, tokens, _ = tenancy_gateway
    with httpx.Client(base_url=gw.url, headers=auth(tokens["tenant-b"]), timeout=120) as client:
        yield client


def routes(client: httpx.Client, family: Family) -> list[tuple[str, str]]:
    """(method, OpenAPI path) of every operation under the family's prefix."""
    paths = client.get("/openapi.json").json()["paths"]
    return sorted(
        (method.upper(), path)
        for path, operations in paths.items() if path.startswith(family.prefix)
        for method in operations
    )


def fill(path: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        path = path.replace(f"{{{key}}}", value)
    assert "{" not in path, f"no value for a parameter of {path}: add it to the family's `owned` and `missing`"
    return path


def assert_no_leak(response: httpx.Response, where: str, leaks: list[str] = LEAKS) -> None:
    for leak in leaks:
        assert leak not in response.text, f"{where} leaks {leak!r}: {response.text[:300]}"


@pytest.mark.parametrize("family", FAMILIES)
def test_another_tenants_resource_answers_as_a_missing_one(tenancy_gateway, as_a, as_b, family):
    fam = _with_version(FAMILIES[family], tenancy_gateway[2])
    found = routes(as_b, fam)
    named = [(method, path) for method, path in found if (method, path) not in fam.unnamed]
    assert named and set(fam.unnamed) <= set(found), found
    for method, path in named:
        kwargs = fam.requests.get((method, path), {})
        theirs = as_b.request(method, fill(path, fam.owned), **kwargs)
        missing = as_b.request(method, fill(path, fam.missing), **kwargs)
        where = f"{method} {path}"
        assert theirs.status_code in (403, 404), f"{where}: {theirs.status_code} {theirs.text[:300]}"
        assert_no_leak(theirs, where)
        # Indistinguishable: the same answer as for a name nothing has, but for the name itself.
        same = missing.text
        for key, value in fam.missing.items():
            same = same.replace(value, fam.owned[key])
        assert (theirs.status_code, theirs.text) == (missing.status_code, same), where
    # Nothing B sent changed A's data.
    assert as_a.get("/v1/adapters/legal").json()["active"] == tenancy_gateway[2]
    assert as_a.get(f"/v1/collections/{COLLECTION}").json()["documents"] == len(A_DOCS)
    for doc_id, doc in A_DOCS.items():
        got = as_a.get(f"/v1/collections/{COLLECTION}/documents/{doc_id}").json()
        assert (got["text"], got["metadata"], got["version"]) == (doc["text"], doc["metadata"], 1)


def _with_version(family: Family, version: str) -> Family:
    """The family with A's adapter version in place of its placeholder."""
    def put(value):
        if isinstance(value, str):
            return value.replace("<A's version>", version)
        if isinstance(value, dict):
            return {k: put(v) for k, v in value.items()}
        return value

    return Family(family.prefix, put(family.owned), put(family.missing),
                  {route: put(kwargs) for route, kwargs in family.requests.items()}, family.unnamed)


def test_listing_shows_only_the_callers_collections(as_a, as_b):
    listed = as_b.get("/v1/collections")
    assert listed.status_code == 200 and COLLECTION not in [c["name"] for c in listed.json()["data"]]
    assert_no_leak(listed, "GET /v1/collections")
    assert COLLECTION in [c["name"] for c in as_a.get("/v1/collections").json()["data"]]


def test_each_tenant_has_its_own_collection_of_the_same_name(as_a, as_b):
    created = as_b.post("/v1/collections", json={"name": COLLECTION})
    assert created.status_code == 201, created.text
    assert created.json()["documents"] == 0
    docs = f"/v1/collections/{COLLECTION}/documents"
    # The same doc id as one of A's, too: only A's content may not show.
    assert as_b.put(f"{docs}/lease-2031", json={"text": B_TEXT}).json()["version"] == 1
    a_only = [leak for leak in LEAKS if leak != "lease-2031"]
    try:
        for answer in (
            as_b.get(f"/v1/collections/{COLLECTION}"),
            as_b.get(docs),
            as_b.get(f"{docs}/lease-2031"),
            as_b.post(f"/v1/collections/{COLLECTION}/search", json={"query": "harbour lease fees", "top_k": 10}),
        ):
            assert_no_leak(answer, str(answer.request.url), a_only)
        # A document only A has, in B's collection of the same name: missing, as any other.
        theirs, missing = as_b.get(f"{docs}/fees-2030"), as_b.get(f"{docs}/never-was")
        assert (theirs.status_code, theirs.text) == (404, missing.text.replace("never-was", "fees-2030"))
        assert [d["doc_id"] for d in as_b.get(docs).json()["data"]] == ["lease-2031"]
        for mode in ("dense", "keyword", "hybrid"):
            hits = as_b.post(f"/v1/collections/{COLLECTION}/search",
                             json={"query": "lease warehouse harbour", "mode": mode, "top_k": 10}).json()["data"]
            assert [h["text"] for h in hits] == [B_TEXT], mode
    finally:
        assert as_b.delete(f"/v1/collections/{COLLECTION}").status_code == 200
    # A's collection is whole after B wrote to and deleted its own of the same name.
    assert as_a.get(f"/v1/collections/{COLLECTION}").json()["documents"] == len(A_DOCS)
    assert as_a.get(f"{docs}/lease-2031").json()["text"] == A_DOCS["lease-2031"]["text"]
    hits = as_a.post(f"/v1/collections/{COLLECTION}/search", json={"query": "harbour lease", "top_k": 1}).json()["data"]
    assert [h["doc_id"] for h in hits] == ["lease-2031"] and SECRET in hits[0]["text"]


# --- Adapters, models and chat -------------------------------------------------------------------

def chat(client: httpx.Client, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "What does the lease say?"}],
            "max_tokens": 4, **extra}
    return client.post("/v1/chat/completions", json=body)


def test_another_tenants_adapter_and_collection_are_missing_to_chat_and_models(tenancy_gateway, as_a, as_b):
    version = tenancy_gateway[2]
    ids = [m["id"] for m in as_b.get("/v1/models").json()["data"]]
    assert ids == [MODEL_NAME], ids  # the base model only: none of A's adapters
    assert {"legal", f"legal@{version}"} <= {m["id"] for m in as_a.get("/v1/models").json()["data"]}
    for model in ("legal", f"legal@{version}"):
        theirs, missing = chat(as_b, model), chat(as_b, "nothing-here")
        assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "model_not_found", theirs.text
        assert theirs.text == missing.text.replace("nothing-here", model)
    theirs = chat(as_b, MODEL_NAME, rag={"collection": COLLECTION})
    missing = chat(as_b, MODEL_NAME, rag={"collection": "nothing-here"})
    assert theirs.status_code == 404 and theirs.text == missing.text.replace("nothing-here", COLLECTION)
    assert_no_leak(theirs, "chat with A's collection")
    # A's own requests: the answer names the version as A knows it, never the engine-side key.
    for stream in (False, True):
        answer = chat(as_a, "legal", stream=stream)
        assert answer.status_code == 200, answer.text
        assert f'"model":"legal@{version}"' in answer.text.replace(" ", "") and "tenant-a/" not in answer.text


def test_each_tenant_has_its_own_adapter_of_the_same_name(tenancy_gateway, as_a, as_b, tiny_model, tmp_path):
    gw, tokens, a_version = tenancy_gateway
    mine = as_b.post("/v1/adapters/legal/versions", params={"activate": "true"},
                     files={"file": ("b.tar.gz", pack(make_adapter(tiny_model, tmp_path / "b", seed=7)))})
    assert mine.status_code == 201, mine.text
    b_version = mine.json()["version"]["version"]
    assert b_version != a_version
    try:
        # The adapter API names a version as chat takes it, never by the engine-side key.
        pinned = f"legal@{b_version}"
        assert mine.json()["version"]["served_name"] == mine.json()["activation"]["served_name"] == pinned
        assert [a["name"] for a in as_b.get("/v1/adapters").json()["data"]] == ["legal"]
        versions = as_b.get("/v1/adapters/legal").json()["versions"]
        assert [(v["version"], v["served_name"]) for v in versions] == [(b_version, pinned)]
        assert chat(as_b, pinned).json()["model"] == pinned
        assert "tenant-b/" not in as_b.post("/v1/adapters/legal/activate", json={"version": b_version}).text
        assert chat(as_b, "legal").json()["model"] == f"legal@{b_version}"
        assert chat(as_a, "legal").json()["model"] == f"legal@{a_version}"
        # B cannot pin A's version through its own adapter of the same name.
        assert chat(as_b, f"legal@{a_version}").status_code == 404
        # A `path` upload reads from the caller's own folder only, not A's files.
        for path in (f"../@tenant-a/legal/{a_version}", f"/{gw.home}/adapters/@tenant-a/legal/{a_version}",
                     f"@tenant-a/legal/{a_version}"):
            refused = as_b.post("/v1/adapters/stolen/versions", data={"path": path})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "path", refused.text
        assert as_b.get("/v1/adapters/stolen").status_code == 404
        metrics = httpx.get(f"{gw.url}/metrics", headers=auth(tokens["operator"])).text
        for tenant, version in (("tenant-a", a_version), ("tenant-b", b_version)):
            assert f'adapter="legal",outcome="ok",tenant="{tenant}",version="{version}"' in metrics
    finally:
        assert as_b.delete("/v1/adapters/legal").status_code == 200
    assert as_a.get("/v1/adapters/legal").json()["active"] == a_version
    assert chat(as_a, "legal").json()["model"] == f"legal@{a_version}"


def test_metrics_are_the_operators_not_a_tenants(tenancy_gateway, as_b):
    # Every tenant's adapter names, versions and traffic: not for a tenant's key, whatever else it may do.
    gw, tokens, a_version = tenancy_gateway
    assert envelope_error(httpx.get(f"{gw.url}/metrics"), 401)["code"] == "missing_api_key"
    refused = as_b.get("/metrics")
    error = envelope_error(refused, 403)
    assert error["code"] == "missing_scope" and "'metrics'" in error["message"]
    assert_no_leak(refused, "GET /metrics", [a_version, "tenant-a"])
    scraped = httpx.get(f"{gw.url}/metrics", headers=auth(tokens["operator"]))
    assert scraped.status_code == 200 and f'tenant="tenant-a",version="{a_version}"' in scraped.text


def test_an_adapter_may_declare_only_its_own_tenants_collection(tenancy_gateway, as_b, tiny_model, tmp_path):
    folder = make_adapter(tiny_model, tmp_path / "b-clerk", seed=8)

    def declaring(collection: str) -> httpx.Response:
        (folder / "lorag.json").write_text(json.dumps({"rag": {"collection": collection}}))
        return as_b.post("/v1/adapters/clerk/versions", files={"file": ("b.tar.gz", pack(folder))})

    theirs, missing = declaring(COLLECTION), declaring("nothing-here")
    assert envelope_error(theirs, 422)["code"] == "unknown_collection"
    assert theirs.text == missing.text.replace("nothing-here", COLLECTION)  # A's is as missing as none
    assert as_b.get("/v1/adapters/clerk").status_code == 404


def _prefix_cache_hits(gw) -> float:
    """Prompt tokens vLLM found in its prefix cache, so far."""
    metrics = httpx.get(f"{gw.engine_url()}/metrics", headers=gw.engine_headers()).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("vllm:prefix_cache_hits_total"))


def test_tenants_never_share_the_engines_prefix_cache(tenancy_gateway, as_a, as_b):
    # A hit is a timing side channel: B would learn that A's prompts begin this way.
    gw, _, _ = tenancy_gateway
    prompt = "Confidential tender for berth 12: " + " ".join(f"clause {i} binds the bidder" for i in range(24))  # fits the 1,024-token context
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1}
    first = as_a.post("/v1/chat/completions", json=body)
    assert first.status_code == 200, first.text
    before = _prefix_cache_hits(gw)
    assert as_a.post("/v1/chat/completions", json=body).status_code == 200
    after_a = _prefix_cache_hits(gw)
    assert after_a > before  # the same tenant reuses its own cached prefix
    assert as_b.post("/v1/chat/completions", json=body).status_code == 200
    assert _prefix_cache_hits(gw) == after_a  # another tenant's identical prompt finds nothing cached
    refused = as_b.post("/v1/chat/completions", json={**body, "cache_salt": "guess"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "cache_salt"
