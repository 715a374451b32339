"""Chat suites: the YAML a `lorag eval chat` run asks, the cells it runs in, and the gate it is judged by.

A suite names its cases (a question and the checks its answer must pass: format, facts,
citations), the house system prompt (`+prompt` cells), the retrieval options (`+rag` cells)
and a `gate:` of thresholds per cell and check kind. Everything is checked when it is loaded,
every problem named with its key path, so that a bad file is refused in seconds, before any
answer is generated. training.eval.chat runs and scores it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KINDS = ("format", "facts", "citations")
SUFFIXES = ("prompt", "rag")
DEFAULT_MAX_TOKENS = 64

_SUITE_KEYS = {"name", "system_prompt", "rag", "max_tokens", "defaults", "cases", "gate", "base_model"}
_CASE_KEYS = {"id", "question", "tags", "expect"}
_FORMAT_KEYS = {"require", "forbid"}
_RAG_KEYS = {"collection", "top_k", "mode", "filter", "enabled"}
_RAG_MODES = ("hybrid", "dense", "keyword")
_THRESHOLD_KEYS = {"min", "max", "within", "of"}


class SuiteError(ValueError):
    """A suite or gate file that cannot be used; the message names every bad key path."""


class CellError(ValueError):
    """A cell that is not MODEL[+prompt][+rag], or that needs what the suite does not give."""


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
