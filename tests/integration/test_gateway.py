"""The device protocol over real MQTT: shadow semantics, rejections, resync, desired fan-out."""

from __future__ import annotations

import json

from tests.integration.conftest import Stack


def test_update_is_accepted_and_announces_delta_and_documents(stack: Stack) -> None:
    stack.start_gateway()
    dev = stack.device("dev-1")
    dev.publish(
        "dev-1/state/update",
        {
            "state": {"desired": {"firmware": {"version": "2.0", "url": "u"}, "led": "on"}},
            "clientToken": "tok-1",
        },
    )
    accepted = dev.expect("dev-1/state/update/accepted")
    assert accepted["clientToken"] == "tok-1"
    assert accepted["version"] == 1
    assert accepted["state"]["desired"]["led"] == "on"

    delta = dev.expect("dev-1/state/update/delta")
    assert delta["state"] == {"firmware": {"version": "2.0", "url": "u"}, "led": "on"}
    assert delta["version"] == 1

    dev.publish("dev-1/state/update", {"state": {"reported": {"firmware": {"version": "2.0"}}}})
    assert dev.expect("dev-1/state/update/accepted")["version"] == 2
    first = dev.expect("dev-1/state/update/documents")
    assert first["previous"] is None and first["current"]["version"] == 1
    documents = dev.expect("dev-1/state/update/documents")
    assert documents["current"]["state"]["reported"] == {"firmware": {"version": "2.0"}}
    assert documents["previous"]["version"] == 1
    # A reported-only update leaves no new delta message.
    assert all(topic != "dev-1/state/update/delta" for topic, _ in dev.drain())


def test_bad_requests_are_rejected_with_codes_and_change_nothing(stack: Stack) -> None:
    stack.start_gateway()
    dev = stack.device("dev-1")
    dev.publish("dev-1/state/update", {"state": {"desired": {"a": 1}}})
    dev.expect("dev-1/state/update/accepted")
    cases = [
        (b"{not json", 400),
        (json.dumps({"state": {"desired": "x"}, "clientToken": "t-type"}).encode(), 400),
        (b'{"state": {"desired": {"a": 2}}, "version": 99, "clientToken": "t-ver"}', 409),
        (json.dumps({"state": {"desired": {"a": "x" * 20000}}}).encode(), 413),
        (b"\xff\xfe", 400),
    ]
    for payload, code in cases:
        dev.publish("dev-1/state/update", payload)
        rejected = dev.expect("dev-1/state/update/rejected")
        assert rejected["code"] == code, (payload[:40], rejected)
        assert rejected["message"]
    # The gateway kept running and still serves the device:
    dev.publish("dev-1/state/update", {"state": {"reported": {"b": 1}}, "clientToken": "ok"})
    assert dev.expect("dev-1/state/update/accepted")["clientToken"] == "ok"
    document = stack.document("dev-1")
    assert document["state"]["desired"] == {"a": 1}
    assert document["version"] == 2


def test_rejected_echoes_the_client_token(stack: Stack) -> None:
    stack.start_gateway()
    dev = stack.device("dev-1")
    dev.publish("dev-1/state/update", {"state": {"desired": 5}, "clientToken": "abc"})
    rejected = dev.expect("dev-1/state/update/rejected")
    assert rejected == {
        "code": 400,
        "message": rejected["message"],
        "clientToken": "abc",
        "timestamp": rejected["timestamp"],
    }


def test_get_returns_the_document_with_its_delta(stack: Stack) -> None:
    stack.start_gateway()
    dev = stack.device("dev-1")
    dev.publish("dev-1/state/get", {"clientToken": "g1"})
    rejected = dev.expect("dev-1/state/get/rejected")
    assert rejected["code"] == 404 and rejected["clientToken"] == "g1"

    stack.update_desired({"dev-1": {"firmware": {"version": "3.0"}}})
    dev.publish("dev-1/state/get", {"clientToken": "g2"})
    document = dev.expect("dev-1/state/get/accepted")
    assert document["state"]["delta"] == {"firmware": {"version": "3.0"}}
    assert document["clientToken"] == "g2"
    dev.publish("dev-1/state/get", b"")
    assert dev.expect("dev-1/state/get/accepted")["version"] == 1


def test_a_desired_change_over_grpc_reaches_every_device(stack: Stack) -> None:
    stack.start_gateway()
    devices = {f"dev-{i}": stack.device(f"dev-{i}") for i in range(5)}
    stack.update_desired({d: {"firmware": {"version": "4.0", "url": f"u/{d}"}} for d in devices})
    for device_id, dev in devices.items():
        delta = dev.expect(f"{device_id}/state/update/delta")
        assert delta["state"] == {"firmware": {"version": "4.0", "url": f"u/{device_id}"}}


def test_an_offline_device_resyncs_with_get(stack: Stack) -> None:
    stack.start_gateway()
    endpoint = stack.register("dev-1")
    stack.update_desired({"dev-1": {"firmware": {"version": "5.0"}}})  # nobody listening
    dev = stack.connect(endpoint, client_id="dev-1")
    assert dev.wait_connected()
    dev.subscribe("dev-1/state/#")
    dev.publish("dev-1/state/get", b"{}")
    assert dev.expect("dev-1/state/get/accepted")["state"]["delta"] == {
        "firmware": {"version": "5.0"}
    }


def test_unknown_devices_are_rejected(stack: Stack) -> None:
    stack.start_gateway()
    app = stack.connect(stack.app)
    assert app.wait_connected()
    app.subscribe("ghost/state/#")
    app.publish("ghost/state/update", {"state": {"reported": {"a": 1}}})
    assert app.expect("ghost/state/update/rejected")["code"] == 404


def test_the_rate_limit_answers_429(stack: Stack) -> None:
    frozen = [1_000_000.0]
    stack.start_gateway(clock=lambda: frozen[0])
    dev = stack.device("dev-1")
    burst = int(stack.gateway_settings.rate_burst)
    for i in range(burst + 5):
        dev.publish("dev-1/state/update", {"state": {"reported": {"n": i}}})
    answers = [(t, body) for t, body in dev.drain(wait=2.0) if t.endswith(("accepted", "rejected"))]
    assert [t for t, _ in answers].count("dev-1/state/update/accepted") == burst
    rejected = [body for t, body in answers if t.endswith("rejected")]
    assert [body["code"] for body in rejected] == [429] * 5
    assert stack.document("dev-1")["version"] == burst
    frozen[0] += 1.0  # a second later the bucket has refilled
    dev.publish("dev-1/state/update", {"state": {"reported": {"n": "later"}}})
    assert dev.expect("dev-1/state/update/accepted")["version"] == burst + 1
