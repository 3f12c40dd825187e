"""The fleet simulator over the real stack (broker, gateway, shadow, artifacts, download plane):
a few hundred simulated devices in this process complete an update, and injected faults give
exactly the failed / rolled_back reports their seeded draw says. No timing assertions.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent.domain import Phase, RetryPolicy
from device_agent.simulator import DeviceOutcome, Faults, FleetSettings, FleetSimulator
from tests.agent.conftest import Fleet
from tests.artifacts.conftest import LoopThread

IMAGE = os.urandom(40_000)
SETTLE_SECONDS = 240.0


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    try:
        yield thread
    finally:
        thread.close()


def simulate(fleet: Fleet, loop: LoopThread, n: int, faults: Faults) -> FleetSimulator:
    credentials = []
    for i in range(n):
        device_id = f"sim-{i:04d}"
        endpoint = fleet.stack.register(device_id)
        assert endpoint.password is not None
        credentials.append((device_id, endpoint.password))
    settings = FleetSettings(
        mqtt_host=fleet.stack.mqtt_host,
        mqtt_port=fleet.stack.mqtt_port,
        download_base_url=fleet.base_url,
        trusted_keys={fleet.signer.key_id: fleet.signer.public_key_raw},
        work_dir=fleet.tmp / "sim",
        retry=RetryPolicy(0.2, 5.0, 12),
        faults=faults,
    )

    async def build() -> FleetSimulator:
        return FleetSimulator(settings, credentials)

    simulator = loop.run(build())
    loop.run(simulator.start(), timeout=SETTLE_SECONDS)
    return simulator


def update_all(fleet: Fleet, simulator: FleetSimulator, version: str) -> str:
    artifact = fleet.upload(IMAGE, version)
    patch = {"firmware": {"version": version, "url": artifact.download_url}}
    fleet.stack.update_desired({device_id: patch for device_id in simulator.devices})
    return artifact.download_url


def reported_states(fleet: Fleet, device_ids: list[str], expected: Counter[str]) -> Counter[str]:
    """The shadow's reported states, once they are `expected` (the last reports may still be on
    their way through the gateway) or, failing that, as they stand after a generous wait."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        states = Counter(str(fleet.reported(d).get("state")) for d in device_ids)
        if states == expected or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def test_a_few_hundred_devices_complete_an_update(fleet: Fleet, loop: LoopThread) -> None:
    simulator = simulate(fleet, loop, 200, Faults())
    try:
        url = update_all(fleet, simulator, "2.0.0")
        outcomes = loop.run(simulator.wait_settled("2.0.0"), timeout=SETTLE_SECONDS + 10)
        assert {(o.running.version, o.running.url, o.phase) for o in outcomes.values()} == {
            ("2.0.0", url, Phase.SUCCEEDED)
        }
        assert all(o.boots == 2 for o in outcomes.values())  # one reboot into the new slot
        # The shadow tells the same truth (what a rollout reads).
        ids = sorted(simulator.devices)
        expected = Counter({"succeeded": 200})
        assert reported_states(fleet, ids, expected) == expected
        assert {fleet.reported(d)["version"] for d in ids[:20]} == {"2.0.0"}
    finally:
        loop.run(simulator.stop())


def test_injected_faults_give_the_expected_reports(fleet: Fleet, loop: LoopThread) -> None:
    faults = Faults(
        fail_install=0.1,
        fail_health=0.1,
        corrupt=0.05,
        offline=0.05,
        slow=0.05,
        offline_seconds=1.0,
        slow_bytes_per_second=20_000,
        seed=7,
    )
    simulator = simulate(fleet, loop, 200, faults)
    try:
        assigned = Counter(f for f in simulator.faults().values() if f)
        assert assigned == Counter(fail_install=20, fail_health=20, corrupt=10, offline=10, slow=10)
        update_all(fleet, simulator, "2.0.0")
        outcomes = loop.run(simulator.wait_settled("2.0.0"), timeout=SETTLE_SECONDS + 10)
        by_fault: dict[str | None, list[DeviceOutcome]] = {}
        for outcome in outcomes.values():
            by_fault.setdefault(outcome.fault, []).append(outcome)

        def phases(fault: str | None) -> set[tuple[str, Phase | None]]:
            return {(o.running.version, o.phase) for o in by_fault[fault]}

        assert phases("fail_install") == {("1.0.0", Phase.FAILED)}
        assert all("simulated install failure" in (o.error or "") for o in by_fault["fail_install"])
        assert phases("fail_health") == {("1.0.0", Phase.ROLLED_BACK)}
        assert all("health check" in (o.error or "") for o in by_fault["fail_health"])
        assert phases("corrupt") == {("1.0.0", Phase.FAILED)}
        assert all("sha256" in (o.error or "") for o in by_fault["corrupt"])
        # Offline in the middle of the download, slow links: late, but they get there.
        for fault in ("offline", "slow", None):
            assert phases(fault) == {("2.0.0", Phase.SUCCEEDED)}, fault
        assert all(o.boots == 3 for o in by_fault["offline"])  # off, on, reboot

        ids = sorted(simulator.devices)
        expected = Counter(succeeded=150, failed=30, rolled_back=20)
        assert reported_states(fleet, ids, expected) == expected
    finally:
        loop.run(simulator.stop())


def test_the_fault_draw_is_seeded() -> None:
    ids = [f"d{i}" for i in range(100)]
    faults = Faults(fail_install=0.13, fail_health=0.07, seed=3)
    assert faults.assign(ids) == faults.assign(list(ids))
    assert Counter(faults.assign(ids).values()) == Counter(fail_install=13, fail_health=7)
    assert faults.assign(ids) != Faults(fail_install=0.13, fail_health=0.07, seed=4).assign(ids)
    with pytest.raises(ValueError):
        Faults(fail_install=0.7, corrupt=0.5)


def test_the_memory_installer_verifies_the_bytes(tmp_path: Path) -> None:
    from device_agent.domain import Firmware
    from device_agent.errors import InstallError
    from device_agent.installer import sha256_of
    from device_agent.simulator import MemoryInstaller

    installer = MemoryInstaller(Firmware("1.0.0"))
    image = tmp_path / "image"
    image.write_bytes(b"new firmware")
    digest = sha256_of(image)
    with pytest.raises(InstallError):
        installer.install("a", image, Firmware("2.0.0", "u"), digest)  # the booted slot
    image.write_bytes(b"new firmware")
    with pytest.raises(InstallError, match="not the verified one"):
        installer.install("b", image, Firmware("2.0.0", "u"), "0" * 64)
    assert not image.exists()
    image.write_bytes(b"new firmware")
    installer.install("b", image, Firmware("2.0.0", "u"), digest)
    installer.activate("b")
    assert installer.booted().firmware == Firmware("2.0.0", "u")
    assert installer.health_check("b") is None
    assert installer.inactive() == "a"


def test_the_command_line_connects_a_fleet_and_prints_its_cost(fleet: Fleet) -> None:
    credentials = {}
    for i in range(20):
        endpoint = fleet.stack.register(f"cli-{i:02d}")
        credentials[f"cli-{i:02d}"] = endpoint.password
    path = fleet.tmp / "credentials.json"
    path.write_text(json.dumps(credentials))
    key = base64.b64encode(fleet.signer.public_key_raw).decode()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "device_agent.simulator",
            "--credentials",
            str(path),
            "--mqtt-host",
            fleet.stack.mqtt_host,
            "--mqtt-port",
            str(fleet.stack.mqtt_port),
            "--download-base-url",
            fleet.base_url,
            "--trusted-key",
            f"{fleet.signer.key_id}={key}",
            "--work-dir",
            str(fleet.tmp / "cli"),
            "--seconds",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=SETTLE_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "20 devices connected in" in done.stdout, done.stdout
    assert "KiB per device" in done.stdout
    assert "{'1.0.0/idle': 20}" in done.stdout
