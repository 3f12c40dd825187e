"""Fan-out benchmark: desired state for N devices -> delta messages received by N devices.

    .venv/bin/python bench/fanout.py --devices 1000 10000

For each N it starts, on loopback: Mosquitto (the project's deploy/ configuration with dynamic
security, every device with its own account), the shadow service and one gateway as processes
(PostgreSQL in a fresh database), and N subscribed simulated devices spread over subscriber
processes (one MQTT connection each, real credentials). Then it measures, in the same run:

- ours: `BatchUpdateDesired` in batches of 1,000 (as rollout chunk tasks call it) until every
  device has received its delta (through the outbox and the gateway);
- raw: one paho client publishing the same delta + documents messages at QoS 1 straight to the
  broker, until every device has received its delta.

It prints devices/s for both and the ratio. Figures are measured, never assumed.
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
from services.shadow import credentials  # noqa: E402
from services.shadow.server import MIGRATIONS  # noqa: E402

BATCH = 1000
DEVICES_PER_SUBSCRIBER = 2500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- subscriber processes ---------------------------------------------------------------------


async def subscribe_slice(host: str, port: int, devices: list[tuple[str, str]]) -> None:
    """Connect one client per device, subscribe to its delta, report each complete round."""
    import aiomqtt

    received = 0
    per_round = len(devices)
    queue: asyncio.Queue[None] = asyncio.Queue()

    async def device(device_id: str, password: str, ready: asyncio.Event) -> None:
        async with aiomqtt.Client(
            host, port, username=device_id, password=password, identifier=device_id, keepalive=300
        ) as client:
            await client.subscribe(f"{device_id}/state/update/delta", qos=1)
            ready.set()
            async for _ in client.messages:
                queue.put_nowait(None)

    readies = []
    tasks = []
    for device_id, password in devices:
        ready = asyncio.Event()
        readies.append(ready)
        tasks.append(asyncio.create_task(device(device_id, password, ready)))
        if len(tasks) % 200 == 0:
            await asyncio.sleep(0)  # let connections complete instead of piling up
    await asyncio.gather(*(r.wait() for r in readies))
    print("ready", flush=True)
    while True:
        await queue.get()
        received += 1
        if received % per_round == 0:
            print(f"round {received // per_round} {time.time()}", flush=True)


def subscriber_main(args: argparse.Namespace) -> None:
    devices = json.loads(sys.stdin.readline())
    asyncio.run(subscribe_slice(args.host, args.port, [tuple(d) for d in devices]))


# --- the coordinator --------------------------------------------------------------------------


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


def run_one(n: int, admin_dsn: str, work: Path) -> dict[str, float]:
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
            for start in range(0, n, DEVICES_PER_SUBSCRIBER):
                chunk = [(d, passwords[d]) for d in ids[start : start + DEVICES_PER_SUBSCRIBER]]
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

            # ours: BatchUpdateDesired in chunks, until every device has its delta
            patch = json.dumps({"firmware": {"version": "2.0.1", "url": "https://dl/fw/2.0.1"}})
            start_ours = time.time()
            for i in range(0, n, BATCH):
                items = [
                    pb.DesiredPatch(device_id=d, desired_json=patch) for d in ids[i : i + BATCH]
                ]
                reply = stub.BatchUpdateDesired(
                    pb.BatchUpdateDesiredRequest(items=items), timeout=120
                )
                assert all(r.status == pb.BatchItemResult.OK for r in reply.results)
            end_ours = wait_rounds(subscribers, 1, timeout=600)

            # raw: the same messages published by one paho client straight to the broker
            delta = json.dumps(
                {"version": 2, "timestamp": int(time.time()), "state": json.loads(patch)}
            )
            documents = json.dumps(
                {"previous": None, "current": {"state": {"desired": json.loads(patch)}}}
            )
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw")
            client.username_pw_set("ota-app", service_pw["ota-app"])
            client.max_inflight_messages_set(1000)
            client.max_queued_messages_set(0)
            client.connect("127.0.0.1", port)
            client.loop_start()
            start_raw = time.time()
            infos = []
            for d in ids:
                infos.append(client.publish(f"{d}/state/update/delta", delta, qos=1))
                infos.append(client.publish(f"{d}/state/update/documents", documents, qos=1))
            for info in infos:
                info.wait_for_publish(120)
            end_raw = wait_rounds(subscribers, 2, timeout=600)
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
    return {"devices": n, "ours": ours, "raw": raw_rate, "ratio": ours / raw_rate}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--role", default="coordinator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args()
    if args.role == "subscriber":
        subscriber_main(args)
        return
    print(
        "fan-out: BatchUpdateDesired -> outbox -> gateway -> Mosquitto -> N devices "
        f"({os.cpu_count()} cores)"
    )
    print(f"{'devices':>8} {'ours dev/s':>12} {'raw paho dev/s':>15} {'ratio':>7}")
    for n in args.devices:
        with tempfile.TemporaryDirectory(prefix="ota-fanout-") as tmp:
            result = run_one(n, args.postgres, Path(tmp))
        print(
            f"{n:>8} {result['ours']:>12,.0f} {result['raw']:>15,.0f} {result['ratio']:>7.2f}",
            flush=True,
        )
    print("targets: ours >= 1,700 devices/s and ratio >= 0.5")


if __name__ == "__main__":
    main()
