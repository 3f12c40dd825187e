"""Fan-out benchmark: desired state for N devices -> delta messages received by N devices.

    .venv/bin/python bench/fanout.py --devices 1000 10000

For each N it starts, on loopback: Mosquitto (the project's deploy/ configuration with dynamic
security, every device with its own account), the shadow service and one gateway as processes
(PostgreSQL in a fresh database), and N subscribed simulated devices spread over subscriber
processes (one MQTT connection each, real credentials, its own delta topic; a minimal MQTT
3.1.1 client on asyncio, so the devices cost little per message and limit neither path). Then
it measures, in the same run:

- ours: `BatchUpdateDesired` in batches of 1,000 (as rollout chunk tasks call it) until every
  device has received its delta (through the outbox and the gateway);
- raw: one paho client publishing the same delta + documents messages at QoS 1 straight to the
  broker (no in-flight cap in paho, whose cap costs a scan of every message in flight per
  PUBACK), until every device has received its delta.

A device counts a round once it has received that many distinct delta versions (a QoS 1
duplicate counts once). It prints devices/s for both, the ratio, and the CPU time each process
used during each phase. Figures are measured, never assumed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import paho.mqtt.client as paho  # noqa: E402
import psycopg  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from protos.shadow.v1 import shadow_pb2 as pb  # noqa: E402
from protos.shadow.v1 import shadow_pb2_grpc  # noqa: E402
from services.broker import mosquitto  # noqa: E402
from services.common import db  # noqa: E402
from services.common.mqtt import MqttEndpoint  # noqa: E402
from services.common.mqtt_packets import (  # noqa: E402
    PINGREQ,
    connect_packet,
    next_packet,
    subscribe_packet,
)
from services.shadow import credentials  # noqa: E402
from services.shadow.server import MIGRATIONS  # noqa: E402

BATCH = 1000
DEVICES_PER_SUBSCRIBER = 5000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- subscriber processes ---------------------------------------------------------------------
#
# The simulated devices speak just enough MQTT 3.1.1 themselves (CONNECT with the device's own
# credentials, SUBSCRIBE to its delta topic at QoS 1, PUBLISH -> PUBACK, PINGREQ) over one
# asyncio connection each: per message that is a parse and a PUBACK, where aiomqtt (over paho)
# spent several times more, so the devices are no longer what limits either path.
# The packet bytes are services/common/mqtt_packets.py's, shared with the gateway's outbox.

KEEPALIVE_SECONDS = 600
CONNECTS_AT_ONCE = 200


class Rounds:
    """Which devices of this process received which delta versions; prints each full round."""

    def __init__(self, devices: int) -> None:
        self.devices = devices
        self.reached: dict[int, int] = {}  # round r -> devices that received r distinct deltas

    def received(self, versions: set[int], version: int) -> None:
        if version in versions:
            return  # a QoS 1 duplicate: the device already has this delta
        versions.add(version)
        done = len(versions)
        count = self.reached.get(done, 0) + 1
        self.reached[done] = count
        if count == self.devices:
            print(f"round {done} {time.time()}", flush=True)


class SimulatedDevice(asyncio.Protocol):
    """One device: its own connection, credentials and delta subscription."""

    def __init__(self, device_id: str, password: str, rounds: Rounds) -> None:
        self.device_id = device_id
        self.password = password
        self.delta_topic = f"{device_id}/state/update/delta".encode()
        self.rounds = rounds
        self.versions: set[int] = set()
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(
            connect_packet(self.device_id, self.device_id, self.password, KEEPALIVE_SECONDS)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(f"{self.device_id}: connection lost"))
        else:
            print(f"{self.device_id}: connection lost ({exc})", file=sys.stderr, flush=True)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        start = 0
        while (framed := next_packet(buffer, start)) is not None:
            pos, end = framed
            self._packet(buffer[start], buffer[pos:end])
            start = end
        self.buffer = buffer[start:]

    def _packet(self, header: int, body: bytes) -> None:
        kind = header >> 4
        if kind == 3:  # PUBLISH
            qos = (header >> 1) & 3
            topic_end = 2 + int.from_bytes(body[:2], "big")
            payload_start = topic_end + (2 if qos else 0)
            if qos == 1 and self.transport is not None:
                self.transport.write(b"\x40\x02" + body[topic_end:payload_start])
            if body[2:topic_end] == self.delta_topic:
                delta = json.loads(body[payload_start:])
                self.rounds.received(self.versions, int(delta["version"]))
        elif kind == 2:  # CONNACK
            if body[1] != 0:
                self.subscribed.set_exception(
                    ConnectionError(f"{self.device_id}: refused {body[1]}")
                )
            elif self.transport is not None:
                self.transport.write(subscribe_packet(1, self.delta_topic.decode()))
        elif kind == 9:  # SUBACK
            if body[2] == 0x80:
                self.subscribed.set_exception(PermissionError(f"{self.device_id}: SUBACK refused"))
            else:
                self.subscribed.set_result(None)


async def subscribe_slice(host: str, port: int, devices: list[tuple[str, str]]) -> None:
    """Connect one client per device, subscribe to its delta, report each complete round."""
    loop = asyncio.get_running_loop()
    rounds = Rounds(len(devices))
    connected: list[SimulatedDevice] = []
    gate = asyncio.Semaphore(CONNECTS_AT_ONCE)  # connections complete instead of piling up

    async def connect(device_id: str, password: str) -> None:
        async with gate:
            _, device = await loop.create_connection(
                lambda: SimulatedDevice(device_id, password, rounds), host, port
            )
            await asyncio.wait_for(device.subscribed, 60)
            connected.append(device)

    await asyncio.gather(*(connect(d, p) for d, p in devices))
    print("ready", flush=True)
    while True:  # keep every session alive for as long as the coordinator needs it
        await asyncio.sleep(KEEPALIVE_SECONDS / 2)
        for device in connected:
            if device.transport is not None:
                device.transport.write(PINGREQ)


def subscriber_main(args: argparse.Namespace) -> None:
    devices = json.loads(sys.stdin.readline())
    asyncio.run(subscribe_slice(args.host, args.port, [(d, p) for d, p in devices]))


# --- the coordinator --------------------------------------------------------------------------

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy_seconds() -> float:
    """CPU time every core of the machine has spent not idle so far."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICKS


class CpuMeter:
    """Where the CPU went during a phase: our processes by role, and the rest of the machine
    (PostgreSQL, this coordinator and its raw publisher, anyone else's work)."""

    def __init__(self, roles: dict[str, list[int]]) -> None:
        self.roles = roles
        self.started = self._sample()

    def _sample(self) -> dict[str, float]:
        sample = {role: sum(cpu_seconds(p) for p in pids) for role, pids in self.roles.items()}
        sample["machine"] = machine_busy_seconds()
        return sample

    def stop(self) -> dict[str, float]:
        now = self._sample()
        used = {role: now[role] - self.started[role] for role in now}
        used["rest"] = used.pop("machine") - sum(used.values())
        return used


@contextmanager
def fresh_database(admin_dsn: str) -> Iterator[str]:
    name = f"ota_fanout_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_dsn.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv, env={**os.environ, **env}, stdout=log.open("ab"), stderr=subprocess.STDOUT
    )


def wait_rounds(subscribers: list[subprocess.Popen[str]], round_no: int, timeout: float) -> float:
    """Block until every subscriber reported `round_no`; the time the last one completed."""
    pending = {s.stdout: s for s in subscribers if s.stdout}
    done_at = 0.0
    deadline = time.monotonic() + timeout
    while pending:
        ready, _, _ = select.select(list(pending), [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"round {round_no}: {len(pending)} subscribers still waiting")
        for stream in ready:
            line = stream.readline().split()
            if line[:2] == ["round", str(round_no)]:
                done_at = max(done_at, float(line[2]))
                del pending[stream]
    return done_at


def run_one(n: int, admin_dsn: str, work: Path, per_subscriber: int) -> dict[str, Any]:
    ids = [f"bench-{i:06d}" for i in range(n)]
    passwords = {d: secrets.token_urlsafe(12) for d in ids}
    # Iterations 1 keeps setup of 10,000 accounts fast; the broker checks whatever it is told.
    hashes = {d: credentials.hash_password(p, iterations=1) for d, p in passwords.items()}
    service_pw = {
        name: secrets.token_urlsafe(16) for name in ("ota-admin", "ota-gateway", "ota-app")
    }
    service_hashes = {k: credentials.hash_password(v) for k, v in service_pw.items()}
    port = free_port()
    conf = mosquitto.write_config(
        work / "mosquitto",
        "127.0.0.1",
        port,
        ("ota-admin", service_hashes["ota-admin"]),
        {k: v for k, v in service_hashes.items() if k != "ota-admin"},
        devices=hashes.items(),
        persistence=False,
    )
    processes: list[subprocess.Popen[bytes]] = []
    subscribers: list[subprocess.Popen[str]] = []
    with fresh_database(admin_dsn) as url:
        engine = db.make_engine(url)
        db.run_migrations(engine, MIGRATIONS, "alembic_version_shadow")
        raw = engine.raw_connection()
        cursor: Any = raw.cursor()
        with (
            cursor as cur,
            cur.copy(
                "COPY devices (device_id, credential_hash, tags, created_at_ms, desired, reported,"
                " shadow_metadata, version, has_shadow) FROM STDIN"
            ) as copy,
        ):
            for d in ids:
                copy.write_row((d, hashes[d], "{}", 0, "{}", "{}", "{}", 0, False))
        raw.commit()
        raw.close()
        engine.dispose()
        try:
            processes.append(mosquitto.start(conf, work / "mosquitto.out"))
            mosquitto.wait_listening("127.0.0.1", port)
            shadow_port = free_port()
            shadow = f"127.0.0.1:{shadow_port}"
            common = {"OTA_DATABASE_URL": url, "OTA_SHADOW_ADDRESS": shadow}
            processes.append(
                spawn(
                    [sys.executable, "-m", "services.shadow"],
                    {**common, "OTA_SHADOW_LISTEN": shadow},
                    work / "shadow.log",
                )
            )
            gateway_url = MqttEndpoint(
                "127.0.0.1", port, "ota-gateway", service_pw["ota-gateway"]
            ).url()
            processes.append(
                spawn(
                    [sys.executable, "-m", "services.gateway"],
                    {**common, "OTA_MQTT_URL": gateway_url},
                    work / "gateway.log",
                )
            )
            for start in range(0, n, per_subscriber):
                chunk = [(d, passwords[d]) for d in ids[start : start + per_subscriber]]
                sub = subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--role",
                        "subscriber",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert sub.stdin is not None
                sub.stdin.write(json.dumps(chunk) + "\n")
                sub.stdin.flush()
                subscribers.append(sub)
            for sub in subscribers:
                assert sub.stdout is not None
                if sub.stdout.readline().strip() != "ready":
                    raise RuntimeError("a subscriber failed to connect its devices")
            channel = grpc.insecure_channel(shadow)
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = shadow_pb2_grpc.ShadowServiceStub(channel)
            time.sleep(2)  # let the gateway connect and subscribe
            roles = {
                "gateway": [processes[2].pid],
                "shadow": [processes[1].pid],
                "broker": [processes[0].pid],
                "devices": [s.pid for s in subscribers],
            }

            # ours: BatchUpdateDesired in chunks, until every device has its delta
            patch = json.dumps({"firmware": {"version": "2.0.1", "url": "https://dl/fw/2.0.1"}})
            meter = CpuMeter(roles)
            start_ours = time.time()
            for i in range(0, n, BATCH):
                items = [
                    pb.DesiredPatch(device_id=d, desired_json=patch) for d in ids[i : i + BATCH]
                ]
                reply = stub.BatchUpdateDesired(
                    pb.BatchUpdateDesiredRequest(items=items), timeout=120
                )
                assert all(r.status == pb.BatchItemResult.OK for r in reply.results)
            written = time.time() - start_ours
            end_ours = wait_rounds(subscribers, 1, timeout=600)
            cpu_ours = meter.stop()

            # raw: the same messages published by one paho client straight to the broker
            delta = json.dumps(
                {"version": 2, "timestamp": int(time.time()), "state": json.loads(patch)}
            )
            documents = json.dumps(
                {"previous": None, "current": {"state": {"desired": json.loads(patch)}}}
            )
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw")
            client.username_pw_set("ota-app", service_pw["ota-app"])
            client.max_inflight_messages_set(0)
            client.max_queued_messages_set(0)
            client.connect("127.0.0.1", port)
            client.loop_start()
            meter = CpuMeter(roles)
            start_raw = time.time()
            infos = []
            for d in ids:
                infos.append(client.publish(f"{d}/state/update/delta", delta, qos=1))
                infos.append(client.publish(f"{d}/state/update/documents", documents, qos=1))
            for info in infos:
                info.wait_for_publish(120)
            end_raw = wait_rounds(subscribers, 2, timeout=600)
            cpu_raw = meter.stop()
            client.loop_stop()
            client.disconnect()
            channel.close()
        finally:
            for sub in subscribers:
                sub.kill()
            for process in reversed(processes):
                process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
    ours = n / (end_ours - start_ours)
    raw_rate = n / (end_raw - start_raw)
    return {
        "ours": ours,
        "raw": raw_rate,
        "ratio": ours / raw_rate,
        "seconds": {"ours": end_ours - start_ours, "raw": end_raw - start_raw},
        "written": written,
        "cpu": {"ours": cpu_ours, "raw": cpu_raw},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--role", default="coordinator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument(
        "--devices-per-subscriber",
        type=int,
        default=DEVICES_PER_SUBSCRIBER,
        help="simulated devices per subscriber process",
    )
    args = parser.parse_args()
    if args.role == "subscriber":
        subscriber_main(args)
        return
    load = os.getloadavg()
    print(
        "fan-out: BatchUpdateDesired -> outbox -> gateway -> Mosquitto -> N devices "
        f"({os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
        f"{args.devices_per_subscriber} devices per subscriber process)"
    )
    results = []
    for n in args.devices:
        with tempfile.TemporaryDirectory(prefix="ota-fanout-") as tmp:
            results.append((n, run_one(n, args.postgres, Path(tmp), args.devices_per_subscriber)))
        print(f"  {n:,} devices done", flush=True)
    print(f"{'devices':>8} {'ours dev/s':>12} {'raw paho dev/s':>15} {'ratio':>7}")
    for n, result in results:
        print(f"{n:>8} {result['ours']:>12,.0f} {result['raw']:>15,.0f} {result['ratio']:>7.2f}")
    print("targets: ours >= 1,700 devices/s and ratio >= 0.5")
    print("CPU seconds used during each phase (rest: PostgreSQL, this coordinator, anyone else):")
    for n, result in results:
        for phase in ("ours", "raw"):
            cpu = result["cpu"][phase]
            parts = " ".join(f"{role} {seconds:.2f}" for role, seconds in cpu.items())
            wall = f"{result['seconds'][phase]:.2f} s wall"
            if phase == "ours":
                wall += f" (BatchUpdateDesired calls done at {result['written']:.2f} s)"
            print(f"{n:>8} {phase:>4}: {wall}; {parts}")


if __name__ == "__main__":
    main()
