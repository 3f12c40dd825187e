"""Broker accounts and ACL over real brokers: each device keeps to its own topics, bad
credentials are refused, deleting a device revokes it, service accounts reach every device.

Runs on both `stack` brokers (Mosquitto + dynamic security, amqtt + the embedded auth plugins).
The brokers differ in how they refuse (a SUBACK failure code, a silently dropped message, a
disconnect): the assertions are on what devices receive and on the stored shadow, never on the
refusal style or on timing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import secrets
import threading
import time

import grpc
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from protos.shadow.v1 import shadow_pb2 as pb
from services.common.mqtt import MqttEndpoint
from tests.integration.conftest import Device, Stack, wait_until

WAIT = 15.0


def raw_messages(device: Device, wait: float = 1.0) -> list[tuple[str, bytes]]:
    """Everything the device received and nobody took yet, raw (payloads need not be JSON)."""
    out = list(device.backlog)
    device.backlog.clear()
    try:
        while True:
            out.append(device.received.get(timeout=wait))
    except queue.Empty:
        return out


def refused_connection(stack: Stack, endpoint: MqttEndpoint) -> Device:
    """Connect with `endpoint`, expecting the broker to refuse; returns the (refused) client."""
    device = stack.connect(endpoint)
    assert wait_until(lambda: device.refused is not None or device.connected.is_set())
    assert device.refused is not None, f"{endpoint.username} was let in"
    assert not device.connected.is_set()
    return device


def delete_device(stack: Stack, device_id: str) -> None:
    stack.shadow.DeleteDevice(pb.DeleteDeviceRequest(device_id=device_id))


def app_client(stack: Stack, *topics: str) -> Device:
    app = stack.connect(stack.app)
    assert app.wait_connected()
    if topics:
        app.subscribe(*topics)
    return app


# --- the ACL ----------------------------------------------------------------------------------


def test_a_device_cannot_read_another_devices_topics(stack: Stack) -> None:
    stack.start_gateway()
    device_a = stack.device("dev-a")
    device_b = stack.device("dev-b")
    # Each filter may be refused in its SUBACK or accepted and never served: either is fine.
    for topic in ("dev-b/state/update/delta", "dev-b/#", "#", "+/state/update/delta"):
        device_a.subscribe(topic)
    app = app_client(stack)

    stack.update_desired({"dev-b": {"firmware": {"version": "9.9"}}})
    assert device_b.expect("dev-b/state/update/delta")["state"] == {"firmware": {"version": "9.9"}}
    device_b.expect("dev-b/state/update/documents")
    # Messages published straight to B's topics by a service account do not reach A either.
    app.publish("dev-b/state/update/delta", {"state": {"from": "app"}})
    assert device_b.expect("dev-b/state/update/delta")["state"] == {"from": "app"}

    leaked = [topic for topic, _ in raw_messages(device_a) if not topic.startswith("dev-a/")]
    assert leaked == []


def test_a_device_cannot_write_another_devices_topics(stack: Stack) -> None:
    stack.start_gateway()
    device_a = stack.device("dev-a")
    device_b = stack.device("dev-b")
    device_b.publish("dev-b/state/update", {"state": {"desired": {"led": "off"}}})
    assert device_b.expect("dev-b/state/update/accepted")["version"] == 1
    device_b.expect("dev-b/state/update/delta")

    # A tries to change B's shadow, to ask for it, and to forge messages to B.
    device_a.publish(
        "dev-b/state/update", {"state": {"desired": {"led": "on"}}, "clientToken": "from-a"}
    )
    device_a.publish("dev-b/state/get", {"clientToken": "from-a"})
    device_a.publish("dev-b/state/update/delta", {"state": {"forged": True}})
    device_a.publish("dev-b/state/update/accepted", {"forged": True})

    # B's own request, sent after A's: once it is answered the gateway had every chance to
    # serve A's requests too.
    device_b.publish("dev-b/state/get", {"clientToken": "from-b"})
    got = device_b.expect("dev-b/state/get/accepted")
    assert got["clientToken"] == "from-b"
    assert got["version"] == 1
    received_by_b = raw_messages(device_b)
    assert all(b"forged" not in payload for _, payload in received_by_b), received_by_b
    assert all(b"from-a" not in payload for _, payload in received_by_b), received_by_b
    assert all(b"from-a" not in payload for _, payload in raw_messages(device_a))

    document = stack.document("dev-b")
    assert document["version"] == 1
    assert document["state"]["desired"] == {"led": "off"}


def test_service_accounts_use_every_devices_topics(stack: Stack) -> None:
    stack.start_gateway()
    device = stack.device("dev-1")
    app = app_client(stack, "dev-1/state/update/accepted", "dev-1/state/update/delta")
    app.publish("dev-1/state/update", {"state": {"desired": {"mode": "eco"}}, "clientToken": "app"})
    assert app.expect("dev-1/state/update/accepted")["clientToken"] == "app"
    assert app.expect("dev-1/state/update/delta")["state"] == {"mode": "eco"}
    assert device.expect("dev-1/state/update/delta")["state"] == {"mode": "eco"}
    assert stack.document("dev-1")["state"]["desired"] == {"mode": "eco"}


# --- authentication ---------------------------------------------------------------------------


def test_wrong_passwords_and_unknown_users_are_refused(stack: Stack) -> None:
    endpoint_a = stack.register("dev-a")
    endpoint_b = stack.register("dev-b")
    assert (
        endpoint_a.password and endpoint_b.password and endpoint_a.password != endpoint_b.password
    )
    refused_connection(stack, dataclasses.replace(endpoint_a, password="wrong"))
    # Another device's (valid) password is as wrong as any.
    refused_connection(
        stack, MqttEndpoint(stack.mqtt_host, stack.mqtt_port, "dev-a", endpoint_b.password)
    )
    refused_connection(
        stack, MqttEndpoint(stack.mqtt_host, stack.mqtt_port, "ghost", secrets.token_urlsafe(16))
    )
    refused_connection(stack, MqttEndpoint(stack.mqtt_host, stack.mqtt_port, "dev-a", None))
    refused_connection(stack, MqttEndpoint(stack.mqtt_host, stack.mqtt_port, None, None))
    # A service account's name with a device's password is refused too.
    refused_connection(
        stack, MqttEndpoint(stack.mqtt_host, stack.mqtt_port, "ota-app", endpoint_a.password)
    )
    # The right credentials still work.
    device = stack.connect(endpoint_a)
    assert device.wait_connected()


# --- revocation -------------------------------------------------------------------------------


def test_a_deleted_device_cannot_connect_again(stack: Stack) -> None:
    endpoint = stack.register("dev-1")
    first = stack.connect(endpoint)
    assert first.wait_connected()
    first.close()
    delete_device(stack, "dev-1")
    refused_connection(stack, endpoint)


def probe(peer: Device, revoked: Device, device_id: str, n: int) -> tuple[bool, bool]:
    """Send probe `n` both ways between a client in good standing and one being revoked
    (already subscribed to `<id>/probe/down` and `<id>/probe/up` respectively); which
    directions arrived within ~2 s: (down to the revoked client, up from it)."""
    down, up, marker = f"{device_id}/probe/down", f"{device_id}/probe/up", str(n).encode()
    # Not `Device.publish`: a disconnected client cannot wait for its PUBACK.
    peer.client.publish(down, marker, qos=1)
    revoked.client.publish(up, marker, qos=1)
    got_down = got_up = False
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and not (got_down and got_up):
        got_down |= (down, marker) in raw_messages(revoked, wait=0.1)
        got_up |= (up, marker) in raw_messages(peer, wait=0.1)
    return got_down, got_up


def assert_cut_off(peer: Device, revoked: Device, device_id: str) -> None:
    """Probe until the revoked client neither receives nor sends on the device's topics
    (bounded wait, no timing asserted), then check that it stays so."""
    cut_off_at = None
    deadline = time.monotonic() + 20.0
    n = 1
    while time.monotonic() < deadline:
        if probe(peer, revoked, device_id, n) == (False, False):
            cut_off_at = n
            break
        n += 1
    assert cut_off_at is not None, "the revoked client still uses the device's topics"
    for later in range(cut_off_at + 1, cut_off_at + 3):
        assert probe(peer, revoked, device_id, later) == (False, False)
    late = [
        payload
        for topic, payload in raw_messages(revoked) + raw_messages(peer)
        if "/probe/" in topic and int(payload) >= cut_off_at
    ]
    assert late == [], "probes sent after the cut-off arrived late"


def test_a_connected_device_loses_its_topics_when_deleted(stack: Stack) -> None:
    endpoint = stack.register("dev-1")
    device = stack.connect(endpoint)
    assert device.wait_connected()
    device.subscribe("dev-1/probe/down")
    app = app_client(stack, "dev-1/probe/up")
    assert probe(app, device, "dev-1", 0) == (True, True)

    delete_device(stack, "dev-1")
    if stack.broker == "mosquitto":
        # Dynamic security's deleteClient disconnects it at once; reconnecting is refused.
        assert wait_until(lambda: not device.connected.is_set()), "still connected"
        assert wait_until(lambda: device.refused is not None), "reconnected after deletion"
    # On amqtt the session stays, but its credentials are re-checked every `recheck_seconds`.
    assert_cut_off(app, device, "dev-1")


def test_reregistering_gives_new_credentials_and_voids_the_old(stack: Stack) -> None:
    stack.start_gateway()
    old = stack.register("dev-1")
    old_client = stack.connect(old)
    assert old_client.wait_connected()
    old_client.subscribe("dev-1/probe/down")
    delete_device(stack, "dev-1")
    new = stack.register("dev-1")
    assert new.password != old.password

    refused_connection(stack, old)
    device = stack.connect(new, client_id="dev-1")
    assert device.wait_connected()
    device.subscribe("dev-1/state/#", "dev-1/probe/up")
    device.publish("dev-1/state/update", {"state": {"reported": {"up": True}}, "clientToken": "n"})
    accepted = device.expect("dev-1/state/update/accepted")
    assert accepted["clientToken"] == "n" and accepted["version"] == 1
    # The old connection, if it still stands (amqtt), is cut off from the device's topics.
    assert_cut_off(device, old_client, "dev-1")


# --- sessions and account names belong to their owners ----------------------------------------


class SessionClient:
    """A client with a persistent session (clean session off), like the gateway's."""

    def __init__(self, endpoint: MqttEndpoint, client_id: str) -> None:
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.answered = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False
        )
        self.client.username_pw_set(endpoint.username, endpoint.password)
        self.client.on_message = lambda _c, _u, m: self.received.put((m.topic, bytes(m.payload)))
        self.client.on_connect = lambda *_: self.answered.set()
        self.client.connect(endpoint.host, endpoint.port, keepalive=30)
        self.client.loop_start()

    def messages(self, wait: float) -> list[tuple[str, bytes]]:
        out = []
        try:
            while True:
                out.append(self.received.get(timeout=wait))
        except queue.Empty:
            return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_device_cannot_take_over_the_gateways_session(stack: Stack) -> None:
    """The gateway's session queues every device's requests while it is down; a device that
    connects with the gateway's client id must neither read them nor make them disappear."""
    stack.start_gateway()
    device_b = stack.device("dev-b")
    stack.stop_gateway()
    device_b.publish(
        "dev-b/state/update", {"state": {"reported": {"secret": "b-only"}}, "clientToken": "b"}
    )

    attacker = SessionClient(stack.register("dev-a"), stack.gateway_settings.client_id)
    try:
        assert attacker.answered.wait(WAIT)
        stolen = attacker.messages(wait=2.0)
    finally:
        attacker.close()
    assert [topic for topic, _ in stolen if not topic.startswith("dev-a/")] == []

    stack.start_gateway()  # the real gateway comes back: B's request is still there
    accepted = device_b.expect("dev-b/state/update/accepted")
    assert accepted["clientToken"] == "b"
    assert stack.document("dev-b")["state"]["reported"] == {"secret": "b-only"}


def assert_gateway_keeps_serving(device: Device, device_id: str) -> None:
    for n in range(6):
        device.publish(
            f"{device_id}/state/update", {"state": {"reported": {"n": n}}, "clientToken": f"t-{n}"}
        )
        assert device.expect(f"{device_id}/state/update/accepted")["clientToken"] == f"t-{n}"
        threading.Event().wait(0.5)


def test_a_device_using_the_gateways_client_id_does_not_cut_the_fleet_off(stack: Stack) -> None:
    stack.start_gateway()
    device_b = stack.device("dev-b")
    attacker = stack.connect(stack.register("dev-a"), client_id=stack.gateway_settings.client_id)
    assert wait_until(lambda: attacker.refused is not None or attacker.connected.is_set())
    # Whatever the broker made of that connection, the gateway keeps serving every device.
    assert_gateway_keeps_serving(device_b, "dev-b")


def test_a_refused_client_using_the_gateways_client_id_does_not_cut_the_fleet_off(
    stack: Stack,
) -> None:
    stack.start_gateway()
    device_b = stack.device("dev-b")
    nobody = MqttEndpoint(stack.mqtt_host, stack.mqtt_port, "nobody", "wrong")
    attacker = stack.connect(nobody, client_id=stack.gateway_settings.client_id)
    assert wait_until(lambda: attacker.refused is not None)
    attacker.close()
    assert_gateway_keeps_serving(device_b, "dev-b")


def test_a_device_named_like_a_service_account_takes_nothing_over(stack: Stack) -> None:
    stack.start_gateway()
    device = stack.device("dev-1")
    for name in ("ota-gateway", "ota-app", "ota-admin"):
        # Refusing such an id is fine; taking the account over is not.
        with contextlib.suppress(grpc.RpcError):
            stack.register(name)
    app = stack.connect(stack.app)
    assert app.wait_connected(), f"the application account was refused ({app.refused})"
    device.publish("dev-1/state/update", {"state": {"reported": {"a": 1}}, "clientToken": "t"})
    assert device.expect("dev-1/state/update/accepted")["clientToken"] == "t"
    # The broker's accounts can still be managed: a new device registers and connects.
    assert stack.device("dev-2").connected.is_set()
