"""RAFT rows built over a real knowledge API (in-process gateway, real Chroma and embedder)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from knowledge import KnowledgeSettings
from knowledge.documents import DEFAULT_TENANT
from knowledge.prompting import PromptBuilder
from service import Settings, create_app
from service.chat.schemas import ChatCompletionRequest
from service.engine.launcher import free_port
from training.data.doctor import check
from training.data.masking import Renderer
from training.data.raft import RaftBuilder, build, questions

ARTICLES = {
    f"article-{n}": f"Article {n} of the Harbour Code. A mooring clause that {what} is invalid; the fee is {n * 10} crowns."
    for n, what in enumerate(["omits the berth number", "sets no end date", "waives pilotage", "names no tug",
                              "allows night loading", "skips the customs seal", "fixes the fee in gold",
                              "binds a minor"], start=1)
}
QUESTIONS = [
    {"id": f"q{n}", "question": f"Is a mooring clause that {what} valid under Article {n}?",
     "answer": f"Per Article {n}, this clause is invalid.", "doc_id": f"article-{n}"}
    for n, what in [(2, "sets no end date"), (4, "names no tug"), (6, "skips the customs seal"), (8, "binds a minor")]
]


@pytest.fixture(scope="module")
def client(tiny_model: Path, tmp_path_factory):
    home = tmp_path_factory.mktemp("raft-home")
    settings = Settings(home=home, model=tiny_model, engine_urls=f"http://127.0.0.1:{free_port()}", query_encoder="torch")
    knowledge = KnowledgeSettings(home=home, chunk_tokens=64, chunk_overlap=8)
    with TestClient(create_app(settings, knowledge)) as c:
        assert c.post("/v1/collections", json={"name": "statutes"}).status_code == 201
        for doc_id, text in ARTICLES.items():
            assert c.put(f"/v1/collections/statutes/documents/{doc_id}", json={"text": text}).status_code == 201
        yield c


def raft(client, tiny_model: Path, share: float, top_k: int = 3) -> RaftBuilder:
    settings = client.app.state.chat._settings
    prompts = PromptBuilder(AutoTokenizer.from_pretrained(tiny_model), settings.engine_max_model_len,
                            settings.rag_system_template)
    return RaftBuilder(client, "statutes", prompts, top_k=top_k, mode="hybrid", max_tokens=settings.max_tokens,
                       oracle_share=share, seed=0)


def test_a_raft_row_carries_the_system_prompt_chat_sends_for_the_same_retrieval(client, tiny_model: Path):
    builder = raft(client, tiny_model, share=1.0)
    retrieval = client.app.state.chat._retrieval
    settings = client.app.state.chat._settings
    for question in QUESTIONS:
        row = builder.row(question)
        request = ChatCompletionRequest(model="lorag-test", messages=[{"role": "user", "content": question["question"]}],
                                        rag={"collection": "statutes", "top_k": 3, "mode": "hybrid"})
        grounding = client.portal.call(lambda: retrieval.ground(request, settings.max_tokens, tenant=DEFAULT_TENANT))
        assert row["messages"][:2] == grounding.messages  # byte for byte: system prompt and question
        assert [s["chunk_id"] for s in row["provenance"]["sources"]] == [c["chunk_id"] for c in grounding.citations]
        cited = next(s["index"] for s in grounding.citations if s["doc_id"] == question["doc_id"])
        assert row["messages"][2] == {"role": "assistant", "content": f"{question['answer']} [{cited}]"}
        assert row["provenance"]["oracle_included"] is True


def test_distractor_rows_hold_the_retrievers_near_misses_and_pass_the_data_doctor(client, tiny_model: Path,
                                                                                   tmp_path: Path):
    builder = raft(client, tiny_model, share=0.0)
    for question in QUESTIONS:
        row = builder.row(question)
        sources = row["provenance"]["sources"]
        assert len(sources) == 3 and question["doc_id"] not in {s["doc_id"] for s in sources}
        assert row["messages"][2]["content"] == question["answer"]  # nothing to cite
        assert row["provenance"]["oracle_included"] is False
    # A mix, drawn per question from the seed, written as rows the data doctor accepts.
    out = tmp_path / "rows.jsonl"
    counts = build(raft(client, tiny_model, share=0.5), QUESTIONS, out)
    assert counts["rows"] == 4 and 0 < counts["with_oracle"] < 4
    assert build(raft(client, tiny_model, share=0.5), QUESTIONS, tmp_path / "again.jsonl") == counts
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()
    report = check(out, Renderer.load(tiny_model), 2048)
    assert report.errors == [] and report.summary["rows"] == 4


def test_refresh_rebuilds_only_rows_whose_documents_changed(client, tiny_model: Path, tmp_path: Path):
    first = tmp_path / "rows.jsonl"
    build(raft(client, tiny_model, share=1.0), QUESTIONS, first)
    old = {json.loads(line)["provenance"]["question_id"]: json.loads(line) for line in first.read_text().splitlines()}
    touched = "article-8"
    users = {q for q, row in old.items() if touched in {s["doc_id"] for s in row["provenance"]["sources"]}}
    text = ARTICLES[touched].replace("80 crowns", "95 crowns")
    assert client.put(f"/v1/collections/statutes/documents/{touched}", json={"text": text}).json()["version"] == 2
    second = tmp_path / "refreshed.jsonl"
    counts = build(raft(client, tiny_model, share=1.0), QUESTIONS, second, refresh=first)
    assert users and counts["rebuilt"] == len(users) and counts["kept"] == 4 - len(users)
    new = {json.loads(line)["provenance"]["question_id"]: json.loads(line) for line in second.read_text().splitlines()}
    for q in users:
        assert {"doc_id": touched, "version": 2} in [{k: s[k] for k in ("doc_id", "version")}
                                                     for s in new[q]["provenance"]["sources"]]
        assert "95 crowns" in new[q]["messages"][0]["content"]
    for q in set(old) - users:
        assert new[q] == old[q]


def test_bad_questions_are_refused_with_their_lines(tmp_path: Path, tiny_model: Path):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps(QUESTIONS[0]) + "\n{oops\n" + json.dumps({"question": "no answer"}) + "\n")
    with pytest.raises(Exception, match="line 2: not JSON.*line 3: needs"):
        questions(bad)
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "data", "raft", "--url", f"http://127.0.0.1:{free_port()}",
         "--collection", "statutes", "--questions", str(bad), "--out", str(tmp_path / "rows.jsonl"),
         "--model", str(tiny_model)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "line 2: not JSON" in run.stderr
