"""The gateway process: two long-lived MQTT connections bridging devices and the shadow service.

The inbound loop (on aiomqtt) takes every device's `<id>/state/update` and `<id>/state/get`
(as a shared subscription, so several gateways split them) and answers them in batches: one
`BatchUpdateShadow` call for the updates a burst brought, then `accepted` / `rejected` for each
in arrival order, so one device's messages are answered in order. Its session is persistent
(fixed client id, clean session off), so device messages sent while the gateway is down wait
in the broker.

The outbox loop reads the delta / documents messages every accepted update left (whoever made
it: a device, an operator, a rollout batch), publishes them pipelined at QoS 1 on a second,
lean connection of its own (`publisher.py`; client id `<client id>-outbox`, clean session), and
acknowledges them only once the broker has them all. Reconnection of both is the explicit loop
in `run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable, Sequence

import aiomqtt
import grpc

from protos.shadow.v1 import shadow_pb2 as pb
from protos.shadow.v1 import shadow_pb2_grpc
from services.common.auth import bearer_aio_channel
from services.common.observability import (
    GATEWAY_BATCH_SECONDS,
    GATEWAY_MESSAGES,
    GATEWAY_PUBLISHES,
    configure_logging,
    start_metrics_server,
)
from services.gateway import protocol
from services.gateway.errors import BrokerConnectionError
from services.gateway.protocol import Inbound, RateLimiter
from services.gateway.publisher import OutboxPublisher, open_publisher
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

# gRPC status -> the shadow protocol's HTTP-like code, when the service sent no `ota-code`.
FALLBACK_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 403,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 503,
}
EVENT_WAIT_MS = 5000
# Device answers in flight at once on the aiomqtt connection: enough to pipeline, few enough
# that aiomqtt's per-call bookkeeping (it scans its pending calls on every publish) stays cheap.
PUBLISH_WINDOW = 500
PUBLISH_TIMEOUT = 60.0
# Outbox messages unacknowledged at once on the outbox connection (a PUBACK costs a set removal
# there, so the window is as wide as a read's messages need, within MQTT's packet ids).
OUTBOX_WINDOW = 4000
# Device messages go to the shadow service in batches: up to MAX_BATCH per call, gathered for
# BATCH_LINGER_SECONDS; reading from the broker pauses while MAX_PENDING wait.
MAX_BATCH = 500
BATCH_LINGER_SECONDS = 0.005
MAX_PENDING = 5000


def rejected_code(error: grpc.aio.AioRpcError) -> int:
    for key, value in error.trailing_metadata() or ():
        if key == "ota-code" and isinstance(value, str) and value.isdigit():
            return int(value)
    return FALLBACK_CODES.get(error.code(), 500)


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        shadow: shadow_pb2_grpc.ShadowServiceAsyncStub,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.shadow = shadow
        self.clock = clock
        self.limiter = RateLimiter(settings.rate_per_second, settings.rate_burst)
        self.connected = asyncio.Event()
        self.handled = 0
        self.published_events = 0

    # --- the connection -----------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        mqtt = self.settings.mqtt
        client = aiomqtt.Client(
            mqtt.host,
            mqtt.port,
            username=mqtt.username,
            password=mqtt.password,
            identifier=self.settings.client_id,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=False,
            keepalive=30,
            max_inflight_messages=self.settings.max_inflight_messages,
            max_queued_outgoing_messages=0,
        )
        # Many publishes in flight are normal here, not a warning sign.
        client.pending_calls_threshold = 2 * PUBLISH_WINDOW
        return client

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, reconnecting with backoff whenever the broker goes away."""
        backoff = 0.5
        while not stop.is_set():
            try:
                async with (
                    self._client() as client,
                    open_publisher(self.settings.mqtt, self.settings.client_id + "-outbox") as out,
                ):
                    backoff = 0.5
                    log.info(
                        "connected to MQTT %s:%d", self.settings.mqtt.host, self.settings.mqtt.port
                    )
                    await self._serve(client, out, stop)
            except (aiomqtt.MqttError, BrokerConnectionError) as exc:
                self.connected.clear()
                log.warning("MQTT connection lost (%s); reconnecting in %.1fs", exc, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 10.0)

    async def _serve(
        self, client: aiomqtt.Client, outbox: OutboxPublisher, stop: asyncio.Event
    ) -> None:
        for topic in protocol.subscriptions(self.settings.shared_group):
            await client.subscribe(topic, qos=1)
        self.connected.set()
        tasks = [
            asyncio.create_task(self._inbound(client)),
            asyncio.create_task(self._publish_events(outbox)),
            asyncio.create_task(stop.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raise a connection error so `run` reconnects
        finally:
            self.connected.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- device messages ----------------------------------------------------------------------

    async def _inbound(self, client: aiomqtt.Client) -> None:
        """Collect device messages in arrival order; `_serve_batches` answers them in batches."""
        pending: list[Inbound] = []
        arrived = asyncio.Event()
        room = asyncio.Event()
        room.set()
        server = asyncio.create_task(self._serve_batches(client, pending, arrived, room))
        try:
            async for message in client.messages:
                parsed = protocol.parse_topic(message.topic.value)
                if parsed is None:
                    continue  # not a device topic we serve; the broker ACL keeps devices in theirs
                payload = message.payload if isinstance(message.payload, bytes) else b""
                pending.append(Inbound(parsed[0], parsed[1], payload))
                arrived.set()
                if len(pending) >= MAX_PENDING:  # back-pressure: stop reading for a moment
                    room.clear()
                    await room.wait()
                if server.done():
                    server.result()  # an MqttError while answering: reconnect
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server

    async def _serve_batches(
        self,
        client: aiomqtt.Client,
        pending: list[Inbound],
        arrived: asyncio.Event,
        room: asyncio.Event,
    ) -> None:
        """One batch at a time, so one device's messages are answered in order."""
        while True:
            await arrived.wait()
            await asyncio.sleep(BATCH_LINGER_SECONDS)  # let a burst gather into one call
            batch = pending[:MAX_BATCH]
            del pending[:MAX_BATCH]
            if not pending:
                arrived.clear()
            room.set()
            started = time.perf_counter()
            await self._publish_all(client, await self.answer(batch))
            GATEWAY_BATCH_SECONDS.observe(time.perf_counter() - started)

    async def answer(self, batch: list[Inbound]) -> list[tuple[str, str | bytes]]:
        """The accepted / rejected message for each device message of a batch, in order.

        Updates go to the shadow service in one `BatchUpdateShadow` call, gets (rare: a device
        resyncing) as concurrent `GetShadow` calls after them.
        """
        now = self.clock()
        limit = self.settings.max_payload_bytes
        answers: list[tuple[str, str | bytes]] = []
        updates: list[tuple[int, Inbound]] = []
        gets: list[tuple[int, Inbound]] = []
        tokens = [protocol.client_token_of(item.payload, limit) for item in batch]
        rejected = 0

        def reject(index: int, code: int, message: str) -> None:
            nonlocal rejected
            rejected += 1
            item = batch[index]
            body = protocol.rejected_body(code, message, tokens[index], now)
            answers[index] = (protocol.reply_topic(item.device_id, item.action, "rejected"), body)

        def accept(index: int, body: str | bytes) -> None:
            item = batch[index]
            answers[index] = (protocol.reply_topic(item.device_id, item.action, "accepted"), body)

        for index, item in enumerate(batch):
            answers.append(("", b""))
            if len(item.payload) > limit:
                reject(index, 413, f"payload is {len(item.payload)} bytes, the limit is {limit}")
            elif not self.limiter.allow(item.device_id, now):
                reject(index, 429, "rate limited: too many requests from this device")
            elif item.action == "get":
                gets.append((index, item))
            elif not _is_utf8(item.payload):
                reject(index, 400, "payload is not UTF-8 JSON")
            else:
                updates.append((index, item))
        if updates:
            request = pb.BatchUpdateShadowRequest(
                items=[
                    pb.ShadowUpdate(device_id=item.device_id, request_json=item.payload.decode())
                    for _, item in updates
                ]
            )
            try:
                reply = await self.shadow.BatchUpdateShadow(
                    request, timeout=self.settings.rpc_timeout_seconds
                )
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "shadow service refused a batch of %d updates: %s %s",
                    len(updates),
                    exc.code().name,
                    exc.details(),
                )
                for index, _ in updates:
                    reject(index, rejected_code(exc), exc.details() or exc.code().name)
            else:
                for (index, _), result in zip(updates, reply.results, strict=True):
                    if result.code == 200:
                        accept(index, result.accepted_json)
                    else:
                        reject(index, result.code, result.message)
        if gets:
            documents = await asyncio.gather(
                *(self._get(item.device_id, tokens[index]) for index, item in gets),
                return_exceptions=True,
            )
            for (index, _), document in zip(gets, documents, strict=True):
                if isinstance(document, grpc.aio.AioRpcError):
                    reject(index, rejected_code(document), document.details() or "")
                elif isinstance(document, BaseException):
                    raise document
                else:
                    accept(index, document)
        self.handled += len(batch)
        got = sum(1 for item in batch if item.action == "get")
        GATEWAY_MESSAGES.labels("in", "get").inc(got)
        GATEWAY_MESSAGES.labels("in", "update").inc(len(batch) - got)
        GATEWAY_MESSAGES.labels("out", "accepted").inc(len(batch) - rejected)
        GATEWAY_MESSAGES.labels("out", "rejected").inc(rejected)
        return answers

    async def _get(self, device_id: str, token: str | None) -> bytes:
        shadow = await self.shadow.GetShadow(
            pb.GetShadowRequest(device_id=device_id), timeout=self.settings.rpc_timeout_seconds
        )
        if token is None:
            return shadow.document_json.encode()
        document = json.loads(shadow.document_json)
        document["clientToken"] = token  # echoed on get/accepted, as AWS IoT does
        return json.dumps(document, separators=(",", ":")).encode()

    # --- the outbox ---------------------------------------------------------------------------

    async def _publish_events(self, outbox: OutboxPublisher) -> None:
        """Publish the outbox, oldest first; acknowledge exactly what the broker has taken.

        Every read starts from the oldest unacknowledged event (not from a cursor): an update
        that commits late can hold a lower id than events already published.
        """
        backoff = 0.2
        settings = self.settings
        while True:
            try:
                reply = await self.shadow.ReadEvents(
                    pb.ReadEventsRequest(
                        partition=settings.partition,
                        partitions=settings.partitions,
                        limit=settings.events_per_read,
                        wait_ms=EVENT_WAIT_MS,
                    ),
                    timeout=EVENT_WAIT_MS / 1000 + settings.rpc_timeout_seconds,
                )
                if not reply.events:
                    continue
                messages = [m for e in reply.events for m in messages_of(e)]
                await outbox.publish(messages, OUTBOX_WINDOW, PUBLISH_TIMEOUT)
                GATEWAY_PUBLISHES.inc(len(messages))
                self.published_events += len(reply.events)
                GATEWAY_MESSAGES.labels("out", "documents").inc(len(reply.events))
                GATEWAY_MESSAGES.labels("out", "delta").inc(len(messages) - len(reply.events))
                await self.shadow.AckEvents(
                    pb.AckEventsRequest(event_ids=[e.event_id for e in reply.events]),
                    timeout=settings.rpc_timeout_seconds,
                )
                backoff = 0.2
            except grpc.aio.AioRpcError as exc:
                log.warning("shadow service: %s; retrying in %.1fs", exc.code().name, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    @staticmethod
    async def _publish_all(
        client: aiomqtt.Client, messages: Sequence[tuple[str, str | bytes]]
    ) -> None:
        """Publish at QoS 1, a window at a time; returns once the broker acknowledged all."""
        for start in range(0, len(messages), PUBLISH_WINDOW):
            await asyncio.gather(
                *(
                    client.publish(topic, payload, qos=1, timeout=PUBLISH_TIMEOUT)
                    for topic, payload in messages[start : start + PUBLISH_WINDOW]
                )
            )
        GATEWAY_PUBLISHES.inc(len(messages))


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode()
    except UnicodeDecodeError:
        return False
    return True


def messages_of(event: pb.ShadowEvent) -> list[tuple[str, str | bytes]]:
    """The MQTT messages announcing one accepted update: its delta (if any), its documents."""
    messages: list[tuple[str, str | bytes]] = [
        (protocol.documents_topic(event.device_id), event.documents_json)
    ]
    if event.delta_json:
        messages.insert(0, (protocol.delta_topic(event.device_id), event.delta_json))
    return messages


async def serve(settings: GatewaySettings, stop: asyncio.Event) -> None:
    async with bearer_aio_channel(settings.shadow_address, settings.service_token) as channel:
        gateway = Gateway(settings, shadow_pb2_grpc.ShadowServiceStub(channel))
        await gateway.run(stop)


def main() -> None:
    configure_logging("gateway")
    settings = GatewaySettings.from_env()
    start_metrics_server()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(run())
