"""Rollout benchmark: one rollout to N simulated devices, end to end, on the real stack.

    .venv/bin/python bench/rollout.py --devices 10000

Starts the stack as `make up` does (`services.devstack up` in a temp dir): Mosquitto, the shadow
service, the gateway, the artifact service and its download plane, the rollout service and,
with a Celery broker (`--celery-broker`, default redis://127.0.0.1:6379/6, flushed first), its
Celery worker; PostgreSQL in a fresh database (dropped afterwards). It registers N devices
(written into the database and the broker's account file, or `--provision api`: through
RegisterDevice), uploads one artifact (256 KiB by default), and starts N real agents in
one FleetSimulator process. Then, timed from StartRollout: a rollout with one stage at 100%, no
rate cap, until every execution is SUCCEEDED (or it stops, or `--timeout`).

It samples, every half second, the rollout's progress (GetRollout: executions created =
devices notified, SUCCEEDED) and, in the simulator process, what the devices see (received the
update, run it), and prints when each milestone was reached, so the time can be placed:
notify (the pass and the fan-out), download + install (the devices), report (the gateway and
the next pass). Devices notified per minute come from the rollout's progress over time.
The target is absolute: every device SUCCEEDED within 120 s of StartRollout. Figures are
measured, never assumed; a run that does not finish says so, with where it stood.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import psycopg  # noqa: E402

from device_agent.domain import RetryPolicy  # noqa: E402
from device_agent.simulator import FleetSettings, FleetSimulator, rss_bytes, summary  # noqa: E402
from protos.artifacts.v1 import artifacts_pb2 as apb  # noqa: E402
from protos.artifacts.v1 import artifacts_pb2_grpc as apb_grpc  # noqa: E402
from protos.rollout.v1 import rollout_pb2 as rpb  # noqa: E402
from protos.rollout.v1 import rollout_pb2_grpc as rpb_grpc  # noqa: E402
from protos.shadow.v1 import shadow_pb2 as spb  # noqa: E402
from protos.shadow.v1 import shadow_pb2_grpc as spb_grpc  # noqa: E402
from services import devstack as devstack_module  # noqa: E402
from services.artifacts import signing  # noqa: E402
from services.broker import mosquitto  # noqa: E402
from services.common import db  # noqa: E402
from services.common.auth import bearer_channel  # noqa: E402
from services.shadow import credentials  # noqa: E402
from services.shadow.server import MIGRATIONS as SHADOW_MIGRATIONS  # noqa: E402

TARGET_SECONDS = 120.0
VERSION = "2.0.0"
IN_FLIGHT = 64
SAMPLE_SECONDS = 0.5
PHASE_SECONDS = 10.0  # how often the devices' update steps are counted for the breakdown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the simulator process ----------------------------------------------------------------------


async def simulate(job: dict[str, Any]) -> dict[str, Any]:
    """Connect the fleet, say so, then sample what the devices see until told to stop."""
    settings = FleetSettings(
        mqtt_host=job["mqtt_host"],
        mqtt_port=job["mqtt_port"],
        download_base_url=job["download_base_url"],
        trusted_keys={job["key_id"]: base64.b64decode(job["public_key"])},
        work_dir=Path(job["work_dir"]),
        connect_concurrency=job["connect_concurrency"],
        http_connections=job["http_connections"],
        retry=RetryPolicy(0.5, 10.0, 12),
    )
    devices = [(str(d), str(p)) for d, p in job["devices"]]
    rss_before = rss_bytes()
    fleet = FleetSimulator(settings, devices)
    seconds = await fleet.start(timeout=1800)
    connected = {"event": "connected", "seconds": seconds}
    connected["kib_per_device"] = (rss_bytes() - rss_before) / len(devices) / 1024
    print(json.dumps(connected), flush=True)
    samples: list[tuple[float, int, int]] = []
    stop = asyncio.ensure_future(
        asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    )
    version = job["version"]
    phases: list[tuple[float, dict[str, int]]] = []
    while not stop.done():
        received = running = 0
        steps: Counter[str] = Counter()
        for device in fleet.devices.values():
            outcome = device.outcome()
            running += outcome.running.version == version
            got = outcome.running.version == version or (
                outcome.target is not None and outcome.target.version == version
            )
            received += got
            if got and outcome.running.version != version:
                steps[outcome.phase.value if outcome.phase else "idle"] += 1
        now = time.time()
        samples.append((now, received, running))
        if not phases or now - phases[-1][0] >= PHASE_SECONDS:
            phases.append((now, dict(steps)))
        await asyncio.wait({stop}, timeout=SAMPLE_SECONDS)
    outcomes = fleet.outcomes()
    await fleet.stop()
    return {"event": "done", "samples": samples, "phases": phases, "states": summary(outcomes)}


def simulator_main() -> None:
    job = json.loads(sys.stdin.readline())
    print(json.dumps(asyncio.run(simulate(job))), flush=True)


# --- the coordinator ----------------------------------------------------------------------------


@contextmanager
def fresh_database(admin_dsn: str) -> Iterator[str]:
    name = f"ota_bench_rollout_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin_dsn.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def devstack(root: Path, command: str, env: Mapping[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.devstack", command],
        cwd=root,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"devstack {command} failed:\n{done.stdout}{done.stderr}")


def register(shadow: spb_grpc.ShadowServiceStub, n: int) -> list[tuple[str, str]]:
    ids = [f"bench-{i:06d}" for i in range(n)]
    devices: list[tuple[str, str]] = []
    for start in range(0, n, IN_FLIGHT):
        chunk = ids[start : start + IN_FLIGHT]
        calls = [
            shadow.RegisterDevice.future(
                spb.RegisterDeviceRequest(
                    device_id=d, tags={"fleet": "bench", "site": f"site-{i % 8}"}
                ),
                timeout=120,
            )
            for i, d in enumerate(chunk, start)
        ]
        for device_id, call in zip(chunk, calls, strict=True):
            devices.append((device_id, call.result().credentials.password))
    return devices


def provision(root: Path, database_url: str, mqtt_port: int, n: int) -> list[tuple[str, str]]:
    """N devices written straight into the shadow database (COPY) and Mosquitto's
    dynamic-security file, before the stack starts, as bench/fanout.py does: RegisterDevice
    (a broker account per call) takes ~0.1 s a device here, too slow to set up 10,000. The
    stack's own secrets are made first (devstack keeps an existing secrets.json and, for
    Mosquitto, an existing dynamic-security file), so its service accounts are in the file.
    Hashes use 1 iteration: the broker checks whatever it is told."""
    ids = [f"bench-{i:06d}" for i in range(n)]
    passwords = {d: secrets.token_urlsafe(12) for d in ids}
    hashes = {d: credentials.hash_password(p, iterations=1) for d, p in passwords.items()}
    state = root / ".devstack"
    state.mkdir()
    stack_secrets = devstack_module._secrets(state)  # the passwords `up` will use
    service_hashes = {k: credentials.hash_password(v) for k, v in stack_secrets.items()}
    mosquitto.write_config(
        state / "mosquitto",
        "127.0.0.1",
        mqtt_port,
        ("ota-admin", service_hashes["ota-admin"]),
        {k: v for k, v in service_hashes.items() if k != "ota-admin"},
        devices=hashes.items(),
    )
    engine = db.make_engine(database_url)
    db.run_migrations(engine, SHADOW_MIGRATIONS, "alembic_version_shadow")
    raw = engine.raw_connection()
    cursor: Any = raw.cursor()
    with (
        cursor as cur,
        cur.copy(
            "COPY devices (device_id, credential_hash, tags, created_at_ms, desired, reported,"
            " shadow_metadata, version, has_shadow) FROM STDIN"
        ) as copy,
    ):
        now_ms = int(time.time() * 1000)
        for i, d in enumerate(ids):
            tags = json.dumps({"fleet": "bench", "site": f"site-{i % 8}"})
            copy.write_row((d, hashes[d], tags, now_ms, "{}", "{}", "{}", 0, False))
    raw.commit()
    raw.close()
    engine.dispose()
    return list(passwords.items())


def upload(artifacts: apb_grpc.ArtifactServiceStub, size: int) -> apb.Artifact:
    data = os.urandom(size)

    def requests() -> Iterator[apb.UploadArtifactRequest]:
        yield apb.UploadArtifactRequest(
            metadata=apb.ArtifactMetadata(
                name="firmware", version=VERSION, compatible_hardware=["gw-100"]
            )
        )
        for start in range(0, size, 256 * 1024):
            yield apb.UploadArtifactRequest(chunk=data[start : start + 256 * 1024])
        yield apb.UploadArtifactRequest(end=apb.UploadEnd())

    artifact: apb.Artifact = artifacts.UploadArtifact(requests(), timeout=120)
    return artifact


def first_time(samples: list[tuple[float, int]], at_least: int) -> float | None:
    return next((t for t, v in samples if v >= at_least), None)


def per_minute(samples: list[tuple[float, int]], start: float) -> float:
    """Devices per minute from `start` until the count reached its final value (a rate: the
    phase may be shorter than a minute)."""
    if not samples or samples[-1][1] == 0:
        return 0.0
    total = samples[-1][1]
    last = first_time(samples, total) or samples[-1][0]
    return total / max(last - start, 1e-9) * 60


def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.devices
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTA_")}
    env["PYTHONPATH"] = str(REPO)
    if args.celery_broker:
        import redis

        redis.Redis.from_url(args.celery_broker).flushdb()
    result: dict[str, Any] = {"bench": "rollout", "devices": n, "artifact_bytes": args.artifact}
    with (
        tempfile.TemporaryDirectory(prefix="ota-rollout-bench-") as tmp,
        fresh_database(args.postgres_dsn) as database_url,
    ):
        root = Path(tmp)
        mqtt_port = free_port()
        env.update(
            OTA_DATABASE_URL=database_url,
            OTA_MQTT_BROKER="mosquitto",
            OTA_MQTT_PORT=str(mqtt_port),
            OTA_ROLLOUT_RECONCILE_SECONDS="1",
        )
        for setting in args.env or []:  # experiments: --env OTA_X=Y for every stack process
            name, _, value = setting.partition("=")
            env[name] = value
        result["env"] = dict(setting.partition("=")[::2] for setting in args.env or [])
        began = time.perf_counter()
        devices = provision(root, database_url, mqtt_port, n) if args.provision == "bulk" else []
        if args.celery_broker:
            env["OTA_CELERY_BROKER_URL"] = args.celery_broker
        devstack(root, "up", env)
        simulator: subprocess.Popen[str] | None = None
        try:
            endpoints = json.loads((root / ".devstack" / "endpoints.json").read_text())
            token = endpoints["operator_token"]
            shadow = spb_grpc.ShadowServiceStub(bearer_channel(endpoints["shadow"], token))
            artifacts = apb_grpc.ArtifactServiceStub(bearer_channel(endpoints["artifacts"], token))
            rollouts = rpb_grpc.RolloutServiceStub(bearer_channel(endpoints["rollout"], token))
            if args.provision == "api":
                devices = register(shadow, n)
            result["register_s"] = time.perf_counter() - began
            result["provision"] = args.provision
            print(f"{n} devices set up ({args.provision}) in {result['register_s']:.1f} s")
            artifact = upload(artifacts, args.artifact)
            signer = signing.load_or_create(root / ".devstack" / "artifact-signing-key.pem")
            simulator = subprocess.Popen(
                [sys.executable, __file__, "--role", "simulator"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert simulator.stdin is not None and simulator.stdout is not None
            job = {
                "mqtt_host": endpoints["mqtt"]["host"],
                "mqtt_port": endpoints["mqtt"]["port"],
                "download_base_url": endpoints["downloads"],
                "key_id": signer.key_id,
                "public_key": base64.b64encode(signer.public_key_raw).decode(),
                "work_dir": str(root / "sim"),
                "connect_concurrency": args.connect_concurrency,
                "http_connections": args.http_connections,
                "devices": devices,
                "version": VERSION,
            }
            simulator.stdin.write(json.dumps(job) + "\n")
            simulator.stdin.flush()
            connected = json.loads(simulator.stdout.readline())
            result["connect_s"] = connected["seconds"]
            result["kib_per_device"] = connected["kib_per_device"]
            print(f"{n} devices connected in {connected['seconds']:.1f} s", flush=True)

            spec = rpb.RolloutSpec(
                rollout_id="bench",
                artifact_id=artifact.artifact_id,
                firmware=rpb.Firmware(version=VERSION, url=artifact.download_url),
                selector=rpb.TargetSelector(tags={"fleet": "bench"}),
                stages=[rpb.Stage(percent=100)],
                timeout_seconds=max(600.0, args.timeout),
            )
            rollouts.CreateRollout(rpb.CreateRolloutRequest(spec=spec), timeout=300)
            start = time.time()
            rollouts.StartRollout(rpb.StartRolloutRequest(rollout_id="bench"), timeout=300)
            notified: list[tuple[float, int]] = []
            succeeded: list[tuple[float, int]] = []
            rollout = None
            next_report = start + 10
            while time.time() - start < args.timeout:
                try:
                    rollout = rollouts.GetRollout(
                        rpb.GetRolloutRequest(rollout_id="bench"), timeout=30
                    )
                except grpc.RpcError as exc:
                    print(f"GetRollout: {exc}", flush=True)
                    time.sleep(SAMPLE_SECONDS)
                    continue
                now = time.time()
                counts = rollout.progress.by_status
                notified.append((now, sum(counts.values())))
                succeeded.append((now, counts.get("SUCCEEDED", 0)))
                if now >= next_report:  # a run that never finishes still shows where it stood
                    next_report = now + 10
                    busy = {k: v for k, v in counts.items() if v}
                    print(f"  {now - start:6.1f} s: {busy}", flush=True)
                if counts.get("SUCCEEDED", 0) == n or rollout.status not in (rpb.RUNNING,):
                    break
                time.sleep(SAMPLE_SECONDS)
            simulator.stdin.write("stop\n")
            simulator.stdin.flush()
            done = json.loads(simulator.stdout.readline())
            simulator.wait(120)
        finally:
            if simulator is not None and simulator.poll() is None:
                simulator.kill()
            devstack(root, "down", env)

    samples = done["samples"]
    received = [(t, r) for t, r, _ in samples]
    running = [(t, x) for t, _, x in samples]

    def since(t: float | None) -> float | None:
        return None if t is None else round(t - start, 2)

    result.update(
        status=rpb.RolloutStatus.Name(rollout.status) if rollout is not None else "UNKNOWN",
        by_status={k: v for k, v in (rollout.progress.by_status.items() if rollout else []) if v},
        all_notified_s=since(first_time(notified, n)),
        all_received_s=since(first_time(received, n)),
        all_running_s=since(first_time(running, n)),
        all_succeeded_s=since(first_time(succeeded, n)),
        device_states=done["states"],
        # Devices that received the update but do not run it yet, by the step they are in.
        steps_over_time=[(round(t - start, 1), steps) for t, steps in done["phases"]],
    )
    result["notified_per_minute"] = round(per_minute(notified, start))
    result["received_per_minute"] = round(per_minute(received, start))
    result["succeeded_per_minute"] = round(per_minute(succeeded, start))
    return result


def describe(result: dict[str, Any]) -> None:
    n = result["devices"]

    def cell(value: Any) -> str:
        return "not reached" if value is None else f"{value:.1f}"

    print(
        f"rollout to {n:,} simulated devices, artifact {result['artifact_bytes'] // 1024} KiB, "
        f"one stage at 100%, no rate cap ({os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f})"
    )
    print(
        f"setup: {result['provision']} provisioning {result['register_s']:.1f} s, connected in "
        f"{result['connect_s']:.1f} s ({result['kib_per_device']:.1f} KiB per device)"
    )
    print(f"{'milestone (s after StartRollout)':<48} {'seconds':>12}")
    rows = (
        ("rollout: every device notified (executions)", result["all_notified_s"]),
        ("devices: every device received the update", result["all_received_s"]),
        ("devices: every device runs it", result["all_running_s"]),
        ("rollout: every execution SUCCEEDED", result["all_succeeded_s"]),
    )
    for name, value in rows:
        print(f"{name:<48} {cell(value):>12}")
    print(
        f"per minute, from StartRollout to the last one: notified "
        f"{result['notified_per_minute']:,}, received {result['received_per_minute']:,}, "
        f"SUCCEEDED {result['succeeded_per_minute']:,}"
    )
    print("devices between receiving the update and running it, by step:")
    for at, steps in result["steps_over_time"]:
        if at >= 0:
            print(f"  {at:6.1f} s: {steps}")
    print(f"rollout {result['status']} {result['by_status']}; devices {result['device_states']}")
    total = result["all_succeeded_s"]
    verdict = "met" if total is not None and total <= TARGET_SECONDS else "missed"
    print(f"target: every device SUCCEEDED <= {TARGET_SECONDS:.0f} s after StartRollout: {verdict}")
    print(json.dumps(result, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--artifact", type=int, default=256 * 1024, help="bytes")
    parser.add_argument("--celery-broker", default="redis://127.0.0.1:6379/6")
    parser.add_argument(
        "--postgres-dsn",
        default=os.environ.get(
            "OTA_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after (s)")
    parser.add_argument(
        "--env", action="append", metavar="OTA_X=Y", help="a setting for the stack (repeatable)"
    )
    parser.add_argument("--connect-concurrency", type=int, default=200)
    parser.add_argument("--http-connections", type=int, default=100)
    parser.add_argument(
        "--provision",
        choices=("bulk", "api"),
        default="bulk",
        help="devices written into the database and broker file, or RegisterDevice each",
    )
    parser.add_argument("--role", default="coordinator")
    args = parser.parse_args()
    if args.role == "simulator":
        simulator_main()
        return
    describe(run(args))


if __name__ == "__main__":
    main()
