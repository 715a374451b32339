"""Metadata filters: a strictly checked subset of Chroma's `where` language.

    {"field": value}                                  equal
    {"field": {"$eq" | "$ne": value}}                 equal / not equal (a missing field is "not equal")
    {"field": {"$gt" | "$gte" | "$lt" | "$lte": n}}   numeric comparison (n: int or float)
    {"field": {"$in" | "$nin": [v, ...]}}             one of / none of (1 to 100 values of one type)
    {"$and": [filter, ...]}, {"$or": [filter, ...]}   1 to 32 sub-filters
    {"a": 1, "b": 2}                                  several keys (1 to 32): all must hold

Every dimension is bounded, so that no filter this module accepts is one SQLite or Chroma
refuses or chokes on (one object of 12,000 keys once crashed the whole process): nesting
depth, keys per object, sub-filters per list, values per list, conditions and list values
in the whole filter, and string length.

Values are strings, numbers or booleans. Numbers compare as 64-bit floats, across int and
float (integers beyond 2**53 round), never with booleans or strings. The same checked filter
runs in Chroma (dense search) and in SQLite (keyword search, over each chunk's copy of its
document's metadata), with the same meaning. Chroma compares an int field with a float
operand after truncating the operand (1 == 1.5 there), so numbers reach Chroma as floats on
both sides: lorag writes its chunk metadata's integers as floats too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from knowledge.documents import MAX_METADATA_STRING_CHARS, METADATA_KEY, check_scalar
from knowledge.errors import InvalidFilter

COMPARISONS = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
OPERATORS = ("$eq", "$ne", "$in", "$nin", *COMPARISONS)
MAX_DEPTH = 8
MAX_CLAUSES = 32  # sub-filters in one $and / $or list, and keys in one object
MAX_VALUES = 100  # values in one $in / $nin list
MAX_CONDITIONS = 64  # field conditions in the whole filter
MAX_TOTAL_VALUES = 256  # values in all of the filter's conditions together


@dataclass(frozen=True)
class Condition:
    field: str
    op: str
    value: object  # a scalar, or a list of scalars for $in / $nin


@dataclass(frozen=True)
class Junction:
    op: str  # "$and" | "$or"
    parts: tuple[Condition | Junction, ...]


Node = Condition | Junction


class Filter:
    """A validated filter; build it with `Filter.parse`."""

    def __init__(self, root: Node):
        self.root = root

    @classmethod
    def parse(cls, raw: object) -> Filter | None:
        """None or {} means no filter."""
        if raw is None or raw == {}:
            return None
        return cls(_Parser().node(raw, depth=0))

    def to_chroma(self) -> dict:
        return _chroma(self.root)

    def to_sql(self, column: str, dialect: str = "sqlite") -> tuple[str, list[object]]:
        """A boolean SQL expression over the JSON object in `column` (text), with its parameters,
        for knowledge.database's `dialect`."""
        params: list[object] = []
        json = _POSTGRES if dialect == "postgresql" else _SQLITE
        return _sql(self.root, column, params, json), params


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    return "str" if isinstance(value, str) else "number"


class _Parser:
    """One filter's parse, counting its conditions and values against the whole-filter limits."""

    def __init__(self) -> None:
        self.conditions = 0
        self.values = 0

    def node(self, raw: object, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise InvalidFilter(f"filter is nested deeper than {MAX_DEPTH} levels; flatten it")
        if not isinstance(raw, dict) or not raw:
            raise InvalidFilter(f"a filter must be a non-empty object like {{\"field\": value}}, got {raw!r:.80}")
        if len(raw) > MAX_CLAUSES:
            raise InvalidFilter(
                f"a filter object has {len(raw)} keys, more than {MAX_CLAUSES}; combine fewer conditions"
            )
        parts = [self.clause(key, value, depth) for key, value in raw.items()]
        return parts[0] if len(parts) == 1 else Junction("$and", tuple(parts))

    def clause(self, key: object, value: object, depth: int) -> Node:
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not 1 <= len(value) <= MAX_CLAUSES:
                raise InvalidFilter(f"{key} takes a list of 1 to {MAX_CLAUSES} filters, got {value!r:.80}")
            parts = tuple(self.node(part, depth + 1) for part in value)
            return parts[0] if len(parts) == 1 else Junction(key, parts)
        if not isinstance(key, str):
            raise InvalidFilter(f"filter keys must be strings, got {key!r}")
        if key.startswith("$"):
            raise InvalidFilter(f"unknown operator {key!r} at the top of a filter; use $and or $or, or a field name")
        if key.startswith("_"):
            raise InvalidFilter(f"field {key!r} starts with '_', which is reserved for lorag; filter on your own fields")
        if not METADATA_KEY.fullmatch(key):
            raise InvalidFilter(f"{key!r:.80} is not a valid metadata field name")
        self.conditions += 1
        if self.conditions > MAX_CONDITIONS:
            raise InvalidFilter(f"filter has more than {MAX_CONDITIONS} conditions in all; simplify it")
        if not isinstance(value, dict):
            return Condition(key, "$eq", self.operand(key, "$eq", value))
        if len(value) != 1:
            raise InvalidFilter(f"the condition on {key!r} must have exactly one operator, got {list(value)!r:.80}")
        ((op, operand),) = value.items()
        if op not in OPERATORS:
            raise InvalidFilter(f"unknown operator {op!r} on {key!r}; supported: {', '.join(OPERATORS)}")
        return Condition(key, op, self.operand(key, op, operand))

    def operand(self, field: str, op: str, value: object) -> object:
        if op in ("$in", "$nin"):
            if not isinstance(value, list) or not 1 <= len(value) <= MAX_VALUES:
                raise InvalidFilter(f"{op} on {field!r} takes a list of 1 to {MAX_VALUES} values, got {value!r:.80}")
            self.count_values(len(value))
            for item in value:
                _scalar(field, op, item)
            if len({_kind(item) for item in value}) > 1:
                raise InvalidFilter(
                    f"{op} on {field!r} mixes value types; use only strings, only numbers or only booleans"
                )
            return list(value)
        self.count_values(1)
        _scalar(field, op, value)
        if op in COMPARISONS and _kind(value) != "number":
            raise InvalidFilter(f"{op} on {field!r} compares numbers only, got {value!r:.80}")
        return value

    def count_values(self, n: int) -> None:
        self.values += n
        if self.values > MAX_TOTAL_VALUES:
            raise InvalidFilter(f"filter has more than {MAX_TOTAL_VALUES} values in all its conditions; send fewer")


def _scalar(field: str, op: str, value: object) -> None:
    if isinstance(value, list):
        raise InvalidFilter(f"{op} on {field!r} takes one value; use $in to match any of several")
    if not check_scalar(value):
        raise InvalidFilter(
            f"{op} on {field!r} takes a string, a finite number or a boolean, got {value!r:.80} "
            "(null and nested values are not supported)"
        )
    # No stored value is longer, so a longer one could never match.
    if isinstance(value, str) and len(value) > MAX_METADATA_STRING_CHARS:
        raise InvalidFilter(f"{op} on {field!r}: a value is longer than {MAX_METADATA_STRING_CHARS} characters")


def as_float(value: object) -> object:
    """Numbers as floats (see the module docstring); other values unchanged."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def _chroma(node: Node) -> dict:
    if isinstance(node, Junction):
        return {node.op: [_chroma(part) for part in node.parts]}
    value = [as_float(v) for v in node.value] if isinstance(node.value, list) else as_float(node.value)
    return {node.field: {node.op: value}}


@dataclass(frozen=True)
class _Json:
    """One dialect's JSON tests, as SQL over `{column}` taking the field's path as a parameter:
    `kind` names the field's JSON type ('' when missing, never NULL, so that NOT reads "missing
    or different", as in Chroma); `text` and `number` read its value."""

    path: Callable[[str], str]
    kind: str
    text: str
    number: str
    names: dict[str, str]  # our type name → the dialect's


_SQLITE = _Json(
    path=lambda field: f'$."{field}"',
    kind="IFNULL(json_type({column}, ?), '')",
    text="json_extract({column}, ?)",
    number="CAST(json_extract({column}, ?) AS REAL)",
    names={"true": "'true'", "false": "'false'", "text": "'text'", "number": "('integer', 'real')"},
)
_POSTGRES = _Json(
    path=lambda field: field,
    kind="COALESCE(jsonb_typeof(({column})::jsonb -> ?::text), '')",
    text="(({column})::jsonb ->> ?::text)",
    number="(({column})::jsonb ->> ?::text)::double precision",
    names={"text": "'string'", "number": "('number')"},  # true and false: see _equals
)


def _sql(node: Node, column: str, params: list[object], json: _Json) -> str:
    if isinstance(node, Junction):
        joiner = " AND " if node.op == "$and" else " OR "
        return "(" + joiner.join(_sql(part, column, params, json) for part in node.parts) + ")"
    path = json.path(node.field)
    kind, number = json.kind.format(column=column), json.number.format(column=column)
    if node.op in COMPARISONS:
        params.extend([path, path, float(node.value)])
        # CASE, not AND: PostgreSQL may cast a text value before it tests the type.
        return f"(CASE WHEN {kind} IN {json.names['number']} THEN {number} {COMPARISONS[node.op]} ? ELSE 0 = 1 END)"
    values = node.value if isinstance(node.value, list) else [node.value]
    matches = "(" + " OR ".join(_equals(column, path, value, params, json) for value in values) + ")"
    return matches if node.op in ("$eq", "$in") else f"(NOT {matches})"


def _equals(column: str, path: str, value: object, params: list[object], json: _Json) -> str:
    kind = json.kind.format(column=column)
    if isinstance(value, bool):
        name = "true" if value else "false"
        if json is _POSTGRES:  # one JSON type for both: the value tells them apart
            params.extend([path, path])
            return f"({kind} = 'boolean' AND {json.text.format(column=column)} = '{name}')"
        params.append(path)
        return f"({kind} = {json.names[name]})"
    if isinstance(value, str):
        params.extend([path, path, value])
        return f"(CASE WHEN {kind} = {json.names['text']} THEN {json.text.format(column=column)} = ? ELSE 0 = 1 END)"
    params.extend([path, path, float(value)])
    return f"(CASE WHEN {kind} IN {json.names['number']} THEN {json.number.format(column=column)} = ? ELSE 0 = 1 END)"
