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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from tqdm import tqdm

KINDS = ("format", "facts", "citations")
SUFFIXES = ("prompt", "rag")
Z95 = 1.959963984540054  # the normal quantile for a two-sided 95% interval
DEFAULT_MAX_TOKENS = 64

_SUITE_KEYS = {"name", "system_prompt", "rag", "max_tokens", "defaults", "cases", "gate", "base_model"}
_CASE_KEYS = {"id", "question", "tags", "expect"}
_FORMAT_KEYS = {"require", "forbid"}
_RAG_KEYS = {"collection", "top_k", "mode", "filter", "enabled"}
_RAG_MODES = ("hybrid", "dense", "keyword")
_THRESHOLD_KEYS = {"min", "max", "within", "of"}
_CITE = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")  # [2], and [1, 3] as one bracket


class SuiteError(ValueError):
    """A suite or gate file that cannot be used; the message names every bad key path."""


class CellError(ValueError):
    """A cell that is not MODEL[+prompt][+rag], or that needs what the suite does not give."""


class ChatFailed(RuntimeError):
    """The service refused or could not answer; the message names the cell and the service's reason."""


# -- the suite --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    require: tuple[re.Pattern[str], ...] = ()
    forbid: tuple[re.Pattern[str], ...] = ()


@dataclass(frozen=True)
class Expect:
    """The checks of one case; None: the case is not counted for that kind."""

    format: Format | None = None
    facts: tuple[re.Pattern[str], ...] | None = None
    citations: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Case:
    id: str
    question: str
    tags: tuple[str, ...] = ()
    expect: Expect = Expect()


@dataclass(frozen=True)
class Threshold:
    """One gate check on a score: at least `min`, at most `max`, not more than `within` below cell `of`."""

    min: float | None = None
    max: float | None = None
    within: float | None = None
    of: str | None = None

    def describe(self) -> str:
        parts = [f"min {self.min:g}"] if self.min is not None else []
        parts += [f"max {self.max:g}"] if self.max is not None else []
        parts += [f"within {self.within:g} of {self.of}"] if self.of is not None else []
        return ", ".join(parts)


Gate = dict[str, dict[str, Threshold]]  # cell -> check kind -> threshold


@dataclass(frozen=True)
class Suite:
    name: str
    cases: tuple[Case, ...]
    system_prompt: str | None = None
    rag: dict[str, Any] | None = None  # RagOptions' fields, sent as they are by +rag cells
    max_tokens: int = DEFAULT_MAX_TOKENS
    base_model: str | None = None  # None: the base card of GET /v1/models
    gate: Gate = field(default_factory=dict)

    def declared(self, kind: str) -> bool:
        return any(getattr(case.expect, kind) is not None for case in self.cases)


def _read_yaml(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"cannot read {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: not YAML ({exc})") from exc


def load_suite(path: Path) -> Suite:
    """The suite in a YAML file; SuiteError naming every problem (key path, case id) otherwise."""
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: a suite is a YAML mapping with `name` and `cases`")
    problems: list[str] = []
    if unknown := sorted(map(str, set(data) - _SUITE_KEYS)):
        problems.append(f"unknown key(s) {', '.join(unknown)}; a suite has {', '.join(sorted(_SUITE_KEYS))}")
    name = data.get("name")
    if not _text(name):
        problems.append("name: required, a non-empty string")
    for key in ("system_prompt", "base_model"):
        if key in data and not _text(data[key]):
            problems.append(f"{key}: must be a non-empty string")
    max_tokens = data.get("max_tokens", DEFAULT_MAX_TOKENS)
    if not _whole(max_tokens) or max_tokens < 1:
        problems.append(f"max_tokens: must be a whole number of 1 or more, got {max_tokens!r}")
    rag = _rag(data["rag"], problems) if "rag" in data else None
    defaults = _expect(data.get("defaults"), "defaults", problems) if data.get("defaults") is not None else {}
    cases = _cases(data.get("cases"), defaults, problems)
    gate = _gate(data["gate"], "gate", problems) if "gate" in data else {}
    if problems:
        raise SuiteError(f"{path}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))
    return Suite(name, tuple(cases), data.get("system_prompt"), rag, max_tokens, data.get("base_model"), gate)


def load_gate(path: Path) -> Gate:
    """The `gate:` mapping of a file (a suite, or a file holding only a gate); SuiteError otherwise."""
    data = _read_yaml(path)
    if not isinstance(data, dict) or "gate" not in data:
        raise SuiteError(f"{path}: no `gate:` mapping (cell -> check kind -> threshold) at the top level")
    problems: list[str] = []
    gate = _gate(data["gate"], "gate", problems)
    if problems:
        raise SuiteError(f"{path}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))
    return gate


def _text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rag(value: object, problems: list[str]) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        problems.append(f"rag: must be a mapping of {', '.join(sorted(_RAG_KEYS))}")
        return None
    before = len(problems)
    if unknown := sorted(map(str, set(value) - _RAG_KEYS)):
        problems.append(f"rag: unknown key(s) {', '.join(unknown)}; rag has {', '.join(sorted(_RAG_KEYS))}")
    if "collection" in value and not _text(value["collection"]):
        problems.append("rag.collection: must be a non-empty string")
    if "top_k" in value and not (_whole(value["top_k"]) and value["top_k"] >= 1):
        problems.append(f"rag.top_k: must be a whole number of 1 or more, got {value['top_k']!r}")
    if "mode" in value and value["mode"] not in _RAG_MODES:
        problems.append(f"rag.mode: must be one of {', '.join(_RAG_MODES)}, got {value['mode']!r}")
    if "filter" in value and not isinstance(value["filter"], dict):
        problems.append("rag.filter: must be a mapping (a metadata filter, as in the search API)")
    if "enabled" in value and value["enabled"] is not True:
        problems.append("rag.enabled: +rag cells turn retrieval on and the other cells turn it off; leave it out")
    return dict(value) if len(problems) == before else None


def _patterns(value: object, where: str, problems: list[str]) -> tuple[re.Pattern[str], ...]:
    if not isinstance(value, list) or not value:
        problems.append(f"{where}: must be a non-empty list of regexes")
        return ()
    compiled = []
    for number, pattern in enumerate(value):
        if not isinstance(pattern, str) or not pattern:
            problems.append(f"{where}[{number}]: must be a non-empty string (a regex)")
            continue
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            problems.append(f"{where}[{number}]: bad regex {pattern!r} ({exc})")
    return tuple(compiled)


def _expect(value: object, where: str, problems: list[str]) -> dict[str, Any]:
    """kind -> parsed check, or None where the value is null (a case opting out of a default)."""
    if not isinstance(value, dict):
        problems.append(f"{where}: must be a mapping of {', '.join(KINDS)}")
        return {}
    if unknown := sorted(map(str, set(value) - set(KINDS))):
        problems.append(f"{where}: unknown check kind(s) {', '.join(unknown)}; the kinds are {', '.join(KINDS)}")
    checks: dict[str, Any] = {}
    for kind in KINDS:
        if kind not in value:
            continue
        spec = value[kind]
        if spec is None:
            checks[kind] = None
        elif kind == "format":
            if not isinstance(spec, dict) or not spec:
                problems.append(f"{where}.format: must be a mapping with require, forbid or both (lists of regexes)")
                continue
            if unknown := sorted(map(str, set(spec) - _FORMAT_KEYS)):
                problems.append(f"{where}.format: unknown key(s) {', '.join(unknown)}; format has require, forbid")
            checks[kind] = Format(*(_patterns(spec[k], f"{where}.format.{k}", problems) if k in spec else ()
                                    for k in ("require", "forbid")))
        elif kind == "facts":
            checks[kind] = _patterns(spec, f"{where}.facts", problems)
        elif not isinstance(spec, list) or not spec or not all(_text(doc) for doc in spec):
            problems.append(f"{where}.citations: must be a non-empty list of doc ids")
        else:
            checks[kind] = tuple(spec)
    return checks


def _cases(value: object, defaults: dict[str, Any], problems: list[str]) -> list[Case]:
    if not isinstance(value, list) or not value:
        problems.append("cases: required, a non-empty list of cases")
        return []
    cases, seen = [], set()
    for number, row in enumerate(value):
        where = f"cases[{number}]"
        if not isinstance(row, dict):
            problems.append(f"{where}: a case is a mapping with id, question, tags, expect")
            continue
        raw_id = row.get("id")
        if not (_text(raw_id) or _whole(raw_id)):
            problems.append(f"{where}.id: required, a non-empty string")
            continue
        case_id = str(raw_id)
        where = f"cases[{number}] (id {case_id})"
        if case_id in seen:
            problems.append(f"{where}: id {case_id!r} is used twice")
        seen.add(case_id)
        if unknown := sorted(map(str, set(row) - _CASE_KEYS)):
            problems.append(f"{where}: unknown key(s) {', '.join(unknown)}; a case has {', '.join(sorted(_CASE_KEYS))}")
        if not _text(row.get("question")):
            problems.append(f"{where}.question: required, a non-empty string")
        tags = row.get("tags", [])
        if not isinstance(tags, list) or not all(_text(tag) for tag in tags):
            problems.append(f"{where}.tags: must be a list of non-empty strings")
            tags = []
        own = _expect(row["expect"], f"{where}.expect", problems) if row.get("expect") is not None else {}
        merged = {kind: check for kind, check in {**defaults, **own}.items() if check is not None}
        cases.append(Case(case_id, row.get("question") or "", tuple(tags), Expect(**merged)))
    return cases


def _gate(value: object, where: str, problems: list[str]) -> Gate:
    if not isinstance(value, dict) or not value:
        problems.append(f"{where}: must be a mapping of cell -> check kind -> threshold")
        return {}
    gate: Gate = {}
    for cell, checks in value.items():
        at = f"{where}.{cell}"
        try:
            parse_cell(str(cell))
        except CellError as exc:
            problems.append(f"{at}: {exc}")
            continue
        if not isinstance(checks, dict) or not checks:
            problems.append(f"{at}: must be a mapping of check kind ({', '.join(KINDS)}) -> threshold")
            continue
        for kind, spec in checks.items():
            if kind not in KINDS:
                problems.append(f"{at}: unknown check kind {kind!r}; the kinds are {', '.join(KINDS)}")
            elif (threshold := _threshold(spec, f"{at}.{kind}", problems)) is not None:
                gate.setdefault(str(cell), {})[kind] = threshold
    return gate


def _threshold(spec: object, where: str, problems: list[str]) -> Threshold | None:
    if isinstance(spec, Threshold):
        return spec
    if _number(spec):
        spec = {"min": spec}
    if not isinstance(spec, dict) or not spec:
        problems.append(f"{where}: a threshold is a number (a minimum), {{min: x}}, {{max: x}} or {{within: d, of: CELL}}")
        return None
    before = len(problems)
    if unknown := sorted(map(str, set(spec) - _THRESHOLD_KEYS)):
        problems.append(f"{where}: unknown key(s) {', '.join(unknown)}; a threshold has min, max, within, of")
    for key in ("min", "max", "within"):
        if key in spec and not (_number(spec[key]) and 0 <= spec[key] <= 1):
            problems.append(f"{where}.{key}: must be a number from 0 to 1, got {spec[key]!r}")
    if ("within" in spec) != ("of" in spec):
        problems.append(f"{where}: `within` and `of` go together: {{within: 0.05, of: base}}")
    if "of" in spec:
        try:
            parse_cell(str(spec["of"]))
        except CellError as exc:
            problems.append(f"{where}.of: {exc}")
    if len(problems) > before:
        return None
    return Threshold(spec.get("min"), spec.get("max"), spec.get("within"), str(spec["of"]) if "of" in spec else None)


# -- cells ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    name: str  # as asked: legal+rag
    model: str  # as asked: base, legal, legal@3f9a2c1b
    prompt: bool = False
    rag: bool = False


def parse_cell(text: str) -> Cell:
    """`MODEL[+prompt][+rag]`; CellError saying what is wrong otherwise."""
    model, *suffixes = text.strip().split("+")
    if not model or any(ch.isspace() for ch in model):
        raise CellError(f"cell {text!r}: expected MODEL[+prompt][+rag], e.g. base, base+prompt, legal+rag")
    for suffix in suffixes:
        if suffix not in SUFFIXES:
            raise CellError(f"cell {text!r}: unknown suffix +{suffix}; a cell is MODEL[+prompt][+rag]")
    if len(set(suffixes)) < len(suffixes):
        raise CellError(f"cell {text!r}: a suffix is given twice")
    return Cell(text.strip(), model, "prompt" in suffixes, "rag" in suffixes)


def parse_cells(names: Iterable[str], suite: Suite | None = None) -> list[Cell]:
    """The cells, checked against what the suite gives (+prompt needs system_prompt, +rag needs rag)."""
    cells = [parse_cell(name) for name in names]
    if not cells:
        raise CellError("no cells: name at least one, e.g. --cells base,base+rag")
    if duplicates := sorted({c.name for c in cells if [d.name for d in cells].count(c.name) > 1}):
        raise CellError(f"cell(s) {', '.join(duplicates)} given twice")
    for cell in cells if suite is not None else ():
        if cell.prompt and suite.system_prompt is None:
            raise CellError(f"cell {cell.name} adds the suite's system_prompt, and suite {suite.name!r} has none")
        if cell.rag and suite.rag is None:
            raise CellError(f"cell {cell.name} sends the suite's rag options, and suite {suite.name!r} has no `rag`")
    return cells


def check_gate(thresholds: Mapping[str, Any], cells: Iterable[Cell | str], suite: Suite | None = None) -> Gate:
    """The gate, parsed, when it can be judged on a run of these cells; SuiteError saying why not.

    Checked before a run, so that a gate naming a cell not run, or a check no case declares,
    is refused in seconds rather than after minutes of generation."""
    problems: list[str] = []
    gate = _gate(dict(thresholds), "gate", problems)
    run = {c.name if isinstance(c, Cell) else parse_cell(c).name: c for c in cells}
    for cell, checks in gate.items():
        if cell not in run:
            problems.append(f"gate.{cell}: that cell is not run (cells: {', '.join(run)})")
            continue
        for kind, threshold in checks.items():
            if threshold.of is not None and threshold.of not in run:
                problems.append(f"gate.{cell}.{kind}.of: cell {threshold.of} is not run (cells: {', '.join(run)})")
            if kind == "citations" and not parse_cell(cell).rag:
                problems.append(f"gate.{cell}.citations: citations are scored only in +rag cells")
            if suite is not None and not suite.declared(kind):
                problems.append(f"gate.{cell}.{kind}: no case of suite {suite.name!r} declares a {kind} check")
    if problems:
        raise SuiteError(f"gate: {len(problems)} problem(s)\n  " + "\n  ".join(problems))
    return gate


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
