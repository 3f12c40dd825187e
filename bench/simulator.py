"""Fleet simulator benchmark: N simulated devices in one process, memory per device and the time
to connect them all.

    .venv/bin/python bench/simulator.py --devices 5000

Starts Mosquitto from the project's deploy/ configuration (dynamic security, every device its
own account written into the plugin's file by hash, as bench/fanout.py does, instead of N
registrations), then, each in a fresh process against that broker:

- baseline: N bare aiomqtt clients, each connected with its credentials and subscribed to the
  same five topics the agent subscribes to (what one MQTT connection costs in Python);
- simulator: `device_agent.simulator.FleetSimulator` with N devices: the real agent per device
  (subscribe, report, resync request), in-memory slots, one shared HTTP session.

Each process measures its RSS before creating its clients and once all are connected; memory
per device = RSS delta / N. It prints both, and the simulator's ratio to the baseline. No shadow
service or gateway runs, so the devices' resync requests go unanswered: this measures the
devices, not the platform.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from device_agent.simulator import (  # noqa: E402
    FleetSettings,
    rss_bytes,
    start_measured,
    summary,
)
from services.broker import mosquitto  # noqa: E402
from services.shadow import credentials  # noqa: E402

TOPICS = (
    "state/update/delta",
    "state/update/accepted",
    "state/update/rejected",
    "state/get/accepted",
    "state/get/rejected",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the measured processes -----------------------------------------------------------------


async def baseline(port: int, devices: list[tuple[str, str]], concurrency: int) -> dict[str, Any]:
    import aiomqtt

    rss_before = rss_bytes()
    gate = asyncio.Semaphore(concurrency)
    stop = asyncio.Event()
    readies: list[asyncio.Event] = []

    async def device(device_id: str, password: str, ready: asyncio.Event) -> None:
        async with aiomqtt.Client(
            "127.0.0.1",
            port,
            username=device_id,
            password=password,
            identifier=device_id,
            keepalive=60,
            protocol=aiomqtt.ProtocolVersion.V311,
        ) as client:
            for topic in TOPICS:
                await client.subscribe(f"{device_id}/{topic}", qos=1)
            ready.set()
            await stop.wait()

    async def connect(device_id: str, password: str) -> None:
        async with gate:
            ready = asyncio.Event()
            readies.append(ready)
            tasks.append(asyncio.create_task(device(device_id, password, ready)))
            await ready.wait()

    tasks: list[asyncio.Task[None]] = []
    began = time.perf_counter()
    await asyncio.gather(*(connect(d, p) for d, p in devices))
    seconds = time.perf_counter() - began
    await asyncio.sleep(1.0)
    rss_after = rss_bytes()
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"seconds": seconds, "rss_before": rss_before, "rss_after": rss_after}


async def simulator(
    port: int, devices: list[tuple[str, str]], concurrency: int, work: Path
) -> dict[str, Any]:
    key = secrets.token_bytes(32)  # no update is sent: any key will do
    settings = FleetSettings(
        mqtt_host="127.0.0.1",
        mqtt_port=port,
        download_base_url="http://127.0.0.1:9",
        trusted_keys={"0123456789abcdef": key},
        work_dir=work,
        connect_concurrency=concurrency,
    )
    fleet, measured = await start_measured(settings, devices)
    counts = summary(fleet.outcomes())
    connected = sum(o.connected for o in fleet.outcomes().values())
    await fleet.stop()
    return {
        "seconds": measured.connect_seconds,
        "rss_before": measured.rss_before,
        "rss_after": measured.rss_after,
        "connected": connected,
        "states": counts,
    }


def role_main(args: argparse.Namespace) -> None:
    devices = [tuple(d) for d in json.loads(sys.stdin.readline())]
    typed: list[tuple[str, str]] = [(str(d), str(p)) for d, p in devices]
    if args.role == "baseline":
        result = asyncio.run(baseline(args.port, typed, args.connect_concurrency))
    else:
        result = asyncio.run(simulator(args.port, typed, args.connect_concurrency, Path(args.work)))
    print(json.dumps(result), flush=True)


# --- the coordinator ------------------------------------------------------------------------


def measure(role: str, port: int, devices: list[tuple[str, str]], args: Any, work: Path) -> Any:
    process = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--role",
            role,
            "--port",
            str(port),
            "--connect-concurrency",
            str(args.connect_concurrency),
            "--work",
            str(work / f"{role}-devices"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    output, _ = process.communicate(json.dumps(devices) + "\n", timeout=1800)
    if process.returncode != 0:
        raise RuntimeError(f"the {role} process failed ({process.returncode})")
    return json.loads(output.strip().splitlines()[-1])


def per_device_kib(result: dict[str, Any], n: int) -> float:
    return float(result["rss_after"] - result["rss_before"]) / n / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--connect-concurrency", type=int, default=200)
    parser.add_argument("--role", default="coordinator")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--work", default="")
    args = parser.parse_args()
    if args.role != "coordinator":
        role_main(args)
        return
    n = args.devices
    ids = [f"sim-{i:06d}" for i in range(n)]
    passwords = {d: base64.b64encode(os.urandom(12)).decode() for d in ids}
    hashes = {d: credentials.hash_password(p) for d, p in passwords.items()}
    admin = credentials.hash_password(secrets.token_urlsafe(16))
    print(
        f"fleet simulator: {n} devices in one process against Mosquitto "
        f"({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="ota-sim-bench-") as tmp:
        work = Path(tmp)
        port = free_port()
        conf = mosquitto.write_config(
            work / "mosquitto",
            "127.0.0.1",
            port,
            ("ota-admin", admin),
            {},
            devices=hashes.items(),
            persistence=False,
        )
        broker = mosquitto.start(conf, work / "mosquitto.out")
        try:
            mosquitto.wait_listening("127.0.0.1", port)
            devices = list(passwords.items())
            base = measure("baseline", port, devices, args, work)
            sim = measure("simulator", port, devices, args, work)
        finally:
            broker.send_signal(signal.SIGTERM)
            try:
                broker.wait(15)
            except subprocess.TimeoutExpired:
                broker.kill()
    print(f"{'':>22} {'connect s':>10} {'devices/s':>10} {'KiB/device':>11}")
    for name, result in (("bare aiomqtt clients", base), ("simulated agents", sim)):
        print(
            f"{name:>22} {result['seconds']:>10.1f} {n / result['seconds']:>10,.0f} "
            f"{per_device_kib(result, n):>11.1f}"
        )
    print(
        f"simulator / baseline: memory {per_device_kib(sim, n) / per_device_kib(base, n):.2f}, "
        f"connect time {sim['seconds'] / base['seconds']:.2f}; "
        f"connected {sim['connected']}/{n}; states {sim['states']}"
    )
    print("target: <= 20 KiB per simulated device")


if __name__ == "__main__":
    main()
