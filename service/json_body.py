"""Strict JSON for every request body, bulk line and JSON form field.

Python's json module accepts what no other component downstream does: lone UTF-16 surrogates
(`"\\ud800"`, which cannot be encoded as UTF-8, so SQLite, the engine request and even our own
error response failed on them), `NaN`/`Infinity` and numbers that overflow to infinity (refused
when the body is re-encoded for the engine), and nesting deep enough to exhaust the recursion
limit. Each is refused here, once, with the field it was found in.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from service.errors import InvalidRequest

MAX_DEPTH = 64  # objects and lists inside one another; real requests nest a handful deep
_SURROGATE = re.compile("[\ud800-\udfff]")


class MalformedJson(ValueError):
    """Text that strict JSON refuses; `param` is the dotted path of the offending field, if any."""

    def __init__(self, message: str, *, code: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


def _no_constant(name: str) -> Any:
    raise MalformedJson(f"{name} is not a JSON number; send a finite number or null", code="non_finite_number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MalformedJson(f"the number {text[:40]} is out of range (it overflows to infinity)",
                            code="non_finite_number")
    return value


def parse_json(data: bytes | str) -> Any:
    """Decode UTF-8 JSON strictly; raises MalformedJson saying what and where."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedJson(f"not UTF-8 (invalid byte at offset {exc.start}); send UTF-8 JSON",
                                code="invalid_encoding") from None
    try:
        value = json.loads(data, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise MalformedJson(f"nested more than {MAX_DEPTH} levels deep; flatten it", code="too_deep") from None
    except json.JSONDecodeError as exc:
        raise MalformedJson(f"not valid JSON: {exc}", code="invalid_json") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        if isinstance(exc, MalformedJson):
            raise
        raise MalformedJson(f"not valid JSON: {exc}", code="invalid_json") from None
    _check_tree(value)
    return value


def _check_tree(root: Any) -> None:
    """Depth and lone surrogates, walked without recursion (the tree may be deep)."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(root, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise MalformedJson(f"nested more than {MAX_DEPTH} levels deep; flatten it", code="too_deep")
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, (*path, key))
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, str(i))) for i, item in enumerate(value))


def _check_text(text: str, path: tuple[str, ...]) -> None:
    found = _SURROGATE.search(text)
    if found:
        param = ".".join(_SURROGATE.sub("\ufffd", part) for part in path) or None
        raise MalformedJson(
            f"{param or 'value'}: a lone UTF-16 surrogate (\\u{ord(found.group()):04x}) is not a character; "
            "send valid Unicode (surrogates only in pairs)",
            code="invalid_unicode",
            param=param,
        )


def _wants_json(request: Request) -> bool:
    # What FastAPI parses as JSON: no content type, or application/json or application/*+json.
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return not kind or kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class JsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = parse_json(await self.body())
            except MalformedJson as exc:
                raise InvalidRequest(exc.message if exc.param else f"request body: {exc.message}",
                                     param=exc.param, code=exc.code) from None
        return self._json


class JsonRoute(APIRoute):
    """A route whose JSON body is parsed strictly before FastAPI sees it (FastAPI would turn our
    error into a bare 400 "There was an error parsing the body")."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            request = JsonRequest(request.scope, request.receive)
            if self.body_field is not None and _wants_json(request) and await request.body():
                await request.json()
            return await handler(request)

        return strict
