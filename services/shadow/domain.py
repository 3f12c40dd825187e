"""The device shadow rules: parse and bound requests, merge, delta, metadata, versions.

Pure functions over plain data (JSON objects as dicts, a `ShadowState` per device). No gRPC,
SQL or MQTT here: the servicer, the store and the gateway translate and call these. Semantics
follow the AWS IoT Device Shadow service (DESIGN.md):

- `desired` and `reported` patches are merged into the stored sections; a null leaf deletes it,
  a null section (`"desired": null`) clears it; objects emptied by deletions disappear;
- the delta is every desired leaf absent from or different in reported (arrays compare whole);
- the version rises by one per accepted update, and an update naming a stale version fails;
- every leaf carries a metadata timestamp (epoch seconds).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import orjson

from services.common.jsontext import may_hold_big_integer
from services.shadow.errors import (
    DocumentTooLargeError,
    InvalidDeviceIdError,
    InvalidRequestError,
    VersionConflictError,
)

JsonObject = dict[str, Any]
Section = Literal["desired", "reported"]
SECTIONS: tuple[Section, ...] = ("desired", "reported")

DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
TAG_KEY_PATTERN = re.compile(r"[A-Za-z0-9_:-]{1,64}")  # no ".": filters name tags.<key>
MAX_TAGS = 50
MAX_TAG_VALUE_CHARS = 256


@dataclass(frozen=True)
class ShadowLimits:
    """Bounds on what a shadow may hold; AWS IoT's defaults."""

    max_document_bytes: int = 8192
    max_depth: int = 6
    max_client_token_chars: int = 64
    # A request can carry a little more than a document (clientToken, version, nulls).
    max_request_bytes: int = 16384


@dataclass(frozen=True)
class ShadowState:
    """One device's stored shadow. `version` survives a delete, as in AWS IoT."""

    desired: JsonObject = field(default_factory=dict)
    reported: JsonObject = field(default_factory=dict)
    metadata: JsonObject = field(default_factory=dict)  # {"desired": {...}, "reported": {...}}
    version: int = 0
    exists: bool = False

    def section(self, name: Section) -> JsonObject:
        return self.desired if name == "desired" else self.reported


@dataclass(frozen=True)
class UpdateRequest:
    """A parsed update: for each section present, a patch object or None (clear the section)."""

    sections: Mapping[Section, JsonObject | None]
    version: int | None = None
    client_token: str | None = None


@dataclass(frozen=True)
class UpdateResult:
    """What an accepted update did, with everything the gateway needs to publish."""

    previous: ShadowState
    current: ShadowState
    request: UpdateRequest
    delta: JsonObject  # the whole delta after the update ({} when none)
    publish_delta: bool  # the update touched desired and a delta remains
    timestamp: int
    # Skipped as a no-op (`skip_unchanged`): nothing to write or announce, current is previous.
    unchanged: bool = False

    @property
    def client_token(self) -> str | None:
        return self.request.client_token

    @property
    def accepted(self) -> JsonObject:
        """The `/update/accepted` message: the request's state, its metadata, the version."""
        accepted: JsonObject = {
            "state": dict(self.request.sections),
            "metadata": {
                name: stamp(patch, self.timestamp)
                if patch is not None
                else {"timestamp": self.timestamp}
                for name, patch in self.request.sections.items()
            },
            "version": self.current.version,
            "timestamp": self.timestamp,
        }
        if self.request.client_token is not None:
            accepted["clientToken"] = self.request.client_token
        return accepted


# --- validation -------------------------------------------------------------------------------


def validate_device_id(device_id: str) -> str:
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise InvalidDeviceIdError(
            "device id must be 1-128 characters of [A-Za-z0-9_.:-] starting with a letter or "
            f"digit (safe as an MQTT topic level), got {device_id[:140]!r}"
        )
    return device_id


RESERVED_PREFIX = "ota-"  # service accounts and their MQTT client ids


def validate_new_device_id(device_id: str) -> str:
    """An id a new device may take: valid, and not in the service accounts' namespace."""
    validate_device_id(device_id)
    if device_id.startswith(RESERVED_PREFIX):
        raise InvalidDeviceIdError(
            f"device ids starting with {RESERVED_PREFIX!r} are reserved for service accounts"
        )
    return device_id


def validate_tags(tags: Mapping[str, str]) -> dict[str, str]:
    if len(tags) > MAX_TAGS:
        raise InvalidRequestError(f"at most {MAX_TAGS} tags, got {len(tags)}")
    for key, value in tags.items():
        if not TAG_KEY_PATTERN.fullmatch(key):
            raise InvalidRequestError(f"tag key must be 1-64 characters of [A-Za-z0-9_:-]: {key!r}")
        if unstorable_text(value):
            raise InvalidRequestError(f"tag {key!r}: value holds NUL or a lone surrogate")
        if len(value) > MAX_TAG_VALUE_CHARS:
            raise InvalidRequestError(f"tag {key!r}: value over {MAX_TAG_VALUE_CHARS} characters")
    return dict(tags)


def _reject_constant(name: str) -> Any:
    raise InvalidRequestError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise InvalidRequestError(f"number {text[:40]} is out of range")
    return value


# Escapes of characters no store can keep: NUL (PostgreSQL's jsonb refuses it) and UTF-16
# surrogates (a lone one has no UTF-8 form). Valid JSON text, so looked for after decoding.
_UNSTORABLE_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


def unstorable_text(text: str) -> bool:
    """A string holding NUL or a lone surrogate, which a document may not contain."""
    if "\x00" in text:
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def _has_unstorable_text(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if unstorable_text(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def parse_json(raw: str | bytes, max_bytes: int, what: str = "document") -> Any:
    """Decode JSON text received from outside, bounded in size.

    Refused: invalid UTF-8 or JSON, NaN, Infinity and numbers that overflow to it, NUL
    characters and lone surrogates, and nesting deep enough to exhaust the parser's recursion.
    """
    try:
        data = raw.encode() if isinstance(raw, str) else raw
    except UnicodeEncodeError:
        raise InvalidRequestError(f"{what} is not valid UTF-8") from None
    if len(data) > max_bytes:
        raise DocumentTooLargeError(f"{what} is {len(data)} bytes, the limit is {max_bytes}")
    try:
        # orjson is several times faster on the fan-out path; the standard library decides
        # whatever orjson refuses (its verdict and messages are the reference) and text that
        # may hold an integer beyond 64 bits, which orjson would turn into a float.
        if may_hold_big_integer(data):
            value = _DECODER.decode(data.decode())
        else:
            try:
                value = orjson.loads(data)
            except orjson.JSONDecodeError:
                value = _DECODER.decode(data.decode())
    except InvalidRequestError:
        raise
    except RecursionError:
        raise InvalidRequestError(f"{what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidRequestError(f"{what} is not valid JSON: {exc}") from None
    if _UNSTORABLE_ESCAPE.search(data) and _has_unstorable_text(value):
        raise InvalidRequestError(f"{what} holds a NUL character or a lone UTF-16 surrogate")
    return value


def depth(value: Any) -> int:
    """Nesting levels of objects and arrays: {"a": 1} is 1, {"a": {"b": [1]}} is 3.

    Iterative, so a hostile document cannot exhaust the stack."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` nests more than `limit` levels (as `depth` counts). Recursion stops at
    the limit, so it is as safe as `depth` and several times faster on the hot path."""
    if isinstance(value, dict):
        children: Iterable[Any] = value.values()
    elif isinstance(value, list):
        children = value
    else:
        return False
    if limit <= 0:
        return True
    for child in children:  # a loop, not any(generator): this runs for every batch item
        if isinstance(child, (dict, list)) and deeper_than(child, limit - 1):
            return True
    return False


def _check_section(name: str, patch: Any, limits: ShadowLimits) -> JsonObject | None:
    if patch is None:
        return None
    if not isinstance(patch, dict):
        raise InvalidRequestError(f"state.{name} must be an object or null")
    if deeper_than(patch, limits.max_depth):
        raise InvalidRequestError(f"state.{name} is nested deeper than {limits.max_depth} levels")
    return patch


def parse_update_request(raw: str | bytes, limits: ShadowLimits) -> UpdateRequest:
    """Parse an AWS-style update document: {"state": {...}, "version"?, "clientToken"?}."""
    doc = parse_json(raw, limits.max_request_bytes, "update request")
    if not isinstance(doc, dict):
        raise InvalidRequestError("update request must be a JSON object")
    unknown = set(doc) - {"state", "version", "clientToken"}
    if unknown:
        raise InvalidRequestError(f"unknown field(s) in update request: {sorted(unknown)}")
    client_token = parse_client_token(doc.get("clientToken"), limits)
    state = doc.get("state")
    if not isinstance(state, dict):
        raise InvalidRequestError("update request needs a 'state' object")
    unknown = set(state) - set(SECTIONS)
    if unknown:
        raise InvalidRequestError(
            f"state may hold only desired and reported, not {sorted(unknown)}"
        )
    if not state:
        raise InvalidRequestError("state must contain desired or reported")
    sections = {
        name: _check_section(name, state[name], limits) for name in SECTIONS if name in state
    }
    version = doc.get("version")
    if version is not None and (
        not isinstance(version, int) or isinstance(version, bool) or version < 0
    ):
        raise InvalidRequestError("version must be a non-negative integer")
    return UpdateRequest(sections=sections, version=version, client_token=client_token)


def parse_client_token(token: Any, limits: ShadowLimits) -> str | None:
    if token is None:
        return None
    if not isinstance(token, str) or len(token) > limits.max_client_token_chars:
        raise InvalidRequestError(
            f"clientToken must be a string of at most {limits.max_client_token_chars} characters"
        )
    return token


def parse_desired_patch(raw: str | bytes, limits: ShadowLimits) -> JsonObject | None:
    """A bare desired patch as BatchUpdateDesired carries it: an object, or null to clear."""
    patch = parse_json(raw, limits.max_request_bytes, "desired patch")
    return _check_section("desired", patch, limits)


# --- the rules --------------------------------------------------------------------------------


def json_equal(a: Any, b: Any) -> bool:
    """JSON value equality: true is not 1, 1 equals 1.0, arrays and objects compare whole."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(json_equal(v, b[k]) for k, v in a.items())
        )
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(json_equal, a, b))
    return type(a) is type(b) and a == b


def same_json(a: Any, b: Any) -> bool:
    """Exact JSON identity, as a stored document would show it: unlike `json_equal`, 1 is not
    1.0 (a write would change the stored text); true is not 1; objects and arrays compare whole."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_json(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same_json, a, b))
    return bool(a == b)


def merge(
    document: JsonObject, metadata: JsonObject, patch: JsonObject, timestamp: int
) -> tuple[JsonObject, JsonObject]:
    """Merge `patch` into `document` and its metadata tree; returns new objects.

    A null leaf deletes; an object merges key by key; any other value (arrays included)
    replaces. Objects left empty are dropped, so a document never holds `{}` or null.
    """
    doc = dict(document)
    meta = dict(metadata)
    for key, value in patch.items():
        if value is None:
            doc.pop(key, None)
            meta.pop(key, None)
        elif isinstance(value, dict):
            old = doc.get(key)
            old_meta = meta.get(key)
            sub_doc, sub_meta = merge(
                old if isinstance(old, dict) else {},
                old_meta if isinstance(old, dict) and isinstance(old_meta, dict) else {},
                value,
                timestamp,
            )
            if sub_doc:
                doc[key], meta[key] = sub_doc, sub_meta
            else:
                doc.pop(key, None)
                meta.pop(key, None)
        else:
            doc[key] = value
            meta[key] = {"timestamp": timestamp}
    return doc, meta


def compute_delta(desired: JsonObject, reported: JsonObject) -> JsonObject:
    """Desired leaves that reported lacks or holds differently, keeping their nested paths."""
    delta: JsonObject = {}
    for key, want in desired.items():
        have = reported.get(key, _ABSENT)
        if isinstance(want, dict) and isinstance(have, dict):
            sub = compute_delta(want, have)
            if sub:
                delta[key] = sub
        elif have is _ABSENT or not json_equal(want, have):
            delta[key] = want
    return delta


_ABSENT = object()


def stamp(patch: JsonObject, timestamp: int) -> JsonObject:
    """The metadata of a patch: each leaf (null included) becomes {"timestamp": ts}."""
    return {
        key: stamp(value, timestamp) if isinstance(value, dict) else {"timestamp": timestamp}
        for key, value in patch.items()
    }


def project_metadata(metadata: JsonObject, shape: JsonObject) -> JsonObject:
    """The part of a metadata tree that covers the leaves of `shape` (e.g. the delta)."""
    out: JsonObject = {}
    for key, value in shape.items():
        meta = metadata.get(key)
        if isinstance(value, dict) and isinstance(meta, dict):  # a nested object, not a leaf
            out[key] = project_metadata(meta, value)
        elif meta is not None:
            out[key] = meta
    return out


def document_size(desired: JsonObject, reported: JsonObject) -> int:
    """UTF-8 bytes of the state document as stored: compact JSON of both sections."""
    document = {"desired": desired, "reported": reported}
    try:
        return len(orjson.dumps(document))
    except TypeError:  # an integer beyond 64 bits: `dumps` writes it with the standard library
        return len(dumps(document).encode())


def apply_update(
    state: ShadowState,
    request: UpdateRequest,
    now: float,
    limits: ShadowLimits,
    skip_unchanged: bool = False,
) -> UpdateResult:
    """Apply an update to a shadow (creating it if it does not exist).

    With `skip_unchanged`, a desired-only update whose merge leaves an existing shadow's
    desired exactly as it is (`same_json`) is a no-op: the result has `unchanged` set and the
    state as it was (same version and metadata), so nothing is written or announced. That makes
    a re-sent fan-out batch notify each device once. A stale `version` still conflicts, and a
    shadow that does not exist is still created: both are decided before any skipping.
    """
    if request.version is not None and request.version != state.version:
        raise VersionConflictError(
            f"version conflict: the request names version {request.version}, "
            f"the shadow is at version {state.version}",
            current_version=state.version,
        )
    timestamp = int(now)
    sections = {"desired": state.desired, "reported": state.reported}
    metadata = {name: state.metadata.get(name, {}) for name in SECTIONS}
    for name, patch in request.sections.items():
        if patch is None:
            sections[name], metadata[name] = {}, {}
        else:
            sections[name], metadata[name] = merge(sections[name], metadata[name], patch, timestamp)
    if (
        skip_unchanged
        and state.exists
        and request.sections.keys() == {"desired"}
        and same_json(sections["desired"], state.desired)
    ):
        return UpdateResult(
            previous=state,
            current=state,
            request=request,
            delta=compute_delta(state.desired, state.reported),
            publish_delta=False,
            timestamp=timestamp,
            unchanged=True,
        )
    size = document_size(sections["desired"], sections["reported"])
    if size > limits.max_document_bytes:
        raise DocumentTooLargeError(
            f"the shadow document would be {size} bytes, the limit is {limits.max_document_bytes}"
        )
    current = ShadowState(
        desired=sections["desired"],
        reported=sections["reported"],
        metadata={name: meta for name, meta in metadata.items() if meta},
        version=state.version + 1,
        exists=True,
    )
    delta = compute_delta(current.desired, current.reported)
    return UpdateResult(
        previous=state,
        current=current,
        request=request,
        delta=delta,
        publish_delta="desired" in request.sections and bool(delta),
        timestamp=timestamp,
    )


def delete_shadow(state: ShadowState, expected_version: int | None) -> ShadowState:
    """Clear a shadow's state; the version is kept so a later update continues from it."""
    if expected_version is not None and expected_version != state.version:
        raise VersionConflictError(
            f"version conflict: expected version {expected_version}, "
            f"the shadow is at version {state.version}",
            current_version=state.version,
        )
    return replace(state, desired={}, reported={}, metadata={}, exists=False)


# --- documents and messages -------------------------------------------------------------------


def _state_view(state: ShadowState, with_delta: bool) -> JsonObject:
    view: JsonObject = {}
    if state.desired:
        view["desired"] = state.desired
    if state.reported:
        view["reported"] = state.reported
    if with_delta:
        delta = compute_delta(state.desired, state.reported)
        if delta:
            view["delta"] = delta
    return view


def shadow_document(state: ShadowState, now: float, client_token: str | None = None) -> JsonObject:
    """The whole shadow as `GetShadow` and `<id>/state/get/accepted` return it."""
    doc: JsonObject = {
        "state": _state_view(state, with_delta=True),
        "metadata": state.metadata,
        "version": state.version,
        "timestamp": int(now),
    }
    if client_token is not None:
        doc["clientToken"] = client_token
    return doc


def delta_message(
    state: ShadowState,
    now: float,
    client_token: str | None = None,
    delta: JsonObject | None = None,
) -> JsonObject:
    """The `<id>/state/update/delta` message: every differing desired field, with metadata.
    `delta`, when the caller has it already, is `compute_delta` of the state's sections."""
    if delta is None:
        delta = compute_delta(state.desired, state.reported)
    message: JsonObject = {
        "version": state.version,
        "timestamp": int(now),
        "state": delta,
        "metadata": project_metadata(state.metadata.get("desired", {}), delta),
    }
    if client_token is not None:
        message["clientToken"] = client_token
    return message


def documents_message(result: UpdateResult) -> JsonObject:
    """The `<id>/state/update/documents` message: the shadow before and after the update."""

    def view(state: ShadowState) -> JsonObject:
        return {
            "state": _state_view(state, with_delta=False),
            "metadata": state.metadata,
            "version": state.version,
        }

    message: JsonObject = {
        "previous": view(result.previous) if result.previous.exists else None,
        "current": view(result.current),
        "timestamp": result.timestamp,
    }
    if result.client_token is not None:
        message["clientToken"] = result.client_token
    return message


def rejected_message(code: int, message: str, client_token: str | None, now: float) -> JsonObject:
    """The body of a `.../rejected` message."""
    body: JsonObject = {"code": code, "message": message, "timestamp": int(now)}
    if client_token is not None:
        body["clientToken"] = client_token
    return body


def dumps(value: Any) -> str:
    """Compact UTF-8 JSON as every message and stored document is written.

    orjson is several times faster than the standard library on the fan-out path; it refuses
    integers beyond 64 bits, which the standard library then writes (docs/adr/0008)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
