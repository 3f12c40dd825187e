"""Unit and property tests of the fleet filter parser and its reference meaning (`matches`)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.shadow.domain import JsonObject
from services.shadow.errors import InvalidRequestError
from services.shadow.fleet_filter import (
    MAX_COMPARISONS,
    MAX_FILTER_CHARS,
    Comparison,
    FleetFilter,
    parse_filter,
)


def comparisons(text: str) -> tuple[Comparison, ...]:
    return parse_filter(text).comparisons


# --- parsing ----------------------------------------------------------------------------------


def test_parse_tag_and_nested_reported_path() -> None:
    assert comparisons('tags.site == "berlin" AND reported.firmware.version != "2.0.0"') == (
        Comparison("tags", ("site",), "==", "berlin"),
        Comparison("reported", ("firmware", "version"), "!=", "2.0.0"),
    )


@pytest.mark.parametrize("joiner", ["AND", "and", "And", "aNd"])
def test_and_is_case_insensitive(joiner: str) -> None:
    assert comparisons(f'tags.a == "x" {joiner} desired.b == 1') == (
        Comparison("tags", ("a",), "==", "x"),
        Comparison("desired", ("b",), "==", 1),
    )


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        ("42", 42),
        ("-1.5", -1.5),
        ("1e3", 1000.0),
        ("0", 0),
        ("true", True),
        ("false", False),
        ("null", None),
        ('"a AND b"', "a AND b"),
        ('"x == 1 AND y != 2"', "x == 1 AND y != 2"),
        ('"\\u00e9"', "é"),
        ('""', ""),
        ("[1, 2]", [1, 2]),
        ('{"a": [true]}', {"a": [True]}),
    ],
)
def test_parse_literals(literal: str, value: Any) -> None:
    (comparison,) = comparisons(f"reported.x == {literal}")
    assert comparison == Comparison("reported", ("x",), "==", value)
    assert type(comparison.value) is type(value)


def test_strings_containing_and_do_not_split() -> None:
    assert comparisons('reported.a == "p AND q" AND reported.b != " AND "') == (
        Comparison("reported", ("a",), "==", "p AND q"),
        Comparison("reported", ("b",), "!=", " AND "),
    )


def test_whitespace_is_optional_around_operators_and_free_at_the_ends() -> None:
    assert comparisons('  reported.a.b=="x"   AND\treported.c!=1  ') == (
        Comparison("reported", ("a", "b"), "==", "x"),
        Comparison("reported", ("c",), "!=", 1),
    )


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_filter_matches_every_device(text: str) -> None:
    fleet_filter = parse_filter(text)
    assert fleet_filter == FleetFilter(())
    assert fleet_filter.matches({}, {}, {})
    assert fleet_filter.matches({"a": "b"}, {"x": 1}, {"y": 2})


def test_path_segments_may_hold_digits_colons_and_dashes() -> None:
    assert comparisons('reported.net.eth-0.mac:addr == "aa"') == (
        Comparison("reported", ("net", "eth-0", "mac:addr"), "==", "aa"),
    )


def test_bounds_at_the_limit_are_accepted() -> None:
    sixteen = " AND ".join(f"reported.k{i} == {i}" for i in range(MAX_COMPARISONS))
    assert len(comparisons(sixteen)) == MAX_COMPARISONS
    deep = "reported.a.b.c.d.e.f == 1"
    assert comparisons(deep)[0].path == ("a", "b", "c", "d", "e", "f")
    prefix = 'reported.a == "'
    exact = prefix + "x" * (MAX_FILTER_CHARS - len(prefix) - 1) + '"'
    assert len(exact) == MAX_FILTER_CHARS
    assert comparisons(exact)[0].value == "x" * (MAX_FILTER_CHARS - len(prefix) - 1)


@pytest.mark.parametrize(
    "text",
    [
        'foo.site == "x"',
        'state.reported.a == "x"',
        'metadata.a == "x"',
        'Tags.site == "x"',
        'tags.site.name == "x"',
        "tags.site == 1",
        "tags.site == true",
        'tags.site == ["x"]',
        'tags.site == {"a": "x"}',
        "reported.a ==",
        "reported.a == ",
        "reported.a",
        'reported == "x"',
        'tags == "x"',
        "reported.a = 1",
        "reported.a <> 1",
        "reported.a > 1",
        'reported.a == "x" garbage',
        'reported.a == "x" OR reported.b == 1',
        'reported.a == "x" AND',
        'reported.a == "x" AND ',
        'AND reported.a == "x"',
        'reported.a == "x" AND AND reported.b == 1',
        'reported.a == "x"AND reported.b == 1',
        "reported.a == 1 2",
        "reported.a == truex",
        "reported.a == 'x'",
        "reported.a == x",
        'reported.a == "unterminated',
        "reported.a == NaN",
        "reported.a == Infinity",
        "reported.a == -Infinity",
        "reported.a == [NaN]",
        "reported.a.b.c.d.e.f.g == 1",
        "reported..a == 1",
        "reported.a. == 1",
        "1reported.a == 1",
    ],
)
def test_bad_filters_are_invalid(text: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_filter(text)
    assert info.value.code == 400


def test_too_long_filter_is_invalid() -> None:
    prefix = 'reported.a == "'
    text = prefix + "x" * (MAX_FILTER_CHARS - len(prefix)) + '"'
    assert len(text) == MAX_FILTER_CHARS + 1
    with pytest.raises(InvalidRequestError, match="characters"):
        parse_filter(text)


def test_too_many_comparisons_is_invalid() -> None:
    text = " AND ".join(f"reported.k{i} == {i}" for i in range(MAX_COMPARISONS + 1))
    assert len(text) <= MAX_FILTER_CHARS
    with pytest.raises(InvalidRequestError, match="comparisons"):
        parse_filter(text)


# --- meaning ----------------------------------------------------------------------------------

TAGS = {"site": "berlin", "ring": "canary"}
DESIRED: JsonObject = {"firmware": {"version": "2.0.0"}}
REPORTED: JsonObject = {
    "firmware": {"version": "1.9.0", "channel": "stable"},
    "battery": 80,
    "charging": True,
    "ratio": 1.0,
    "modules": ["gps", "lte"],
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('tags.site == "berlin"', True),
        ('tags.site == "paris"', False),
        ('tags.site != "paris"', True),
        ('tags.region == "eu"', False),  # missing tag: == is false
        ('tags.region != "eu"', True),  # missing tag: != is true
        ("tags.region == null", True),
        ("tags.site == null", False),
        ("tags.site != null", True),
        ('tags.site == "berlin" AND reported.firmware.version != "2.0.0"', True),
        ('tags.site == "berlin" AND reported.firmware.version == "2.0.0"', False),
        ('desired.firmware.version == "2.0.0"', True),
        ('reported.firmware.version == "2.0.0"', False),
        ('reported.firmware.channel == "stable"', True),
        ("reported.firmware.missing == 1", False),
        ("reported.firmware.missing != 1", True),
        ("reported.firmware.missing == null", True),
        ("reported.firmware.missing != null", False),
        ("reported.firmware.version == null", False),
        ("reported.firmware.version != null", True),
        # a path through a scalar does not exist
        ("reported.battery.level == null", True),
        ("reported.battery.level == 80", False),
        ("reported.battery.level != 80", True),
        ("reported.battery == 80", True),
        ("reported.battery == 80.0", True),
        ('reported.battery == "80"', False),
        ("reported.charging == true", True),
        ("reported.charging == 1", False),
        ("reported.charging != 1", True),
        ("reported.ratio == 1", True),
        ("reported.ratio == true", False),
        ('reported.modules == ["gps", "lte"]', True),
        ('reported.modules == ["lte", "gps"]', False),
        ('reported.modules == ["gps"]', False),
        ('reported.firmware == {"version": "1.9.0", "channel": "stable"}', True),
        ('reported.firmware == {"version": "1.9.0"}', False),
        ('reported.charging == true AND tags.ring == "canary" AND reported.battery != 0', True),
        ('reported.charging == true AND tags.ring == "stable" AND reported.battery != 0', False),
    ],
)
def test_matches(text: str, expected: bool) -> None:
    assert parse_filter(text).matches(TAGS, DESIRED, REPORTED) is expected


def test_each_root_looks_only_at_its_own_document() -> None:
    fleet_filter = parse_filter("desired.battery == 80")
    assert not fleet_filter.matches(TAGS, DESIRED, REPORTED)
    assert fleet_filter.matches({}, {"battery": 80}, {})
    assert not parse_filter('tags.battery == "80"').matches({}, {}, {"battery": "80"})


# --- properties -------------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "x-1", "k:2"])
SCALARS = st.one_of(
    st.booleans(),
    st.integers(-2, 2),
    st.sampled_from([0.0, 1.0, 2.5]),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=4),
)
VALUES = st.recursive(
    st.one_of(SCALARS, st.lists(SCALARS, max_size=3)),
    lambda inner: st.dictionaries(KEYS, inner, min_size=1, max_size=3),
    max_leaves=8,
)
DOCUMENTS: st.SearchStrategy[JsonObject] = st.dictionaries(KEYS, VALUES, max_size=4)
LITERALS = st.one_of(st.none(), VALUES)
PATHS = st.lists(KEYS, min_size=1, max_size=4).map(tuple)
TAG_MAPS = st.dictionaries(KEYS, st.text(max_size=4), max_size=3)


def lookup(document: JsonObject, path: tuple[str, ...]) -> tuple[bool, Any]:
    value: Any = document
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return False, None
        value = value[key]
    return True, value


@st.composite
def path_into(draw: st.DrawFn, document: JsonObject) -> tuple[str, ...]:
    """A path that exists in `document` when it has one, else any path."""
    path: list[str] = []
    value: Any = document
    while isinstance(value, dict) and value and len(path) < 6 and (not path or draw(st.booleans())):
        key = draw(st.sampled_from(sorted(value)))
        path.append(key)
        value = value[key]
    return tuple(path) if path else draw(PATHS)


@given(TAG_MAPS, DOCUMENTS, DOCUMENTS, st.data())
def test_prop_not_equal_is_the_negation_of_equal(
    tags: dict[str, str], desired: JsonObject, reported: JsonObject, data: st.DataObject
) -> None:
    root = data.draw(st.sampled_from(["tags", "desired", "reported"]))
    if root == "tags":
        path: tuple[str, ...] = (data.draw(KEYS),)
        literal: Any = data.draw(st.one_of(st.none(), st.text(max_size=4)))
    else:
        document = desired if root == "desired" else reported
        path = data.draw(st.one_of(PATHS, path_into(document)))
        literal = data.draw(
            st.one_of(LITERALS, st.just(lookup(document, path)[1])) if path else LITERALS
        )
    subject, value = f"{root}.{'.'.join(path)}", json.dumps(literal)
    equal = parse_filter(f"{subject} == {value}")
    not_equal = parse_filter(f"{subject} != {value}")
    assert equal.matches(tags, desired, reported) is not not_equal.matches(tags, desired, reported)


@given(DOCUMENTS, st.data())
def test_prop_a_present_value_equals_itself_and_is_not_null(
    reported: JsonObject, data: st.DataObject
) -> None:
    path = data.draw(path_into(reported))
    found, value = lookup(reported, path)
    dotted = ".".join(path)
    present = parse_filter(f"reported.{dotted} != null").matches({}, {}, reported)
    assert present is found
    if found:
        assert parse_filter(f"reported.{dotted} == {json.dumps(value)}").matches({}, {}, reported)
        assert not parse_filter(f"reported.{dotted} != {json.dumps(value)}").matches(
            {}, {}, reported
        )


@given(st.lists(st.tuples(PATHS, st.sampled_from(["==", "!="]), LITERALS), max_size=6), DOCUMENTS)
def test_prop_a_conjunction_holds_iff_each_comparison_holds(
    parts: list[tuple[tuple[str, ...], str, Any]], reported: JsonObject
) -> None:
    texts = [f"reported.{'.'.join(p)} {op} {json.dumps(v)}" for p, op, v in parts]
    whole = parse_filter(" AND ".join(texts)).matches({}, {}, reported)
    assert whole is all(parse_filter(t).matches({}, {}, reported) for t in texts)
    assert len(parse_filter(" and ".join(texts)).comparisons) == len(parts)
