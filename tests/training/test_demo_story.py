"""The story's machinery on the session's real gateway (tiny model, real Chroma and embedder): a
small world's statutes pushed through the bulk API, a `legal` adapter serving with them as its
retrieval default, then `python -m training.demo story`. The tiny model answers noise, so its
gates fail; what is checked is that every suite ran in every cell, that the amendments reached
the knowledge base as new versions between the runs, and that the report says which gates failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx

from tests.adapters import make_adapter, pack
from training.demo.story import CELLS, push_documents
from training.demo.world import ADAPTER, general, world, write

COLLECTION = "story-statutes"


def test_the_story_runs_every_suite_in_every_cell_and_pushes_the_amendments_between(gateway, tiny_model, tmp_path):
    w = world(11, articles=20, held_out=4)
    files = write(w, tmp_path / "world", COLLECTION)
    pushed = push_documents(gateway.url, files["statutes.jsonl"], COLLECTION)
    assert pushed["created"] == 20
    assert push_documents(gateway.url, files["statutes.jsonl"], COLLECTION)["unchanged"] == 20  # idempotent
    adapters = f"{gateway.url}/v1/adapters/{ADAPTER}"
    folder = make_adapter(tiny_model, tmp_path / "legal", seed=3)
    upload = httpx.post(f"{adapters}/versions", files={"file": ("legal.tgz", pack(folder))}, timeout=120)
    assert upload.status_code == 201, upload.text
    version = upload.json()["version"]["version"]
    activated = httpx.post(f"{adapters}/activate", json={"version": version, "rag": {"collection": COLLECTION}},
                           timeout=120)
    assert activated.status_code == 200, activated.text
    try:
        run = subprocess.run([sys.executable, "-m", "training.demo", "story", "--url", gateway.url,
                              "--world", str(files["suite.yaml"].parent), "--out", str(tmp_path / "out")],
                             capture_output=True, text=True, timeout=900)
        # Noise fails the house-style gate, and the command says so.
        assert run.returncode == 1, run.stderr[-3000:]
        assert "the held_out gate failed" in run.stderr and "legal+rag format" in run.stderr
        assert run.stdout.startswith("## legal-demo\n")

        story = json.loads((tmp_path / "out" / "story.json").read_text())
        reports = story["reports"]
        assert list(reports["held_out"]["cells"]) == list(CELLS)
        assert [len(a) for a in reports["held_out"]["answers"].values()] == [4 * 3] * len(CELLS)
        assert list(reports["general"]["cells"]) == ["base", ADAPTER]
        assert len(reports["general"]["answers"]["base"]) == len(general(11))
        assert [len(a) for a in reports["amended"]["answers"].values()] == [2 * 2] * len(CELLS)
        assert story["amendments"]["updated"] == 2
        assert story["gates"]["held_out"] and all(isinstance(f, str) for f in story["gates"]["held_out"])
        # Retrieval cells cited the world's statutes; the plain cells searched nothing.
        held = reports["held_out"]["answers"]
        assert all(a["citations"] for a in held["legal+rag"]) and not any(a["citations"] for a in held["legal"])
        for png in ("held_out.png", "general.png", "amended.png"):
            assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"

        # The amended articles now answer from their new text: version 2, with the new fine.
        for article in w.amended:
            doc = httpx.get(f"{gateway.url}/v1/collections/{COLLECTION}/documents/{article.doc_id}").json()
            assert doc["version"] == 2 and f"{article.fine:,} crowns" in doc["text"]
    finally:
        httpx.delete(adapters, timeout=60)
        httpx.delete(f"{gateway.url}/v1/collections/{COLLECTION}", timeout=60)


def test_demo_run_pushes_the_statutes_trains_the_adapter_on_raft_rows_and_gates_it(gateway, tiny_model, tmp_path):
    home, collection = tmp_path / "home", "run-statutes"
    env = {**os.environ, "LORAG_HOME": str(home), "LORAG_MODEL": str(tiny_model)}
    command = [sys.executable, "-m", "service.cli", "demo", "run", "--attach", "--url", gateway.url, "--seed", "5",
               "--articles", "16", "--held-out", "4", "--collection", collection, "epochs=1", "learning_rate=0.02"]
    try:
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        # The tiny model's noise fails the house-style gate: the adapter stays inactive, and it says so.
        assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-3000:]
        said = [line.split(":")[1].strip() for line in run.stdout.splitlines() if line.startswith("lorag demo:")]
        assert said[:4] == ["world 5 written to " + str(home / "demo" / "world-5"), "statutes", "raft", "adapter"]
        assert "did not pass its gate" in run.stdout and "failed the gate" in run.stderr
        work = home / "demo" / "world-5"
        rows = [json.loads(line) for line in (work / "raft-rows.jsonl").read_text().splitlines()]
        assert len(rows) == 12 * 3 * 2  # every train article's questions, in two wordings
        assert all(r["provenance"]["collection"] == collection for r in rows)
        assert len((work / "train.jsonl").read_text().splitlines()) == len(rows) + len(general(5))
        legal = httpx.get(f"{gateway.url}/v1/adapters/{ADAPTER}").json()
        assert legal["active"] is None
        [version] = legal["versions"]
        assert [(e["suite"], e["passed"]) for e in version["evals"]] == [("legal-demo", False)]
        documents = httpx.get(f"{gateway.url}/v1/collections/{collection}").json()
        assert documents["documents"] == 16, documents
    finally:
        httpx.delete(f"{gateway.url}/v1/adapters/{ADAPTER}", timeout=60)
        httpx.delete(f"{gateway.url}/v1/collections/{collection}", timeout=60)
