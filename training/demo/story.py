"""The measured story, through the service's HTTP API only (what users get):

    python -m training.demo story --url URL --world DIR --out DIR

1. the held-out suite in every cell (base, base+prompt, base+rag, legal, legal+rag);
2. the general suite on the base and on the adapter (what fine-tuning made it forget);
3. the amendments pushed through the knowledge API, and the amended suite in every cell again,
   with no retraining: retrieval carries the new facts, the adapter keeps the house style.

Written to OUT: story.json (every report with its answers, and each suite's gate failures),
story.md (the tables) and a chart per suite. `lorag demo` runs it; the README's report is
its story.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from training.demo.world import ADAPTER, COLLECTION
from training.eval.chat import Report, chart, evaluate
from training.eval.suite import load_gate, load_suite

CELLS = ("base", "base+prompt", "base+rag", ADAPTER, f"{ADAPTER}+rag")


class StoryFailed(RuntimeError):
    """The service refused a step of the story; the message says which and why."""


def push_documents(url: str, path: Path, collection: str = COLLECTION, api_key: str | None = None) -> dict[str, int]:
    """Create `collection` if it is missing and write the JSON lines of `path` through the bulk API;
    the summary counts created, updated and unchanged documents."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=600) as http:
        created = http.post("/v1/collections", json={"name": collection})
        if created.status_code not in (201, 409):
            raise StoryFailed(f"creating collection {collection}: {created.status_code} {created.text[:300]}")
        written = http.post(f"/v1/collections/{collection}/documents/bulk", content=path.read_bytes(),
                            headers={"Content-Type": "application/x-ndjson"})
        if written.status_code != 200:
            raise StoryFailed(f"writing {path} to {collection}: {written.status_code} {written.text[:300]}")
        result = written.json()
    failed = [r for r in result["results"] if r.get("status") == "failed"]
    if failed:
        raise StoryFailed(f"{len(failed)} document(s) of {path} were refused, the first: {failed[0]}")
    return result["summary"]


def story(url: str, world: Path, out: Path, *, api_key: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the story against a service that serves the `legal` adapter and holds the world's statutes
    (`world`: the folder `training.demo.world.write` filled)."""
    out.mkdir(parents=True, exist_ok=True)

    def run(suite_file: str, run_cells: list[str]) -> tuple[Report, list[str]]:
        path = world / suite_file
        report = evaluate(load_suite(path), url, run_cells, api_key, progress=progress)
        return report, report.gate(load_gate(path))

    before, before_failures = run("suite.yaml", list(CELLS))
    general, general_failures = run("general.yaml", ["base", ADAPTER])
    collection = load_suite(world / "suite-amended.yaml").rag["collection"]
    pushed = push_documents(url, world / "amendments.jsonl", collection, api_key)
    after, after_failures = run("suite-amended.yaml", list(CELLS))

    reports = {"held_out": before, "general": general, "amended": after}
    gates = {"held_out": before_failures, "general": general_failures, "amended": after_failures}
    for name, report in reports.items():
        chart(report, out / f"{name}.png")
    result = {"amendments": pushed, "gates": gates, "reports": {k: r.as_dict() for k, r in reports.items()}}
    (out / "story.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    sections = [f"{reports[k].markdown()}\n\ngate: {'passed' if not gates[k] else 'FAILED: ' + '; '.join(gates[k])}"
                for k in reports]
    (out / "story.md").write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return result
