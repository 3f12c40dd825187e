"""The shadow service over real gRPC on loopback, against SQLite and PostgreSQL."""

from __future__ import annotations

import json
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import select

from protos.shadow.v1 import shadow_pb2 as pb
from services.shadow import credentials
from services.shadow.schema import devices
from tests.conftest import RunningShadow


def rpc_error(call: Any, *args: Any) -> grpc.Call:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return cast(grpc.Call, info.value)


def register(server: RunningShadow, device_id: str, **tags: str) -> pb.RegisterDeviceResponse:
    return server.stub.RegisterDevice(pb.RegisterDeviceRequest(device_id=device_id, tags=tags))


def update(server: RunningShadow, device_id: str, request: Any) -> pb.UpdateShadowResponse:
    return server.stub.UpdateShadow(
        pb.UpdateShadowRequest(device_id=device_id, request_json=json.dumps(request))
    )


def shadow(server: RunningShadow, device_id: str) -> Any:
    return json.loads(server.stub.GetShadow(pb.GetShadowRequest(device_id=device_id)).document_json)


# --- devices ----------------------------------------------------------------------------------


def test_register_returns_credentials_once_and_stores_only_a_hash(
    shadow_server: RunningShadow,
) -> None:
    reply = register(shadow_server, "dev-1", site="berlin")
    assert reply.credentials.username == "dev-1"
    assert len(reply.credentials.password) >= 32
    assert reply.device.tags == {"site": "berlin"}
    assert reply.device.shadow_version == 0

    with shadow_server.service.store.engine.connect() as conn:
        row = conn.execute(select(devices).where(devices.c.device_id == "dev-1")).one()
    assert reply.credentials.password not in str(tuple(row))
    assert credentials.verify_password(reply.credentials.password, row.credential_hash)
    assert not credentials.verify_password("wrong", row.credential_hash)
    for device_id, password, expected in [
        ("dev-1", reply.credentials.password, True),
        ("dev-1", "wrong", False),
        ("dev-2", reply.credentials.password, False),
        ("a/b", reply.credentials.password, False),
    ]:
        answer = shadow_server.stub.AuthenticateDevice(
            pb.AuthenticateDeviceRequest(device_id=device_id, password=password)
        )
        assert answer.authenticated is expected

    device = shadow_server.stub.GetDevice(pb.GetDeviceRequest(device_id="dev-1"))
    assert device.device_id == "dev-1" and device.tags == {"site": "berlin"}


def test_registering_twice_is_already_exists(shadow_server: RunningShadow) -> None:
    register(shadow_server, "dev-1")
    error = rpc_error(register, shadow_server, "dev-1")
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize(
    "device_id", ["", "a/b", "a+b", "a#b", "$SYS", "x" * 129, "has space", "café", "-lead"]
)
def test_unsafe_device_ids_are_invalid_and_store_nothing(
    shadow_server: RunningShadow, device_id: str
) -> None:
    error = rpc_error(register, shadow_server, device_id)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "device id" in (error.details() or "")
    listed = shadow_server.stub.ListDevices(pb.ListDevicesRequest())
    assert list(listed.devices) == []


def test_the_service_account_namespace_is_reserved(shadow_server: RunningShadow) -> None:
    for name in ("ota-gateway", "ota-app", "ota-admin", "ota-anything"):
        error = rpc_error(register, shadow_server, name)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reserved" in (error.details() or "")
    # Only the "ota-" prefix is reserved.
    assert register(shadow_server, "ota").device.device_id == "ota"
    assert register(shadow_server, "otatracker-1").device.device_id == "otatracker-1"


def test_bad_tags_are_invalid(shadow_server: RunningShadow) -> None:
    for tags in ({"bad key": "x"}, {"site": "x" * 300}, {f"k{i}": "v" for i in range(51)}):
        error = rpc_error(
            shadow_server.stub.RegisterDevice,
            pb.RegisterDeviceRequest(device_id="dev-1", tags=tags),
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_device_is_not_found(shadow_server: RunningShadow) -> None:
    stub = shadow_server.stub
    for call, request in [
        (stub.GetDevice, pb.GetDeviceRequest(device_id="ghost")),
        (stub.GetShadow, pb.GetShadowRequest(device_id="ghost")),
        (stub.DeleteDevice, pb.DeleteDeviceRequest(device_id="ghost")),
        (stub.DeleteShadow, pb.DeleteShadowRequest(device_id="ghost")),
        (
            stub.UpdateShadow,
            pb.UpdateShadowRequest(device_id="ghost", request_json='{"state":{"desired":{}}}'),
        ),
    ]:
        assert rpc_error(call, request).code() == grpc.StatusCode.NOT_FOUND


def test_delete_device_removes_it_and_its_shadow(shadow_server: RunningShadow) -> None:
    register(shadow_server, "dev-1")
    update(shadow_server, "dev-1", {"state": {"desired": {"a": 1}}})
    shadow_server.stub.DeleteDevice(pb.DeleteDeviceRequest(device_id="dev-1"))
    for call, request in [
        (shadow_server.stub.GetDevice, pb.GetDeviceRequest(device_id="dev-1")),
        (shadow_server.stub.GetShadow, pb.GetShadowRequest(device_id="dev-1")),
    ]:
        assert rpc_error(call, request).code() == grpc.StatusCode.NOT_FOUND
    # The id is free again; the new device starts with no shadow.
    assert register(shadow_server, "dev-1").device.shadow_version == 0


def test_list_devices_pages_in_id_order(shadow_server: RunningShadow) -> None:
    for i in range(23):
        register(shadow_server, f"dev-{i:02d}", site="a" if i % 2 else "b")
    seen: list[str] = []
    token = ""
    while True:
        page = shadow_server.stub.ListDevices(
            pb.ListDevicesRequest(page_size=5, page_token=token, tags={"site": "a"})
        )
        seen += [d.device_id for d in page.devices]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"dev-{i:02d}" for i in range(23) if i % 2]


TOO_LARGE = grpc.StatusCode.RESOURCE_EXHAUSTED

# --- shadows ----------------------------------------------------------------------------------


def test_update_merges_and_reports_the_delta(shadow_server: RunningShadow) -> None:
    register(shadow_server, "dev-1")
    assert (
        rpc_error(shadow_server.stub.GetShadow, pb.GetShadowRequest(device_id="dev-1")).code()
        == grpc.StatusCode.NOT_FOUND
    )
    first = update(
        shadow_server,
        "dev-1",
        {
            "state": {"desired": {"firmware": {"version": "2.0.0", "url": "u"}, "led": "on"}},
            "clientToken": "tok-1",
        },
    )
    assert first.version == 1
    accepted = json.loads(first.accepted_json)
    assert accepted["clientToken"] == "tok-1"
    assert accepted["version"] == 1
    assert accepted["metadata"]["desired"]["firmware"]["version"]["timestamp"] > 0
    assert json.loads(first.delta_json) == {
        "firmware": {"version": "2.0.0", "url": "u"},
        "led": "on",
    }

    second = update(
        shadow_server,
        "dev-1",
        {"state": {"reported": {"firmware": {"version": "2.0.0"}, "led": "on", "temp": 21}}},
    )
    assert second.version == 2
    assert json.loads(second.delta_json) == {"firmware": {"url": "u"}}

    document = shadow(shadow_server, "dev-1")
    assert document["version"] == 2
    assert document["state"]["delta"] == {"firmware": {"url": "u"}}
    assert document["state"]["reported"]["temp"] == 21
    assert set(document["metadata"]) == {"desired", "reported"}

    third = update(shadow_server, "dev-1", {"state": {"desired": {"firmware": {"url": None}}}})
    assert json.loads(third.delta_json) == {}
    assert "delta" not in shadow(shadow_server, "dev-1")["state"]
    device = shadow_server.stub.GetDevice(pb.GetDeviceRequest(device_id="dev-1"))
    assert device.shadow_version == 3


def test_stale_version_is_aborted_with_the_current_version(shadow_server: RunningShadow) -> None:
    register(shadow_server, "dev-1")
    update(shadow_server, "dev-1", {"state": {"desired": {"a": 1}}})
    update(shadow_server, "dev-1", {"state": {"desired": {"a": 2}}, "version": 1})
    error = rpc_error(
        update, shadow_server, "dev-1", {"state": {"desired": {"a": 3}}, "version": 1}
    )
    assert error.code() == grpc.StatusCode.ABORTED
    trailers = dict(error.trailing_metadata() or ())
    assert trailers["ota-code"] == "409"
    assert trailers["ota-current-version"] == "2"
    assert shadow(shadow_server, "dev-1")["state"]["desired"] == {"a": 2}


@pytest.mark.parametrize(
    ("request_json", "code"),
    [
        ("{not json", grpc.StatusCode.INVALID_ARGUMENT),
        ("[]", grpc.StatusCode.INVALID_ARGUMENT),
        ('{"state": {"desired": 5}}', grpc.StatusCode.INVALID_ARGUMENT),
        ('{"state": {"desired": {"a": NaN}}}', grpc.StatusCode.INVALID_ARGUMENT),
        ('{"state": {"desired": {"a": 1}}, "version": "1"}', grpc.StatusCode.INVALID_ARGUMENT),
        ('{"state": {"desired": {"a": 1}}, "extra": 1}', grpc.StatusCode.INVALID_ARGUMENT),
        (
            json.dumps({"state": {"desired": {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}}}),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (json.dumps({"state": {"desired": {"a": "x" * 9000}}}), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (
            json.dumps({"state": {"desired": {"a": "x" * 20000}}}),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
    ],
    ids=[
        "bad-json",
        "array",
        "section-type",
        "nan",
        "version-type",
        "unknown",
        "deep",
        "big",
        "huge",
    ],
)
def test_bad_updates_are_rejected_and_change_nothing(
    shadow_server: RunningShadow, request_json: str, code: grpc.StatusCode
) -> None:
    register(shadow_server, "dev-1")
    update(shadow_server, "dev-1", {"state": {"desired": {"keep": True}}})
    before = shadow(shadow_server, "dev-1")
    error = rpc_error(
        shadow_server.stub.UpdateShadow,
        pb.UpdateShadowRequest(device_id="dev-1", request_json=request_json),
    )
    assert error.code() == code
    assert error.details()
    after = shadow(shadow_server, "dev-1")
    assert (after["state"], after["version"]) == (before["state"], before["version"])


@pytest.mark.parametrize(
    "request_json",
    [
        r'{"state": {"desired": {"a": "\u0000"}}}',
        r'{"state": {"reported": {"a": "x\u0000y"}}}',
        r'{"state": {"reported": {"a": {"b": [1, "\u0000"]}}}}',
        r'{"state": {"desired": {"k\u0000": 1}}}',
        r'{"state": {"reported": {"a": {"\u0000": "v"}}}}',
        r'{"state": {"desired": {"a": "\\\u0000"}}}',
        r'{"state": {"desired": {"a": "\ud800"}}}',
        r'{"state": {"reported": {"a": ["\udfff"]}}}',
        r'{"state": {"reported": {"\udc00": 1}}}',
        r'{"state": {"desired": {"keep": null, "a": "\u0000"}}}',
    ],
    ids=[
        "nul-value",
        "nul-inside-value",
        "nul-in-array",
        "nul-key",
        "nul-nested-key",
        "backslash-then-nul",
        "lone-high-surrogate",
        "lone-low-surrogate-in-array",
        "lone-surrogate-key",
        "nul-beside-a-delete",
    ],
)
def test_nul_and_lone_surrogates_are_invalid_and_store_nothing(
    shadow_server: RunningShadow, request_json: str
) -> None:
    register(shadow_server, "dev-1")
    update(shadow_server, "dev-1", {"state": {"desired": {"keep": True}}})
    before = shadow(shadow_server, "dev-1")
    error = rpc_error(
        shadow_server.stub.UpdateShadow,
        pb.UpdateShadowRequest(device_id="dev-1", request_json=request_json),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "NUL" in (error.details() or "")
    after = shadow(shadow_server, "dev-1")
    assert (after["state"], after["metadata"], after["version"]) == (
        before["state"],
        before["metadata"],
        before["version"],
    )
    device = shadow_server.stub.GetDevice(pb.GetDeviceRequest(device_id="dev-1"))
    assert device.shadow_version == 1
    # The shadow still takes good updates, text that only looks like an escape included.
    good = update(shadow_server, "dev-1", {"state": {"reported": {"path": "C:\\u0000"}}})
    assert good.version == 2
    assert shadow(shadow_server, "dev-1")["state"]["reported"] == {"path": "C:\\u0000"}


def test_a_batch_item_holding_nul_is_invalid_and_the_others_apply(
    shadow_server: RunningShadow,
) -> None:
    for device_id in ("dev-0", "dev-1"):
        register(shadow_server, device_id)
    update(shadow_server, "dev-1", {"state": {"desired": {"keep": 1}}})
    reply = shadow_server.stub.BatchUpdateDesired(
        pb.BatchUpdateDesiredRequest(
            items=[
                pb.DesiredPatch(device_id="dev-0", desired_json=r'{"a": "\u0000"}'),
                pb.DesiredPatch(device_id="dev-1", desired_json=r'{"a\u0000": 1}'),
                pb.DesiredPatch(device_id="dev-1", desired_json=r'{"b": ["\ud800"]}'),
                pb.DesiredPatch(device_id="dev-1", desired_json='{"c": 2}'),
                pb.DesiredPatch(device_id="dev-0", desired_json=r'{"d": "\\u0000"}'),
            ]
        )
    )
    result = pb.BatchItemResult
    assert [(r.device_id, r.status, r.version) for r in reply.results] == [
        ("dev-0", result.INVALID, 0),
        ("dev-1", result.INVALID, 0),
        ("dev-1", result.INVALID, 0),
        ("dev-1", result.OK, 2),
        ("dev-0", result.OK, 1),
    ]
    assert all("NUL" in r.message for r in reply.results if r.status == result.INVALID)
    assert shadow(shadow_server, "dev-0")["state"]["desired"] == {"d": "\\u0000"}
    assert shadow(shadow_server, "dev-1")["state"]["desired"] == {"keep": 1, "c": 2}


def test_a_document_grown_past_the_limit_is_rejected(shadow_server: RunningShadow) -> None:
    register(shadow_server, "dev-1")
    update(shadow_server, "dev-1", {"state": {"desired": {"a": "x" * 5000}}})
    error = rpc_error(update, shadow_server, "dev-1", {"state": {"reported": {"b": "y" * 5000}}})
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "reported" not in shadow(shadow_server, "dev-1")["state"]


def test_delete_shadow_keeps_the_version(shadow_server: RunningShadow) -> None:
    register(shadow_server, "dev-1")
    update(shadow_server, "dev-1", {"state": {"desired": {"a": 1}}})
    update(shadow_server, "dev-1", {"state": {"reported": {"a": 1}}})
    error = rpc_error(
        shadow_server.stub.DeleteShadow,
        pb.DeleteShadowRequest(device_id="dev-1", expected_version=1),
    )
    assert error.code() == grpc.StatusCode.ABORTED
    deleted = shadow_server.stub.DeleteShadow(
        pb.DeleteShadowRequest(device_id="dev-1", expected_version=2)
    )
    assert deleted.version == 2
    assert (
        rpc_error(shadow_server.stub.GetShadow, pb.GetShadowRequest(device_id="dev-1")).code()
        == grpc.StatusCode.NOT_FOUND
    )
    again = update(shadow_server, "dev-1", {"state": {"desired": {"b": 2}}})
    assert again.version == 3
    assert shadow(shadow_server, "dev-1")["state"] == {"desired": {"b": 2}, "delta": {"b": 2}}


# --- batch ------------------------------------------------------------------------------------


def test_batch_update_desired_gives_a_result_per_item(shadow_server: RunningShadow) -> None:
    for i in range(3):
        register(shadow_server, f"dev-{i}")
    update(shadow_server, "dev-2", {"state": {"reported": {"firmware": {"version": "2.0"}}}})
    patch = json.dumps({"firmware": {"version": "2.0", "url": "fw/2.0"}})
    reply = shadow_server.stub.BatchUpdateDesired(
        pb.BatchUpdateDesiredRequest(
            items=[
                pb.DesiredPatch(device_id="dev-0", desired_json=patch, client_token="t0"),
                pb.DesiredPatch(device_id="ghost", desired_json=patch),
                pb.DesiredPatch(device_id="dev-1", desired_json="{oops"),
                pb.DesiredPatch(device_id="dev-2", desired_json=patch, expected_version=1),
                pb.DesiredPatch(device_id="dev-1", desired_json=patch, expected_version=7),
                pb.DesiredPatch(device_id="a/b", desired_json=patch),
                pb.DesiredPatch(device_id="dev-0", desired_json='{"extra": 1}'),
            ]
        )
    )
    statuses = [(r.device_id, r.status, r.version) for r in reply.results]
    result = pb.BatchItemResult
    assert statuses == [
        ("dev-0", result.OK, 1),
        ("ghost", result.NOT_FOUND, 0),
        ("dev-1", result.INVALID, 0),
        ("dev-2", result.OK, 2),
        ("dev-1", result.VERSION_CONFLICT, 0),
        ("a/b", result.INVALID, 0),
        ("dev-0", result.OK, 2),
    ]
    assert all(r.message for r in reply.results if r.status != result.OK)
    assert shadow(shadow_server, "dev-0")["state"]["desired"] == {
        "firmware": {"version": "2.0", "url": "fw/2.0"},
        "extra": 1,
    }
    assert shadow(shadow_server, "dev-2")["state"]["delta"] == {"firmware": {"url": "fw/2.0"}}
    assert (
        rpc_error(shadow_server.stub.GetShadow, pb.GetShadowRequest(device_id="dev-1")).code()
        == grpc.StatusCode.NOT_FOUND
    )


def test_an_oversized_batch_is_refused_whole(shadow_server: RunningShadow) -> None:
    register(shadow_server, "dev-0")
    limit = shadow_server.service.max_batch_items
    items = [pb.DesiredPatch(device_id="dev-0", desired_json='{"a": 1}')] * (limit + 1)
    error = rpc_error(
        shadow_server.stub.BatchUpdateDesired, pb.BatchUpdateDesiredRequest(items=items)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert shadow_server.stub.GetDevice(pb.GetDeviceRequest(device_id="dev-0")).shadow_version == 0


def test_a_large_batch_updates_every_device(shadow_server: RunningShadow) -> None:
    ids = [f"dev-{i:04d}" for i in range(1500)]
    for device_id in ids:
        shadow_server.service.register_device(device_id, {})
    items = [
        pb.DesiredPatch(device_id=d, desired_json=json.dumps({"firmware": {"version": d}}))
        for d in ids
    ]
    reply = shadow_server.stub.BatchUpdateDesired(pb.BatchUpdateDesiredRequest(items=items))
    assert [r.status for r in reply.results] == [pb.BatchItemResult.OK] * len(ids)
    for device_id in (ids[0], ids[777], ids[-1]):
        assert shadow(shadow_server, device_id)["state"]["desired"] == {
            "firmware": {"version": device_id}
        }


# --- standard services ------------------------------------------------------------------------


def test_health_and_reflection(shadow_server: RunningShadow) -> None:
    health = health_pb2_grpc.HealthStub(shadow_server.channel)
    for name in ("", "ota.shadow.v1.ShadowService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(shadow_server.channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert "ota.shadow.v1.ShadowService" in names
    assert "grpc.health.v1.Health" in names


def test_batch_update_shadow_answers_each_request_like_update_shadow(
    shadow_server: RunningShadow,
) -> None:
    register(shadow_server, "dev-0")
    register(shadow_server, "dev-1")
    items = [
        ("dev-0", {"state": {"reported": {"a": 1}}, "clientToken": "c0"}),
        ("dev-0", {"state": {"desired": {"a": 2}}, "version": 1}),
        ("dev-0", {"state": {"desired": {"a": 3}}, "version": 1}),
        ("dev-1", {"state": {"desired": 5}}),
        ("ghost", {"state": {"reported": {"a": 1}}}),
        ("a/b", {"state": {"reported": {"a": 1}}}),
        ("dev-1", {"state": {"reported": {"x": "y" * 9000}}}),
        ("dev-1", {"state": {"reported": {"ok": True}}}),
    ]
    reply = shadow_server.stub.BatchUpdateShadow(
        pb.BatchUpdateShadowRequest(
            items=[pb.ShadowUpdate(device_id=d, request_json=json.dumps(r)) for d, r in items]
        )
    )
    assert [(r.device_id, r.code, r.version) for r in reply.results] == [
        ("dev-0", 200, 1),
        ("dev-0", 200, 2),
        ("dev-0", 409, 0),
        ("dev-1", 400, 0),
        ("ghost", 404, 0),
        ("a/b", 400, 0),
        ("dev-1", 413, 0),
        ("dev-1", 200, 1),
    ]
    first = json.loads(reply.results[0].accepted_json)
    assert first["clientToken"] == "c0" and first["state"] == {"reported": {"a": 1}}
    assert all(r.message for r in reply.results if r.code != 200)
    assert shadow(shadow_server, "dev-0")["state"]["desired"] == {"a": 2}
    assert shadow(shadow_server, "dev-1")["state"] == {"reported": {"ok": True}}
