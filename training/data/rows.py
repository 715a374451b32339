"""Rows of OpenAI's chat fine-tuning format, one JSON object a line:
{"messages": [{"role": "system"|"user"|"assistant", "content": str, "weight": 0|1 (assistant only)}]}.

Reading a file never stops at the first bad line: every problem of every line is collected, each
with its line number and a code, so one run of `lorag data check` lists all there is to fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "weight")


@dataclass(frozen=True)
class Problem:
    line: int
    code: str  # invalid_json, missing_messages, unknown_role, ... (see the doctor)
    message: str
    file: str = ""


@dataclass(frozen=True)
class Row:
    line: int
    messages: list[dict]  # as given; every message has role and content, weight only on assistants
    key: str = field(default="", compare=False)  # canonical JSON of the messages: equal rows, equal keys

    def trained(self, index: int) -> bool:
        """Whether message `index` is learned: assistant messages unless their weight is 0."""
        message = self.messages[index]
        return message["role"] == "assistant" and message.get("weight", 1) == 1


def parse(line_number: int, text: str) -> tuple[Row | None, list[Problem]]:
    """One line: the row, or None, and every problem found in it."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, [Problem(line_number, "invalid_json", f"not JSON: {exc.msg} at column {exc.colno}")]
    if not isinstance(data, dict):
        return None, [Problem(line_number, "invalid_json", f"a row is a JSON object, not {type(data).__name__}")]
    problems = [
        Problem(line_number, "unknown_key", f"unknown key {key!r}; a row holds \"messages\" (and lorag's \"provenance\")")
        for key in data if key not in ("messages", "provenance")
    ]
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        problems.append(Problem(line_number, "missing_messages", "\"messages\" must be a non-empty list of messages"))
        return None, problems
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, dict):
            problems.append(Problem(line_number, "missing_content", f"{where} is not an object with role and content"))
            continue
        problems += [
            Problem(line_number, "unknown_key", f"{where} has unknown key {key!r}; use role, content, weight")
            for key in message if key not in MESSAGE_KEYS
        ]
        role = message.get("role")
        if role not in ROLES:
            problems.append(Problem(line_number, "unknown_role", f"{where} has role {role!r}; use one of {', '.join(ROLES)}"))
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            problems.append(Problem(line_number, "missing_content", f"{where} needs a non-empty string \"content\""))
        if "weight" in message:
            weight = message["weight"]
            if role != "assistant":
                problems.append(Problem(line_number, "invalid_weight", f"{where}: only assistant messages take a weight"))
            elif isinstance(weight, bool) or weight not in (0, 1):
                problems.append(Problem(line_number, "invalid_weight", f"{where}: weight must be 0 or 1, got {weight!r}"))
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        problems.append(Problem(line_number, "no_assistant_message", "the row has no assistant message to learn from"))
    if problems:
        return None, problems
    return Row(line_number, messages, json.dumps(messages, sort_keys=True, ensure_ascii=False)), []


def read(path: Path) -> Iterator[tuple[Row | None, list[Problem]]]:
    """Every non-blank line of a JSON-lines file, parsed."""
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, 1):
            if text.strip():
                row, problems = parse(number, text)
                yield row, [Problem(p.line, p.code, p.message, str(path)) for p in problems]
