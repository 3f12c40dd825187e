"""The outbox's own broker connection: a minimal MQTT 3.1.1 client that only publishes at QoS 1.

Publishing the outbox through aiomqtt (over paho) cost the gateway about 80 us of CPU per
message, the most of any process in a fan-out: per publish a future, a task and a scan of every
pending call; per PUBACK three socket reads and a scan of every message in flight. Here a whole
window of messages is encoded and written at once and PUBACKs are counted off a set.

It does nothing else: no subscriptions, no QoS 2, no retained messages, no session. The
session is clean on purpose: whatever the broker has not acknowledged is still in the outbox
and is published again after a reconnect (at least once; devices drop repeats by version).
Device messages stay on the gateway's aiomqtt connection with its persistent session.
The packet bytes themselves are services/common/mqtt_packets.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from services.common.mqtt import MqttEndpoint
from services.common.mqtt_packets import (
    DISCONNECT,
    PINGREQ,
    connect_packet,
    next_packet,
    publish_packet,
)
from services.gateway.errors import BrokerConnectionError

Message = tuple[str, str | bytes]

CONNACK_REFUSALS = {
    1: "unacceptable protocol version",
    2: "client id rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
MAX_PACKET_ID = 0xFFFF


class _Connection(asyncio.Protocol):
    """The socket side: reads CONNACK, PUBACK and PINGRESP; wakes the publisher."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.connack: asyncio.Future[int] = self.loop.create_future()
        self.unacked: set[int] = set()
        self.waiter: asyncio.Future[None] | None = None
        self.wake_below = 0
        self.lost: BrokerConnectionError | None = None
        self.last_heard = self.loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = BrokerConnectionError(f"broker connection lost ({exc or 'closed'})")
        if not self.connack.done():
            self.connack.set_exception(self.lost)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.last_heard = self.loop.time()
        buffer = self.buffer + data if self.buffer else data
        start = 0
        while (framed := next_packet(buffer, start)) is not None:
            pos, end = framed
            kind = buffer[start] >> 4
            if kind == 4 and end - pos >= 2:  # PUBACK
                self.unacked.discard(int.from_bytes(buffer[pos : pos + 2], "big"))
            elif kind == 2 and end - pos >= 2 and not self.connack.done():  # CONNACK
                self.connack.set_result(buffer[pos + 1])
            start = end
        self.buffer = buffer[start:]
        waiter = self.waiter
        if waiter is not None and len(self.unacked) < self.wake_below and not waiter.done():
            waiter.set_result(None)


class OutboxPublisher:
    """Publishes batches of messages at QoS 1, pipelined; one batch at a time."""

    def __init__(self, connection: _Connection, transport: asyncio.Transport) -> None:
        self._connection = connection
        self._transport = transport
        self._next_id = 0
        self._busy = asyncio.Lock()

    async def publish(self, messages: Sequence[Message], window: int, timeout: float) -> None:
        """Publish `messages` in order, at most `window` unacknowledged at once; return once
        the broker has acknowledged every one. Raises BrokerConnectionError if the connection
        is lost or the broker acknowledges nothing for `timeout` seconds."""
        if not 1 <= window < MAX_PACKET_ID:
            raise ValueError(f"window must be in [1, {MAX_PACKET_ID})")
        connection = self._connection
        async with self._busy:
            sent = 0
            while sent < len(messages) or connection.unacked:
                if connection.lost is not None:
                    raise connection.lost
                room = window - len(connection.unacked)
                if sent < len(messages) and room > 0:
                    chunk = messages[sent : sent + room]
                    self._transport.write(
                        b"".join(publish_packet(t, p, self._packet_id()) for t, p in chunk)
                    )
                    sent += len(chunk)
                # While sending, refill once half the window is acknowledged; then wait for all.
                wake_below = window // 2 + 1 if sent < len(messages) else 1
                if len(connection.unacked) >= wake_below:
                    await self._acknowledged(wake_below, timeout)
            if connection.lost is not None:
                raise connection.lost

    def _packet_id(self) -> int:
        unacked = self._connection.unacked
        packet_id = self._next_id % MAX_PACKET_ID + 1
        while packet_id in unacked:  # only if the broker skipped acknowledging an old one
            packet_id = packet_id % MAX_PACKET_ID + 1
        self._next_id = packet_id
        unacked.add(packet_id)
        return packet_id

    async def _acknowledged(self, below: int, timeout: float) -> None:
        """Wait until fewer than `below` messages are unacknowledged (or the connection ends)."""
        connection = self._connection
        connection.wake_below = below
        connection.waiter = connection.loop.create_future()
        try:
            await asyncio.wait_for(connection.waiter, timeout)
        except TimeoutError:
            self._transport.abort()
            raise BrokerConnectionError(
                f"the broker acknowledged nothing for {timeout:.0f}s"
            ) from None
        finally:
            connection.waiter = None

    async def _keep_alive(self, keepalive: int) -> None:
        """PINGREQ every half keepalive; a broker silent for 1.5 keepalives is gone."""
        connection = self._connection
        while connection.lost is None:
            await asyncio.sleep(keepalive / 2)
            if connection.loop.time() - connection.last_heard > keepalive * 1.5:
                self._transport.abort()
                return
            self._transport.write(PINGREQ)

    def _close(self) -> None:
        if self._connection.lost is None:
            self._transport.write(DISCONNECT)
        self._transport.close()


@contextlib.asynccontextmanager
async def open_publisher(
    endpoint: MqttEndpoint, client_id: str, keepalive: int = 30, timeout: float = 10.0
) -> AsyncIterator[OutboxPublisher]:
    """Connect (clean session) and yield a publisher; disconnect on the way out."""
    loop = asyncio.get_running_loop()
    try:
        transport, connection = await asyncio.wait_for(
            loop.create_connection(_Connection, endpoint.host, endpoint.port), timeout
        )
    except (OSError, TimeoutError) as exc:
        raise BrokerConnectionError(
            f"cannot connect to {endpoint.host}:{endpoint.port} ({exc or 'timed out'})"
        ) from exc
    try:
        transport.write(connect_packet(client_id, endpoint.username, endpoint.password, keepalive))
        try:
            code = await asyncio.wait_for(connection.connack, timeout)
        except TimeoutError:
            raise BrokerConnectionError(f"no CONNACK within {timeout:.0f}s") from None
        if code != 0:
            refusal = CONNACK_REFUSALS.get(code, f"code {code}")
            raise BrokerConnectionError(f"the broker refused the connection: {refusal}")
    except BaseException:
        transport.abort()
        raise
    publisher = OutboxPublisher(connection, transport)
    pinger = asyncio.create_task(publisher._keep_alive(keepalive))
    try:
        yield publisher
    finally:
        pinger.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pinger
        publisher._close()
