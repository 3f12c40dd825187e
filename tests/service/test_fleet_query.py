"""Fleet queries (QueryFleet, ListDevices) over real gRPC, on SQLite and on PostgreSQL.

The store compiles a filter to SQL per database; `FleetFilter.matches` is the reference meaning
(services/shadow/fleet_filter.py). The example tests pin the documented meaning on a small
fleet; the property test checks that the SQL of each database agrees with the reference on a
varied fleet whose documents are read back over the API.

A filter compares with JSON scalars only (objects and arrays, integers beyond +-2**53 and strings
holding NUL or a lone surrogate are refused); a path segment is always an object key, never an
array index; and the JSON type must match (1 is not true, an array is not the string spelling
it), while 1 equals 1.0. Documents still hold arrays, objects, JSON-looking strings and big
integers, so every rule meets them.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protos.shadow.v1 import shadow_pb2 as pb
from protos.shadow.v1.shadow_pb2_grpc import ShadowServiceStub
from services.shadow.errors import InvalidRequestError
from services.shadow.fleet_filter import MAX_EXACT_INTEGER, parse_filter

JsonObject = dict[str, Any]


class Server(Protocol):
    """What these tests use of conftest's `RunningShadow`."""

    @property
    def stub(self) -> ShadowServiceStub: ...


# --- helpers over the API ---------------------------------------------------------------------


def status_of(exc: grpc.RpcError) -> grpc.StatusCode:
    return cast(grpc.Call, exc).code()


def register(stub: ShadowServiceStub, device_id: str, tags: dict[str, str] | None = None) -> None:
    stub.RegisterDevice(pb.RegisterDeviceRequest(device_id=device_id, tags=tags or {}))


def update(
    stub: ShadowServiceStub,
    device_id: str,
    desired: JsonObject | None = None,
    reported: JsonObject | None = None,
) -> int:
    state: JsonObject = {}
    if desired is not None:
        state["desired"] = desired
    if reported is not None:
        state["reported"] = reported
    response = stub.UpdateShadow(
        pb.UpdateShadowRequest(device_id=device_id, request_json=json.dumps({"state": state}))
    )
    return response.version


def query(
    stub: ShadowServiceStub, filter_text: str, page_size: int = 1000, page_token: str = ""
) -> pb.QueryFleetResponse:
    return stub.QueryFleet(
        pb.QueryFleetRequest(filter=filter_text, page_size=page_size, page_token=page_token)
    )


def matching(stub: ShadowServiceStub, filter_text: str) -> list[str]:
    """Ids of every device matching the filter, following pages to the end."""
    ids: list[str] = []
    token = ""
    while True:
        response = query(stub, filter_text, page_size=1000, page_token=token)
        ids.extend(d.device_id for d in response.devices)
        token = response.next_page_token
        if not token:
            return ids


def expect_status(code: grpc.StatusCode, call: Any, request: Any) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    assert status_of(info.value) == code, (request, cast(grpc.Call, info.value).details())
    return cast(grpc.Call, info.value).details() or ""


def read_back(
    stub: ShadowServiceStub, device_id: str
) -> tuple[dict[str, str], JsonObject, JsonObject]:
    """A device's tags, desired and reported as the API returns them."""
    tags = dict(stub.GetDevice(pb.GetDeviceRequest(device_id=device_id)).tags)
    try:
        shadow = stub.GetShadow(pb.GetShadowRequest(device_id=device_id))
    except grpc.RpcError as exc:
        assert status_of(exc) == grpc.StatusCode.NOT_FOUND
        return tags, {}, {}
    state = json.loads(shadow.document_json)["state"]
    return tags, state.get("desired", {}), state.get("reported", {})


# --- the documented meaning, on a small fleet -------------------------------------------------


@pytest.fixture
def small_fleet(shadow_server: Server) -> ShadowServiceStub:
    """Five devices, d04 without any shadow; see each test for what it relies on."""
    stub = shadow_server.stub
    register(stub, "d01", {"site": "berlin", "ring": "canary"})
    register(stub, "d02", {"site": "paris"})
    register(stub, "d03", {"site": "berlin"})
    register(stub, "d04")
    register(stub, "d05", {"site": "berlin", "ring": "stable"})
    update(
        stub,
        "d01",
        desired={"firmware": {"version": "2.0.0"}},
        reported={
            "firmware": {"version": "1.0.0", "build": 7},
            "temp": 1,
            "online": True,
            "name": "alpha",
        },
    )
    update(
        stub,
        "d02",
        desired={"firmware": {"version": "2.0.0"}},
        reported={
            "firmware": {"version": "2.0.0", "build": 8},
            "temp": 1.0,
            "online": False,
            "name": "beta",
        },
    )
    update(stub, "d03", reported={"temp": 1.5, "online": 1, "name": "1"})
    update(stub, "d05", reported={"firmware": {"version": "1.0.0"}, "temp": 2, "online": "true"})
    return stub


@pytest.mark.parametrize(
    ("filter_text", "expected"),
    [
        ('tags.site == "berlin"', ["d01", "d03", "d05"]),
        ('tags.site != "berlin"', ["d02", "d04"]),
        ('tags.ring == "canary"', ["d01"]),
        # A device without the tag is "not equal".
        ('tags.ring != "canary"', ["d02", "d03", "d04", "d05"]),
        ("tags.ring == null", ["d02", "d03", "d04"]),
        ("tags.ring != null", ["d01", "d05"]),
        ('tags.site == "Berlin"', []),
    ],
)
def test_tags_equality_and_inequality(
    small_fleet: ShadowServiceStub, filter_text: str, expected: list[str]
) -> None:
    assert matching(small_fleet, filter_text) == expected


@pytest.mark.parametrize(
    ("filter_text", "expected"),
    [
        ('reported.firmware.version == "1.0.0"', ["d01", "d05"]),
        ('reported.firmware.version != "1.0.0"', ["d02", "d03", "d04"]),
        ("reported.firmware.build == 7", ["d01"]),
        ("reported.firmware.build != 7", ["d02", "d03", "d04", "d05"]),
        ('desired.firmware.version == "2.0.0"', ["d01", "d02"]),
        ('desired.firmware.version != "2.0.0"', ["d03", "d04", "d05"]),
        # A path that runs through a string (or misses) is absent.
        ('reported.name.first == "alpha"', []),
        ("reported.name.first == null", ["d01", "d02", "d03", "d04", "d05"]),
    ],
)
def test_dotted_paths_into_desired_and_reported(
    small_fleet: ShadowServiceStub, filter_text: str, expected: list[str]
) -> None:
    assert matching(small_fleet, filter_text) == expected


@pytest.mark.parametrize(
    ("filter_text", "expected"),
    [
        ("reported.firmware == null", ["d03", "d04"]),
        ("reported.firmware != null", ["d01", "d02", "d05"]),
        ("desired.firmware == null", ["d03", "d04", "d05"]),
        ("desired.firmware != null", ["d01", "d02"]),
        ("reported.nothing == null", ["d01", "d02", "d03", "d04", "d05"]),
        ("reported.nothing != null", []),
    ],
)
def test_null_means_absent(
    small_fleet: ShadowServiceStub, filter_text: str, expected: list[str]
) -> None:
    assert matching(small_fleet, filter_text) == expected


@pytest.mark.parametrize(
    ("filter_text", "expected"),
    [
        # 1 and 1.0 are the same JSON number, whichever way round.
        ("reported.temp == 1", ["d01", "d02"]),
        ("reported.temp == 1.0", ["d01", "d02"]),
        ("reported.temp == 1e0", ["d01", "d02"]),
        ("reported.temp != 1", ["d03", "d04", "d05"]),
        ("reported.temp == 1.5", ["d03"]),
        ("reported.temp == 2.0", ["d05"]),
        ("reported.temp == -1", []),
        # true is not 1, nor "true"; false is not 0.
        ("reported.online == true", ["d01"]),
        ("reported.online != true", ["d02", "d03", "d04", "d05"]),
        ("reported.online == false", ["d02"]),
        ("reported.online == 0", []),
        ("reported.online == 1", ["d03"]),
        ("reported.online == 1.0", ["d03"]),
        ('reported.online == "true"', ["d05"]),
        # Strings compare as strings: "1" is not 1.
        ('reported.name == "1"', ["d03"]),
        ("reported.name == 1", []),
        ('reported.name == "alpha"', ["d01"]),
        ('reported.name != "alpha"', ["d02", "d03", "d04", "d05"]),
        ('reported.name == "ALPHA"', []),
    ],
)
def test_numbers_booleans_and_strings(
    small_fleet: ShadowServiceStub, filter_text: str, expected: list[str]
) -> None:
    assert matching(small_fleet, filter_text) == expected


@pytest.mark.parametrize(
    "filter_text",
    [
        'reported.firmware == {"version": "1.0.0"}',
        'reported.firmware != {"version": "1.0.0"}',
        'reported.firmware == {"version": "1.0.0", "build": 7}',
        "reported.firmware == {}",
        "reported.temp == []",
        "reported.temp != [1]",
        'tags.site == "berlin" AND desired.firmware == {"version": "2.0.0"}',
    ],
)
def test_object_and_array_literals_are_refused(
    small_fleet: ShadowServiceStub, filter_text: str
) -> None:
    for count in (False, True):
        details = expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            small_fleet.QueryFleet,
            pb.QueryFleetRequest(filter=filter_text, count=count),
        )
        assert "string, number, true, false or null" in details


@pytest.mark.parametrize(
    ("filter_text", "expected"),
    [
        # An object is present but equals no scalar, whatever its members.
        ('reported.firmware == "1.0.0"', []),
        ('reported.firmware != "1.0.0"', ["d01", "d02", "d03", "d04", "d05"]),
        ("reported.firmware == 7", []),
        ("reported.firmware == true", []),
        # Its members compare one by one.
        ('reported.firmware.version == "1.0.0" AND reported.firmware.build == null', ["d05"]),
        ('reported.firmware.version == "1.0.0" AND reported.firmware.build == 7', ["d01"]),
    ],
)
def test_an_object_equals_no_scalar(
    small_fleet: ShadowServiceStub, filter_text: str, expected: list[str]
) -> None:
    assert matching(small_fleet, filter_text) == expected


@pytest.mark.parametrize(
    ("filter_text", "expected"),
    [
        ('tags.site == "berlin" AND reported.firmware.version == "1.0.0"', ["d01", "d05"]),
        (
            'tags.site == "berlin" AND reported.firmware.version == "1.0.0" AND reported.temp != 1',
            ["d05"],
        ),
        ('tags.site == "berlin" and reported.online != true', ["d03", "d05"]),
        ('tags.site == "berlin" AND tags.site != "berlin"', []),
        (
            '  desired.firmware.version == "2.0.0"   AND   reported.firmware.version != "2.0.0"  ',
            ["d01"],
        ),
        ("", ["d01", "d02", "d03", "d04", "d05"]),
    ],
)
def test_conjunctions(
    small_fleet: ShadowServiceStub, filter_text: str, expected: list[str]
) -> None:
    assert matching(small_fleet, filter_text) == expected


def test_devices_carry_tags_and_shadow_version(small_fleet: ShadowServiceStub) -> None:
    update(small_fleet, "d05", reported={"temp": 3})
    response = query(small_fleet, "tags.ring != null")
    got = {d.device_id: (dict(d.tags), d.shadow_version) for d in response.devices}
    assert got == {
        "d01": ({"site": "berlin", "ring": "canary"}, 1),
        "d05": ({"site": "berlin", "ring": "stable"}, 2),
    }
    assert all(d.created_at_ms > 0 for d in response.devices)
    (d04,) = query(small_fleet, "tags.site == null").devices
    assert (d04.device_id, d04.shadow_version) == ("d04", 0)


def test_count_gives_the_total_whatever_the_page(small_fleet: ShadowServiceStub) -> None:
    response = small_fleet.QueryFleet(
        pb.QueryFleetRequest(filter='tags.site == "berlin"', page_size=1, count=True)
    )
    assert [d.device_id for d in response.devices] == ["d01"]
    assert response.total_count == 3
    assert response.next_page_token
    second = small_fleet.QueryFleet(
        pb.QueryFleetRequest(
            filter='tags.site == "berlin"',
            page_size=1,
            page_token=response.next_page_token,
            count=True,
        )
    )
    assert [d.device_id for d in second.devices] == ["d03"]
    assert second.total_count == 3
    everything = small_fleet.QueryFleet(pb.QueryFleetRequest(count=True))
    assert everything.total_count == 5
    nothing = small_fleet.QueryFleet(pb.QueryFleetRequest(filter='tags.site == "x"', count=True))
    assert (list(nothing.devices), nothing.total_count, nothing.next_page_token) == ([], 0, "")
    # Without count, no total is computed.
    uncounted = small_fleet.QueryFleet(pb.QueryFleetRequest(filter='tags.site == "berlin"'))
    assert len(uncounted.devices) == 3
    assert uncounted.total_count == 0


# --- pagination ------------------------------------------------------------------------------


@pytest.fixture
def thirty(shadow_server: Server) -> ShadowServiceStub:
    """p-00 .. p-29, registered out of order; even ones in group a, odd in group b."""
    stub = shadow_server.stub
    order = list(range(30))
    random.Random(7).shuffle(order)
    for i in order:
        register(stub, f"p-{i:02d}", {"group": "a" if i % 2 == 0 else "b"})
        update(stub, f"p-{i:02d}", reported={"n": i, "square": i % 3 == 0})
    return stub


def walk(stub: ShadowServiceStub, filter_text: str, page_size: int) -> list[list[str]]:
    pages: list[list[str]] = []
    token = ""
    while True:
        response = query(stub, filter_text, page_size=page_size, page_token=token)
        pages.append([d.device_id for d in response.devices])
        token = response.next_page_token
        if not token:
            return pages
        assert len(pages) < 50, "pagination does not end"


@pytest.mark.parametrize(
    ("filter_text", "numbers", "sizes"),
    [
        ("", list(range(30)), [7, 7, 7, 7, 2]),
        ('tags.group == "a"', list(range(0, 30, 2)), [7, 7, 1]),
        ('tags.group == "b" AND reported.square == true', [3, 9, 15, 21, 27], [5]),
        (
            "reported.n != 4 AND reported.n != 5",
            [i for i in range(30) if i not in (4, 5)],
            [7, 7, 7, 7],
        ),
    ],
)
def test_pages_of_seven_walk_every_match_once_in_id_order(
    thirty: ShadowServiceStub, filter_text: str, numbers: list[int], sizes: list[int]
) -> None:
    pages = walk(thirty, filter_text, page_size=7)
    assert [len(page) for page in pages] == sizes
    ids = [device_id for page in pages for device_id in page]
    assert ids == [f"p-{i:02d}" for i in numbers]


def test_page_size_zero_means_the_default_and_huge_is_capped(thirty: ShadowServiceStub) -> None:
    assert len(query(thirty, "", page_size=0).devices) == 30
    assert query(thirty, "", page_size=0).next_page_token == ""
    assert len(query(thirty, "", page_size=2**31 - 1).devices) == 30


def test_a_token_carries_on_after_the_last_id_even_if_it_was_deleted(
    thirty: ShadowServiceStub,
) -> None:
    first = query(thirty, "", page_size=7)
    assert first.devices[-1].device_id == "p-06"
    thirty.DeleteDevice(pb.DeleteDeviceRequest(device_id="p-06"))
    thirty.DeleteDevice(pb.DeleteDeviceRequest(device_id="p-07"))
    second = query(thirty, "", page_size=7, page_token=first.next_page_token)
    assert [d.device_id for d in second.devices] == [f"p-{i:02d}" for i in range(8, 15)]


def test_list_devices_filters_on_tags_and_pages(thirty: ShadowServiceStub) -> None:
    register(thirty, "z-1", {"group": "a", "site": "berlin"})
    register(thirty, "z-2", {"group": "b", "site": "berlin"})
    ids: list[str] = []
    sizes: list[int] = []
    token = ""
    while True:
        response = thirty.ListDevices(
            pb.ListDevicesRequest(tags={"group": "a"}, page_size=4, page_token=token)
        )
        ids.extend(d.device_id for d in response.devices)
        sizes.append(len(response.devices))
        token = response.next_page_token
        if not token:
            break
    assert ids == [*(f"p-{i:02d}" for i in range(0, 30, 2)), "z-1"]
    assert sizes == [4, 4, 4, 4]
    both = thirty.ListDevices(pb.ListDevicesRequest(tags={"group": "b", "site": "berlin"}))
    assert [(d.device_id, dict(d.tags)) for d in both.devices] == [
        ("z-2", {"group": "b", "site": "berlin"})
    ]
    assert both.next_page_token == ""
    everyone = thirty.ListDevices(pb.ListDevicesRequest(page_size=100))
    assert len(everyone.devices) == 32
    assert list(thirty.ListDevices(pb.ListDevicesRequest(tags={"group": "c"})).devices) == []
    # A tag value that only differs in case is another value.
    assert list(thirty.ListDevices(pb.ListDevicesRequest(tags={"group": "A"})).devices) == []


# --- invalid requests --------------------------------------------------------------------------


BAD_FILTERS = [
    "site == 1",  # no root
    'foo.site == "x"',  # unknown root
    'tags.site = "x"',  # not an operator
    "tags.site == berlin",  # not a JSON literal
    "tags.site == 1",  # tags compare with strings
    "tags.site == true",
    'tags.a.b == "x"',  # tags are flat
    "reported.a.b.c.d.e.f.g == 1",  # deeper than 6
    "reported.x == NaN",
    "reported.x == Infinity",
    'tags.site == "x" AND',
    'tags.site == "x" OR tags.ring == "y"',
    'tags.site == "x" tags.ring == "y"',
    'tags.site == "x" AND AND tags.ring == "y"',
    "reported. == 1",
    "reported.x == 1 2",
    " AND ".join(f"reported.k{i} == {i}" for i in range(17)),  # over 16 comparisons
    "reported.x == " + json.dumps("y" * 2100),  # over 2048 characters
    "reported.x == [1, 2]",  # literals are scalars
    'reported.x == {"a": 1}',
    'tags.site == "x" AND reported.x != []',
    f"reported.x == {2**53 + 1}",  # integers within +-2**53
    f"reported.x != {-(2**53) - 1}",
    f"reported.x == {2**64}",
    'reported.x == "a\\u0000b"',  # no NUL
    'tags.site == "\\u0000"',
    'reported.x == "\\ud800"',  # no lone surrogate
    'reported.x != "\\udfff"',
]


def test_bad_filters_are_invalid_argument(shadow_server: Server) -> None:
    stub = shadow_server.stub
    register(stub, "d01", {"site": "x"})
    for text in BAD_FILTERS:
        expect_status(
            grpc.StatusCode.INVALID_ARGUMENT, stub.QueryFleet, pb.QueryFleetRequest(filter=text)
        )
        expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            stub.QueryFleet,
            pb.QueryFleetRequest(filter=text, count=True),
        )


def test_the_limits_themselves_are_accepted(shadow_server: Server) -> None:
    stub = shadow_server.stub
    register(stub, "d01")
    update(stub, "d01", reported={"k0": 0})
    sixteen = " AND ".join(f"reported.k{i} != {i + 1}" for i in range(16))
    assert matching(stub, sixteen) == ["d01"]
    assert matching(stub, "reported.a.b.c.d.e.f == null") == ["d01"]


BAD_TOKENS = [
    "not base64!",
    "%%%%",
    base64.urlsafe_b64encode(b"/not a device id").decode(),
    base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    base64.urlsafe_b64encode(b"").decode() + "=",
]


def test_bad_page_tokens_and_sizes_are_invalid_argument(shadow_server: Server) -> None:
    stub = shadow_server.stub
    register(stub, "d01", {"site": "x"})
    for token in BAD_TOKENS:
        expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            stub.QueryFleet,
            pb.QueryFleetRequest(page_token=token),
        )
        expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            stub.ListDevices,
            pb.ListDevicesRequest(page_token=token),
        )
    for size in (-1, -7, -(2**31)):
        expect_status(
            grpc.StatusCode.INVALID_ARGUMENT, stub.QueryFleet, pb.QueryFleetRequest(page_size=size)
        )
        expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            stub.ListDevices,
            pb.ListDevicesRequest(page_size=size),
        )
    expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.ListDevices,
        pb.ListDevicesRequest(tags={"bad/key": "x"}),
    )
    # The rejections changed nothing and a good request still works.
    assert matching(stub, "") == ["d01"]


# --- edges where SQL must still mean what the reference means ---------------------------------


def reference(stub: ShadowServiceStub, ids: Sequence[str], filter_text: str) -> list[str]:
    fleet_filter = parse_filter(filter_text)
    return [i for i in ids if fleet_filter.matches(*read_back(stub, i))]


EDGE_DOCUMENTS: dict[str, JsonObject] = {
    "e1": {
        "arr": [1, 2],
        "fw": {"version": "1.0.0", "build": 7},
        "big": 2**64,
        "flag": True,
        "nest": [{"a": 1}],
        "huge": 10**23,
    },
    "e2": {
        "arr": ["a"],
        "fw": {"build": 7.0, "version": "1.0.0"},
        "big": 2**64 + 1,
        "flag": 1,
        "nest": {"0": {"a": 2}},
    },
    "e3": {
        "arr": "[1,2]",
        "fw": '{"build":7,"version":"1.0.0"}',
        "big": 2**53,
        "flag": "true",
        "nest": '[{"a":1}]',
    },
    "e4": {
        "arr": {"0": 1},
        "fw": {"version": "1.0.0", "build": 7, "x": True},
        "big": 2**53 + 1,
        "flag": 1.0,
        "nest": {"0": {"a": 1}},
    },
}
EDGE_IDS = sorted(EDGE_DOCUMENTS)


@pytest.fixture
def edge_fleet(shadow_server: Server) -> ShadowServiceStub:
    stub = shadow_server.stub
    for device_id, reported in EDGE_DOCUMENTS.items():
        register(stub, device_id, {"site": "edge"})
        update(stub, device_id, reported=reported)
    for device_id, reported in EDGE_DOCUMENTS.items():
        assert read_back(stub, device_id)[2] == reported
    return stub


def assert_means(stub: ShadowServiceStub, filter_text: str, expected: list[str]) -> None:
    """The reference gives `expected` and so does the database, with a matching count."""
    assert reference(stub, EDGE_IDS, filter_text) == expected
    assert matching(stub, filter_text) == expected
    counted = stub.QueryFleet(pb.QueryFleetRequest(filter=filter_text, count=True))
    assert counted.total_count == len(expected)


@pytest.mark.parametrize(
    ("filter_text", "expected"),
    [
        # A path segment is an object key, never an array index ("0" is a key of e4's object).
        ("reported.arr.0 == 1", ["e4"]),
        ("reported.arr.0 != 1", ["e1", "e2", "e3"]),
        ("reported.arr.0 == null", ["e1", "e2", "e3"]),
        ("reported.arr.0 != null", ["e4"]),
        ('reported.arr.0 == "a"', []),
        ("reported.arr.-1 == 2", []),
        ("reported.arr.1 != null", []),
        ("reported.arr.1 == 2", []),
        # ... at any depth: e1's nest is an array holding {"a": 1}.
        ("reported.nest.0.a == 1", ["e4"]),
        ("reported.nest.0.a == 2", ["e2"]),
        ("reported.nest.0.a != 1", ["e1", "e2", "e3"]),
        ("reported.nest.0.a != null", ["e2", "e4"]),
        ("reported.nest.0 == null", ["e1", "e3"]),
        ("reported.nest.00.a == null", ["e1", "e2", "e3", "e4"]),
    ],
)
def test_path_segments_do_not_index_arrays(
    edge_fleet: ShadowServiceStub, filter_text: str, expected: list[str]
) -> None:
    assert_means(edge_fleet, filter_text, expected)


@pytest.mark.parametrize(
    ("filter_text", "expected"),
    [
        # A string holding JSON text is a string, not the array or object it spells...
        ('reported.arr == "[1,2]"', ["e3"]),
        ('reported.arr != "[1,2]"', ["e1", "e2", "e4"]),
        ('reported.arr == "[1, 2]"', []),
        ('reported.fw == "{\\"build\\":7,\\"version\\":\\"1.0.0\\"}"', ["e3"]),
        ('reported.fw != "{\\"build\\":7,\\"version\\":\\"1.0.0\\"}"', ["e1", "e2", "e4"]),
        ('reported.nest == "[{\\"a\\":1}]"', ["e3"]),
        # ... and an array or object equals no scalar.
        ("reported.arr == 1", []),
        ("reported.arr != 1", ["e1", "e2", "e3", "e4"]),
        ('reported.arr == "a"', []),
        ("reported.arr != null", ["e1", "e2", "e3", "e4"]),
        ('reported.fw == "1.0.0"', []),
        ("reported.fw == true", []),
        # Numbers: 7 and 7.0 are one number, "7" is a string.
        ("reported.fw.build == 7", ["e1", "e2", "e4"]),
        ("reported.fw.build == 7.0", ["e1", "e2", "e4"]),
        ("reported.fw.build == 7e0", ["e1", "e2", "e4"]),
        ('reported.fw.build == "7"', []),
        ("reported.fw.x == true", ["e4"]),
        ("reported.fw.x == 1", []),
        # true is not 1 (nor 1.0, nor "true"); 1 is 1.0.
        ("reported.flag == true", ["e1"]),
        ("reported.flag != true", ["e2", "e3", "e4"]),
        ("reported.flag == 1", ["e2", "e4"]),
        ("reported.flag == 1.0", ["e2", "e4"]),
        ("reported.flag != 1", ["e1", "e3"]),
        ('reported.flag == "true"', ["e3"]),
        ('reported.flag == "1"', []),
        ("reported.flag == false", []),
        ("reported.flag == 0", []),
    ],
)
def test_the_json_type_must_match(
    edge_fleet: ShadowServiceStub, filter_text: str, expected: list[str]
) -> None:
    assert_means(edge_fleet, filter_text, expected)


@pytest.mark.parametrize(
    ("filter_text", "expected"),
    [
        # Within +-2**53 integers are exact, whatever the documents hold beyond.
        (f"reported.big == {2**53}", ["e3"]),
        (f"reported.big == {float(2**53)}", ["e3"]),
        (f"reported.big != {2**53}", ["e1", "e2", "e4"]),
        (f"reported.big == {2**53 - 1}", []),
        (f"reported.big == {-(2**53)}", []),
        ("reported.big != null", ["e1", "e2", "e3", "e4"]),
        ("reported.huge == 1", []),
    ],
)
def test_integer_literals_compare_exactly(
    edge_fleet: ShadowServiceStub, filter_text: str, expected: list[str]
) -> None:
    assert_means(edge_fleet, filter_text, expected)


@pytest.mark.parametrize(
    "filter_text",
    [
        # integers beyond +-2**53, which not every database compares exactly
        f"reported.big == {2**64}",
        f"reported.big == {2**64 + 1}",
        f"reported.big != {2**64}",
        f"reported.big == {2**53 + 1}",
        f"reported.big == {-(2**53) - 1}",
        f"reported.huge == {10**23}",
        # arrays and objects
        "reported.arr == [1, 2]",
        "reported.arr == [1.0, 2.0]",
        'reported.fw == {"version": "1.0.0", "build": 7}',
        'reported.fw != {"build": 7, "version": "1.0.0"}',
        'reported.arr == {"0": 1}',
        "reported.nest == []",
        # numbers that overflow to infinity
        "reported.big == 1e400",
        "reported.big != -1e400",
        # PostgreSQL's jsonb has no NUL character; a lone surrogate is no Unicode character
        'reported.fw == "\\u0000"',
        'reported.fw == "x\\u0000"',
        'reported.fw != "\\ud800"',
        'reported.fw == "\\udc00"',
        'tags.site == "\\u0000"',
        'tags.site != "\\ud800"',
    ],
)
def test_literals_outside_the_decided_scalars_are_refused(
    edge_fleet: ShadowServiceStub, filter_text: str
) -> None:
    with pytest.raises(InvalidRequestError):
        parse_filter(filter_text)
    for count in (False, True):
        expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            edge_fleet.QueryFleet,
            pb.QueryFleetRequest(filter=filter_text, count=count),
        )
    assert matching(edge_fleet, 'tags.site == "edge"') == EDGE_IDS


def test_storable_strings_near_the_refused_ones_are_accepted(
    shadow_server: Server,
) -> None:
    stub = shadow_server.stub
    values = {"s1": "\\u0000", "s2": "\U0001f600", "s3": "\x01", "s4": "é"}
    for device_id, value in values.items():
        register(stub, device_id)
        update(stub, device_id, reported={"s": value})
    ids = sorted(values)
    for device_id, value in values.items():
        for literal in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
            assert matching(stub, f"reported.s == {literal}") == [device_id]
            assert reference(stub, ids, f"reported.s == {literal}") == [device_id]


@pytest.mark.parametrize(
    "filter_text",
    [
        # Number literals whose value is an integer beyond 2**53 written as a float.
        "reported.big == 1.8446744073709552e19",  # the double nearest 2**64 is 2**64
        "reported.big != 1.8446744073709552e19",
        "reported.huge == 1e23",  # the double nearest 1e23 is not 10**23
        "reported.huge != 1e23",
        "reported.big == 9007199254740994.0",
    ],
)
def test_float_literals_beyond_2_to_the_53_are_refused_or_mean_the_reference(
    edge_fleet: ShadowServiceStub, filter_text: str
) -> None:
    """Either the filter is refused as INVALID_ARGUMENT, or it means what the reference says.

    Known to fail (services, not this test): a float literal is not bounded like an integer
    one. PostgreSQL compares the stored integer with the literal's shortest decimal spelling
    (10**23 equals 1e23 there) and SQLite reads integers beyond 64 bits as REAL (2**64 + 1
    equals 1.8446744073709552e19 there), while the reference compares the integer exactly
    with the binary double."""
    try:
        fleet_filter = parse_filter(filter_text)
    except InvalidRequestError:
        expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            edge_fleet.QueryFleet,
            pb.QueryFleetRequest(filter=filter_text),
        )
        return
    expected = [i for i in EDGE_IDS if fleet_filter.matches(*read_back(edge_fleet, i))]
    got = matching(edge_fleet, filter_text)
    assert got == expected, f"{filter_text!r}: SQL {got}, reference {expected}"


def test_a_tag_value_holding_nul_is_refused_or_found(shadow_server: Server) -> None:
    """RegisterDevice and ListDevices either refuse a tag value holding NUL (INVALID_ARGUMENT)
    or store it and find the device by it; never a server error or a device lost to its tag.

    Known to fail (services, not this test): validate_tags lets NUL through, so PostgreSQL
    raises a DataError (UNKNOWN over gRPC) and SQLite stores it but never finds it."""
    stub = shadow_server.stub
    tags = {"site": "a\x00b"}
    try:
        register(stub, "t1", tags)
    except grpc.RpcError as exc:
        assert status_of(exc) == grpc.StatusCode.INVALID_ARGUMENT, cast(grpc.Call, exc).details()
        refused = True
    else:
        refused = False
    try:
        listed = stub.ListDevices(pb.ListDevicesRequest(tags=tags))
    except grpc.RpcError as exc:
        assert status_of(exc) == grpc.StatusCode.INVALID_ARGUMENT, cast(grpc.Call, exc).details()
        assert refused
        return
    assert [d.device_id for d in listed.devices] == ([] if refused else ["t1"])


# --- SQL agrees with the reference, on a varied fleet -----------------------------------------

TAG_CHOICES: dict[str, list[str]] = {
    "site": ["berlin", "paris", "1", "true", ""],
    "ring": ["canary", "stable"],
    "hw-rev": ["a:1", "b-2"],
}
DOC_KEYS = ["firmware", "mode", "level", "cfg", "arr", "s", "0"]
BIG_INTEGERS: list[Any] = [2**53, -(2**53), 2**53 + 1, -(2**53) - 1, 2**63, 2**64, 10**23]
SCALARS: list[Any] = [
    0,
    1,
    2,
    -3,
    1.0,
    1.5,
    -0.25,
    2.0,
    1e-7,
    True,
    False,
    "1",
    "1.0",
    "true",
    "null",
    "",
    "berlin",
    "2.0.0",
    "[1,2]",
    '{"v":1}',
    "\\u0000",
    *BIG_INTEGERS,
]
COMPOUNDS: list[Any] = [
    {"version": "1.0.0", "build": 7},
    {"version": "2.0.0"},
    {"version": "2.0.0", "build": 7.0},
    {"a": {"b": 1}},
    {"a": {"b": True, "c": "x"}},
    {"a": {"b": 1.0}, "v": 1},
    {"v": 1},
    {"v": 1, "w": [1, 2], "x": {"y": "z", "n": 2}},
    {"0": 1},
    {"0": {"a": {"b": 1}}},
    {"big": 2**64, "0": True},
    [1, 2],
    [1.0, 2],
    ["a", 1.5],
    [True],
    [1, {"a": 1, "b": 2.5}],
    [{"a": {"b": 1}}],
    [2**64],
    [],
]


@dataclass(frozen=True)
class Model:
    tags: dict[str, str]
    desired: JsonObject
    reported: JsonObject
    has_shadow: bool


# Devices written by hand, so that each rule meets its hardest case whatever the random fleet
# holds: an array and an object with key "0" at one path, an array and the string spelling it,
# true and 1 and 1.0, integers beyond 2**53 and 2**64.
PINNED: dict[str, Model] = {
    "g-1": Model(
        {"site": "berlin"},
        {"arr": [1, 2], "mode": 1},
        {"arr": [1, 2], "mode": True, "level": 2**64, "cfg": [{"a": {"b": 1}}], "s": [1]},
        True,
    ),
    "g-2": Model(
        {"site": "paris"},
        {"arr": "[1,2]", "mode": True},
        {"arr": "[1,2]", "mode": 1, "level": 10**23, "cfg": {"0": {"a": {"b": 1}}}, "s": "1"},
        True,
    ),
    "g-3": Model(
        {},
        {"arr": {"0": 1}},
        {"arr": {"0": 1}, "mode": 1.0, "level": 2**53 + 1, "cfg": '[{"a":{"b":1}}]', "s": 1},
        True,
    ),
    "g-4": Model(
        {"ring": "canary"},
        {"level": 2**53},
        {"arr": [[1, 2]], "mode": "true", "level": 2**64 + 1, "s": True},
        True,
    ),
}


def build_models(count: int = 40, seed: int = 2024) -> dict[str, Model]:
    """The fleet, decided up front: deterministic, so the strategies can draw from it."""
    rng = random.Random(seed)
    values = SCALARS + COMPOUNDS

    def document() -> JsonObject:
        keys = rng.sample(DOC_KEYS, rng.randint(0, 4))
        return {key: rng.choice(values) for key in keys}

    models: dict[str, Model] = {}
    for i in range(count):
        tags = {k: rng.choice(v) for k, v in TAG_CHOICES.items() if rng.random() < 0.6}
        has_shadow = i % 8 != 5
        desired = document() if has_shadow else {}
        reported = document() if has_shadow else {}
        models[f"f-{i:03d}"] = Model(tags, desired, reported, has_shadow)
    return {**models, **PINNED}


MODELS = build_models()


def paths_and_values(
    doc: Any, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (path, value) of a document, plus array elements under index-like segments."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield (*prefix, key), value
            yield from paths_and_values(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield (*prefix, str(index)), value
            yield from paths_and_values(value, (*prefix, str(index)))


def spellings(value: Any) -> set[str]:
    """Scalar literals that name `value` or come close: 1 and 1.0, the float nearest a big
    integer (and the integer itself when within +-2**53); for an array or object, the string
    spelling it, which must not match it."""
    if isinstance(value, dict | list):
        return {json.dumps(json.dumps(value, separators=(",", ":")))}
    if isinstance(value, bool | str):
        return {json.dumps(value)}
    assert isinstance(value, int | float), value
    if isinstance(value, float) and not value.is_integer():
        return {json.dumps(value)}
    spelled = {json.dumps(float(value))}
    if abs(value) <= MAX_EXACT_INTEGER:
        spelled.add(json.dumps(int(value)))
    return spelled


Path = tuple[str, ...]
# For each root, each path some device holds, with every spelling of every value held there.
PATH_LITERALS: dict[str, dict[Path, list[str]]] = {"desired": {}, "reported": {}}
for _model in MODELS.values():
    for _root, _doc in (("desired", _model.desired), ("reported", _model.reported)):
        for _path, _value in paths_and_values(_doc):
            _known = PATH_LITERALS[_root].setdefault(_path, [])
            _known[:] = sorted(set(_known) | spellings(_value))
ROOT_PATHS = {root: sorted(paths) for root, paths in PATH_LITERALS.items()}
ALL_PATHS = sorted(
    {path for paths in ROOT_PATHS.values() for path in paths}
    | {("missing",), ("firmware", "version", "x"), ("cfg", "a", "b", "c")}
)
LITERALS = sorted(
    {literal for paths in PATH_LITERALS.values() for known in paths.values() for literal in known}
    | {"null", "99", '"nope"', "true", "false", "0", "1", "1.0", '"[1,2]"', '"true"'}
    | {str(MAX_EXACT_INTEGER), str(-MAX_EXACT_INTEGER), str(MAX_EXACT_INTEGER - 1)}
)
TAG_LITERALS = sorted(
    {json.dumps(v) for values in TAG_CHOICES.values() for v in values} | {"null", '"nope"'}
)


@st.composite
def comparisons(draw: st.DrawFn) -> str:
    """One comparison. Paths are mostly ones that some device holds under that root, literals
    mostly values (or other spellings of values) held at that very path, so that comparisons
    select some devices and not others. Literals are scalars only."""
    operator = draw(st.sampled_from(["==", "!="]))
    root = draw(st.sampled_from(["tags", "desired", "reported"]))
    if root == "tags":
        key = draw(st.sampled_from([*TAG_CHOICES, "missing"]))
        return f"tags.{key} {operator} {draw(st.sampled_from(TAG_LITERALS))}"
    held = st.sampled_from(ROOT_PATHS[root])
    path = draw(st.one_of(held, held, st.sampled_from(ALL_PATHS)))
    literals = st.sampled_from(LITERALS)
    here = PATH_LITERALS[root].get(path)
    if here:
        literals = st.one_of(st.sampled_from(here), st.sampled_from(here), literals)
    return f"{root}.{'.'.join(path)} {operator} {draw(literals)}"


filters = st.lists(comparisons(), min_size=1, max_size=3).map(" AND ".join)


def test_the_generated_literals_are_scalars_only() -> None:
    """Guards the strategy: every literal it can draw is a JSON scalar."""
    for literal in {*LITERALS, *TAG_LITERALS}:
        value = json.loads(literal)
        assert value is None or isinstance(value, bool | int | float | str), literal
        assert not isinstance(value, int) or abs(value) <= MAX_EXACT_INTEGER, literal
    # ... and the fleet holds what the type rules are about.
    held = [v for m in MODELS.values() for d in (m.desired, m.reported) for v in d.values()]
    assert any(isinstance(v, list) for v in held)
    assert any(isinstance(v, dict) and "0" in v for v in held)
    assert any(isinstance(v, str) and v.startswith("[") for v in held)
    assert any(isinstance(v, int) and abs(v) > 2**64 - 1 for v in held)
    assert any(v is True for v in held) and any(v == 1 and v is not True for v in held)


@dataclass(frozen=True, repr=False)
class Fleet:
    stub: ShadowServiceStub
    documents: dict[str, tuple[dict[str, str], JsonObject, JsonObject]]

    def __repr__(self) -> str:  # keeps hypothesis' report of a failing filter short
        return f"Fleet({len(self.documents)} devices)"


@pytest.fixture
def fleet(shadow_server: Server) -> Fleet:
    """MODELS in the database, through the API: reported with UpdateShadow (with a key set and
    deleted again on some devices), desired with one BatchUpdateDesired. The reference then uses
    the documents as the API reads them back."""
    stub = shadow_server.stub
    items: list[pb.DesiredPatch] = []
    for device_id, model in MODELS.items():
        register(stub, device_id, model.tags)
        if not model.has_shadow:
            continue
        update(stub, device_id, reported={**model.reported, "gone": {"x": 1}})
        update(stub, device_id, reported={"gone": None})
        if model.desired:
            items.append(
                pb.DesiredPatch(device_id=device_id, desired_json=json.dumps(model.desired))
            )
    results = stub.BatchUpdateDesired(pb.BatchUpdateDesiredRequest(items=items)).results
    assert [r.status for r in results] == [pb.BatchItemResult.OK] * len(items)
    documents = {device_id: read_back(stub, device_id) for device_id in MODELS}
    for device_id, model in MODELS.items():
        assert documents[device_id] == (model.tags, model.desired, model.reported), device_id
    return Fleet(stub, documents)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(filter_text=filters)
# Each former disagreement, always tried first.
@example(filter_text="reported.arr.0 == 1")  # PostgreSQL indexed arrays
@example(filter_text="reported.cfg.0.a.b == 1 AND reported.cfg.0.a.b != 2")
@example(filter_text='reported.arr == "[1,2]"')  # SQLite took an array for its spelling
@example(filter_text='desired.arr != "[1,2]"')
@example(filter_text="reported.mode == 1")  # SQLite took true for 1
@example(filter_text="desired.mode == true")
@example(filter_text="reported.mode == 1.0 AND reported.mode != true")
@example(filter_text=f"reported.level == {2**53}")
@example(filter_text=f"desired.level == {float(2**53)}")
# A float literal whose value is an integer beyond 2**53 (see the test above).
@example(filter_text="reported.level == 1.8446744073709552e+19")
@example(filter_text="reported.level == 1e+23")
def test_query_fleet_agrees_with_the_reference_meaning(fleet: Fleet, filter_text: str) -> None:
    try:
        fleet_filter = parse_filter(filter_text)
    except InvalidRequestError:
        # Refused by the parser: the service refuses it too, and then nothing is to compare.
        expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            fleet.stub.QueryFleet,
            pb.QueryFleetRequest(filter=filter_text, count=True),
        )
        return
    expected = {
        device_id
        for device_id, (tags, desired, reported) in fleet.documents.items()
        if fleet_filter.matches(tags, desired, reported)
    }
    response = fleet.stub.QueryFleet(
        pb.QueryFleetRequest(filter=filter_text, page_size=1000, count=True)
    )
    got = [d.device_id for d in response.devices]
    assert set(got) == expected, (
        f"{filter_text!r}: SQL only {sorted(set(got) - expected)}, "
        f"reference only {sorted(expected - set(got))}"
    )
    assert len(got) == len(expected)
    assert response.total_count == len(expected)
