"""A broker restart loses nothing accepted (issue 3 §2).

The broker goes away under a running gateway; operators change desired state over gRPC while it
is down (the outbox keeps the deltas); the broker starts again on the same port with the same
configuration. The gateway must reconnect by itself and publish what waited in the outbox, and
a device that reconnects and asks `<id>/state/get` must get the current document and delta.

Mosquitto runs from the project's deploy/ configuration with persistence on, as deployments run
it (the shared `stack` fixture turns persistence off, hence `persistent_stack` here): device
accounts survive in the dynamic-security file, sessions in the persistence file, so a device
with a persistent session also gets the delta pushed to it after the restart. The embedded amqtt
broker keeps sessions in memory only: after its restart a device's subscriptions are gone and
the device resyncs, as the agent does on every connect.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import BROKERS, Device, Stack, build_stack

# paho backs off up to 2 min between reconnects by default, the gateway up to 10 s.
RECONNECT_TIMEOUT = 30.0


def pending_events(stack: Stack) -> int:
    """Outbox events not yet acknowledged by a gateway."""
    return len(stack.service.read_events(0, 0, 1, 1000, 0))


def wait_for(condition: Callable[[], bool], what: str, timeout: float = RECONNECT_TIMEOUT) -> None:
    """Poll `condition` until it holds; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (waited {timeout}s)")
        time.sleep(0.05)


@pytest.fixture(params=BROKERS)
def persistent_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """The integration `stack`, with Mosquitto keeping sessions across its restart."""
    with build_stack(request, tmp_path, request.param, persistence=True) as stack:
        yield stack


def test_desired_changes_made_while_the_broker_is_down_reach_devices_after_it_restarts(
    persistent_stack: Stack,
) -> None:
    stack = persistent_stack
    gateway = stack.start_gateway()
    # "pushed": keeps its session across the restart (Mosquitto only: amqtt forgets sessions).
    # "resync": a clean session, like the device agent: resubscribes and asks state/get.
    resync = stack.device("resync")
    pushed: Device | None = None
    if stack.broker == "mosquitto":
        # A persistent session (clean session off): the broker keeps its subscriptions and
        # queues its QoS 1 messages while it is away, across a restart too with persistence.
        pushed = Device(stack.register("pushed"), "pushed", clean_session=False)
        pushed.client.reconnect_delay_set(min_delay=1, max_delay=2)
        stack.devices.append(pushed)
        assert pushed.wait_connected(), "pushed could not connect"
        pushed.subscribe("pushed/state/#")
    ids = ["resync"] + (["pushed"] if pushed else [])

    # Before the restart everything flows: a desired change reaches each device as a delta.
    stack.update_desired({device_id: {"firmware": {"version": "1.0"}} for device_id in ids})
    assert resync.expect("resync/state/update/delta")["state"] == {"firmware": {"version": "1.0"}}
    if pushed:
        assert pushed.expect("pushed/state/update/delta")["version"] == 1
    resync.publish(
        "resync/state/update",
        {"state": {"reported": {"firmware": {"version": "1.0"}}}, "clientToken": "before"},
    )
    assert resync.expect("resync/state/update/accepted")["version"] == 2
    wait_for(lambda: pending_events(stack) == 0, "the outbox was not drained")
    resync.drain()
    if pushed:
        pushed.drain()

    stack.stop_broker()
    wait_for(lambda: not gateway.connected.is_set(), "the gateway did not notice the broker go")
    wait_for(lambda: not resync.connected.is_set(), "the device did not notice the broker go")

    # While the broker is down, operators change desired state; the outbox keeps the deltas.
    published_before = gateway.published_events
    desired = {"firmware": {"version": "2.0", "url": "https://artifacts/fw-2.0"}}
    stack.update_desired({device_id: desired for device_id in ids})
    assert pending_events(stack) == len(ids)

    stack.start_broker()  # same port, same configuration files

    # The gateway reconnects by itself and publishes what waited (the broker acknowledged it:
    # only then does the gateway acknowledge the outbox events).
    wait_for(gateway.connected.is_set, "the gateway did not reconnect")
    wait_for(lambda: pending_events(stack) == 0, "the outbox was not published")
    assert gateway.published_events >= published_before + len(ids)

    if pushed:
        # The broker kept the persistent session: the delta made while it was down arrives.
        delta = pushed.expect("pushed/state/update/delta", timeout=RECONNECT_TIMEOUT)
        assert delta["state"] == desired
        assert delta["version"] == 2

    # A clean-session device reconnects, resubscribes, asks for its shadow: the current delta.
    assert resync.connected.wait(RECONNECT_TIMEOUT), "the device did not reconnect"
    resync.subscribe("resync/state/#")
    resync.publish("resync/state/get", {"clientToken": "after-restart"})
    document = resync.expect("resync/state/get/accepted")
    assert document["clientToken"] == "after-restart"
    assert document["version"] == 3
    assert document["state"]["desired"] == desired
    assert document["state"]["reported"] == {"firmware": {"version": "1.0"}}
    assert document["state"]["delta"] == {
        "firmware": {"version": "2.0", "url": "https://artifacts/fw-2.0"}
    }

    # And the restarted broker and gateway carry new traffic both ways.
    resync.publish(
        "resync/state/update",
        {"state": {"reported": {"firmware": desired["firmware"]}}, "clientToken": "after"},
    )
    accepted = resync.expect("resync/state/update/accepted")
    assert accepted["clientToken"] == "after" and accepted["version"] == 4
    stack.update_desired({"resync": {"led": "on"}})
    assert resync.expect("resync/state/update/delta")["state"] == {"led": "on"}
