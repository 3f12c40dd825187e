"""The agent's own asyncio plumbing, without a broker: its MQTT inbox (`MessageQueue`, what
aiomqtt queues incoming messages in) and `stop()` from each state in which no connection is up.
Stopping a connected agent is covered over the real stack (test_agent_stack, test_simulator)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiomqtt
import pytest

from device_agent.agent import Agent, MessageQueue
from device_agent.config import AgentConfig
from device_agent.domain import Firmware
from device_agent.simulator import MemoryInstaller, MemoryStateFiles


def message(n: int) -> aiomqtt.Message:
    return aiomqtt.Message("dev-1/state/update/delta", str(n).encode(), 1, False, n, None)


def test_the_inbox_is_first_in_first_out() -> None:
    async def scenario() -> list[bytes]:
        inbox = MessageQueue()
        for n in range(3):
            inbox.put_nowait(message(n))
        assert inbox.qsize() == 3
        got = [await inbox.get() for _ in range(3)]
        assert inbox.qsize() == 0
        return [m.payload for m in got]

    assert asyncio.run(scenario()) == [b"0", b"1", b"2"]


def test_a_waiting_reader_gets_the_next_message() -> None:
    async def scenario() -> object:
        inbox = MessageQueue()
        reader = asyncio.create_task(inbox.get())
        await asyncio.sleep(0)
        assert not reader.done()
        inbox.put_nowait(message(7))
        return (await reader).payload

    assert asyncio.run(scenario()) == b"7"


def test_a_full_inbox_refuses_like_asyncio_queue() -> None:
    inbox = MessageQueue(maxsize=1)
    inbox.put_nowait(message(1))
    with pytest.raises(asyncio.QueueFull):
        inbox.put_nowait(message(2))
    assert inbox.qsize() == 1


def test_a_reader_cancelled_after_its_wake_up_loses_nothing() -> None:
    async def scenario() -> object:
        inbox = MessageQueue()
        first = asyncio.create_task(inbox.get())
        await asyncio.sleep(0)
        inbox.put_nowait(message(1))
        first.cancel()  # woken, but cancelled before it ran again
        with pytest.raises(asyncio.CancelledError):
            await first
        assert inbox.qsize() == 1
        return (await inbox.get()).payload

    assert asyncio.run(scenario()) == b"1"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once closed


def agent(tmp_path: Path) -> Agent:
    config = AgentConfig(
        device_id="dev-1",
        password="secret",
        mqtt_host="127.0.0.1",
        mqtt_port=closed_port(),
        download_base_url="http://127.0.0.1:9",
        trusted_keys={},
        hardware="gw-100",
        data_dir=tmp_path,
        factory_version="1.0.0",
    )
    installer = MemoryInstaller(Firmware("1.0.0", None))
    return Agent(config, installer=installer, files=MemoryStateFiles("1.0.0"))


def test_stop_before_run_returns_without_connecting(tmp_path: Path) -> None:
    device = agent(tmp_path)
    device.stop()
    assert asyncio.run(asyncio.wait_for(device.run(), 10)) is False
    assert not device.connected


def test_stop_ends_the_wait_before_a_reconnect(tmp_path: Path) -> None:
    async def scenario() -> bool:
        device = agent(tmp_path)
        running = asyncio.create_task(device.run())
        # The broker refuses: the agent waits (0.5-1 s, then longer) before each new attempt.
        while device._pause is None:
            await asyncio.sleep(0.01)
        device.stop()
        for _ in range(20):  # a few turns of the loop, not the rest of the pause
            await asyncio.sleep(0)
        assert running.done()
        return running.result()

    assert asyncio.run(scenario()) is False
