"""Fleet filters: parse `tags.site == "berlin" AND reported.firmware.version != "2.0.0"`.

A filter is a conjunction of comparisons of a dotted path with a JSON scalar literal (a string,
a number, true, false or null; numbers within +-2**53 so every database compares them
exactly). The parser and `matches` (the reference meaning) are pure; the store compiles the
same `Comparison`s to SQL, and a test checks the two agree.

Meaning: `==` holds when the path exists and equals the literal; `!=` holds when it does not
(a device that lacks the field is "not equal", which is what a rollout selector wants);
`== null` means the field is absent and `!= null` that it is present.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from services.shadow.domain import JsonObject, json_equal, unstorable_text
from services.shadow.errors import InvalidRequestError

Root = Literal["tags", "desired", "reported"]
Operator = Literal["==", "!="]

MAX_FILTER_CHARS = 2048
MAX_COMPARISONS = 16
MAX_PATH_DEPTH = 6
_PATH = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_:-]+)+)\s*(==|!=)\s*")
_AND = re.compile(r"\s+AND\s+", re.IGNORECASE)
_END = re.compile(r"\s*$")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_no_constants, parse_float=_finite_float)


@dataclass(frozen=True)
class Comparison:
    root: Root
    path: tuple[str, ...]
    op: Operator
    value: str | int | float | bool | None  # None means "absent"


@dataclass(frozen=True)
class FleetFilter:
    comparisons: tuple[Comparison, ...]

    def matches(self, tags: Mapping[str, str], desired: JsonObject, reported: JsonObject) -> bool:
        roots: dict[Root, Mapping[str, Any]] = {
            "tags": tags,
            "desired": desired,
            "reported": reported,
        }
        return all(_holds(c, _lookup(roots[c.root], c.path)) for c in self.comparisons)


_MISSING = object()


def _lookup(doc: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = doc
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _holds(comparison: Comparison, found: Any) -> bool:
    if comparison.value is None:
        equal = found is _MISSING
    else:
        equal = found is not _MISSING and json_equal(found, comparison.value)
    return equal if comparison.op == "==" else not equal


MAX_EXACT_INTEGER = 2**53


def _check_literal(value: Any) -> None:
    if isinstance(value, dict | list):
        raise InvalidRequestError("filter: compare with a string, number, true, false or null")
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (abs(value) > MAX_EXACT_INTEGER)
    ):
        raise InvalidRequestError("filter: numbers must lie within +-2**53")
    if isinstance(value, str) and unstorable_text(value):
        raise InvalidRequestError("filter: a string may not hold NUL or a lone surrogate")


def parse_filter(text: str) -> FleetFilter:
    """Parse a filter; an empty text matches every device."""
    if len(text) > MAX_FILTER_CHARS:
        raise InvalidRequestError(f"filter is over {MAX_FILTER_CHARS} characters")
    comparisons: list[Comparison] = []
    pos = 0
    if _END.fullmatch(text):
        return FleetFilter(())
    while True:
        match = _PATH.match(text, pos)
        if not match:
            raise InvalidRequestError(
                f"filter: expected 'path == value' or 'path != value' at character {pos}: "
                f"{text[pos : pos + 40]!r}"
            )
        root, *path = match.group(1).split(".")
        if root not in ("tags", "desired", "reported"):
            raise InvalidRequestError(
                f"filter: a path starts with tags, desired or reported, not {root!r}"
            )
        if len(path) > MAX_PATH_DEPTH or (root == "tags" and len(path) != 1):
            raise InvalidRequestError(f"filter: path {match.group(1)!r} is too deep")
        try:
            value, pos = _DECODER.raw_decode(text, match.end())
        except ValueError:
            raise InvalidRequestError(
                f"filter: expected a JSON value after {match.group(0).strip()!r}"
            ) from None
        _check_literal(value)
        if root == "tags" and value is not None and not isinstance(value, str):
            raise InvalidRequestError("filter: tags compare with strings")
        op: Operator = "==" if match.group(2) == "==" else "!="
        comparisons.append(Comparison(root, tuple(path), op, value))  # type: ignore[arg-type]
        if len(comparisons) > MAX_COMPARISONS:
            raise InvalidRequestError(f"filter: at most {MAX_COMPARISONS} comparisons")
        if _END.fullmatch(text, pos):
            return FleetFilter(tuple(comparisons))
        joiner = _AND.match(text, pos)
        if not joiner:
            raise InvalidRequestError(f"filter: expected AND at character {pos}")
        pos = joiner.end()
