"""The outbox's own MQTT connection (services/gateway/publisher.py) on both real brokers, and the
gateway across a broker restart: what the broker did not acknowledge stays in the outbox."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections import defaultdict

import pytest

from services.common.mqtt import MqttEndpoint
from services.gateway.errors import BrokerConnectionError
from services.gateway.publisher import Message, open_publisher
from tests.integration.conftest import TIMEOUT, Device, Stack, wait_until


def publish(endpoint: MqttEndpoint, messages: list[Message], window: int, timeout: float) -> None:
    async def run() -> None:
        async with open_publisher(endpoint, f"{endpoint.username}-test-outbox") as publisher:
            await publisher.publish(messages, window, timeout)

    asyncio.run(run())


def receive(device: Device, count: int) -> list[tuple[str, bytes]]:
    got = []
    for _ in range(count):
        got.append(device.received.get(timeout=TIMEOUT))
    return got


def test_a_batch_wider_than_the_window_arrives_whole_and_in_order(stack: Stack) -> None:
    observer = stack.connect(stack.app)
    assert observer.wait_connected()
    observer.subscribe("pub-test/#")
    messages: list[Message] = [
        (f"pub-test/{i % 7}/state/update/delta", json.dumps({"n": i})) for i in range(1000)
    ]
    messages.append(("pub-test/bytes", b"\x00\xff" * 200))  # bytes go out as they are

    async def run() -> list[tuple[str, bytes]]:
        async with open_publisher(stack.gateway_endpoint, "ota-gateway-test-outbox") as publisher:
            await publisher.publish(messages, 64, TIMEOUT)
            # Connected until everything arrived: amqtt acknowledges a message before it
            # forwards it, and drops what it has not forwarded when its publisher disconnects.
            return await asyncio.to_thread(receive, observer, len(messages))

    got = asyncio.run(run())
    by_topic: dict[str, list[int]] = defaultdict(list)
    for topic, payload in got:
        if topic == "pub-test/bytes":
            assert payload == b"\x00\xff" * 200
        else:
            by_topic[topic].append(json.loads(payload)["n"])
    # Every message once, and each topic (one device's messages) in publishing order.
    for k in range(7):
        assert by_topic[f"pub-test/{k}/state/update/delta"] == list(range(k, 1000, 7))
    assert observer.drain(wait=0.5) == []


def test_wrong_credentials_are_refused(stack: Stack) -> None:
    wrong = dataclasses.replace(stack.gateway_endpoint, password="not-the-password")
    with pytest.raises(BrokerConnectionError):
        publish(wrong, [("pub-test/x", "{}")], window=8, timeout=5.0)


def test_no_broker_is_an_error_not_a_hang(stack: Stack) -> None:
    stack.stop_broker()
    with pytest.raises(BrokerConnectionError, match="cannot connect"):
        publish(stack.gateway_endpoint, [("pub-test/x", "{}")], window=8, timeout=5.0)


def test_a_broker_lost_while_publishing_fails_the_publish(stack: Stack) -> None:
    async def run() -> None:
        async with open_publisher(stack.gateway_endpoint, "ota-gateway-test-outbox") as publisher:
            await publisher.publish([("pub-test/first", "{}")], 8, TIMEOUT)
            await asyncio.to_thread(stack.stop_broker)
            await publisher.publish([("pub-test/second", "{}")] * 100, 8, TIMEOUT)

    with pytest.raises(BrokerConnectionError):
        asyncio.run(run())


def test_a_broker_restart_loses_nothing_from_the_outbox(stack: Stack) -> None:
    device = stack.device("dev-1")
    gateway = stack.start_gateway()
    device.publish("dev-1/state/update", {"state": {"reported": {"up": 1}}})
    device.expect("dev-1/state/update/accepted")
    assert wait_until(lambda: not stack.service.read_events(0, 0, 1, 100, 0), timeout=30.0)
    published = gateway.published_events
    second = stack.register("dev-2")  # while the broker's account admin is connected

    stack.stop_broker()
    stack.update_desired({"dev-1": {"firmware": {"version": "7.0"}}})
    threading.Event().wait(1.0)  # the gateway, reconnecting meanwhile, publishes nothing
    waiting = stack.service.read_events(0, 0, 1, 100, 0)
    assert [(e.device_id, e.version) for e in waiting] == [("dev-1", 2)]
    assert gateway.published_events == published

    stack.start_broker()
    # The gateway reconnects and publishes the event; only the broker's PUBACK removes it.
    assert wait_until(lambda: not stack.service.read_events(0, 0, 1, 100, 0), timeout=30.0)
    assert gateway.published_events == published + 1

    # And it serves devices again: a fresh connection gets the next delta.
    again = stack.connect(second, client_id="dev-2")
    assert again.wait_connected()
    again.subscribe("dev-2/state/#")
    stack.update_desired({"dev-2": {"firmware": {"version": "8.0"}}})
    delta = again.expect("dev-2/state/update/delta", timeout=30.0)
    assert delta["state"] == {"firmware": {"version": "8.0"}}


def test_an_idle_connection_outlives_its_keepalive(stack: Stack) -> None:
    observer = stack.connect(stack.app)
    assert observer.wait_connected()
    observer.subscribe("pub-test/#")

    async def run() -> None:
        async with open_publisher(
            stack.gateway_endpoint, "ota-gateway-test-outbox", keepalive=3
        ) as publisher:
            # Brokers drop a client silent for 1.5 keepalives (Mosquitto checks every few s).
            await asyncio.sleep(10)
            await publisher.publish([("pub-test/late", "{}")], 8, TIMEOUT)

    asyncio.run(run())
    assert receive(observer, 1) == [("pub-test/late", b"{}")]
