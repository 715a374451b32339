"""Chat scoring: do the answers users get have the house format, the right facts, real citations?

    lorag eval chat SUITE.yaml --cells base,base+prompt,base+rag,legal,legal+rag [--url URL]
                    [--api-key KEY] [--json OUT.json] [--chart OUT.png] [--gate FILE.yaml] [--concurrency 4]

Every case of a suite is asked once per cell through `POST /v1/chat/completions` (temperature
0, the suite's max_tokens), as a user would ask it, and each answer is scored by the checks
the suite declares:

- `format`: every `require` regex is found in the answer and no `forbid` regex is;
- `facts`: every regex is found;
- `citations` (+rag cells only): one of the listed doc ids is among the response's
  `citations` and the answer cites it as `[n]`, n being that citation's index.

A cell is `MODEL[+prompt][+rag]`: `base` is the served base model, any other MODEL is sent as
`model` as it is (`legal`, `legal@3f9a2c1b`); `+prompt` adds the suite's system prompt;
`+rag` sends the suite's `rag` options, and a cell without it sends `{"enabled": false}` so
that no default retrieval (the service's, or an adapter's) changes what is measured.

Scores are pass rates with a 95% Wilson interval, per cell and check kind, and per tag. A
gate holds thresholds per cell and kind: a number or `{min: x}`, `{max: x}`, or
`{within: d, of: CELL}` (not more than d below that cell's score in the same run).
"""


from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from training.eval.suite import KINDS, Case, Cell, Expect, Format, Suite, Threshold, check_gate, parse_cells

Z95 = 1.959963984540054  # the normal quantile for a two-sided 95% interval
_CITE = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")  # [2], and [1, 3] as one bracket


class ChatFailed(RuntimeError):
    """The service refused or could not answer; the message names the cell and the service's reason."""


# -- scoring ----------------------------------------------------------------------------------


def format_passes(answer: str, check: Format) -> bool:
    return all(p.search(answer) for p in check.require) and not any(p.search(answer) for p in check.forbid)


def facts_pass(answer: str, facts: Iterable[re.Pattern[str]]) -> bool:
    return all(p.search(answer) for p in facts)


def cited_indexes(answer: str) -> set[int]:
    """The n of every [n] in an answer ([1, 3] gives 1 and 3)."""
    return {int(n) for group in _CITE.findall(answer) for n in group.split(",")}


def citations_pass(answer: str, citations: Iterable[Mapping[str, Any]], doc_ids: Iterable[str]) -> bool:
    """An expected document is among the sources and the answer cites that source's [n]."""
    wanted = set(doc_ids)
    indexes = {c.get("index") for c in citations if c.get("doc_id") in wanted}
    return bool(indexes & cited_indexes(answer))


def passes(expect: Expect, answer: str, citations: list[Mapping[str, Any]], rag: bool) -> dict[str, bool]:
    """kind -> passed, for the kinds the case declares (citations only in a +rag cell)."""
    result = {}
    if expect.format is not None:
        result["format"] = format_passes(answer, expect.format)
    if expect.facts is not None:
        result["facts"] = facts_pass(answer, expect.facts)
    if expect.citations is not None and rag:
        result["citations"] = citations_pass(answer, citations, expect.citations)
    return result


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a pass rate: honest at 0/n and n/n, where p ± z·se is not."""
    if n == 0:
        raise ValueError("no trials: a pass rate of 0 cases has no interval")
    p = successes / n
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def stats(outcomes: list[bool]) -> dict[str, Any]:
    """{mean, n, low, high}; the numbers are None when no case was scored (n = 0)."""
    n = len(outcomes)
    if n == 0:
        return {"mean": None, "n": 0, "low": None, "high": None}
    low, high = wilson(sum(outcomes), n)
    return {"mean": round(sum(outcomes) / n, 4), "n": n, "low": round(low, 4), "high": round(high, 4)}


# -- running ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    cell: str
    case: Case
    text: str
    citations: list[dict[str, Any]]  # the response's, as sent
    passed: dict[str, bool]  # kind -> passed
    usage: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.case.id, "tags": list(self.case.tags), "answer": self.text, "passed": self.passed,
                "citations": [{"index": c.get("index"), "doc_id": c.get("doc_id")} for c in self.citations],
                "usage": self.usage}


def request_body(suite: Suite, cell: Cell, model: str, case: Case) -> dict[str, Any]:
    """The chat request a case sends in a cell."""
    messages = [{"role": "system", "content": suite.system_prompt}] if cell.prompt else []
    messages.append({"role": "user", "content": case.question})
    # An explicit `enabled: false`: with no `rag` at all, the service's or the adapter's default
    # collection would be searched, and a plain cell would measure retrieval after all.
    rag = dict(suite.rag or {}) if cell.rag else {"enabled": False}
    return {"model": model, "messages": messages, "temperature": 0, "max_tokens": suite.max_tokens, "rag": rag}


class ChatClient:
    """The chat and models API of a running lorag (or any OpenAI-compatible server)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        # One pool for every worker thread: httpx.Client is thread-safe.
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout, headers=headers,
                                  limits=httpx.Limits(max_connections=64))
        self.url = url

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, what: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ChatFailed(f"{what}: cannot reach the service at {self.url}: {exc}") from exc
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise ChatFailed(f"{what}: the service answered {response.status_code}: {message}")
        try:
            return response.json()
        except ValueError:
            raise ChatFailed(f"{what}: the service answered 200 with no JSON: {response.text[:200]!r}") from None

    def base_model(self) -> str:
        """The one model of GET /v1/models that is not an adapter (adapters carry a `parent`)."""
        cards = self.call("GET", "/v1/models", "listing models").get("data") or []
        bases = [card["id"] for card in cards if not card.get("parent")]
        if len(bases) != 1:
            raise ChatFailed(f"cannot tell the base model at {self.url}: GET /v1/models lists "
                             f"{', '.join(bases) or 'none'} without a parent; name it in the suite as base_model")
        return bases[0]

    def answer(self, body: dict[str, Any], what: str) -> tuple[str, list[dict[str, Any]], dict[str, Any] | None]:
        """(answer text, the response's citations, usage)."""
        reply = self.call("POST", "/v1/chat/completions", what, json=body)
        try:
            text = reply["choices"][0]["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ChatFailed(f"{what}: the response has no choices[0].message: {str(reply)[:200]}") from None
        return text, list(reply.get("citations") or []), reply.get("usage")


def evaluate(suite: Suite, url: str, cells: list[str], api_key: str | None = None, *,
             concurrency: int = 4, progress: bool = True, pins: Mapping[str, str] | None = None) -> Report:
    """Ask every case in every cell and score the answers; ChatFailed stops the run at the first refusal.

    `pins` maps a cell's MODEL to the `model` actually sent ({"legal": "legal@3f9a2c1b"}): the gate
    judges a new version under the cell names its thresholds use, before `legal` points at it."""
    if concurrency < 1:
        raise ValueError(f"concurrency is 1 or more, got {concurrency}")
    parsed = parse_cells(cells, suite)
    client = ChatClient(url, api_key)
    try:
        base = suite.base_model
        if base is None and any(cell.model == "base" for cell in parsed):
            base = client.base_model()
        pins = pins or {}
        models = {cell.name: base if cell.model == "base" else pins.get(cell.model, cell.model) for cell in parsed}
        jobs = [(cell, case) for cell in parsed for case in suite.cases]

        def ask(cell: Cell, case: Case) -> Answer:
            what = f"cell {cell.name} (model {models[cell.name]}), case {case.id}"
            text, citations, usage = client.answer(request_body(suite, cell, models[cell.name], case), what)
            return Answer(cell.name, case, text, citations, passes(case.expect, text, citations, cell.rag), usage)

        answers: dict[tuple[str, str], Answer] = {}
        with tqdm(total=len(jobs), unit="answer", desc="eval chat", file=sys.stderr, disable=not progress) as bar, \
                ThreadPoolExecutor(max_workers=concurrency) as pool:
            futures = [pool.submit(ask, cell, case) for cell, case in jobs]
            try:
                for future in as_completed(futures):
                    answer = future.result()
                    answers[answer.cell, answer.case.id] = answer
                    bar.update(1)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)  # a refusal ends the run: ask nothing more
                raise
    finally:
        client.close()
    ordered = {cell.name: [answers[cell.name, case.id] for case in suite.cases] for cell in parsed}
    return Report(suite.name, url, models, ordered)


# -- the report -------------------------------------------------------------------------------


@dataclass
class Report:
    suite: str
    url: str
    models: dict[str, str]  # cell -> the `model` it sent
    answers: dict[str, list[Answer]]  # cell -> one answer per case, in suite order

    @property
    def cells(self) -> list[str]:
        return list(self.answers)

    def kinds(self) -> list[str]:
        """The check kinds scored anywhere in the run."""
        return [k for k in KINDS if any(k in a.passed for answers in self.answers.values() for a in answers)]

    def tags(self) -> list[str]:
        return sorted({tag for answers in self.answers.values() for a in answers for tag in a.case.tags})

    def scores(self, cell: str, tag: str | None = None) -> dict[str, dict[str, Any]]:
        """kind -> {mean, n, low, high} in one cell (the cases with `tag`, if given)."""
        answers = [a for a in self.answers[cell] if tag is None or tag in a.case.tags]
        return {kind: stats([a.passed[kind] for a in answers if kind in a.passed]) for kind in KINDS}

    def summary(self) -> dict[str, Any]:
        """The scores without the answers: what is stored with an adapter version."""
        return {
            "suite": self.suite,
            "url": self.url,
            "models": self.models,
            "cells": {cell: self.scores(cell) for cell in self.cells},
            "tags": {cell: {tag: self.scores(cell, tag) for tag in self.tags()} for cell in self.cells},
        }

    def as_dict(self) -> dict[str, Any]:
        answers = {cell: [a.as_dict() for a in answers] for cell, answers in self.answers.items()}
        return {**self.summary(), "answers": answers}

    def markdown(self) -> str:
        """A table per cell (and per cell and tag): mean [95% interval] n=count for each check kind."""
        kinds = self.kinds() or list(KINDS)
        lines = [f"## {self.suite}", "", "| cell | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        lines += [f"| {cell} | " + " | ".join(_shown(self.scores(cell)[k]) for k in kinds) + " |" for cell in self.cells]
        if tags := self.tags():
            lines += ["", "### by tag", "", "| cell | tag | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 2) + "|"]
            lines += [f"| {cell} | {tag} | " + " | ".join(_shown(self.scores(cell, tag)[k]) for k in kinds) + " |"
                      for cell in self.cells for tag in tags]
        return "\n".join(lines)

    def gate(self, thresholds: Mapping[str, Any]) -> list[str]:
        """One message per failing check (cell, kind, score, threshold); [] when all pass.

        `thresholds` is a gate as `load_gate` gives it or as written in YAML; SuiteError when it
        names a cell this run did not have."""
        failures = []
        for cell, checks in check_gate(thresholds, self.cells).items():
            for kind, threshold in checks.items():
                failures += _failures(cell, kind, self.scores(cell)[kind], threshold, self)
        return failures


def _shown(s: dict[str, Any]) -> str:
    return "—" if s["n"] == 0 else f"{s['mean']:.2f} [{s['low']:.2f}, {s['high']:.2f}] n={s['n']}"


def _failures(cell: str, kind: str, score: dict[str, Any], threshold: Threshold, report: Report) -> list[str]:
    if score["n"] == 0:
        return [f"{cell} {kind}: no case was scored (n=0); threshold {threshold.describe()}"]
    mean, failures = score["mean"], []
    if threshold.min is not None and mean < threshold.min:
        failures.append(f"{cell} {kind}: {mean:.3f} is below the minimum {threshold.min:g} (n={score['n']})")
    if threshold.max is not None and mean > threshold.max:
        failures.append(f"{cell} {kind}: {mean:.3f} is above the maximum {threshold.max:g} (n={score['n']})")
    if threshold.of is not None:
        other = report.scores(threshold.of)[kind]
        if other["n"] == 0:
            failures.append(f"{cell} {kind}: cell {threshold.of} scored no case (n=0) to compare with")
        elif mean < other["mean"] - threshold.within - 1e-9:  # scores are rounded to 4 places
            failures.append(f"{cell} {kind}: {mean:.3f} is more than {threshold.within:g} below "
                            f"{threshold.of}'s {other['mean']:.3f} (n={score['n']})")
    return failures


def chart(report: Report, path: Path) -> None:
    """A PNG: one group of bars per check kind, one bar per cell, the 95% interval as error bars."""
    from matplotlib.figure import Figure  # heavy; and no pyplot, so no display backend is needed

    kinds, cells = report.kinds() or list(KINDS), report.cells
    width = 0.8 / len(cells)
    figure = Figure(figsize=(max(6.0, 2.5 + 0.5 * len(kinds) * len(cells)), 4.5), dpi=100)
    axes = figure.subplots()
    for number, cell in enumerate(cells):
        scores = report.scores(cell)
        xs = [k + (number - (len(cells) - 1) / 2) * width for k in range(len(kinds))]
        means = [scores[k]["mean"] or 0.0 for k in kinds]
        errors = [[(scores[k]["mean"] - scores[k]["low"]) if scores[k]["n"] else 0.0 for k in kinds],
                  [(scores[k]["high"] - scores[k]["mean"]) if scores[k]["n"] else 0.0 for k in kinds]]
        axes.bar(xs, means, width, yerr=errors, capsize=3, label=cell)
        for x, kind in zip(xs, kinds):
            if scores[kind]["n"] == 0:
                axes.text(x, 0.02, "n/a", ha="center", fontsize=7, rotation=90)
    axes.set_xticks(range(len(kinds)), kinds)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("pass rate (95% Wilson interval)")
    axes.set_title(f"lorag eval chat: {report.suite}")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, format="png")
