"""The shadow outbox over real gRPC: every accepted update leaves the messages to publish."""

from __future__ import annotations

import json
import threading
from typing import Any

import grpc
import pytest

from protos.shadow.v1 import shadow_pb2 as pb
from services.shadow.store import bucket_of
from tests.conftest import RunningShadow


def update(server: RunningShadow, device_id: str, request: Any) -> None:
    server.stub.UpdateShadow(
        pb.UpdateShadowRequest(device_id=device_id, request_json=json.dumps(request))
    )


def read(server: RunningShadow, after: int = 0, **kwargs: int) -> list[pb.ShadowEvent]:
    reply = server.stub.ReadEvents(pb.ReadEventsRequest(after_event_id=after, **kwargs))
    return list(reply.events)


def test_each_accepted_update_leaves_its_delta_and_documents(
    shadow_server: RunningShadow,
) -> None:
    shadow_server.service.register_device("dev-1", {})
    update(shadow_server, "dev-1", {"state": {"desired": {"fw": "2"}}, "clientToken": "c1"})
    update(shadow_server, "dev-1", {"state": {"reported": {"fw": "1"}}})
    update(shadow_server, "dev-1", {"state": {"reported": {"fw": "2"}}})

    events = read(shadow_server)
    assert [(e.device_id, e.version) for e in events] == [("dev-1", 1), ("dev-1", 2), ("dev-1", 3)]
    assert events[0].event_id < events[1].event_id < events[2].event_id
    delta = json.loads(events[0].delta_json)
    assert delta["state"] == {"fw": "2"}
    assert delta["version"] == 1 and delta["clientToken"] == "c1"
    assert delta["metadata"]["fw"]["timestamp"] > 0
    # A reported update announces no delta (AWS IoT publishes /delta on desired changes).
    assert events[1].delta_json == "" and events[2].delta_json == ""
    documents = json.loads(events[2].documents_json)
    assert documents["previous"]["state"]["reported"] == {"fw": "1"}
    assert documents["current"]["state"] == {"desired": {"fw": "2"}, "reported": {"fw": "2"}}
    assert documents["current"]["version"] == 3


def test_rejected_updates_leave_no_event(shadow_server: RunningShadow) -> None:
    shadow_server.service.register_device("dev-1", {})
    update(shadow_server, "dev-1", {"state": {"desired": {"a": 1}}})
    for bad in ('{"state": 1}', '{"state": {"desired": {"a": 2}}, "version": 9}'):
        with pytest.raises(grpc.RpcError):
            shadow_server.stub.UpdateShadow(
                pb.UpdateShadowRequest(device_id="dev-1", request_json=bad)
            )
    assert len(read(shadow_server)) == 1


def test_a_batch_leaves_one_event_per_applied_item(shadow_server: RunningShadow) -> None:
    ids = [f"dev-{i:03d}" for i in range(50)]
    for device_id in ids:
        shadow_server.service.register_device(device_id, {})
    items = [pb.DesiredPatch(device_id=d, desired_json='{"fw": {"version": "2"}}') for d in ids]
    items.append(pb.DesiredPatch(device_id="ghost", desired_json="{}"))
    items.append(pb.DesiredPatch(device_id="dev-000", desired_json='{"fw": {"url": "u"}}'))
    shadow_server.stub.BatchUpdateDesired(pb.BatchUpdateDesiredRequest(items=items))

    events = read(shadow_server, limit=1000)
    assert sorted((e.device_id, e.version) for e in events) == sorted(
        [(d, 1) for d in ids] + [("dev-000", 2)]
    )
    last = [e for e in events if e.device_id == "dev-000"][-1]
    assert json.loads(last.delta_json)["state"] == {"fw": {"version": "2", "url": "u"}}


def test_partitions_split_the_events_and_ack_forgets_only_what_it_names(
    shadow_server: RunningShadow,
) -> None:
    ids = [f"dev-{i:03d}" for i in range(40)]
    for device_id in ids:
        shadow_server.service.register_device(device_id, {})
    items = [pb.DesiredPatch(device_id=d, desired_json='{"x": 1}') for d in ids]
    shadow_server.stub.BatchUpdateDesired(pb.BatchUpdateDesiredRequest(items=items))

    parts = [read(shadow_server, partition=p, partitions=3, limit=1000) for p in range(3)]
    seen = [e.device_id for part in parts for e in part]
    assert sorted(seen) == ids  # every event once, in exactly one partition
    for p, part in enumerate(parts):
        assert all(bucket_of(e.device_id) % 3 == p for e in part)

    acked = shadow_server.stub.AckEvents(
        pb.AckEventsRequest(event_ids=[e.event_id for e in parts[0]])
    )
    assert acked.deleted == len(parts[0])
    assert read(shadow_server, partition=0, partitions=3) == []
    assert len(read(shadow_server, limit=1000)) == len(ids) - len(parts[0])


def test_a_waiting_reader_wakes_up_on_a_write(shadow_server: RunningShadow) -> None:
    shadow_server.service.register_device("dev-1", {})
    got: list[pb.ShadowEvent] = []
    reader = threading.Thread(target=lambda: got.extend(read(shadow_server, wait_ms=20_000)))
    reader.start()
    update(shadow_server, "dev-1", {"state": {"desired": {"a": 1}}})
    reader.join()
    assert [e.device_id for e in got] == ["dev-1"]


def test_event_ids_are_never_reused(shadow_server: RunningShadow) -> None:
    shadow_server.service.register_device("dev-1", {})
    update(shadow_server, "dev-1", {"state": {"desired": {"a": 1}}})
    first = read(shadow_server)
    shadow_server.stub.AckEvents(pb.AckEventsRequest(event_ids=[e.event_id for e in first]))
    update(shadow_server, "dev-1", {"state": {"desired": {"a": 2}}})
    second = read(shadow_server, after=first[-1].event_id)
    assert [e.version for e in second] == [2]
    assert second[0].event_id > first[-1].event_id
