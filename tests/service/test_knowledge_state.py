"""A stateful property test of the knowledge API: after any sequence of writes, good and bad,
every write the API acknowledged is stored and searchable, and nothing else is.

Hypothesis drives the real app (real Chroma, the real embedder) through puts, bulk uploads,
file uploads and deletes, each sometimes made hostile (a lone surrogate, NaN, deep or wide
metadata, a reserved key, NUL bytes in a file). A model of what was acknowledged is kept from
the answers alone; after every step the API must agree with it: the listing, each document's
text, and keyword search for a word that only one written text ever held.
"""

from __future__ import annotations

import itertools
import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from knowledge import KnowledgeSettings
from service import Settings, create_app
from service.engine.launcher import free_port

DOC_IDS = st.sampled_from(["pier", "quay", "dock", "slip"])
# Each text carries a made-up word no other text has, so a keyword search for it has one answer.
WORDS = st.text("bcdfghjklmnpqrstvwxz", min_size=10, max_size=10).map(lambda w: "zq" + w)
HOSTILE_METADATA = {  # raw JSON for the metadata value; None: a plain, valid object
    None: '{"berth": 4}',
    "surrogate": '{"berth": "\\ud800"}',
    "nan": '{"berth": NaN}',
    "deep": "[" * 1000 + "]" * 1000,
    "wide": "{" + ",".join(f'"k{i}": {i}' for i in range(5000)) + "}",
    "reserved": '{"_version": 1}',
}
KINDS = st.sampled_from(list(HOSTILE_METADATA))


def document(word: str, kind: str | None) -> str:
    return '{"text": %s, "metadata": %s}' % (json.dumps(f"Tide table {word} for the harbour."), HOSTILE_METADATA[kind])


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    home = tmp_path_factory.mktemp("state-home")
    app_settings = Settings(home=home, engine_urls=f"http://127.0.0.1:{free_port()}", max_body_bytes=200_000)
    with TestClient(create_app(app_settings, KnowledgeSettings(home=home))) as c:
        yield c


def test_acknowledged_writes_are_exactly_what_is_stored_and_found(client):
    runs = itertools.count()  # one fresh collection per run (shrinking a failure makes many)

    class KnowledgeApi(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.base = f"/v1/collections/state-{next(runs)}"
            assert client.post("/v1/collections", json={"name": self.base.rsplit("/", 1)[1]}).status_code == 201
            self.stored: dict[str, str] = {}  # doc id → the word of its acknowledged text
            self.never: set[str] = set()  # words of texts refused, replaced or deleted

        def _written(self, doc_id: str, word: str) -> None:
            if doc_id in self.stored and self.stored[doc_id] != word:
                self.never.add(self.stored[doc_id])
            self.stored[doc_id] = word

        @rule(doc_id=DOC_IDS, word=WORDS, kind=KINDS)
        def put(self, doc_id, word, kind):
            response = client.put(f"{self.base}/documents/{doc_id}", content=document(word, kind),
                                  headers={"content-type": "application/json"})
            assert response.status_code < 500, response.text
            if response.status_code in (200, 201):
                self._written(doc_id, word)
            else:
                assert kind is not None and response.status_code in (400, 413, 422), response.text
                self.never.add(word)

        @rule(lines=st.lists(st.tuples(DOC_IDS, WORDS, KINDS), min_size=1, max_size=4))
        def bulk(self, lines):
            body = "\n".join(document(w, k)[:-1] + ', "id": %s}' % json.dumps(d) for d, w, k in lines)
            response = client.post(f"{self.base}/documents/bulk", content=body,
                                   headers={"content-type": "application/x-ndjson"})
            assert response.status_code == 200, response.text
            results = response.json()["results"]
            assert [r["line"] for r in results] == list(range(1, len(lines) + 1))
            for (doc_id, word, kind), result in zip(lines, results):
                if result["status"] == "failed":
                    assert kind is not None, result
                    self.never.add(word)
                else:
                    assert result["doc_id"] == doc_id
                    self._written(doc_id, word)

        @rule(doc_id=DOC_IDS, word=WORDS, nul=st.booleans())
        def upload(self, doc_id, word, nul):
            text = f"Harbour notice {word}." + ("\x00" if nul else "")
            response = client.post(f"{self.base}/files", data={"doc_id": doc_id},
                                   files={"file": ("notice.txt", text.encode())})
            if nul:
                assert response.status_code == 422, response.text
                self.never.add(word)
            else:
                assert response.status_code in (200, 201), response.text
                self._written(doc_id, word)

        @rule(doc_id=DOC_IDS)
        def delete(self, doc_id):
            response = client.delete(f"{self.base}/documents/{doc_id}")
            if doc_id in self.stored:
                assert response.status_code == 200, response.text
                self.never.add(self.stored.pop(doc_id))
            else:
                assert response.status_code == 404, response.text

        @invariant()
        def api_agrees_with_what_was_acknowledged(self):
            listed = client.get(f"{self.base}/documents", params={"limit": 100}).json()["data"]
            assert {d["doc_id"] for d in listed} == set(self.stored)
            for doc_id, word in self.stored.items():
                assert word in client.get(f"{self.base}/documents/{doc_id}").json()["text"]
                hits = client.post(f"{self.base}/search", json={"query": word, "mode": "keyword", "top_k": 8}).json()["data"]
                assert [h["doc_id"] for h in hits if word in h["text"]] == [doc_id], (word, hits)
            for word in self.never - set(self.stored.values()):
                hits = client.post(f"{self.base}/search", json={"query": word, "mode": "keyword", "top_k": 8}).json()["data"]
                assert not [h for h in hits if word in h["text"]], (word, hits)

        def teardown(self):
            client.delete(self.base)

    # derandomize: the same sequences on every run, so CI is reproducible.
    KnowledgeApi.TestCase.settings = settings(max_examples=12, stateful_step_count=10, derandomize=True,
                                              database=None, deadline=None, suppress_health_check=list(HealthCheck))
    KnowledgeApi.TestCase().runTest()
