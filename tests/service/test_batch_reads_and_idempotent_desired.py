"""BatchGetShadows and BatchUpdateDesired's skip_unchanged, over real gRPC on loopback, against
SQLite and PostgreSQL: the rollout's fleet-scale read, and a fan-out batch that may be re-sent."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from sqlalchemy import Engine, event, func, select

from protos.shadow.v1 import shadow_pb2 as pb
from protos.shadow.v1 import shadow_pb2_grpc
from services.common.auth import BearerAuthInterceptor, TokenTable, bearer_channel
from services.shadow.schema import devices, shadow_events
from services.shadow.server import create_server
from services.shadow.service import ShadowService
from services.shadow.settings import ShadowSettings
from services.shadow.store import ShadowStore
from tests.conftest import RunningShadow


class Clock:
    """A clock the test moves by hand, so a rewritten metadata timestamp would show."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def shadow_service(engine: Engine, clock: Clock) -> ShadowService:
    return ShadowService(ShadowStore(engine), clock=clock)


def rpc_error(call: Any, request: Any) -> grpc.Call:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    return cast(grpc.Call, info.value)


def register_many(server: RunningShadow, ids: list[str]) -> None:
    """Devices straight into the store (a fixed credential hash: hashing is not under test)."""
    for device_id in ids:
        server.service.store.register_device(device_id, {}, "$7$1$AA==$AA==", 0)


def update(server: RunningShadow, device_id: str, request: Any) -> pb.UpdateShadowResponse:
    return server.stub.UpdateShadow(
        pb.UpdateShadowRequest(device_id=device_id, request_json=json.dumps(request))
    )


def batch_get(server: RunningShadow, ids: list[str]) -> list[pb.ShadowRead]:
    return list(server.stub.BatchGetShadows(pb.BatchGetShadowsRequest(device_ids=ids)).shadows)


def get_document(server: RunningShadow, device_id: str) -> str:
    return server.stub.GetShadow(pb.GetShadowRequest(device_id=device_id)).document_json


def desired_batch(
    server: RunningShadow, patches: list[tuple[str, Any]], skip_unchanged: bool
) -> list[pb.BatchItemResult]:
    items = [pb.DesiredPatch(device_id=d, desired_json=json.dumps(p)) for d, p in patches]
    request = pb.BatchUpdateDesiredRequest(items=items, skip_unchanged=skip_unchanged)
    return list(server.stub.BatchUpdateDesired(request).results)


def stored_rows(server: RunningShadow) -> dict[str, tuple[Any, ...]]:
    """Every device's stored shadow columns, straight from the database."""
    with server.service.store.engine.connect() as conn:
        rows = conn.execute(
            select(
                devices.c.device_id,
                devices.c.desired,
                devices.c.reported,
                devices.c.shadow_metadata,
                devices.c.version,
                devices.c.has_shadow,
            )
        ).all()
    return {row.device_id: tuple(row[1:]) for row in rows}


def outbox_count(server: RunningShadow) -> int:
    with server.service.store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(shadow_events)).scalar_one())


def outbox(server: RunningShadow) -> list[pb.ShadowEvent]:
    return list(server.stub.ReadEvents(pb.ReadEventsRequest(limit=5000)).events)


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    """The SQL statements the service runs inside the block (not BEGIN: SQLite's engine sends
    its own BEGIN IMMEDIATE)."""
    seen: list[str] = []

    def record(*args: Any) -> None:
        statement = args[2]  # (conn, cursor, statement, parameters, context, executemany)
        if not statement.startswith("BEGIN"):
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


# --- BatchGetShadows --------------------------------------------------------------------------


def test_batch_get_answers_found_no_shadow_and_unknown_in_request_order(
    shadow_server: RunningShadow,
) -> None:
    register_many(shadow_server, ["dev-a", "dev-b", "dev-c"])
    update(
        shadow_server,
        "dev-a",
        {"state": {"desired": {"fw": {"version": "2"}}, "reported": {"fw": {"version": "1"}}}},
    )
    update(shadow_server, "dev-c", {"state": {"desired": {"x": 1}}})
    shadow_server.stub.DeleteShadow(pb.DeleteShadowRequest(device_id="dev-c"))  # no shadow again

    reads = batch_get(shadow_server, ["ghost", "dev-c", "dev-a", "dev-b"])

    assert [(r.device_id, r.status) for r in reads] == [
        ("ghost", pb.ShadowRead.DEVICE_NOT_FOUND),
        ("dev-c", pb.ShadowRead.NO_SHADOW),
        ("dev-a", pb.ShadowRead.FOUND),
        ("dev-b", pb.ShadowRead.NO_SHADOW),
    ]
    assert [r.document_json for r in reads if r.device_id != "dev-a"] == ["", "", ""]
    found = reads[2].document_json
    assert found == get_document(shadow_server, "dev-a")  # the very text GetShadow returns
    document = json.loads(found)
    assert document["state"] == {
        "desired": {"fw": {"version": "2"}},
        "reported": {"fw": {"version": "1"}},
        "delta": {"fw": {"version": "2"}},
    }
    assert document["version"] == 1
    assert document["timestamp"] == 1_800_000_000


def test_batch_get_of_a_thousand_devices_is_one_query_and_matches_get_shadow(
    shadow_server: RunningShadow,
) -> None:
    ids = [f"dev-{i:04d}" for i in range(999)]
    register_many(shadow_server, ids)
    with_shadow = ids[::3]
    desired_batch(shadow_server, [(d, {"fw": d, "n": i}) for i, d in enumerate(with_shadow)], False)
    wanted = [*ids, "ghost"]
    random.Random(7).shuffle(wanted)

    with statements(shadow_server.service.store.engine) as seen:
        reads = batch_get(shadow_server, wanted)

    assert len(seen) == 1 and "FROM devices" in seen[0], seen
    assert [r.device_id for r in reads] == wanted
    expected_status = {
        **{d: pb.ShadowRead.NO_SHADOW for d in ids},
        **{d: pb.ShadowRead.FOUND for d in with_shadow},
        "ghost": pb.ShadowRead.DEVICE_NOT_FOUND,
    }
    assert [r.status for r in reads] == [expected_status[d] for d in wanted]
    by_id = {r.device_id: r.document_json for r in reads}
    for device_id in with_shadow[::25]:
        assert by_id[device_id] == get_document(shadow_server, device_id)
    assert json.loads(by_id[with_shadow[5]])["state"]["desired"] == {"fw": with_shadow[5], "n": 5}


@pytest.mark.parametrize(
    ("ids", "words"),
    [
        ([], "got 0"),
        ([f"dev-{i}" for i in range(1001)], "got 1001"),
        (["dev-1", "dev-2", "dev-1"], "device_ids[2]: 'dev-1' is listed more than once"),
        (["dev-1", "a/b"], "device_ids[1]"),
        (["", "dev-1"], "device_ids[0]"),
        (["x" * 129], "device_ids[0]"),
        (["$SYS"], "device_ids[0]"),
    ],
)
def test_batch_get_refuses_bad_requests_before_reading(
    shadow_server: RunningShadow, ids: list[str], words: str
) -> None:
    register_many(shadow_server, ["dev-1", "dev-2"])
    request = pb.BatchGetShadowsRequest(device_ids=ids)

    with statements(shadow_server.service.store.engine) as seen:
        error = rpc_error(shadow_server.stub.BatchGetShadows, request)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (error.details() or "")
    assert seen == []  # refused before the database was touched


def test_a_read_token_may_batch_read_but_not_write(
    shadow_service: ShadowService, tmp_path: Path
) -> None:
    path = tmp_path / "tokens.json"
    TokenTable.write(path, {"read-secret": ("viewer", "read")})
    server, port = create_server(
        ShadowSettings(listen="127.0.0.1:0"),
        shadow_service,
        [BearerAuthInterceptor(TokenTable.load(path))],
    )
    server.start()
    channel = bearer_channel(f"127.0.0.1:{port}", "read-secret")
    try:
        shadow_service.store.register_device("dev-1", {}, "$7$1$AA==$AA==", 0)
        viewer = shadow_pb2_grpc.ShadowServiceStub(channel)
        reply = viewer.BatchGetShadows(pb.BatchGetShadowsRequest(device_ids=["dev-1"]))
        assert [(r.device_id, r.status) for r in reply.shadows] == [
            ("dev-1", pb.ShadowRead.NO_SHADOW)
        ]
        write = pb.BatchUpdateDesiredRequest(
            items=[pb.DesiredPatch(device_id="dev-1", desired_json="{}")], skip_unchanged=True
        )
        assert rpc_error(viewer.BatchUpdateDesired, write).code() == (
            grpc.StatusCode.PERMISSION_DENIED
        )
    finally:
        channel.close()
        server.stop(None)


# --- BatchUpdateDesired with skip_unchanged ---------------------------------------------------


def test_a_resent_batch_changes_nothing_and_announces_nothing(
    shadow_server: RunningShadow, clock: Clock
) -> None:
    ids = ["dev-1", "dev-2", "dev-3"]
    register_many(shadow_server, ids)
    update(shadow_server, "dev-3", {"state": {"reported": {"fw": {"version": "1"}}}})
    patches = [(d, {"fw": {"version": "2", "url": f"https://x/{d}"}}) for d in ids]

    first = desired_batch(shadow_server, patches, skip_unchanged=True)
    assert [(r.status, r.version, r.unchanged) for r in first] == [
        (pb.BatchItemResult.OK, 1, False),
        (pb.BatchItemResult.OK, 1, False),
        (pb.BatchItemResult.OK, 2, False),
    ]
    rows = stored_rows(shadow_server)
    events = outbox(shadow_server)
    assert len(events) == 4 and outbox_count(shadow_server) == 4
    documents = {d: get_document(shadow_server, d) for d in ids}

    clock.now += 60  # a rewritten metadata timestamp would now differ
    second = desired_batch(shadow_server, patches, skip_unchanged=True)

    assert [(r.device_id, r.status, r.version, r.unchanged, r.message) for r in second] == [
        ("dev-1", pb.BatchItemResult.OK, 1, True, ""),
        ("dev-2", pb.BatchItemResult.OK, 1, True, ""),
        ("dev-3", pb.BatchItemResult.OK, 2, True, ""),
    ]
    assert stored_rows(shadow_server) == rows
    assert outbox_count(shadow_server) == 4
    assert [(e.event_id, e.device_id, e.version) for e in outbox(shadow_server)] == [
        (e.event_id, e.device_id, e.version) for e in events
    ]
    for device_id in ids:  # same document but for the read's own timestamp
        now = json.loads(get_document(shadow_server, device_id))
        before = json.loads(documents[device_id])
        assert now.pop("timestamp") == before.pop("timestamp") + 60
        assert now == before


def test_a_subset_of_what_is_desired_or_deleting_what_is_absent_is_unchanged(
    shadow_server: RunningShadow, clock: Clock
) -> None:
    register_many(shadow_server, ["dev-1"])
    desired_batch(
        shadow_server, [("dev-1", {"fw": {"version": "2", "url": "u"}, "mode": "a"})], False
    )
    rows = stored_rows(shadow_server)
    clock.now += 5

    results = desired_batch(
        shadow_server,
        [
            ("dev-1", {"fw": {"version": "2"}}),
            ("dev-1", {"mode": "a", "gone": None}),
            ("dev-1", {"fw": {"nothing": {"here": None}}}),
            ("dev-1", {}),
        ],
        skip_unchanged=True,
    )

    assert [(r.status, r.version, r.unchanged) for r in results] == [
        (pb.BatchItemResult.OK, 1, True)
    ] * 4
    assert stored_rows(shadow_server) == rows
    assert outbox_count(shadow_server) == 1


def test_changed_items_in_the_same_batch_are_written_as_today(
    shadow_server: RunningShadow, clock: Clock
) -> None:
    register_many(shadow_server, ["dev-1", "dev-2"])
    desired_batch(shadow_server, [("dev-1", {"fw": "2"}), ("dev-2", {"fw": "2"})], False)
    before = outbox(shadow_server)
    clock.now += 10

    results = desired_batch(
        shadow_server,
        [
            ("dev-1", {"fw": "2"}),
            ("dev-2", {"fw": "3"}),
            ("dev-2", {"fw": "3"}),  # applies after the item before it: nothing left to change
            ("ghost", {"fw": "3"}),
            ("dev-1", {"n": 1.0}),
            ("dev-1", {"n": 1}),  # 1 is not 1.0: the stored text would change
        ],
        skip_unchanged=True,
    )

    assert [(r.device_id, r.status, r.version, r.unchanged) for r in results] == [
        ("dev-1", pb.BatchItemResult.OK, 1, True),
        ("dev-2", pb.BatchItemResult.OK, 2, False),
        ("dev-2", pb.BatchItemResult.OK, 2, True),
        ("ghost", pb.BatchItemResult.NOT_FOUND, 0, False),
        ("dev-1", pb.BatchItemResult.OK, 2, False),
        ("dev-1", pb.BatchItemResult.OK, 3, False),
    ]
    new = outbox(shadow_server)[len(before) :]
    assert [(e.device_id, e.version) for e in new] in (
        [("dev-1", 2), ("dev-1", 3), ("dev-2", 2)],
        [("dev-2", 2), ("dev-1", 2), ("dev-1", 3)],
    )
    dev2 = next(e for e in new if e.device_id == "dev-2")
    delta = json.loads(dev2.delta_json)
    assert delta["state"] == {"fw": "3"}
    assert delta["metadata"]["fw"]["timestamp"] == 1_800_000_010
    document = json.loads(get_document(shadow_server, "dev-1"))
    assert document["state"]["desired"] == {"fw": "2", "n": 1}
    assert document["metadata"]["desired"]["fw"]["timestamp"] == 1_800_000_000  # untouched
    assert document["metadata"]["desired"]["n"]["timestamp"] == 1_800_000_010


def test_without_the_flag_an_identical_batch_is_written_and_announced_again(
    shadow_server: RunningShadow, clock: Clock
) -> None:
    register_many(shadow_server, ["dev-1", "dev-2"])
    patches = [("dev-1", {"fw": "2"}), ("dev-2", {"fw": "2"})]
    desired_batch(shadow_server, patches, skip_unchanged=False)
    clock.now += 30

    again = desired_batch(shadow_server, patches, skip_unchanged=False)

    assert [(r.status, r.version, r.unchanged) for r in again] == [
        (pb.BatchItemResult.OK, 2, False)
    ] * 2
    assert outbox_count(shadow_server) == 4
    assert sorted((e.device_id, e.version) for e in outbox(shadow_server)) == [
        ("dev-1", 1),
        ("dev-1", 2),
        ("dev-2", 1),
        ("dev-2", 2),
    ]
    document = json.loads(get_document(shadow_server, "dev-1"))
    assert document["version"] == 2
    assert document["metadata"]["desired"]["fw"]["timestamp"] == 1_800_000_030


def test_skipping_still_checks_versions_and_still_creates_a_missing_shadow(
    shadow_server: RunningShadow,
) -> None:
    register_many(shadow_server, ["dev-1", "dev-2"])
    desired_batch(shadow_server, [("dev-1", {"fw": "2"})], False)

    items = [
        pb.DesiredPatch(device_id="dev-1", desired_json='{"fw": "2"}', expected_version=0),
        pb.DesiredPatch(device_id="dev-1", desired_json='{"fw": "2"}', expected_version=1),
        pb.DesiredPatch(device_id="dev-2", desired_json="{}"),
    ]
    reply = shadow_server.stub.BatchUpdateDesired(
        pb.BatchUpdateDesiredRequest(items=items, skip_unchanged=True)
    )

    assert [(r.status, r.version, r.unchanged) for r in reply.results] == [
        (pb.BatchItemResult.VERSION_CONFLICT, 1, False),
        (pb.BatchItemResult.OK, 1, True),
        (pb.BatchItemResult.OK, 1, False),  # dev-2 had no shadow: creating it is a change
    ]
    assert stored_rows(shadow_server)["dev-2"][3:] == (1, True)
    assert outbox_count(shadow_server) == 2
