"""The device-facing stack for integration tests: a real broker, the shadow service, a gateway.

`stack` runs twice: Mosquitto 2 started from the project's deploy/ configuration (dynamic
security: per-device accounts created by RegisterDevice) on PostgreSQL, and the embedded amqtt
broker on SQLite. Devices are real MQTT clients with their own credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import Engine, text

from protos.shadow.v1 import shadow_pb2 as pb
from protos.shadow.v1 import shadow_pb2_grpc
from services.broker import mosquitto
from services.broker.dynsec import DynsecAccounts
from services.broker.embedded import broker_config, run_broker
from services.common import db
from services.common.mqtt import MqttEndpoint
from services.common.observability import server_metrics_interceptor
from services.gateway.gateway import Gateway
from services.gateway.settings import GatewaySettings
from services.shadow.credentials import hash_password
from services.shadow.server import MIGRATIONS, create_server
from services.shadow.service import ShadowService
from services.shadow.settings import ShadowSettings
from services.shadow.store import ShadowStore
from tests.conftest import service_missing

TIMEOUT = 15.0
BROKERS = ["mosquitto", "amqtt"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AsyncThread:
    """An asyncio loop in a thread, for the in-process broker and gateway."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def start(self, factory: Callable[[asyncio.Event], Any]) -> tuple[asyncio.Event, Any]:
        async def make_stop() -> asyncio.Event:
            return asyncio.Event()

        stop = asyncio.run_coroutine_threadsafe(make_stop(), self.loop).result()
        future = asyncio.run_coroutine_threadsafe(factory(stop), self.loop)
        return stop, future

    def stop(self, stop: asyncio.Event, future: Any) -> None:
        self.loop.call_soon_threadsafe(stop.set)
        future.result(timeout=TIMEOUT)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)


class Device:
    """A device (or an application) on MQTT: a paho client that records what it receives."""

    def __init__(self, endpoint: MqttEndpoint, client_id: str, clean_session: bool = True) -> None:
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.backlog: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.refused: int | None = None
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session
        )
        self.client.username_pw_set(endpoint.username, endpoint.password)
        self.client.on_message = lambda _c, _u, m: self.received.put((m.topic, bytes(m.payload)))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self.connected.clear()
        self.client.connect(endpoint.host, endpoint.port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.refused = reason.value
        else:
            self.connected.set()

    def wait_connected(self) -> bool:
        self.connected.wait(5)
        return self.connected.is_set()

    def subscribe(self, *topics: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_: done.set()
        self.client.subscribe([(t, 1) for t in topics])
        assert done.wait(TIMEOUT), "no SUBACK"

    def publish(self, topic: str, payload: Any) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(topic, data, qos=1).wait_for_publish(TIMEOUT)

    def expect(self, topic: str, timeout: float = TIMEOUT) -> Any:
        """The oldest message received on `topic` and not yet taken, as JSON (waits for one)."""
        for i, (got, payload) in enumerate(self.backlog):
            if got == topic:
                del self.backlog[i]
                return json.loads(payload)
        try:
            while True:
                got, payload = self.received.get(timeout=timeout)
                if got == topic:
                    return json.loads(payload)
                self.backlog.append((got, payload))
        except queue.Empty:
            raise AssertionError(f"nothing arrived on {topic} within {timeout}s") from None

    def drain(self, wait: float = 0.5) -> list[tuple[str, Any]]:
        """Every message not yet taken, waiting until none arrives for `wait` seconds."""
        out = [(topic, json.loads(payload)) for topic, payload in self.backlog]
        self.backlog.clear()
        try:
            while True:
                topic, payload = self.received.get(timeout=wait)
                out.append((topic, json.loads(payload)))
        except queue.Empty:
            return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class BrokerControl:
    """Stops the stack's broker and starts it again on the same port, with the same accounts
    (Mosquitto's dynamic-security file, amqtt's account table); sessions are kept only by a
    Mosquitto built with persistence."""

    stop: Callable[[], None]
    start: Callable[[], None]


@dataclass
class Stack:
    broker: str
    mqtt_host: str
    mqtt_port: int
    shadow_address: str
    shadow: shadow_pb2_grpc.ShadowServiceStub
    service: ShadowService
    app: MqttEndpoint  # a service account for applications and tests
    gateway_endpoint: MqttEndpoint
    runner: AsyncThread
    gateway_settings: GatewaySettings
    gateway: Gateway | None = None
    _gateway_run: tuple[asyncio.Event, Any] | None = None
    devices: list[Device] = field(default_factory=list)
    broker_control: BrokerControl | None = None

    def register(self, device_id: str, **tags: str) -> MqttEndpoint:
        reply = self.shadow.RegisterDevice(pb.RegisterDeviceRequest(device_id=device_id, tags=tags))
        return MqttEndpoint(
            self.mqtt_host, self.mqtt_port, reply.credentials.username, reply.credentials.password
        )

    def connect(self, endpoint: MqttEndpoint, client_id: str | None = None) -> Device:
        """Connect as a device (client id = its id, as the brokers require) or, for a service
        account, under a fresh client id."""
        name = endpoint.username or "anonymous"
        default = f"{name}-{secrets.token_hex(3)}" if name.startswith("ota-") else name
        device = Device(endpoint, client_id or default)
        self.devices.append(device)
        return device

    def device(self, device_id: str, **tags: str) -> Device:
        """Register a device, connect it and subscribe it to its own answer topics."""
        device = self.connect(self.register(device_id, **tags), client_id=device_id)
        assert device.wait_connected(), f"{device_id} could not connect"
        device.subscribe(f"{device_id}/state/#")
        return device

    def start_gateway(self, clock: Callable[[], float] | None = None) -> Gateway:
        async def run(stop: asyncio.Event) -> None:
            async with grpc.aio.insecure_channel(self.shadow_address) as channel:
                stub = shadow_pb2_grpc.ShadowServiceStub(channel)
                kwargs = {"clock": clock} if clock else {}
                self.gateway = Gateway(self.gateway_settings, stub, **kwargs)
                await self.gateway.run(stop)

        self._gateway_run = self.runner.start(run)
        for _ in range(int(TIMEOUT * 20)):
            if self.gateway is not None and self.gateway.connected.is_set():
                return self.gateway
            threading.Event().wait(0.05)
        raise AssertionError("the gateway did not connect")

    def stop_gateway(self) -> None:
        if self._gateway_run is not None:
            self.runner.stop(*self._gateway_run)
            self._gateway_run = None
            self.gateway = None

    def stop_broker(self) -> None:
        assert self.broker_control is not None, "this stack cannot restart its broker"
        self.broker_control.stop()

    def start_broker(self) -> None:
        assert self.broker_control is not None, "this stack cannot restart its broker"
        self.broker_control.start()

    def update_desired(self, patches: dict[str, Any]) -> None:
        items = [
            pb.DesiredPatch(device_id=d, desired_json=json.dumps(p)) for d, p in patches.items()
        ]
        reply = self.shadow.BatchUpdateDesired(pb.BatchUpdateDesiredRequest(items=items))
        assert all(r.status == pb.BatchItemResult.OK for r in reply.results), reply

    def document(self, device_id: str) -> Any:
        reply = self.shadow.GetShadow(pb.GetShadowRequest(device_id=device_id))
        return json.loads(reply.document_json)


def _mosquitto_broker(
    tmp: Path, accounts: dict[str, str], persistence: bool
) -> tuple[subprocess.Popen[bytes], int]:
    if not shutil.which("mosquitto") and not os.path.exists("/usr/sbin/mosquitto"):
        service_missing("Mosquitto", FileNotFoundError("mosquitto"))
    port = free_port()
    admin = accounts.pop("ota-admin")
    conf = mosquitto.write_config(
        tmp / "mosquitto",
        "127.0.0.1",
        port,
        ("ota-admin", admin),
        accounts,
        persistence=persistence,
    )
    process = mosquitto.start(conf)
    mosquitto.wait_listening("127.0.0.1", port)
    return process, port


@pytest.fixture(params=BROKERS)
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    with build_stack(request, tmp_path, request.param) as built:
        yield built


@contextlib.contextmanager
def build_stack(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str, *, persistence: bool = False
) -> Iterator[Stack]:
    """The stack on broker `kind` ("mosquitto" or "amqtt"). With `persistence`, Mosquitto saves
    its sessions to disk as deployments run it, so they outlive a broker restart (amqtt keeps
    sessions in memory only)."""
    passwords = {
        name: secrets.token_urlsafe(16) for name in ("ota-admin", "ota-gateway", "ota-app")
    }
    hashes = {name: hash_password(pw) for name, pw in passwords.items()}
    runner = AsyncThread()
    process: subprocess.Popen[bytes] | None = None
    accounts: DynsecAccounts | None = None
    broker_run: tuple[asyncio.Event, Any] | None = None

    engine: Engine
    if kind == "mosquitto":
        engine = request.getfixturevalue("postgres_engine")
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE devices, shadow_events"))
        process, port = _mosquitto_broker(tmp_path, dict(hashes), persistence)
        accounts = DynsecAccounts(
            MqttEndpoint("127.0.0.1", port, "ota-admin", passwords["ota-admin"]),
            client_id=f"dynsec-{secrets.token_hex(3)}",
        )
    else:
        engine = db.make_engine(f"sqlite:///{tmp_path / 'ota.db'}")
        db.run_migrations(engine, MIGRATIONS, "alembic_version_shadow")
        port = free_port()

    service = ShadowService(ShadowStore(engine), broker_accounts=accounts)
    # Timed as in production (tests read ota_grpc_request_seconds to see a call finish).
    server, shadow_port = create_server(
        ShadowSettings(listen="127.0.0.1:0"), service, [server_metrics_interceptor()]
    )
    server.start()
    shadow_address = f"127.0.0.1:{shadow_port}"

    def start_broker() -> None:
        nonlocal process, broker_run
        if kind == "mosquitto":
            process = mosquitto.start(tmp_path / "mosquitto" / "mosquitto.conf")
        else:
            services = {k: v for k, v in hashes.items() if k != "ota-admin"}
            config = broker_config("127.0.0.1", port, shadow_address, services)
            broker_run = runner.start(lambda stop: run_broker(config, stop))
        mosquitto.wait_listening("127.0.0.1", port)

    def stop_broker() -> None:
        nonlocal process, broker_run
        if process is not None:
            process.terminate()  # SIGTERM: Mosquitto saves its persistence file and exits
            assert process.wait(TIMEOUT) == 0, "Mosquitto did not exit cleanly"
            process = None
        if broker_run is not None:
            runner.stop(*broker_run)
            broker_run = None

    if kind == "amqtt":
        start_broker()

    channel = grpc.insecure_channel(shadow_address)
    gateway_settings = GatewaySettings(
        mqtt=MqttEndpoint("127.0.0.1", port, "ota-gateway", passwords["ota-gateway"]),
        client_id=f"ota-gateway-{secrets.token_hex(3)}",
        shadow_address=shadow_address,
        shared_group="ota-gateway" if kind == "mosquitto" else "",
    )
    built = Stack(
        broker=kind,
        mqtt_host="127.0.0.1",
        mqtt_port=port,
        shadow_address=shadow_address,
        shadow=shadow_pb2_grpc.ShadowServiceStub(channel),
        service=service,
        app=MqttEndpoint("127.0.0.1", port, "ota-app", passwords["ota-app"]),
        gateway_endpoint=gateway_settings.mqtt,
        runner=runner,
        gateway_settings=gateway_settings,
        broker_control=BrokerControl(stop=stop_broker, start=start_broker),
    )
    try:
        yield built
    finally:
        for device in built.devices:
            device.close()
        built.stop_gateway()
        if broker_run is not None:
            runner.stop(*broker_run)
        runner.close()
        channel.close()
        server.stop(None)
        if accounts is not None:
            accounts.close()
        if process is not None:
            process.terminate()
            process.wait(TIMEOUT)
        if kind == "amqtt":
            engine.dispose()


def gateway_subprocess(stack: Stack, log: Path) -> subprocess.Popen[bytes]:
    """The gateway as users run it: `python -m services.gateway`, configured by environment."""
    settings = stack.gateway_settings
    env = {
        **os.environ,
        "OTA_MQTT_URL": settings.mqtt.url(),
        "OTA_GATEWAY_CLIENT_ID": settings.client_id,
        "OTA_SHADOW_ADDRESS": settings.shadow_address,
        "OTA_GATEWAY_SHARED_GROUP": settings.shared_group,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "services.gateway"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll `condition` until it holds or `timeout` passes; returns whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(0.05)
    return True
