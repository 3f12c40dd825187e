"""The embedded broker's device check (ADR 43) against the real shadow service over gRPC: a
CONNECT waits for the service's answer; a publish or a delivery gets the answer in hand at once
(it never waits for the service, so one client's messages cannot be overtaken by a later
connection of the same device) and an old answer is asked again in the background, which is
how a deleted device loses its topics."""

from __future__ import annotations

import asyncio
import time

import pytest

from protos.shadow.v1 import shadow_pb2 as pb
from services.broker.embedded import _DeviceCheck
from tests.conftest import RunningShadow

WAIT_SECONDS = 20.0


def register(server: RunningShadow, device_id: str) -> str:
    reply = server.stub.RegisterDevice(pb.RegisterDeviceRequest(device_id=device_id))
    return reply.credentials.password


def test_a_held_answer_is_given_at_once_and_asked_again_behind_it(
    shadow_server: RunningShadow,
) -> None:
    password = register(shadow_server, "chk-1")

    async def scenario() -> None:
        check = _DeviceCheck(shadow_server.address, recheck_seconds=0.0, token=None)
        assert await check.authenticated("chk-1", "not-the-password", fresh=True) is False
        assert await check.authenticated("chk-1", password, fresh=True) is True
        shadow_server.stub.DeleteDevice(pb.DeleteDeviceRequest(device_id="chk-1"))

        # The answer in hand, without waiting for the service (the coroutine never suspends).
        pending = check.authenticated("chk-1", password)
        with pytest.raises(StopIteration) as answered:
            pending.send(None)
        assert answered.value.value is True

        # The re-check it started lands, and the next message is refused.
        deadline = time.monotonic() + WAIT_SECONDS
        while await check.authenticated("chk-1", password) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await check.authenticated("chk-1", password) is False
        # A CONNECT asks afresh, and is refused too.
        assert await check.authenticated("chk-1", password, fresh=True) is False

    asyncio.run(scenario())


def test_without_an_answer_in_hand_a_message_waits_for_the_service(
    shadow_server: RunningShadow,
) -> None:
    password = register(shadow_server, "chk-2")

    async def scenario() -> None:
        check = _DeviceCheck(shadow_server.address, recheck_seconds=60.0, token=None)
        assert await check.authenticated("chk-2", password) is True  # asked, not assumed
        assert await check.authenticated("chk-2", "wrong") is False

    asyncio.run(scenario())


def test_a_service_that_cannot_answer_refuses_a_connect() -> None:
    async def scenario() -> None:
        check = _DeviceCheck("127.0.0.1:1", recheck_seconds=5.0, token=None)
        assert await check.authenticated("chk-3", "whatever", fresh=True) is False

    asyncio.run(scenario())
