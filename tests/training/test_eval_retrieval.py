"""`lorag eval retrieval`: a suite scored through a real lorag's search API (knowledge-only
gateway: real Chroma, the real embedder), in-process and from the command line."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest

from tests.gateway import knowledge_gateway
from tests.service.test_auth import lorag
from training.eval.retrieval import SearchClient, SearchFailed, SuiteError, load_suite, score

DOCS = {
    "tides": "Spring tides happen near new and full moon, when the sun and moon pull in line. "
             "Neap tides come at the quarter moons and have the smallest range.",
    "bread": "Sourdough bread rises with a culture of wild yeast and lactobacilli. "
             "Feed the starter flour and water every day to keep it active.",
    "bees": "A honey bee colony has one queen, thousands of female workers and, in summer, drones. "
            "Workers perform the waggle dance to tell others where flowers are.",
}
SUITE = [
    {"id": "tides", "question": "When are neap tides and how big is their range?", "doc_id": "tides",
     "answer": "have the smallest range", "split": "test"},
    {"id": "bread", "question": "How often should a sourdough starter be fed?", "doc_id": "bread",
     "answer": "every day", "split": "test"},
    {"id": "bees", "question": "How do worker bees tell the hive where flowers are?", "doc_id": "bees",
     "answer": "waggle  dance", "split": "dev"},  # the answer's spacing differs from the text's: still found
    # Its answer is in no document: it counts, as a miss, in every measure.
    {"id": "absent", "question": "What is the boiling point of tungsten?", "doc_id": "metals", "answer": "5555 °C"},
]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    gw = knowledge_gateway(tmp_path_factory.mktemp("eval") / "home").start()
    gw.wait_up()
    assert httpx.post(f"{gw.url}/v1/collections", json={"name": "notes"}).status_code == 201
    lines = "\n".join(json.dumps({"id": doc_id, "text": text}) for doc_id, text in DOCS.items())
    bulk = httpx.post(f"{gw.url}/v1/collections/notes/documents/bulk", content=lines.encode(),
                      headers={"content-type": "application/x-ndjson"}, timeout=120)
    assert bulk.status_code == 200 and bulk.json()["summary"]["created"] == 3, bulk.text
    yield gw
    gw.stop(signal.SIGTERM)


@pytest.fixture
def suite(tmp_path) -> Path:
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in SUITE))
    return path


def test_scores_recall_and_mrr_of_document_and_text_per_mode(service, suite):
    results = score(SearchClient(service.url, "notes"), load_suite(suite), ["dense", "keyword", "hybrid"], [1, 3],
                    progress=False)
    for mode in ("dense", "keyword", "hybrid"):
        # Three documents on three subjects: each answerable question finds its own first.
        assert results[mode]["document"] == {"recall@1": 0.75, "recall@3": 0.75, "mrr": 0.75, "scored": 4}, mode
        assert results[mode]["text"] == {"recall@1": 0.75, "recall@3": 0.75, "mrr": 0.75, "scored": 4}, mode
        assert results[mode]["questions"] == 4
        assert results[mode]["search_ms"]["p50"] > 0


def test_a_passage_must_hold_the_answer_text_not_just_come_from_the_document(service, tmp_path):
    path = tmp_path / "suite.jsonl"
    path.write_text(json.dumps({"question": "How often should a sourdough starter be fed?", "doc_id": "bread",
                                "answer": "every week"}) + "\n")
    results = score(SearchClient(service.url, "notes"), load_suite(path), ["keyword"], [1], progress=False)
    assert results["keyword"]["document"]["recall@1"] == 1.0
    assert results["keyword"]["text"]["recall@1"] == 0.0


def test_the_cli_prints_the_same_scores_and_filters_by_split(service, suite, tmp_path):
    run = lorag(tmp_path, "eval", "retrieval", str(suite), "--url", service.url, "--collection", "notes",
                "--modes", "keyword", "--k", "1", "--split", "test", "--json")
    assert run.returncode == 0, run.stderr
    scores = json.loads(run.stdout)
    assert list(scores) == ["keyword"]
    assert scores["keyword"]["questions"] == 2
    assert scores["keyword"]["text"] == {"recall@1": 1.0, "mrr": 1.0, "scored": 2}
    table = lorag(tmp_path, "eval", "retrieval", str(suite), "--url", service.url, "--collection", "notes")
    assert table.returncode == 0, table.stderr
    assert [line.split()[:2] for line in table.stdout.splitlines()[1:]] == [
        [mode, target] for mode in ("dense", "keyword", "hybrid") for target in ("document", "text")]


def test_a_bad_suite_names_every_bad_line_and_scores_nothing(service, tmp_path):
    path = tmp_path / "suite.jsonl"
    path.write_text('{"question": "no answer named"}\n{"question": "ok", "answer": "x"}\n{broken\n'
                    '{"question": "q", "answer": "x", "score": 1}\n{"id": 2, "question": "q", "answer": ""}\n')
    with pytest.raises(SuiteError) as refused:
        load_suite(path)
    message = str(refused.value)
    assert "4 bad line(s)" in message
    for expected in ("line 1: name the answer", "line 3: not JSON", "line 4: unknown key(s) score",
                     "line 5: 'answer' must be a non-empty string"):
        assert expected in message
    run = lorag(tmp_path, "eval", "retrieval", str(path), "--url", service.url, "--collection", "notes")
    assert run.returncode == 2 and "line 3: not JSON" in run.stderr and not run.stdout


def test_an_unknown_collection_or_mode_is_a_clear_error(service, suite, tmp_path):
    with pytest.raises(SearchFailed, match="404"):
        score(SearchClient(service.url, "nowhere"), load_suite(suite), ["dense"], [1], progress=False)
    run = lorag(tmp_path, "eval", "retrieval", str(suite), "--url", service.url, "--collection", "nowhere")
    assert run.returncode == 1 and "nowhere" in run.stderr, run.stderr
    run = lorag(tmp_path, "eval", "retrieval", str(suite), "--url", service.url, "--collection", "notes",
                "--modes", "dense,fuzzy")
    assert run.returncode == 2 and "unknown mode(s) fuzzy" in run.stderr
    run = lorag(tmp_path, "eval", "retrieval", str(suite), "--url", service.url, "--collection", "notes",
                "--split", "holdout")
    assert run.returncode == 2 and "no question" in run.stderr
