"""Unit and property tests of the fleet filter parser and its reference meaning (`matches`).

Literals are JSON scalars only (strings, numbers, true, false, null); integers within +-2**53;
strings without NUL or lone surrogates. Documents may hold anything, so the meaning is checked
against arrays, objects, JSON-looking strings and big integers too.
"""

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
    MAX_EXACT_INTEGER,
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
        ('"[1, 2]"', "[1, 2]"),  # a string spelling an array is a string
        ('"{\\"a\\": 1}"', '{"a": 1}'),
        ('"\\ud83d\\ude00"', "\U0001f600"),  # a surrogate pair is one character
        ('"\\\\u0000"', "\\u0000"),  # an escaped backslash, then the text u0000
        ('"\\u0001"', "\x01"),
        ("9007199254740992", 2**53),
        ("-9007199254740992", -(2**53)),
        ("9007199254740992.0", float(2**53)),
        ("2.5e-7", 2.5e-7),
        ("-0", 0),
    ],
)
def test_parse_literals(literal: str, value: Any) -> None:
    (comparison,) = comparisons(f"reported.x == {literal}")
    assert comparison == Comparison("reported", ("x",), "==", value)
    assert type(comparison.value) is type(value)


@pytest.mark.parametrize(
    "literal",
    ["[1, 2]", '{"a": [true]}', "[]", "{}", "[null]", '["x"]', '{"version": "1.0.0"}', "[NaN]"],
)
@pytest.mark.parametrize("root", ["reported", "desired"])
@pytest.mark.parametrize("op", ["==", "!="])
def test_object_and_array_literals_are_refused(root: str, op: str, literal: str) -> None:
    for text in (
        f"{root}.x {op} {literal}",
        f'tags.site == "x" AND {root}.x.y {op} {literal}',
    ):
        with pytest.raises(InvalidRequestError) as info:
            parse_filter(text)
        assert info.value.code == 400


@pytest.mark.parametrize(
    "literal",
    [
        str(MAX_EXACT_INTEGER + 1),
        str(-MAX_EXACT_INTEGER - 1),
        str(2**63),
        str(2**64),
        str(2**64 + 1),
        str(-(2**64)),
        "1" + "0" * 400,
    ],
)
def test_integer_literals_beyond_2_to_the_53_are_refused(literal: str) -> None:
    with pytest.raises(InvalidRequestError, match="2\\*\\*53"):
        parse_filter(f"reported.x == {literal}")
    with pytest.raises(InvalidRequestError):
        parse_filter(f"reported.x != {literal}")


def test_integer_literals_at_2_to_the_53_are_accepted() -> None:
    assert MAX_EXACT_INTEGER == 2**53
    for value in (MAX_EXACT_INTEGER, -MAX_EXACT_INTEGER, MAX_EXACT_INTEGER - 1):
        (comparison,) = comparisons(f"reported.x == {value}")
        assert comparison.value == value
        assert type(comparison.value) is int


@pytest.mark.parametrize(
    "literal",
    [
        '"\\u0000"',
        '"a\\u0000b"',
        '"\\\\\\u0000"',  # an escaped backslash, then a real NUL escape
        '"\\ud800"',
        '"\\uDBFF"',
        '"\\udc00"',
        '"\\uDFFF"',
        '"x\\ud800y"',
        '"\\ude00\\ud83d"',  # a pair in the wrong order is two lone surrogates
        '"\\ud83d"',
    ],
)
@pytest.mark.parametrize("root", ["tags.site", "reported.x", "desired.x.y"])
def test_string_literals_holding_nul_or_a_lone_surrogate_are_refused(
    root: str, literal: str
) -> None:
    for op in ("==", "!="):
        with pytest.raises(InvalidRequestError) as info:
            parse_filter(f"{root} {op} {literal}")
        assert info.value.code == 400


def test_a_raw_nul_or_control_character_in_a_string_is_not_json() -> None:
    for text in ('reported.x == "a\x00b"', 'reported.x == "a\nb"', 'tags.site == "\x00"'):
        with pytest.raises(InvalidRequestError):
            parse_filter(text)


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
        'tags.site == "\\u0000"',
        "tags.site == 9007199254740993",
        "reported.a == [1]",
        'reported.a == {"b": 1}',
        "reported.a == 9007199254740993",
        'reported.a == "\\ud800"',
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
    "spelled": "[1,2]",
    "indexed": {"0": 1},
    "big": 2**53 + 1,
    "edge": 2**53,
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
        ("reported.ratio == 1.0", True),
        # An array or object is present, but equals no scalar; its string spelling is a string.
        ("reported.modules != null", True),
        ("reported.modules == null", False),
        ('reported.modules == "gps"', False),
        ('reported.modules != "gps"', True),
        ('reported.modules == "[\\"gps\\", \\"lte\\"]"', False),
        ('reported.firmware == "1.9.0"', False),
        ('reported.firmware != "1.9.0"', True),
        ("reported.firmware != null", True),
        ('reported.spelled == "[1,2]"', True),
        ('reported.spelled != "[1,2]"', False),
        ("reported.spelled == 1", False),
        # A segment that looks like an integer is a key, never an array index.
        ('reported.modules.0 == "gps"', False),
        ('reported.modules.0 != "gps"', True),
        ("reported.modules.0 == null", True),
        ("reported.modules.-1 == null", True),
        ("reported.indexed.0 == 1", True),
        ("reported.indexed.1 == null", True),
        # Integers beyond 2**53 are held exactly and equal no literal within the bound.
        (f"reported.big == {2**53}", False),
        (f"reported.big != {2**53}", True),
        (f"reported.big == {float(2**53)}", False),
        ("reported.big != null", True),
        (f"reported.edge == {2**53}", True),
        (f"reported.edge == {float(2**53)}", True),
        (f"reported.edge == {-(2**53)}", False),
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

KEYS = st.sampled_from(["a", "b", "c", "x-1", "k:2", "0", "1"])
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=4)
JSON_LOOKING = st.sampled_from(["[1,2]", '{"a":1}', "1", "1.0", "true", "null", "[]", "{}"])
BIG_INTEGERS = st.sampled_from([2**53, 2**53 + 1, -(2**53) - 1, 2**63, 2**64, 10**23])
# What documents hold: scalars of every kind, integers beyond 2**53 included.
SCALARS = st.one_of(
    st.booleans(),
    st.integers(-2, 2),
    st.sampled_from([0.0, 1.0, 2.5, -0.0]),
    TEXT,
    JSON_LOOKING,
    BIG_INTEGERS,
)
VALUES = st.recursive(
    st.one_of(SCALARS, st.lists(SCALARS, max_size=3)),
    lambda inner: st.dictionaries(KEYS, inner, min_size=1, max_size=3),
    max_leaves=8,
)
COMPOUNDS = st.one_of(st.lists(VALUES, max_size=3), st.dictionaries(KEYS, VALUES, max_size=3))
DOCUMENTS: st.SearchStrategy[JsonObject] = st.dictionaries(KEYS, VALUES, max_size=4)
# What a filter may compare with: scalars only, integers within +-2**53.
SCALAR_LITERALS = st.one_of(
    st.booleans(),
    st.integers(-2, 2),
    st.integers(-MAX_EXACT_INTEGER, MAX_EXACT_INTEGER),
    st.sampled_from([0.0, 1.0, 2.5, -0.0, float(2**53)]),
    TEXT,
    JSON_LOOKING,
)
LITERALS = st.one_of(st.none(), SCALAR_LITERALS)
PATHS = st.lists(KEYS, min_size=1, max_size=4).map(tuple)
TAG_MAPS = st.dictionaries(KEYS, TEXT, max_size=3)
UNSTORABLE = st.sampled_from(["\x00", "\ud800", "\udbff", "\udc00", "\udfff"])


def is_literal(value: Any) -> bool:
    """Whether a filter may compare with `value` (decision: scalars, exact integers, no NUL or
    lone surrogate)."""
    if isinstance(value, dict | list):
        return False
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) <= MAX_EXACT_INTEGER
    if isinstance(value, str):
        return "\x00" not in value and not any("\ud800" <= c <= "\udfff" for c in value)
    return True


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
        literal: Any = data.draw(st.one_of(st.none(), TEXT))
    else:
        document = desired if root == "desired" else reported
        path = data.draw(st.one_of(PATHS, path_into(document)))
        held = lookup(document, path)[1]
        literal = data.draw(
            st.one_of(LITERALS, st.just(held)) if path and is_literal(held) else LITERALS
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
    if not found:
        return
    if is_literal(value):
        assert parse_filter(f"reported.{dotted} == {json.dumps(value)}").matches({}, {}, reported)
        assert not parse_filter(f"reported.{dotted} != {json.dumps(value)}").matches(
            {}, {}, reported
        )
    else:
        # An array, an object or an integer beyond 2**53 cannot be named by a literal...
        with pytest.raises(InvalidRequestError):
            parse_filter(f"reported.{dotted} == {json.dumps(value)}")
        # ... and no literal names it.
        literal = json.dumps(data.draw(SCALAR_LITERALS))
        assert not parse_filter(f"reported.{dotted} == {literal}").matches({}, {}, reported)
        assert parse_filter(f"reported.{dotted} != {literal}").matches({}, {}, reported)


@given(st.lists(st.tuples(PATHS, st.sampled_from(["==", "!="]), LITERALS), max_size=6), DOCUMENTS)
def test_prop_a_conjunction_holds_iff_each_comparison_holds(
    parts: list[tuple[tuple[str, ...], str, Any]], reported: JsonObject
) -> None:
    texts = [f"reported.{'.'.join(p)} {op} {json.dumps(v)}" for p, op, v in parts]
    whole = parse_filter(" AND ".join(texts)).matches({}, {}, reported)
    assert whole is all(parse_filter(t).matches({}, {}, reported) for t in texts)
    assert len(parse_filter(" and ".join(texts)).comparisons) == len(parts)


@given(COMPOUNDS, st.sampled_from(["==", "!="]), PATHS)
def test_prop_array_and_object_literals_are_refused(
    literal: Any, op: str, path: tuple[str, ...]
) -> None:
    with pytest.raises(InvalidRequestError):
        parse_filter(f"reported.{'.'.join(path)} {op} {json.dumps(literal)}")


@given(st.one_of(st.integers(), st.integers(-(2**54), 2**54), BIG_INTEGERS))
def test_prop_integer_literals_are_accepted_iff_within_2_to_the_53(value: int) -> None:
    text = f"reported.x == {value}"
    if abs(value) <= MAX_EXACT_INTEGER:
        assert comparisons(text) == (Comparison("reported", ("x",), "==", value),)
    else:
        with pytest.raises(InvalidRequestError):
            parse_filter(text)


@given(TEXT, st.booleans())
def test_prop_storable_strings_round_trip_as_literals(value: str, ascii_only: bool) -> None:
    literal = json.dumps(value, ensure_ascii=ascii_only)
    for root in ("tags.site", "reported.x"):
        (comparison,) = comparisons(f"{root} == {literal}")
        assert comparison.value == value


@given(TEXT, UNSTORABLE, TEXT, st.sampled_from(["tags.site", "reported.x", "desired.a.b"]))
def test_prop_strings_holding_nul_or_a_lone_surrogate_are_refused(
    before: str, bad: str, after: str, subject: str
) -> None:
    literal = json.dumps(before + bad + after)  # ASCII-only: the bad character as an escape
    with pytest.raises(InvalidRequestError):
        parse_filter(f"{subject} == {literal}")
