"""Gate before activation: judge a just-uploaded version by a suite's own `gate:`, pinned.

    lorag adapters push DIR --name legal --gate suite.yaml [--activate]
    lorag train CONFIG.yaml --push URL --name legal --gate suite.yaml [--activate]

The version is uploaded inactive; every cell the gate names (and every cell a `within ... of`
compares with) is run with `legal` sent as `legal@VERSION`, so the thresholds written for
`legal` judge the new version while the active one keeps serving. The verdict, with the
scores (not the answers), is stored with the version (`PUT .../versions/{v}/eval`); only a
version that passed is activated. Over HTTP only, like every other training-side call.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.eval.chat import ChatClient, ChatFailed, Report, evaluate
from training.eval.suite import SuiteError, check_gate, load_gate, load_suite, parse_cell


@dataclass(frozen=True)
class Verdict:
    pinned: str  # name@version, as it was asked
    passed: bool
    failures: list[str]  # one line per failing check
    report: Report  # its summary() (the scores, not the answers) is stored with the version
    activation: dict[str, Any] | None  # the activate call's answer; None unless it passed and was asked to


def gate_cells(gate: dict[str, Any], name: str) -> list[str]:
    """The cells a gate needs run: those it names and those its `of`s compare with; SuiteError if none is
    the adapter's (a gate that never asks the new version would pass it unseen)."""
    compared = [t.of for checks in gate.values() for t in checks.values() if t.of is not None]
    cells = list(dict.fromkeys([*gate, *compared]))
    if not any(parse_cell(cell).model == name for cell in cells):
        raise SuiteError(f"the gate names no cell of adapter {name!r} (cells: {', '.join(cells)}); "
                         f"add thresholds for {name} or {name}+rag")
    return cells


def check_suite(suite_path: Path, name: str) -> None:
    """Refuse a suite that cannot gate `name`, before anything is trained or uploaded."""
    suite, gate = load_suite(suite_path), load_gate(suite_path)
    check_gate(gate, gate_cells(gate, name), suite)


def gate_version(url: str, name: str, version: str, suite_path: Path, *, api_key: str | None = None,
                 activate: bool = False, rag: dict[str, Any] | None = None, concurrency: int = 4,
                 progress: bool = True) -> Verdict:
    """Evaluate `name@version` by the suite's gate, store the verdict with it, activate it if it passed.

    SuiteError for a suite or gate that cannot be used; ChatFailed when the service refuses a
    request (nothing is stored then: a refusal is not a verdict)."""
    suite, gate = load_suite(suite_path), load_gate(suite_path)
    cells = gate_cells(gate, name)
    check_gate(gate, cells, suite)
    pinned = f"{name}@{version}"
    report = evaluate(suite, url, cells, api_key, concurrency=concurrency, progress=progress, pins={name: pinned})
    failures = report.gate(gate)
    client = ChatClient(url, api_key)
    try:
        client.call("PUT", f"/v1/adapters/{name}/versions/{version}/eval", f"storing the eval of {pinned}",
                    json={"suite": suite.name, "passed": not failures, "failures": failures, "report": report.summary()})
        activation = None
        if activate and not failures:
            body = {"version": version, **({"rag": rag} if rag is not None else {})}
            activation = client.call("POST", f"/v1/adapters/{name}/activate", f"activating {pinned}", json=body)
    finally:
        client.close()
    return Verdict(pinned, not failures, failures, report, activation)


def run_gate(url: str, name: str, version: str, suite_path: Path, *, api_key: str | None = None,
             activate: bool = False, rag: dict[str, Any] | None = None, prog: str = "lorag") -> int:
    """`gate_version` for a command line: the scores table, then the verdict. Exit 0 passed, 1 failed
    (the active version keeps serving), 2 when it could not be judged."""
    try:
        verdict = gate_version(url, name, version, suite_path, api_key=api_key, activate=activate, rag=rag)
    except (SuiteError, ChatFailed) as exc:
        print(f"{prog}: {name}@{version} is uploaded and inactive; the gate could not judge it: {exc}", file=sys.stderr)
        return 2
    print(verdict.report.markdown())
    if not verdict.passed:
        print(f"{prog}: {verdict.pinned} failed the gate of {suite_path} and was not activated "
              f"(the active version keeps serving):\n  " + "\n  ".join(verdict.failures), file=sys.stderr)
        return 1
    done = " and is active" if verdict.activation else " (not activated: add --activate)"
    print(f"{verdict.pinned} passed the gate of {suite_path}{done}")
    return 0
