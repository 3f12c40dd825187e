"""Two gateways at once on Mosquitto: device messages split by the shared subscription, the
outbox split by partition, and one gateway stopped and started again.

Mosquitto only (amqtt has no shared subscriptions). Both gateways run in process on the stack's
event loop, with their own client ids, the same shared-subscription group and outbox partitions
0 and 1 of 2. Who served what is read from each `Gateway`'s own counters: `handled` (device
messages answered) and `published_events` (outbox events published).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.shadow.v1 import shadow_pb2_grpc
from services.gateway.gateway import Gateway
from services.gateway.settings import GatewaySettings
from services.shadow.store import bucket_of
from tests.integration.conftest import Device, Stack, build_stack

DEVICES = 20
UPDATES = 5  # per device, under the gateways' per-device burst of 20
PARTITIONS = 2
DEADLINE = 30.0


@dataclass
class RunningGateway:
    gateway: Gateway
    run: tuple[asyncio.Event, Any]


def start(stack: Stack, settings: GatewaySettings) -> RunningGateway:
    """A gateway on the stack's loop, as `Stack.start_gateway` runs one, with its own settings."""
    holder: list[Gateway] = []

    async def run(stop: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(settings.shadow_address) as channel:
            gateway = Gateway(settings, shadow_pb2_grpc.ShadowServiceStub(channel))
            holder.append(gateway)
            await gateway.run(stop)

    handle = stack.runner.start(run)
    wait_for(lambda: bool(holder) and holder[0].connected.is_set(), "the gateway to connect")
    return RunningGateway(holder[0], handle)


def stop(stack: Stack, running: RunningGateway) -> None:
    stack.runner.stop(*running.run)  # a clean DISCONNECT: the broker keeps the session


def wait_for(condition: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def take(device: Device, topic: str) -> list[Any]:
    """Every message received on `topic` and not yet taken, oldest first (does not wait)."""
    while not device.received.empty():
        device.backlog.append(device.received.get_nowait())
    taken = [json.loads(payload) for got, payload in device.backlog if got == topic]
    device.backlog[:] = [(got, payload) for got, payload in device.backlog if got != topic]
    return taken


class Inbox:
    """What each device has received on one topic suffix, accumulated across polls."""

    def __init__(self, devices: dict[str, Device], suffix: str) -> None:
        self.devices = devices
        self.suffix = suffix
        self.got: dict[str, list[Any]] = {d: [] for d in devices}

    def poll(self) -> int:
        for device_id, device in self.devices.items():
            self.got[device_id] += take(device, f"{device_id}/{self.suffix}")
        return sum(len(v) for v in self.got.values())


def pending_events(stack: Stack, partition: int) -> list[Any]:
    return stack.service.store.read_events(0, partition, PARTITIONS, 10_000)


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    with build_stack(request, tmp_path, "mosquitto") as built:
        yield built


def test_two_gateways_split_device_messages_and_the_outbox(stack: Stack) -> None:
    ids = [f"dev-{i}" for i in range(DEVICES)]
    partition_of = {d: bucket_of(d) % PARTITIONS for d in ids}
    assert set(partition_of.values()) == {0, 1}, "the device ids must cover both partitions"
    devices = {d: stack.device(d) for d in ids}

    base = dataclasses.replace(stack.gateway_settings, partitions=PARTITIONS)
    assert base.shared_group, "two gateways share device messages through a shared group"
    settings = [
        dataclasses.replace(base, client_id=f"{base.client_id}-{i}", partition=i)
        for i in range(PARTITIONS)
    ]
    gw = [start(stack, s) for s in settings]
    try:
        _run(stack, ids, devices, partition_of, gw, settings)
    finally:
        for running in gw:
            if not running.run[1].done():
                stop(stack, running)


def _run(
    stack: Stack,
    ids: list[str],
    devices: dict[str, Device],
    partition_of: dict[str, int],
    gw: list[RunningGateway],
    settings: list[GatewaySettings],
) -> None:
    # 1. Device messages: every update applied once, answered once, by one gateway or the other.
    for n in range(UPDATES):
        for d in ids:
            devices[d].publish(
                f"{d}/state/update", {"state": {"reported": {"n": n}}, "clientToken": f"{d}-{n}"}
            )
    accepted = Inbox(devices, "state/update/accepted")
    wait_for(lambda: accepted.poll() >= DEVICES * UPDATES, "every update's accepted")
    for d in ids:
        assert sorted(a["clientToken"] for a in accepted.got[d]) == [
            f"{d}-{n}" for n in range(UPDATES)
        ]
        assert sorted(a["version"] for a in accepted.got[d]) == list(range(1, UPDATES + 1))
        assert stack.document(d)["version"] == UPDATES
    assert sum(g.gateway.handled for g in gw) == DEVICES * UPDATES
    assert all(g.gateway.handled > 0 for g in gw), [g.gateway.handled for g in gw]

    # The updates' documents events: each gateway publishes exactly its partition's.
    share = [sum(1 for d in ids if partition_of[d] == p) for p in range(PARTITIONS)]
    wait_for(
        lambda: all(g.gateway.published_events >= UPDATES * share[p] for p, g in enumerate(gw)),
        "the updates' outbox events",
    )
    assert [g.gateway.published_events for g in gw] == [UPDATES * s for s in share]

    # 2. The outbox: one batch to all, exactly one delta per device, each partition by its own.
    stack.update_desired({d: {"firmware": {"version": "2.0"}} for d in ids})
    deltas = Inbox(devices, "state/update/delta")
    wait_for(lambda: deltas.poll() >= DEVICES, "a delta for every device")
    wait_for(
        lambda: all(
            g.gateway.published_events >= (UPDATES + 1) * share[p] for p, g in enumerate(gw)
        ),
        "the batch's outbox events",
    )
    time.sleep(0.5)  # room for a duplicate to show up before counting (none should)
    deltas.poll()
    for d in ids:
        assert [(x["version"], x["state"]) for x in deltas.got[d]] == [
            (UPDATES + 1, {"firmware": {"version": "2.0"}})
        ], d
    assert [g.gateway.published_events for g in gw] == [(UPDATES + 1) * s for s in share]
    wait_for(lambda: all(pending_events(stack, p) == [] for p in range(PARTITIONS)), "the acks")

    # 3. Gateway 1 stops (clean disconnect; its persistent session stays on the broker).
    handled_before = gw[0].gateway.handled
    stop(stack, gw[1])
    assert pending_events(stack, 1) == []
    for d in ids:
        devices[d].publish(
            f"{d}/state/update", {"state": {"reported": {"n": "late"}}, "clientToken": f"{d}-late"}
        )
    late = Inbox(devices, "state/update/accepted")
    # Gateway 0 keeps answering what the broker hands it.
    wait_for(lambda: gw[0].gateway.handled > handled_before, "gateway 0 to keep serving")
    wait_for(lambda: late.poll() == gw[0].gateway.handled - handled_before, "gateway 0's answers")
    assert all(len(late.got[d]) <= 1 for d in ids)

    # An outbox batch while gateway 1 is down: partition 0's deltas go out, partition 1's stay.
    stack.update_desired({d: {"firmware": {"version": "3.0"}} for d in ids})
    deltas = Inbox(devices, "state/update/delta")
    p0 = [d for d in ids if partition_of[d] == 0]
    p1 = [d for d in ids if partition_of[d] == 1]
    wait_for(lambda: deltas.poll() >= len(p0), "partition 0's deltas")
    assert all(len(deltas.got[d]) == 1 for d in p0)
    assert all(deltas.got[d] == [] for d in p1)
    pending = pending_events(stack, 1)
    assert sorted(e.device_id for e in pending if e.delta_json) == sorted(p1)
    assert {e.device_id for e in pending} == set(p1)
    wait_for(lambda: pending_events(stack, 0) == [], "partition 0's acks")

    # Gateway 1 comes back under the same client id: its session's messages are answered and
    # its partition's events published.
    back = start(stack, settings[1])
    gw[1] = back
    wait_for(lambda: late.poll() >= DEVICES, "every late update's accepted")
    wait_for(lambda: deltas.poll() >= DEVICES, "partition 1's deltas")
    wait_for(lambda: pending_events(stack, 1) == [], "partition 1's outbox to drain")
    deltas.poll()
    late.poll()
    for d in ids:
        assert [a["clientToken"] for a in late.got[d]] == [f"{d}-late"], d
        assert [x["state"] for x in deltas.got[d]] == [{"firmware": {"version": "3.0"}}], d
        assert stack.document(d)["version"] == UPDATES + 3
    # Mosquitto (2.0) keeps dealing the group's messages round-robin to the stopped member's
    # persistent session too: that share waited there and was answered by gateway 1 on its
    # return, none by gateway 0. A gateway stopped for good strands its share this way.
    served_by_0 = gw[0].gateway.handled - handled_before
    assert back.gateway.handled > 0
    assert served_by_0 + back.gateway.handled == DEVICES
    # Each partition's events since the stop went out once, by the partition's own gateway:
    # partition 0's (late documents and the batch) by gateway 0 throughout, partition 1's by
    # gateway 1 once back.
    wait_for(
        lambda: (
            gw[0].gateway.published_events >= (UPDATES + 3) * share[0]
            and back.gateway.published_events >= 2 * share[1]
        ),
        "every partition's events published",
    )
    assert gw[0].gateway.published_events == (UPDATES + 3) * share[0]
    assert back.gateway.published_events == 2 * share[1]
