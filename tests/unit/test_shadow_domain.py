"""Unit and property tests of the device shadow rules (`services.shadow.domain`).

The examples follow the AWS IoT Device Shadow semantics that DESIGN.md ("Device protocol")
adopts; the property tests check the invariants that must hold for any document.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.shadow import domain
from services.shadow.domain import (
    JsonObject,
    ShadowLimits,
    ShadowState,
    UpdateRequest,
    UpdateResult,
    apply_update,
    compute_delta,
    delete_shadow,
    delta_message,
    depth,
    document_size,
    documents_message,
    dumps,
    json_equal,
    merge,
    parse_desired_patch,
    parse_json,
    parse_update_request,
    rejected_message,
    same_json,
    shadow_document,
    validate_device_id,
    validate_tags,
)
from services.shadow.errors import (
    DocumentTooLargeError,
    InvalidDeviceIdError,
    InvalidRequestError,
    ShadowError,
    VersionConflictError,
)

LIMITS = ShadowLimits()
NOW = 1_700_000_000.9  # int(NOW) is what every timestamp must carry
TS = 1_700_000_000


def update(
    state: ShadowState, body: JsonObject, now: float = NOW, limits: ShadowLimits = LIMITS
) -> UpdateResult:
    """Send `body` through the same path a device update takes: JSON text, parse, apply."""
    return apply_update(state, parse_update_request(json.dumps(body), limits), now, limits)


def nested(levels: int) -> JsonObject:
    """An object `levels` deep by `depth()`: nested(1) == {"k": 1}."""
    value: Any = 1
    for _ in range(levels):
        value = {"k": value}
    result: JsonObject = value
    return result


# --- merge ------------------------------------------------------------------------------------


def test_nested_objects_merge_key_by_key() -> None:
    first = update(ShadowState(), {"state": {"reported": {"light": {"on": True, "level": 3}}}})
    second = update(first.current, {"state": {"reported": {"light": {"level": 5, "hue": "red"}}}})
    assert second.current.reported == {"light": {"on": True, "level": 5, "hue": "red"}}


def test_null_leaf_deletes_it_and_its_metadata() -> None:
    first = update(ShadowState(), {"state": {"reported": {"a": {"b": 1, "c": 2}, "d": 3}}})
    second = update(first.current, {"state": {"reported": {"a": {"b": None}}}}, now=NOW + 10)
    assert second.current.reported == {"a": {"c": 2}, "d": 3}
    assert second.current.metadata["reported"] == {
        "a": {"c": {"timestamp": TS}},
        "d": {"timestamp": TS},
    }


def test_null_for_a_missing_key_is_a_no_op() -> None:
    first = update(ShadowState(), {"state": {"reported": {"a": 1}}})
    second = update(first.current, {"state": {"reported": {"zzz": None}}})
    assert second.current.reported == {"a": 1}
    assert second.current.version == 2


def test_desired_null_clears_the_section_only() -> None:
    first = update(
        ShadowState(), {"state": {"desired": {"a": 1, "b": {"c": 2}}, "reported": {"a": 0}}}
    )
    second = update(first.current, {"state": {"desired": None}})
    assert second.current.desired == {}
    assert second.current.reported == {"a": 0}
    assert "desired" not in second.current.metadata
    assert second.current.metadata["reported"] == {"a": {"timestamp": TS}}
    assert second.delta == {}


def test_objects_emptied_by_deletion_disappear() -> None:
    first = update(ShadowState(), {"state": {"reported": {"a": {"b": {"c": 1}}, "x": 1}}})
    second = update(first.current, {"state": {"reported": {"a": {"b": {"c": None}}}}})
    assert second.current.reported == {"x": 1}
    assert second.current.metadata["reported"] == {"x": {"timestamp": TS}}
    third = update(second.current, {"state": {"reported": {"x": None}}})
    assert third.current.reported == {}
    assert "reported" not in third.current.metadata


def test_arrays_replace_whole() -> None:
    first = update(ShadowState(), {"state": {"reported": {"l": [1, 2, 3], "o": [{"a": 1}]}}})
    second = update(first.current, {"state": {"reported": {"l": [4], "o": [{"b": 2}]}}})
    assert second.current.reported == {"l": [4], "o": [{"b": 2}]}


def test_object_replaces_scalar_and_scalar_replaces_object() -> None:
    first = update(ShadowState(), {"state": {"reported": {"a": 1, "b": {"c": 1}}}})
    second = update(first.current, {"state": {"reported": {"a": {"x": 2}, "b": 7}}})
    assert second.current.reported == {"a": {"x": 2}, "b": 7}
    assert second.current.metadata["reported"] == {
        "a": {"x": {"timestamp": TS}},
        "b": {"timestamp": TS},
    }


def test_merge_returns_new_objects_and_leaves_its_inputs_alone() -> None:
    document: JsonObject = {"a": {"b": 1}}
    metadata: JsonObject = {"a": {"b": {"timestamp": 1}}}
    doc, meta = merge(document, metadata, {"a": {"b": None, "c": 2}}, 5)
    assert doc == {"a": {"c": 2}}
    assert meta == {"a": {"c": {"timestamp": 5}}}
    assert document == {"a": {"b": 1}}
    assert metadata == {"a": {"b": {"timestamp": 1}}}


# --- delta ------------------------------------------------------------------------------------


def test_delta_keeps_nested_path_and_ignores_reported_only_keys() -> None:
    result = update(
        ShadowState(),
        {
            "state": {
                "desired": {"color": "red", "light": {"on": True, "level": 5}},
                "reported": {"color": "red", "light": {"on": True, "level": 3}, "extra": 1},
            }
        },
    )
    assert result.delta == {"light": {"level": 5}}


def test_delta_holds_desired_leaves_absent_from_reported() -> None:
    assert compute_delta({"a": 1, "b": {"c": 2}}, {}) == {"a": 1, "b": {"c": 2}}
    assert compute_delta({"a": {"b": 1}}, {"a": 5}) == {"a": {"b": 1}}
    assert compute_delta({"a": 5}, {"a": {"b": 1}}) == {"a": 5}
    assert compute_delta({}, {"a": 1}) == {}


def test_delta_compares_arrays_whole() -> None:
    assert compute_delta({"l": [1, 2]}, {"l": [1, 2]}) == {}
    assert compute_delta({"l": [1, 2]}, {"l": [2, 1]}) == {"l": [1, 2]}
    assert compute_delta({"l": [1, 2]}, {"l": [1, 2, 3]}) == {"l": [1, 2]}


def test_delta_carries_every_differing_desired_field_not_only_the_last_update() -> None:
    first = update(ShadowState(), {"state": {"desired": {"a": 1}}})
    second = update(first.current, {"state": {"desired": {"b": {"c": 2}}}})
    assert second.delta == {"a": 1, "b": {"c": 2}}
    assert delta_message(second.current, NOW)["state"] == {"a": 1, "b": {"c": 2}}


def test_true_differs_from_one_but_one_equals_one_point_zero() -> None:
    delta = compute_delta({"on": True, "n": 1, "f": 2.0}, {"on": 1, "n": 1.0, "f": 2})
    assert delta == {"on": True}
    assert delta["on"] is True
    assert compute_delta({"on": 1}, {"on": True}) == {"on": 1}
    assert compute_delta({"off": False}, {"off": 0}) == {"off": False}


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        (True, 1, False),
        (False, 0, False),
        (1, 1.0, True),
        (True, True, True),
        ("1", 1, False),
        (None, None, True),
        (None, 0, False),
        ([1, 2], [1, 2.0], True),
        ([True], [1], False),
        ({"a": 1}, {"a": 1.0}, True),
        ({"a": 1}, {"a": 1, "b": 2}, False),
        ({"a": [1]}, {"a": 1}, False),
        ([], {}, False),
    ],
)
def test_json_equal(a: Any, b: Any, equal: bool) -> None:
    assert json_equal(a, b) is equal
    assert json_equal(b, a) is equal


# --- versions, client tokens, metadata --------------------------------------------------------


def test_version_rises_by_one_per_accepted_update() -> None:
    state = ShadowState()
    assert state.version == 0
    for expected in (1, 2, 3):
        result = update(state, {"state": {"reported": {"n": expected}}})
        assert result.current.version == expected
        assert result.accepted["version"] == expected
        assert result.previous is state
        state = result.current
    assert state.exists


def test_update_naming_the_current_version_is_accepted() -> None:
    first = update(ShadowState(), {"state": {"reported": {"a": 1}}})
    second = update(first.current, {"state": {"reported": {"a": 2}}, "version": 1})
    assert second.current.version == 2


@pytest.mark.parametrize("named", [0, 2, 7])
def test_update_naming_another_version_is_a_conflict(named: int) -> None:
    state = update(ShadowState(), {"state": {"reported": {"a": 1}}}).current
    with pytest.raises(VersionConflictError) as info:
        update(state, {"state": {"reported": {"a": 2}}, "version": named})
    assert info.value.current_version == 1
    assert info.value.code == 409
    assert state.reported == {"a": 1}


def test_client_token_is_echoed_on_accepted_and_documents() -> None:
    result = update(ShadowState(), {"state": {"desired": {"a": 1}}, "clientToken": "tok-1"})
    assert result.client_token == "tok-1"
    assert result.accepted["clientToken"] == "tok-1"
    assert documents_message(result)["clientToken"] == "tok-1"
    no_token = update(result.current, {"state": {"desired": {"a": 2}}})
    assert "clientToken" not in no_token.accepted
    assert "clientToken" not in documents_message(no_token)


def test_accepted_message_shape() -> None:
    result = update(
        ShadowState(),
        {
            "state": {"desired": {"a": {"b": 1, "gone": None}}, "reported": None},
            "clientToken": "t",
        },
    )
    assert result.accepted == {
        "state": {"desired": {"a": {"b": 1, "gone": None}}, "reported": None},
        "metadata": {
            "desired": {"a": {"b": {"timestamp": TS}, "gone": {"timestamp": TS}}},
            "reported": {"timestamp": TS},
        },
        "version": 1,
        "timestamp": TS,
        "clientToken": "t",
    }
    assert result.timestamp == TS


def test_every_leaf_has_a_metadata_timestamp_of_its_last_update() -> None:
    first = update(
        ShadowState(),
        {"state": {"reported": {"a": 1, "b": {"c": [1, 2], "d": "x"}}}},
        now=100.99,
    )
    assert first.current.metadata == {
        "reported": {
            "a": {"timestamp": 100},
            "b": {"c": {"timestamp": 100}, "d": {"timestamp": 100}},
        }
    }
    second = update(first.current, {"state": {"reported": {"b": {"d": "y"}}}}, now=200.5)
    assert second.current.metadata == {
        "reported": {
            "a": {"timestamp": 100},
            "b": {"c": {"timestamp": 100}, "d": {"timestamp": 200}},
        }
    }


# --- delete -----------------------------------------------------------------------------------


def test_delete_keeps_the_version_and_clears_the_state() -> None:
    state = update(ShadowState(), {"state": {"desired": {"a": 1}, "reported": {"a": 2}}}).current
    state = update(state, {"state": {"reported": {"b": 1}}}).current
    deleted = delete_shadow(state, expected_version=None)
    assert deleted.version == 2
    assert deleted.desired == {}
    assert deleted.reported == {}
    assert deleted.metadata == {}
    assert not deleted.exists


def test_delete_naming_a_stale_version_is_a_conflict() -> None:
    state = update(ShadowState(), {"state": {"reported": {"a": 1}}}).current
    assert delete_shadow(state, expected_version=1).version == 1
    with pytest.raises(VersionConflictError) as info:
        delete_shadow(state, expected_version=0)
    assert info.value.current_version == 1


def test_update_after_delete_continues_from_the_kept_version() -> None:
    state = update(ShadowState(), {"state": {"reported": {"a": 1}}}).current
    state = update(state, {"state": {"reported": {"a": 2}}}).current
    deleted = delete_shadow(state, expected_version=2)
    with pytest.raises(VersionConflictError):
        update(deleted, {"state": {"reported": {"b": 1}}, "version": 0})
    result = update(deleted, {"state": {"reported": {"b": 1}}, "version": 2})
    assert result.current.version == 3
    assert result.current.reported == {"b": 1}
    assert result.current.exists
    assert documents_message(result)["previous"] is None


# --- messages ---------------------------------------------------------------------------------


def test_shadow_document_shape() -> None:
    state = update(
        ShadowState(),
        {"state": {"desired": {"a": 1, "b": 2}, "reported": {"a": 1, "c": 3}}},
        now=50,
    ).current
    assert shadow_document(state, now=60.7, client_token="ct") == {
        "state": {
            "desired": {"a": 1, "b": 2},
            "reported": {"a": 1, "c": 3},
            "delta": {"b": 2},
        },
        "metadata": {
            "desired": {"a": {"timestamp": 50}, "b": {"timestamp": 50}},
            "reported": {"a": {"timestamp": 50}, "c": {"timestamp": 50}},
        },
        "version": 1,
        "timestamp": 60,
        "clientToken": "ct",
    }


def test_shadow_document_omits_empty_sections_and_an_empty_delta() -> None:
    state = update(ShadowState(), {"state": {"reported": {"a": 1}}}, now=5).current
    assert shadow_document(state, now=5) == {
        "state": {"reported": {"a": 1}},
        "metadata": {"reported": {"a": {"timestamp": 5}}},
        "version": 1,
        "timestamp": 5,
    }


def test_delta_message_shape_with_metadata_of_the_delta_leaves_only() -> None:
    state = update(
        ShadowState(),
        {"state": {"desired": {"a": 1, "b": {"c": 2, "d": 3}}, "reported": {"b": {"d": 3}}}},
        now=10,
    ).current
    state = update(state, {"state": {"desired": {"e": [1]}}}, now=20).current
    assert delta_message(state, now=30, client_token="x") == {
        "version": 2,
        "timestamp": 30,
        "state": {"a": 1, "b": {"c": 2}, "e": [1]},
        "metadata": {
            "a": {"timestamp": 10},
            "b": {"c": {"timestamp": 10}},
            "e": {"timestamp": 20},
        },
        "clientToken": "x",
    }


def test_documents_message_shape() -> None:
    first = update(ShadowState(), {"state": {"desired": {"a": 1}}}, now=1)
    assert documents_message(first) == {
        "previous": None,
        "current": {
            "state": {"desired": {"a": 1}},
            "metadata": {"desired": {"a": {"timestamp": 1}}},
            "version": 1,
        },
        "timestamp": 1,
    }
    second = update(first.current, {"state": {"reported": {"a": 1}}, "clientToken": "c"}, now=2)
    assert documents_message(second) == {
        "previous": {
            "state": {"desired": {"a": 1}},
            "metadata": {"desired": {"a": {"timestamp": 1}}},
            "version": 1,
        },
        "current": {
            "state": {"desired": {"a": 1}, "reported": {"a": 1}},
            "metadata": {
                "desired": {"a": {"timestamp": 1}},
                "reported": {"a": {"timestamp": 2}},
            },
            "version": 2,
        },
        "timestamp": 2,
        "clientToken": "c",
    }


def test_rejected_message_shape() -> None:
    assert rejected_message(409, "conflict", "t", now=9.9) == {
        "code": 409,
        "message": "conflict",
        "timestamp": 9,
        "clientToken": "t",
    }
    assert rejected_message(400, "bad", None, now=1) == {
        "code": 400,
        "message": "bad",
        "timestamp": 1,
    }


@pytest.mark.parametrize(
    ("before", "body", "publish"),
    [
        ({}, {"desired": {"a": 1}}, True),
        ({"reported": {"a": 1}}, {"desired": {"a": 1}}, False),
        ({"desired": {"a": 1}}, {"reported": {"a": 2}}, False),
        ({"desired": {"a": 1}}, {"desired": {"b": 2}, "reported": {"b": 2}}, True),
        ({"desired": {"a": 1}}, {"desired": {"a": None}}, False),
        ({"desired": {"a": 1}}, {"desired": None}, False),
        ({"desired": {"a": 1}, "reported": {"a": 1}}, {"desired": {"a": 1}}, False),
        ({"reported": {"a": 1}}, {"desired": {"a": 2}}, True),
        ({"desired": {"a": 1}}, {"reported": {"b": 1}}, False),
    ],
)
def test_publish_delta_only_when_desired_was_updated_and_a_delta_remains(
    before: JsonObject, body: JsonObject, publish: bool
) -> None:
    state = update(ShadowState(), {"state": before}).current if before else ShadowState()
    result = update(state, {"state": body})
    assert result.publish_delta is publish
    assert result.delta == compute_delta(result.current.desired, result.current.reported)


# --- limits -----------------------------------------------------------------------------------


def test_document_over_the_limit_after_merge_is_too_large() -> None:
    limits = ShadowLimits(max_document_bytes=120)
    # each update is small, but together they would be over the limit
    first = update(ShadowState(), {"state": {"reported": {"a": "x" * 40}}}, limits=limits)
    second = update(first.current, {"state": {"desired": {"b": "y" * 40}}}, limits=limits)
    with pytest.raises(DocumentTooLargeError) as info:
        update(second.current, {"state": {"reported": {"c": "z" * 40}}}, limits=limits)
    assert info.value.code == 413


def test_document_exactly_at_the_limit_is_accepted() -> None:
    reported = {"a": "x" * 50}
    size = document_size({}, reported)
    limits = ShadowLimits(max_document_bytes=size)
    result = update(ShadowState(), {"state": {"reported": reported}}, limits=limits)
    assert result.current.reported == reported
    with pytest.raises(DocumentTooLargeError):
        update(ShadowState(), {"state": {"reported": {"a": "x" * 51}}}, limits=limits)


def test_deleting_makes_room_under_the_limit() -> None:
    limits = ShadowLimits(max_document_bytes=100)
    state = update(ShadowState(), {"state": {"reported": {"a": "x" * 60}}}, limits=limits).current
    with pytest.raises(DocumentTooLargeError):
        update(state, {"state": {"reported": {"b": "y" * 30}}}, limits=limits)
    result = update(state, {"state": {"reported": {"a": None, "b": "y" * 30}}}, limits=limits)
    assert result.current.reported == {"b": "y" * 30}


def test_document_size_counts_utf8_bytes_of_the_stored_json() -> None:
    # The stored and published form is `dumps` (UTF-8, no \\u escapes); the 8 KiB limit is on
    # those bytes, as the request limit already counts UTF-8 bytes.
    desired: JsonObject = {"name": "é" * 10, "emoji": "\U0001f600"}
    expected = len(dumps({"desired": desired, "reported": {}}).encode("utf-8"))
    assert document_size(desired, {}) == expected


def test_non_ascii_document_under_the_limit_in_utf8_is_accepted() -> None:
    # 3000 two-byte characters: about 6 KB of UTF-8, well under the 8 KiB default.
    body = {"state": {"reported": {"name": "é" * 3000}}}
    raw = json.dumps(body, ensure_ascii=False).encode("utf-8")
    assert len(raw) < LIMITS.max_document_bytes
    result = apply_update(ShadowState(), parse_update_request(raw, LIMITS), NOW, LIMITS)
    assert result.current.reported == {"name": "é" * 3000}


def test_request_over_the_request_limit_is_too_large() -> None:
    limits = ShadowLimits(max_request_bytes=64)
    body = json.dumps({"state": {"reported": {"a": "x" * 40}}})
    assert len(body) > 64
    with pytest.raises(DocumentTooLargeError):
        parse_update_request(body, limits)
    with pytest.raises(DocumentTooLargeError):
        parse_desired_patch(json.dumps({"a": "x" * 60}), limits)
    # the limit is on UTF-8 bytes, not characters: 30 characters, 60 bytes
    with pytest.raises(DocumentTooLargeError):
        parse_json('"' + "é" * 32 + '"', 64)
    assert parse_json('"' + "é" * 30 + '"', 64) == "é" * 30


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"state": {"reported": {"a": 1}}',
        b"{'state': {}}",
        b'{"state": {"reported": {"a": "\xff"}}}',
        b'\xc3\x28{"state": {"reported": {"a": 1}}}',
        b'{"state": {"reported": {"a": NaN}}}',
        b'{"state": {"reported": {"a": Infinity}}}',
        b'{"state": {"reported": {"a": -Infinity}}}',
        b"[]",
        b'"state"',
        b"1",
        b"null",
        b'{"state": {"reported": {"a": 1}}, "unknown": 1}',
        b'{"state": {"reported": {"a": 1}}, "metadata": {}}',
        b"{}",
        b'{"version": 1}',
        b'{"state": null}',
        b'{"state": []}',
        b'{"state": "desired"}',
        b'{"state": {}}',
        b'{"state": {"delta": {"a": 1}}}',
        b'{"state": {"reported": {"a": 1}, "delta": {"a": 1}}}',
        b'{"state": {"desired": 1}}',
        b'{"state": {"desired": [1]}}',
        b'{"state": {"reported": "x"}}',
        b'{"state": {"reported": true}}',
        b'{"state": {"reported": {}}, "version": -1}',
        b'{"state": {"reported": {}}, "version": true}',
        b'{"state": {"reported": {}}, "version": "1"}',
        b'{"state": {"reported": {}}, "version": 1.5}',
        b'{"state": {"reported": {}}, "clientToken": 1}',
        b'{"state": {"reported": {}}, "clientToken": ["a"]}',
    ],
)
def test_bad_update_requests_are_invalid(raw: bytes) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_update_request(raw, LIMITS)
    assert info.value.code == 400


def test_client_token_length_bound() -> None:
    ok = parse_update_request(
        json.dumps({"state": {"reported": {}}, "clientToken": "t" * 64}), LIMITS
    )
    assert ok.client_token == "t" * 64
    with pytest.raises(InvalidRequestError):
        parse_update_request(
            json.dumps({"state": {"reported": {}}, "clientToken": "t" * 65}), LIMITS
        )


def test_good_update_request_is_parsed() -> None:
    request = parse_update_request(
        b'{"state": {"desired": null, "reported": {"a": {"b": [1, null]}}},'
        b' "version": 0, "clientToken": "c"}',
        LIMITS,
    )
    assert request == UpdateRequest(
        sections={"desired": None, "reported": {"a": {"b": [1, None]}}},
        version=0,
        client_token="c",
    )


def test_depth_counts_objects_and_arrays() -> None:
    assert depth({}) == 1
    assert depth({"a": 1}) == 1
    assert depth({"a": {"b": [1]}}) == 3
    assert depth([[], [[1]]]) == 3
    assert depth(5) == 0
    assert depth(nested(6)) == 6


def test_section_at_max_depth_is_accepted_and_one_deeper_is_rejected() -> None:
    assert depth(nested(6)) == 6
    request = parse_update_request(json.dumps({"state": {"reported": nested(6)}}), LIMITS)
    assert request.sections["reported"] == nested(6)
    with pytest.raises(InvalidRequestError):
        parse_update_request(json.dumps({"state": {"reported": nested(7)}}), LIMITS)
    with pytest.raises(InvalidRequestError):
        parse_update_request(json.dumps({"state": {"desired": {"a": [[[[[[1]]]]]]}}}), LIMITS)
    small = ShadowLimits(max_depth=2)
    parse_update_request(json.dumps({"state": {"desired": nested(2)}}), small)
    with pytest.raises(InvalidRequestError):
        parse_update_request(json.dumps({"state": {"desired": nested(3)}}), small)


@pytest.mark.parametrize("levels", [400, 600, 800])
def test_absurdly_deep_request_within_the_size_limit_is_invalid_not_a_crash(levels: int) -> None:
    # Deep enough to recurse past Python's limit somewhere, small enough for max_request_bytes:
    # it must still end as the service's own 400, not a RecursionError.
    raw = '{"state": {"reported": ' + '{"a":' * levels + "1" + "}" * levels + "}}"
    assert len(raw.encode()) <= LIMITS.max_request_bytes
    with pytest.raises(InvalidRequestError):
        parse_update_request(raw, LIMITS)
    with pytest.raises(InvalidRequestError):
        parse_desired_patch('{"a":' * levels + "1" + "}" * levels, LIMITS)


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "[1e999]"])
def test_number_literals_that_overflow_to_infinity_are_refused(literal: str) -> None:
    # json.loads turns 1e400 into float('inf') without calling parse_constant; stored, it would
    # be written back as `Infinity`, which is not JSON.
    with pytest.raises(InvalidRequestError):
        parse_json(literal, 100)
    with pytest.raises(InvalidRequestError):
        parse_update_request('{"state": {"reported": {"a": ' + literal + "}}}", LIMITS)


def test_whatever_is_accepted_can_be_written_back_as_utf8_json() -> None:
    # A lone surrogate escape is valid JSON text but has no UTF-8 form: accepting it would make
    # the stored document and every later message unwritable.
    # Decided: such a document is refused.
    raw = b'{"state": {"reported": {"name": "\\ud800"}}}'
    with pytest.raises(InvalidRequestError):
        parse_update_request(raw, LIMITS)


# Documents holding a character no store can keep: NUL (PostgreSQL's jsonb has none) or a lone
# UTF-16 surrogate (no UTF-8 form), as a value, a key, nested in an array, in either section.
def in_state(section: str, patch: str) -> str:
    """An update request's JSON text around a section's patch, given as JSON text."""
    return '{"state": {"' + section + '": ' + patch + "}}"


UNSTORABLE_PATCHES = [
    r'{"a": "\u0000"}',
    r'{"a": "x\u0000y"}',
    r'{"a\u0000": 1}',
    r'{"\u0000": null}',
    r'{"a": {"b\u0000c": {"d": 1}}}',
    r'{"a": [1, ["\u0000"]]}',
    r'{"a": [{"k\u0000": 1}]}',
    r'{"a": "\\\u0000"}',  # an escaped backslash, then a real NUL escape
    r'{"a": "\ud800"}',
    r'{"a": "\uDBFF"}',
    r'{"a": "\udc00"}',
    r'{"a": "\uDFFF"}',
    r'{"a": "x\ud83dy"}',
    r'{"a": "\ude00\ud83d"}',  # a pair in the wrong order is two lone surrogates
    r'{"\ud800": 1}',
    r'{"a": [{"b": "\udfff"}]}',
]


@pytest.mark.parametrize("patch", UNSTORABLE_PATCHES)
@pytest.mark.parametrize("section", ["desired", "reported"])
def test_update_requests_holding_nul_or_a_lone_surrogate_are_invalid(
    patch: str, section: str
) -> None:
    raw = in_state(section, patch)
    for text in (raw, raw.encode()):
        with pytest.raises(InvalidRequestError, match=r"NUL|surrogate") as info:
            parse_update_request(text, LIMITS)
        assert info.value.code == 400


@pytest.mark.parametrize("patch", UNSTORABLE_PATCHES)
def test_desired_patches_holding_nul_or_a_lone_surrogate_are_invalid(patch: str) -> None:
    for text in (patch, patch.encode()):
        with pytest.raises(InvalidRequestError, match=r"NUL|surrogate") as info:
            parse_desired_patch(text, LIMITS)
        assert info.value.code == 400


def test_nul_in_the_client_token_is_invalid() -> None:
    with pytest.raises(InvalidRequestError):
        parse_update_request(r'{"state": {"reported": {}}, "clientToken": "t\u0000"}', LIMITS)


def test_a_raw_nul_or_lone_surrogate_is_invalid_too() -> None:
    # Unescaped, NUL is a control character JSON forbids in a string; a lone surrogate in a
    # Python str has no UTF-8 form.
    for raw in ('{"a": "\x00"}', '{"a\x00": 1}', '{"a": "\ud800"}', '{"\udfff": 1}'):
        with pytest.raises(InvalidRequestError):
            parse_desired_patch(raw, LIMITS)
        with pytest.raises(InvalidRequestError):
            parse_update_request(in_state("reported", raw), LIMITS)


@pytest.mark.parametrize(
    ("patch", "value"),
    [
        # A JSON text holding the six characters \u0000 (an escaped backslash, then u0000).
        (r'{"a": "\\u0000"}', "\\u0000"),
        (r'{"a": "x\\u0000y"}', "x\\u0000y"),
        (r'{"a": "\\\\u0000"}', "\\\\u0000"),
        (r'{"a": "\\ud800"}', "\\ud800"),
        (r'{"a": "\\uDFFF"}', "\\uDFFF"),
        # A surrogate pair is one character, and other control characters are storable.
        (r'{"a": "\ud83d\ude00"}', "\U0001f600"),
        (r'{"a": "\uD83D\uDE00"}', "\U0001f600"),
        (r'{"a": "\u0001"}', "\x01"),
        (r'{"a": "\u00e9"}', "é"),
        ('{"a": "\U0001f600"}', "\U0001f600"),
    ],
)
def test_storable_text_near_the_refused_is_accepted(patch: str, value: str) -> None:
    assert parse_desired_patch(patch, LIMITS) == {"a": value}
    assert parse_desired_patch(patch.encode(), LIMITS) == {"a": value}
    request = parse_update_request(in_state("reported", patch), LIMITS)
    assert request.sections == {"reported": {"a": value}}
    key_request = parse_update_request(
        in_state("desired", "{" + json.dumps(value) + ": 1}"), LIMITS
    )
    assert key_request.sections == {"desired": {value: 1}}
    # ... and written back, it reads as the same text.
    result = apply_update(ShadowState(), request, NOW, LIMITS)
    written = dumps(shadow_document(result.current, NOW)).encode("utf-8")
    assert json.loads(written)["state"]["reported"] == {"a": value}


def test_the_escaped_backslash_u0000_is_accepted_exactly() -> None:
    raw = '{"state": {"reported": {"path": "C:\\\\u0000"}}}'
    assert len(json.loads(raw)["state"]["reported"]["path"]) == 8  # C : \ u 0 0 0 0
    request = parse_update_request(raw, LIMITS)
    assert request.sections == {"reported": {"path": "C:\\u0000"}}
    assert "\x00" not in dumps(dict(request.sections))


@pytest.mark.parametrize(
    "raw",
    [b"[]", b"1", b'"x"', b"true", b"{", b"NaN", b'{"a": NaN}', b'{"a": "\xff"}'],
)
def test_bad_desired_patches_are_invalid(raw: bytes) -> None:
    with pytest.raises(InvalidRequestError):
        parse_desired_patch(raw, LIMITS)


def test_desired_patch_null_clears_and_object_is_kept() -> None:
    assert parse_desired_patch(b"null", LIMITS) is None
    assert parse_desired_patch(b'{"a": {"b": null}}', LIMITS) == {"a": {"b": None}}
    parse_desired_patch(json.dumps(nested(6)), LIMITS)
    with pytest.raises(InvalidRequestError):
        parse_desired_patch(json.dumps(nested(7)), LIMITS)


def test_parse_json_accepts_str_and_bytes() -> None:
    assert parse_json('{"a": [1, 2.5, "é"]}', 100) == {"a": [1, 2.5, "é"]}
    assert parse_json('{"a": "é"}'.encode(), 100) == {"a": "é"}


def test_error_codes() -> None:
    assert InvalidRequestError("x").code == 400
    assert InvalidDeviceIdError("x").code == 400
    assert DocumentTooLargeError("x").code == 413
    assert VersionConflictError("x", current_version=3).code == 409
    assert isinstance(InvalidDeviceIdError("x"), InvalidRequestError)
    assert isinstance(DocumentTooLargeError("x"), ShadowError)


# --- device ids and tags ----------------------------------------------------------------------


@pytest.mark.parametrize("device_id", ["dev-1", "a:b_c.d", "A", "0", "x" * 128, "sensor.01:eu-1"])
def test_valid_device_ids(device_id: str) -> None:
    assert validate_device_id(device_id) == device_id


@pytest.mark.parametrize(
    "device_id",
    [
        "",
        "a/b",
        "a+b",
        "a#",
        "#",
        "+",
        "$SYS",
        "$aws",
        "x" * 129,
        "a b",
        " a",
        "a\n",
        "a\x00",
        "dév",
        "設備",
        "-dev",
        ".dev",
        "_dev",
        "a/",
    ],
)
def test_invalid_device_ids(device_id: str) -> None:
    with pytest.raises(InvalidDeviceIdError):
        validate_device_id(device_id)


def test_valid_tags() -> None:
    tags = {"site": "berlin", "k" * 64: "v" * 256, "a:b_c-d": ""}
    assert validate_tags(tags) == tags
    many = {f"t{i}": "x" for i in range(50)}
    assert validate_tags(many) == many
    assert validate_tags({}) == {}


@pytest.mark.parametrize(
    "tags",
    [
        {f"t{i}": "x" for i in range(51)},
        {"": "x"},
        {"k" * 65: "x"},
        {"a b": "x"},
        {"a/b": "x"},
        {"a.b": "x"},  # a filter could not name it: tags.a.b is a two-level path
        {"ä": "x"},
        {"site": "v" * 257},
    ],
)
def test_invalid_tags(tags: dict[str, str]) -> None:
    with pytest.raises(InvalidRequestError):
        validate_tags(tags)


# --- properties -------------------------------------------------------------------------------

# A small key alphabet makes patches collide with documents; "timestamp" as a key checks that
# metadata leaves and nested objects are not confused.
KEYS = st.sampled_from(["a", "b", "c", "timestamp", "x-1"])
SCALARS = st.one_of(
    st.booleans(),
    st.integers(-2, 2),
    st.sampled_from([0.0, 1.0, 2.5, -1.0]),
    st.text(alphabet="xyé", max_size=2),
)
ARRAYS = st.lists(
    st.one_of(st.none(), SCALARS, st.dictionaries(KEYS, SCALARS, max_size=2)), max_size=3
)
LEAVES = st.one_of(SCALARS, ARRAYS)
# Stored documents: no null values, no empty objects.
DOC_VALUES = st.recursive(
    LEAVES, lambda inner: st.dictionaries(KEYS, inner, min_size=1, max_size=3), max_leaves=8
)
DOCUMENTS: st.SearchStrategy[JsonObject] = st.dictionaries(KEYS, DOC_VALUES, max_size=4)
# Patches: nulls delete, empty objects allowed.
PATCH_VALUES = st.recursive(
    st.one_of(st.none(), LEAVES),
    lambda inner: st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)
PATCHES: st.SearchStrategy[JsonObject] = st.dictionaries(KEYS, PATCH_VALUES, max_size=4)
SECTION_PATCHES: st.SearchStrategy[JsonObject | None] = st.one_of(st.none(), PATCHES)
REQUESTS: st.SearchStrategy[UpdateRequest] = st.builds(
    UpdateRequest,
    sections=st.fixed_dictionaries(
        {}, optional={"desired": SECTION_PATCHES, "reported": SECTION_PATCHES}
    ).filter(bool),
)
TIMES = st.integers(0, 2_000_000_000)


def leaves(
    document: JsonObject, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, value) of every non-object value; arrays are leaves."""
    for key, value in document.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


_ABSENT = object()


def lookup(document: JsonObject, path: tuple[str, ...]) -> Any:
    value: Any = document
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return _ABSENT
        value = value[key]
    return value


def strip_timestamps(metadata: Any) -> Any:
    """The shape of a metadata tree, timestamps replaced by a marker."""
    if isinstance(metadata, dict):
        if set(metadata) == {"timestamp"} and isinstance(metadata["timestamp"], int):
            return "leaf"
        return {k: strip_timestamps(v) for k, v in metadata.items()}
    raise AssertionError(f"metadata holds a non-object: {metadata!r}")


def assert_metadata_mirrors(document: JsonObject, metadata: JsonObject) -> None:
    """Every leaf has exactly one {"timestamp": int} and nothing else has metadata."""
    assert set(metadata) == set(document), (document, metadata)
    for key, value in document.items():
        if isinstance(value, dict):
            assert isinstance(metadata[key], dict)
            assert_metadata_mirrors(value, metadata[key])
        else:
            entry = metadata[key]
            assert set(entry) == {"timestamp"}, (key, entry)
            assert isinstance(entry["timestamp"], int)


def assert_normalized(document: JsonObject) -> None:
    """No null values and no empty objects (arrays keep whatever they were given)."""
    for value in document.values():
        assert value is not None
        if isinstance(value, dict):
            assert value, document
            assert_normalized(value)


def stored(document: JsonObject, timestamp: int = 0) -> tuple[JsonObject, JsonObject]:
    """A document with consistent metadata, as a first merge stores it."""
    return merge({}, {}, document, timestamp)


def run(requests: list[UpdateRequest], now: int = 1000) -> ShadowState:
    state = ShadowState()
    for i, request in enumerate(requests):
        state = apply_update(state, request, now + i, LIMITS).current
    return state


@given(DOCUMENTS, DOCUMENTS, DOCUMENTS)
def test_prop_reporting_the_desired_state_leaves_no_delta(
    desired: JsonObject, reported: JsonObject, other: JsonObject
) -> None:
    state = run(
        [UpdateRequest(sections={"desired": desired, "reported": reported})],
    )
    state = apply_update(state, UpdateRequest(sections={"desired": other}), 2000, LIMITS).current
    result = apply_update(
        state,
        UpdateRequest(sections={"reported": json.loads(json.dumps(state.desired))}),
        3000,
        LIMITS,
    )
    assert result.delta == {}
    assert compute_delta(result.current.desired, result.current.reported) == {}
    assert not result.publish_delta
    assert "delta" not in shadow_document(result.current, 3000)["state"]


def twin(value: Any) -> Any:
    """A value Python's == confuses with `value`: true -> 1, 1 -> 1.0, 1.0 -> 1."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return float(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: twin(v) for k, v in value.items()}
    if isinstance(value, list):
        return [twin(v) for v in value]
    return value


@st.composite
def desired_and_reported(draw: st.DrawFn) -> tuple[JsonObject, JsonObject]:
    desired = draw(DOCUMENTS)
    choice = draw(st.sampled_from(["independent", "patched", "twin"]))
    if choice == "independent":
        reported = draw(DOCUMENTS)
    elif choice == "patched":  # close to desired, so the "empty delta" side is exercised too
        reported, _ = merge(desired, {}, draw(PATCHES), 0)
    else:  # equal to Python, but true is not 1 in JSON
        reported = twin(desired)
    return desired, reported


@given(desired_and_reported())
def test_prop_delta_is_empty_iff_every_desired_leaf_is_reported_equal(
    pair: tuple[JsonObject, JsonObject],
) -> None:
    desired, reported = pair
    all_reported = all(
        (have := lookup(reported, path)) is not _ABSENT and json_equal(want, have)
        for path, want in leaves(desired)
    )
    assert (compute_delta(desired, reported) == {}) is all_reported


@given(desired_and_reported())
def test_prop_delta_is_a_sub_document_of_desired(pair: tuple[JsonObject, JsonObject]) -> None:
    desired, reported = pair
    delta = compute_delta(desired, reported)
    assert_normalized(delta)
    delta_leaves = list(leaves(delta))
    for path, value in delta_leaves:
        assert json_equal(lookup(desired, path), value), (path, value)
        have = lookup(reported, path)
        assert have is _ABSENT or not json_equal(have, value)
    # and conversely every differing desired leaf is in the delta
    for path, want in leaves(desired):
        have = lookup(reported, path)
        if have is _ABSENT or not json_equal(want, have):
            assert json_equal(lookup(delta, path), want), path


@given(DOCUMENTS, PATCHES, TIMES, TIMES)
def test_prop_merging_the_same_patch_twice_is_idempotent(
    document: JsonObject, patch: JsonObject, t1: int, t2: int
) -> None:
    doc0, meta0 = stored(document)
    doc1, meta1 = merge(doc0, meta0, patch, t1)
    doc2, meta2 = merge(doc1, meta1, patch, t2)
    assert doc2 == doc1
    assert json_equal(doc2, doc1)
    assert strip_timestamps(meta2) == strip_timestamps(meta1)


@given(st.lists(REQUESTS, min_size=1, max_size=5))
def test_prop_metadata_mirrors_every_leaf(requests: list[UpdateRequest]) -> None:
    state = run(requests)
    for name in ("desired", "reported"):
        section: JsonObject = getattr(state, name)
        assert_metadata_mirrors(section, state.metadata.get(name, {}))
        assert name not in state.metadata or state.metadata[name]


@given(DOCUMENTS, PATCHES, TIMES)
def test_prop_merge_metadata_mirrors_every_leaf(
    document: JsonObject, patch: JsonObject, t: int
) -> None:
    doc, meta = merge(*stored(document), patch, t)
    assert_metadata_mirrors(doc, meta)
    # the patched leaves carry the new timestamp
    for path, value in leaves(patch):
        if value is not None and not (isinstance(value, dict) and not value):
            assert lookup(meta, (*path, "timestamp")) == t, path


@given(st.lists(REQUESTS, min_size=1, max_size=5))
def test_prop_merged_documents_hold_no_nulls_or_empty_objects(
    requests: list[UpdateRequest],
) -> None:
    state = run(requests)
    assert_normalized(state.desired)
    assert_normalized(state.reported)


@given(DOCUMENTS, PATCHES)
def test_prop_merge_sets_non_null_patch_leaves_and_deletes_null_ones(
    document: JsonObject, patch: JsonObject
) -> None:
    doc, _ = merge(*stored(document), patch, 1)
    for path, value in leaves(patch):
        if value is None:
            assert lookup(doc, path) is _ABSENT, path
        elif not (isinstance(value, dict) and not value):
            assert lookup(doc, path) == value, path


@given(st.lists(REQUESTS, max_size=8), st.lists(REQUESTS, max_size=4))
def test_prop_n_accepted_updates_yield_version_n(
    before: list[UpdateRequest], after: list[UpdateRequest]
) -> None:
    state = run(before)
    assert state.version == len(before)
    assert state.exists is bool(before)
    state = delete_shadow(state, expected_version=len(before))
    for i, request in enumerate(after):
        named = UpdateRequest(sections=request.sections, version=state.version)
        state = apply_update(state, named, i, LIMITS).current
    assert state.version == len(before) + len(after)


@given(REQUESTS, st.integers(0, 5), st.integers(0, 5))
def test_prop_only_the_current_version_is_accepted(
    request: UpdateRequest, updates: int, named: int
) -> None:
    state = run([UpdateRequest(sections={"reported": {"n": i}}) for i in range(updates)])
    versioned = UpdateRequest(sections=request.sections, version=named)
    if named == updates:
        assert apply_update(state, versioned, 0, LIMITS).current.version == updates + 1
    else:
        with pytest.raises(VersionConflictError) as info:
            apply_update(state, versioned, 0, LIMITS)
        assert info.value.current_version == updates


@given(DOCUMENTS, DOCUMENTS)
def test_prop_documents_round_trip_through_the_parser(
    desired: JsonObject, reported: JsonObject
) -> None:
    # what dumps writes, parse_update_request reads back to the same patch
    raw = dumps({"state": {"desired": desired, "reported": reported}}).encode("utf-8")
    request = parse_update_request(raw, ShadowLimits(max_depth=64))
    assert request.sections == {"desired": desired, "reported": reported}


def poisoned(value: Any, bad: str, data: st.DataObject) -> Any:
    """`value` with `bad` put into one of its keys or strings (a leaf of another type becomes a
    string holding it)."""
    if isinstance(value, dict) and value:
        key = data.draw(st.sampled_from(sorted(value)))
        if data.draw(st.booleans()):
            rest = {k: v for k, v in value.items() if k != key}
            return {**rest, key + bad: value[key]}
        return {**value, key: poisoned(value[key], bad, data)}
    if isinstance(value, dict):
        return {bad: 1}
    if isinstance(value, list) and value:
        i = data.draw(st.integers(0, len(value) - 1))
        return [*value[:i], poisoned(value[i], bad, data), *value[i + 1 :]]
    if isinstance(value, str):
        cut = data.draw(st.integers(0, len(value)))
        return value[:cut] + bad + value[cut:]
    return bad


@given(DOCUMENTS, st.sampled_from(["\x00", "\ud800", "\udbff", "\udc00", "\udfff"]), st.data())
def test_prop_one_unstorable_character_anywhere_refuses_the_whole_document(
    document: JsonObject, bad: str, data: st.DataObject
) -> None:
    patch = poisoned(document, bad, data)
    section = data.draw(st.sampled_from(["desired", "reported"]))
    raw = json.dumps({"state": {section: patch}})  # ASCII: the character as a \u escape
    with pytest.raises(InvalidRequestError, match=r"NUL|surrogate"):
        parse_update_request(raw, LIMITS)
    with pytest.raises(InvalidRequestError, match=r"NUL|surrogate"):
        parse_desired_patch(json.dumps(patch), LIMITS)


def reference_parse(raw: bytes) -> Any:
    """parse_json's verdict with the standard library's decoder alone (as before orjson)."""
    try:
        value = domain._DECODER.decode(raw.decode())
    except (ValueError, RecursionError) as exc:
        raise InvalidRequestError(str(exc)) from None
    if domain._has_unstorable_text(value):
        raise InvalidRequestError("unstorable")
    return value


ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)
NEAR_JSON = st.one_of(
    ANY_JSON.map(lambda v: json.dumps(v, ensure_ascii=False).encode()),
    ANY_JSON.map(lambda v: json.dumps(v).encode()),
    # Cut, spliced or hostile variants: the two decoders must refuse the same texts.
    st.tuples(ANY_JSON, st.integers(0, 40), st.binary(max_size=3)).map(
        lambda t: (lambda s: s[: t[1]] + t[2] + s[t[1] :])(json.dumps(t[0]).encode())
    ),
    st.sampled_from(
        [
            b"1e400",
            b"[1.7976931348623159e308]",
            b'"\\ud800"',
            b'"\\u0000"',
            b"NaN",
            b"\xef\xbb\xbf{}",
            b"[" * 1100 + b"]" * 1099,  # past orjson's depth limit, and not closed
            b"[" * 300 + b"]" * 300,
            b"12345678901234567890",
            b"-9223372036854775809",
            b'{"a":1,"a":2}',
        ]
    ),
)


@given(NEAR_JSON)
def test_prop_the_fast_decoder_agrees_with_the_standard_library(raw: bytes) -> None:
    try:
        expected = reference_parse(raw)
    except InvalidRequestError:
        with pytest.raises(InvalidRequestError):
            parse_json(raw, 1 << 20)
        return
    assert same_json(parse_json(raw, 1 << 20), expected)


@given(st.lists(REQUESTS, min_size=1, max_size=5))
def test_prop_an_update_results_delta_is_the_one_its_delta_message_carries(
    requests: list[UpdateRequest],
) -> None:
    # The outbox passes UpdateResult.delta to delta_message instead of computing it again.
    state = run(requests[:-1])
    result = apply_update(state, requests[-1], 2000, LIMITS)
    given_delta = delta_message(result.current, 2000, "t", result.delta)
    assert given_delta == delta_message(result.current, 2000, "t")
