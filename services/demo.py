"""`make demo`: the whole update flow on one machine, on the embedded default.

It starts the stack `make up` starts (broker, shadow service, gateway, artifact service and
download plane, rollout service, Celery worker) in a temporary directory, on the embedded
default: amqtt, SQLite, a SQLite-file Celery broker, a local artifact directory. It registers
50 devices and runs them in the fleet simulator (the real agent over in-memory A/B slots),
uploads build 1.1.0 and rolls it out 10% -> 50% -> 100% with `otactl rollouts watch` live on
screen, then uploads build 1.2.0, which fails its health check on the devices of three of the
five sites: the canary stage aborts the rollout and rolls the canary back, and nobody else is
touched. It prints a summary and stops everything it started.

The documented environment variables move it onto real services: `OTA_DATABASE_URL`
(PostgreSQL), `OTA_MQTT_BROKER=mosquitto`, `OTA_CELERY_BROKER_URL` (Redis),
`OTA_ARTIFACTS_STORAGE=s3` with `OTA_S3_*`.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from device_agent.simulator import FleetSettings, FleetSimulator
from ota_client import OtaClient
from ota_client.settings import ClientSettings
from services import devstack

T = TypeVar("T")
SITES = ("berlin", "lisbon", "osaka", "austin", "sydney")
DEVICES = 50
HARDWARE = "gw-100"
FACTORY = "1.0.0"
GOOD, BAD = "1.1.0", "1.2.0"
BUILD_BYTES = 256 * 1024
OTACTL = Path(sys.executable).parent / "otactl"


def say(text: str = "") -> None:
    print(text, flush=True)


class Fleet:
    """The fleet simulator on its own asyncio loop, in a background thread."""

    def __init__(self, settings: FleetSettings, credentials: list[tuple[str, str]]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fleet", daemon=True)
        self.thread.start()
        self.simulator = self.call(self._build(settings, credentials))

    async def _build(
        self, settings: FleetSettings, credentials: list[tuple[str, str]]
    ) -> FleetSimulator:
        return FleetSimulator(settings, credentials)

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def running_versions(self) -> Counter[str]:
        outcomes = self.simulator.outcomes()
        return Counter(outcome.running.version for outcome in outcomes.values())

    def close(self) -> None:
        try:
            self.call(self.simulator.stop(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def otactl(env: Mapping[str, str], *args: str, show: bool = True) -> int:
    """Run `otactl` as an operator would, showing the command and its output."""
    if show:
        say(f"$ otactl {' '.join(args)}")
    return subprocess.run([str(OTACTL), *args], env=dict(env), check=False).returncode


def rollout(
    ota: OtaClient, env: Mapping[str, str], rollout_id: str, artifact_id: str
) -> tuple[int, float]:
    """Create, start and watch a canary rollout; returns watch's exit code and the seconds."""
    code = otactl(
        env,
        "rollouts",
        "create",
        "--id",
        rollout_id,
        "--artifact",
        artifact_id,
        "--tag",
        "fleet=demo",
        "--stage",
        "10%",
        "--stage",
        "50%",
        "--stage",
        "100%",
        "--failure-threshold",
        "20%",
        "--min-finished",
        "3",
        "--timeout",
        "120",
        "--rollback-on-abort",
    )
    if code != 0:
        raise SystemExit(f"otactl rollouts create failed ({code})")
    began = time.monotonic()
    if otactl(env, "rollouts", "start", rollout_id) != 0:
        raise SystemExit("otactl rollouts start failed")
    code = otactl(env, "rollouts", "watch", rollout_id, "--interval", "0.5")
    return code, time.monotonic() - began


def run(root: Path, env: Mapping[str, str]) -> int:
    began = time.monotonic()
    stack_root = root / ".devstack"
    say("== starting the stack (the processes `make up` starts) ==")
    endpoints = devstack.up(stack_root, env)
    endpoints_file = stack_root / "endpoints.json"
    operator_env = {k: v for k, v in os.environ.items() if not k.startswith("OTA_")}
    operator_env["OTA_ENDPOINTS"] = str(endpoints_file)
    if not sys.stdout.isatty():
        operator_env.setdefault("COLUMNS", "150")
    fleet: Fleet | None = None
    with OtaClient(ClientSettings.load(endpoints_file, env={})) as ota:
        try:
            say(f"\n== registering {DEVICES} devices on {len(SITES)} sites ==")
            credentials = []
            sites: dict[str, str] = {}
            for i in range(DEVICES):
                device_id = f"demo-{i:03d}"
                sites[device_id] = SITES[i % len(SITES)]
                tags = {"fleet": "demo", "site": sites[device_id]}
                registered = ota.shadow.register_device(device_id, tags)
                credentials.append((device_id, registered.credentials.password))
            key = ota.artifacts.signing_key()
            fleet = Fleet(
                FleetSettings(
                    mqtt_host=endpoints["mqtt"]["host"],
                    mqtt_port=endpoints["mqtt"]["port"],
                    download_base_url=endpoints["downloads"],
                    trusted_keys={key.key_id: base64.b64decode(key.public_key)},
                    work_dir=root / "devices",
                    hardware=HARDWARE,
                    factory_version=FACTORY,
                ),
                credentials,
            )
            seconds = fleet.call(fleet.simulator.start())
            say(f"{DEVICES} simulated devices connected in {seconds:.1f} s, all on {FACTORY}")

            say(f"\n== rollout 1: build {GOOD}, canary 10% -> 50% -> 100% ==")
            good = upload(ota, root, GOOD)
            good_code, good_seconds = rollout(ota, operator_env, f"demo-{GOOD}", good)

            broken_sites = SITES[:3]
            say(
                f"\n== rollout 2: build {BAD}, which fails its health check on the devices "
                f"in {', '.join(broken_sites)} =="
            )
            fleet.simulator.break_build(
                BAD, [d for d, site in sites.items() if site in broken_sites]
            )
            bad = upload(ota, root, BAD)
            bad_code, bad_seconds = rollout(ota, operator_env, f"demo-{BAD}", bad)

            versions = fleet.running_versions()
            first = ota.rollouts.get(f"demo-{GOOD}")
            second = ota.rollouts.get(f"demo-{BAD}")
            second_counts = second.progress.by_status
            notified = sum(second_counts.values())
            # After the abort every device desires GOOD again: the rollout set the canary's
            # desired firmware back, and nobody else's was ever changed.
            desire_good = sum(
                (ota.shadow.get_shadow(d).document["state"].get("desired") or {})
                .get("firmware", {})
                .get("version")
                == GOOD
                for d in sites
            )
            say("\n== summary ==")
            say(
                f"rollout demo-{GOOD}: {first.status} in {good_seconds:.0f} s, "
                f"{first.progress.by_status.get('SUCCEEDED', 0)}/{DEVICES} SUCCEEDED"
            )
            say(
                f"rollout demo-{BAD}: {second.status} in {bad_seconds:.0f} s ({second.reason}): "
                f"{notified} canary devices notified, {second_counts.get('FAILED', 0)} failed "
                f"(their agents rolled back), {second_counts.get('ROLLED_BACK', 0)} rolled back "
                f"by the rollout, {second.progress.not_started} never notified; "
                f"{desire_good} devices desire {GOOD}"
            )
            say("the fleet runs: " + ", ".join(f"{v} on {n}" for v, n in sorted(versions.items())))
            say(f"demo took {time.monotonic() - began:.0f} s")
            ok = (
                good_code == 0
                and first.status == "COMPLETED"
                and bad_code == 3
                and second.status == "ABORTED"
                and versions == Counter({GOOD: DEVICES})
                and desire_good == DEVICES
                and notified + second.progress.not_started == DEVICES
                and second.progress.not_started > 0
            )
            say("the demo ended as expected" if ok else "the demo did NOT end as expected")
            return 0 if ok else 1
        finally:
            if fleet is not None:
                fleet.close()
            say("\n== stopping the stack ==")
            devstack.down(stack_root)


def upload(ota: OtaClient, root: Path, version: str) -> str:
    build = root / f"firmware-{version}.img"
    build.write_bytes(os.urandom(BUILD_BYTES))
    artifact = ota.artifacts.upload(build, "demo-firmware", version, [HARDWARE])
    say(
        f"uploaded {build.name} ({BUILD_BYTES // 1024} KiB): artifact {artifact.artifact_id}, "
        f"signed by {artifact.key_id}"
    )
    return artifact.artifact_id


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="ota-demo-"))
    try:
        code = run(root, os.environ)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
