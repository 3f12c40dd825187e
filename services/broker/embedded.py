"""The embedded MQTT broker (amqtt, in-process) with the same accounts and ACL as Mosquitto.

Devices log in with the credentials `RegisterDevice` gave them (checked by the shadow service's
`AuthenticateDevice`); service accounts (gateways, applications) with passwords whose `$7$`
hashes are configured here. A device may use only topics under its own `<id>/`
(`access.device_may_use`). amqtt keeps a session's password, so a device's right to a topic is
re-checked against the shadow service, in the background, once its answer is `recheck_seconds`
old: a deleted device loses its topics within about that time plus one check (Mosquitto
disconnects it at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from protos.shadow.v1 import shadow_pb2 as pb
from protos.shadow.v1 import shadow_pb2_grpc
from services.broker.access import device_may_use
from services.common.auth import bearer_aio_channel
from services.shadow.credentials import verify_password

log = logging.getLogger(__name__)


class _DeviceCheck:
    """Asks the shadow service whether a device's credentials hold, and keeps the answers.

    Only a CONNECT (`fresh`) waits for the service. A publish or a delivery is checked
    against the answer in hand; one older than `recheck_seconds` is asked again in the
    background, and the new answer counts from the next message on (ADR 43). Waiting there
    would stall that client's messages behind a call to the shadow service, and a device that
    reconnected meanwhile could overtake its own older messages: a stale `downloading`
    report landing after the device's `succeeded`."""

    def __init__(self, shadow_address: str, recheck_seconds: float, token: str | None) -> None:
        self.shadow_address = shadow_address
        self.token = token
        self.recheck_seconds = recheck_seconds
        self._stub: shadow_pb2_grpc.ShadowServiceAsyncStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._answers: dict[tuple[str, str], tuple[bool, float]] = {}
        self._rechecks: dict[tuple[str, str], asyncio.Task[bool | None]] = {}

    async def authenticated(self, device_id: str, password: str, fresh: bool = False) -> bool:
        key = (device_id, password)
        cached = self._answers.get(key)
        if fresh or cached is None or self._loop is not asyncio.get_running_loop():
            return bool(await self._ask(key))
        if time.monotonic() - cached[1] >= self.recheck_seconds and key not in self._rechecks:
            task = asyncio.create_task(self._ask(key))
            self._rechecks[key] = task
            task.add_done_callback(lambda done: self._recheck_done(key, done))
        return cached[0]

    def _recheck_done(self, key: tuple[str, str], task: asyncio.Task[bool | None]) -> None:
        if self._rechecks.get(key) is task:
            del self._rechecks[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("re-checking device credentials failed", exc_info=task.exception())

    async def _ask(self, key: tuple[str, str]) -> bool | None:
        """The shadow service's answer, kept; None (and nothing kept) if it cannot answer."""
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:
            # A gRPC aio channel belongs to the loop it was made in; a broker started again in
            # another loop (tests do) with the same shadow address needs its own.
            channel = bearer_aio_channel(self.shadow_address, self.token)
            self._stub = shadow_pb2_grpc.ShadowServiceStub(channel)
            self._loop = loop
            self._answers.clear()
            self._rechecks.clear()
        asked = time.monotonic()
        try:
            reply = await self._stub.AuthenticateDevice(
                pb.AuthenticateDeviceRequest(device_id=key[0], password=key[1]), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("cannot check device credentials: %s", exc.code().name)
            return None
        if len(self._answers) > 100_000:
            self._answers.clear()
        self._answers[key] = (reply.authenticated, asked)
        return reply.authenticated


_checks: dict[str, _DeviceCheck] = {}


def _device_check(shadow_address: str, recheck_seconds: float, token: str) -> _DeviceCheck:
    """One cache per broker, shared by its auth and topic plugins."""
    if shadow_address not in _checks:
        _checks[shadow_address] = _DeviceCheck(shadow_address, recheck_seconds, token or None)
    return _checks[shadow_address]


class DeviceAuthPlugin(BaseAuthPlugin):
    @dataclass
    class Config:
        shadow_address: str = "127.0.0.1:50051"
        service_accounts: dict[str, str] = field(default_factory=dict)  # user -> $7$ hash
        recheck_seconds: float = 5.0
        service_token: str = ""  # sent to the shadow service

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.config: DeviceAuthPlugin.Config = context.config
        self.devices = _device_check(
            self.config.shadow_address, self.config.recheck_seconds, self.config.service_token
        )

    async def authenticate(self, *, session: Session) -> bool | None:
        username, password = session.username, session.password
        if not username or password is None:
            return False
        service_hash = self.config.service_accounts.get(username)
        if service_hash is not None:
            return verify_password(password, service_hash)
        if session.client_id != username:
            return False  # a device connects as itself only: no one else's session to take
        return await self.devices.authenticated(username, password, fresh=True)


class DeviceTopicPlugin(BaseTopicPlugin):
    @dataclass
    class Config:
        shadow_address: str = "127.0.0.1:50051"
        service_accounts: list[str] = field(default_factory=list)
        recheck_seconds: float = 5.0
        service_token: str = ""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.config: DeviceTopicPlugin.Config = context.config
        self.devices = _device_check(
            self.config.shadow_address, self.config.recheck_seconds, self.config.service_token
        )

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        if session is None or not topic or not session.username:
            return False
        if session.username in self.config.service_accounts:
            return True
        if not device_may_use(session.username, topic):
            return False
        return await self.devices.authenticated(session.username, session.password or "")


def broker_config(
    host: str,
    port: int,
    shadow_address: str,
    service_accounts: dict[str, str],
    service_token: str = "",
) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        "plugins": {
            f"{__name__}.DeviceAuthPlugin": {
                "shadow_address": shadow_address,
                "service_accounts": service_accounts,
                "service_token": service_token,
            },
            f"{__name__}.DeviceTopicPlugin": {
                "shadow_address": shadow_address,
                "service_accounts": list(service_accounts),
                "service_token": service_token,
            },
        },
    }


class _SubscriptionTable(dict[str, list[tuple[Session, int]]]):
    """amqtt 0.12 broadcasts by iterating `_subscriptions.items()` with awaits inside the loop,
    so a client subscribing meanwhile raises "dictionary changed size during iteration" and
    kills the broadcast. Here `items()` is a snapshot."""

    def items(self) -> list[tuple[str, list[tuple[Session, int]]]]:  # type: ignore[override]
        return list(super().items())


class GuardedBroker(Broker):
    """amqtt 0.12 settles a CONNECT's session before it authenticates: a clean session drops
    the namesake session (say, the gateway's, with every device request queued for it), a
    resumed one is handed the newcomer's credentials. Here both wait for a successful
    authentication, so a refused client touches no one's session."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._subscriptions = _SubscriptionTable()  # empty at this point, as in amqtt
        self._deferred_deletes: set[str] = set()
        self._owners: dict[str, tuple[str | None, str | None]] = {}

    async def _delete_session(self, client_id: str) -> None:
        self._deferred_deletes.add(client_id)  # until the newcomer has authenticated

    async def _handle_client_session(
        self,
        reader: Any,
        writer: Any,
        client_session: Session,
        handler: Any,
        server: Any,
        listener_name: str,
    ) -> None:
        # amqtt would refuse a client only after taking over (disconnecting) the connection
        # that holds its client id and registering itself in that session's place.
        if not await self._authenticate(client_session, None):
            stranger = Session()
            stranger.client_id = f"refused-{uuid.uuid4().hex}"
            handler.attach(stranger, reader, writer)
            await handler.mqtt_connack_authorize(False)
            await writer.close()
            return
        await super()._handle_client_session(
            reader, writer, client_session, handler, server, listener_name
        )

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        authenticated = bool(await super()._authenticate(session, listener))
        client_id = session.client_id or ""
        deferred = client_id in self._deferred_deletes
        self._deferred_deletes.discard(client_id)
        if authenticated:
            if deferred:
                await super()._delete_session(client_id)
            self._owners[client_id] = (session.username, session.password)
        elif session.parent == 1 and client_id in self._owners:
            # A resumed session was given the refused client's credentials: give it back.
            session.username, session.password = self._owners[client_id]
        return authenticated


async def run_broker(config: dict[str, Any], stop: asyncio.Event) -> None:
    broker = GuardedBroker(config)
    await broker.start()
    try:
        await stop.wait()
    finally:
        await broker.shutdown()
