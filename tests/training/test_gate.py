"""The gate before activation, through the session's real gateway: `lorag adapters push --gate`
and `lorag train --push --gate` evaluate the new version pinned, store the verdict with it, and
activate only a version that passed, while the active one keeps serving.

The tiny model's answers are noise, so the gates judge checks whose outcome does not depend on
what it says (see test_eval_chat.py): format 1.0 and facts 0.5 in every cell.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.adapters import make_adapter
from tests.service.test_auth import lorag
from tests.training.test_eval_chat import COLLECTION, SUITE, write
from tests.training.test_recipe import CONFIG, rows

NAME = "gated"


def suite(tmp_path: Path, gate: dict, name: str = "gated-suite") -> Path:
    return write(tmp_path / f"{name}.yaml", {**SUITE, "name": name, "gate": gate})


PASSING = {NAME: {"format": 1.0}, f"{NAME}+rag": {"facts": {"within": 0.0, "of": "base+rag"}}}
FAILING = {NAME: {"format": 1.0, "facts": {"min": 0.9}}}


@pytest.fixture
def adapter(gateway, tmp_path):
    assert httpx.post(f"{gateway.url}/v1/collections", json={"name": COLLECTION}).status_code in (201, 409)
    yield f"{gateway.url}/v1/adapters/{NAME}"
    httpx.delete(f"{gateway.url}/v1/adapters/{NAME}", timeout=60)


def shown(url: str) -> dict:
    return httpx.get(url, timeout=30).json()


def test_push_with_a_gate_activates_only_a_version_that_passes_and_stores_each_verdict(
        gateway, tiny_model, adapter, tmp_path):
    def push(seed: int, *options: str) -> subprocess.CompletedProcess:
        folder = make_adapter(tiny_model, tmp_path / f"v{seed}", seed=seed)
        return lorag(tmp_path, "adapters", "--url", gateway.url, "push", str(folder), "--name", NAME, *options)

    first = push(1, "--activate")
    assert first.returncode == 0, first.stderr
    v1 = shown(adapter)["active"]

    failed = push(2, "--activate", "--gate", str(suite(tmp_path, FAILING)))
    assert failed.returncode == 1, failed.stderr
    assert "failed the gate" in failed.stderr and "the active version keeps serving" in failed.stderr
    assert f"{NAME} facts: 0.500 is below the minimum 0.9 (n=2)" in failed.stderr
    assert "| gated |" in failed.stdout  # the scores table
    after = shown(adapter)
    assert after["active"] == v1 and len(after["versions"]) == 2
    v2 = next(v for v in after["versions"] if v["version"] != v1)
    [verdict] = v2["evals"]
    assert (verdict["suite"], verdict["passed"]) == ("gated-suite", False)
    assert verdict["failures"] == [f"{NAME} facts: 0.500 is below the minimum 0.9 (n=2)"]
    # Judged pinned: the new version answered, not the active one that `gated` names.
    assert verdict["report"]["models"][NAME] == f"{NAME}@{v2['version']}"
    assert "answers" not in verdict["report"] and verdict["report"]["cells"][NAME]["facts"]["mean"] == 0.5
    listed = lorag(tmp_path, "adapters", "--url", gateway.url, "list")
    assert "evals gated-suite:FAILED" in listed.stdout

    passed = push(3, "--activate", "--gate", str(suite(tmp_path, PASSING)), "--rag-collection", COLLECTION)
    assert passed.returncode == 0, passed.stderr
    assert "passed the gate" in passed.stdout and "is active" in passed.stdout
    after = shown(adapter)
    v3 = next(v for v in after["versions"] if v["version"] not in (v1, v2["version"]))
    assert after["active"] == v3["version"] and after["rag"]["collection"] == COLLECTION
    assert [(e["suite"], e["passed"], e["failures"]) for e in v3["evals"]] == [("gated-suite", True, [])]
    report = v3["evals"][0]["report"]
    assert set(report["models"]) == {NAME, f"{NAME}+rag", "base+rag"}  # the gate's cells and its `of`

    # Without --activate a passing version is judged and stored, and stays inactive.
    judged = push(4, "--gate", str(suite(tmp_path, PASSING)))
    assert judged.returncode == 0 and "not activated" in judged.stdout, judged.stderr
    assert shown(adapter)["active"] == v3["version"]


def test_a_gate_that_cannot_judge_the_adapter_is_refused_before_anything_is_uploaded(
        gateway, tiny_model, adapter, tmp_path):
    folder = make_adapter(tiny_model, tmp_path / "v", seed=7)
    for gate, complaint in [({"base": {"format": 1.0}}, "names no cell of adapter 'gated'"),
                            ({NAME: {"citations": 0.5}}, "citations are scored only in +rag cells")]:
        run = lorag(tmp_path, "adapters", "--url", gateway.url, "push", str(folder), "--name", NAME,
                    "--gate", str(suite(tmp_path, gate)))
        assert run.returncode == 2 and complaint in run.stderr, run.stderr
    no_gate = write(tmp_path / "plain.yaml", {k: v for k, v in SUITE.items() if k != "gate"})
    run = lorag(tmp_path, "adapters", "--url", gateway.url, "push", str(folder), "--name", NAME,
                "--gate", str(no_gate))
    assert run.returncode == 2 and "no `gate:` mapping" in run.stderr, run.stderr
    assert httpx.get(adapter).status_code == 404  # nothing was uploaded


def test_train_push_with_a_failing_gate_leaves_the_version_inactive_with_its_verdict(
        gateway, tiny_model, adapter, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows(32)))
    command = [sys.executable, "-m", "service.cli", "train", str(CONFIG), f"model={tiny_model}", f"train={train}",
               f"output={tmp_path / 'out'}", "learning_rate=0.02", "epochs=4",
               "--push", gateway.url, "--name", NAME, "--activate"]
    refused = subprocess.run([*command, "--gate", str(suite(tmp_path, {"base": {"format": 1.0}}))],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "names no cell of adapter" in refused.stderr
    assert not (tmp_path / "out").exists()  # refused before training

    run = subprocess.run([*command, "--gate", str(suite(tmp_path, FAILING))], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 1, run.stdout + run.stderr[-3000:]
    assert "inactive until it passes the gate" in run.stdout and "failed the gate" in run.stderr
    after = shown(adapter)
    assert after["active"] is None
    [version] = after["versions"]
    assert [(e["suite"], e["passed"]) for e in version["evals"]] == [("gated-suite", False)]


def test_the_gate_runs_each_cell_it_names_or_compares_with_once(tmp_path):
    from training.eval.suite import SuiteError, load_gate
    from training.eval.gate import gate_cells

    gate = load_gate(suite(tmp_path, {NAME: {"facts": {"within": 0.05, "of": "base"},
                                             "format": {"within": 0.1, "of": "base"}},
                                      "base+rag": {"facts": {"within": 0.0, "of": f"{NAME}+rag"}}}))
    assert gate_cells(gate, NAME) == [NAME, "base+rag", "base", f"{NAME}+rag"]
    with pytest.raises(SuiteError, match="names no cell of adapter 'other'"):
        gate_cells(gate, "other")
