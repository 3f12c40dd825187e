"""The agent's download retries against a real download plane, and a newer desired arriving in
the middle of a download, driven through the fleet simulator (each device is the real agent).

The plane here is a second one over the `fleet`'s artifact store and bytes, so a test can set
its limits and URL lifetime: the server compares only the path of a firmware URL, so the
desired URL names this plane's origin. No timing assertions: a test waits for what the agent
logs or reports, within generous bounds.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from device_agent.domain import Phase, RetryPolicy
from device_agent.simulator import DeviceOutcome, Faults, FleetSettings, FleetSimulator
from services.artifacts.download_plane import PlaneLimits, RunningPlane, start_download_plane
from services.artifacts.service import DownloadService
from services.artifacts.storage import LocalStorage
from services.artifacts.store import ArtifactStore
from services.common import db
from tests.agent.conftest import Fleet
from tests.artifacts.conftest import LoopThread

IMAGE = os.urandom(200_000)
WAIT_SECONDS = 120.0


@dataclass
class Plane:
    downloads: DownloadService
    running: RunningPlane
    loop: LoopThread

    @property
    def base_url(self) -> str:
        return self.running.plane.base_url

    def hold_every_slot(self, hold: bool) -> None:
        """Take (or give back) every download slot, as other devices' downloads would."""
        slots = self.running.plane.slots

        def change() -> None:
            slots.active = slots.limit if hold else 0

        self.loop.loop.call_soon_threadsafe(change)


@pytest.fixture
def plane(fleet: Fleet) -> Iterator[Plane]:
    engine = db.make_engine(f"sqlite:///{fleet.tmp / 'artifacts.db'}")
    downloads = DownloadService(ArtifactStore(engine), LocalStorage(fleet.tmp / "artifact-bytes"))
    loop = LoopThread()
    running = loop.run(
        start_download_plane(downloads, fleet.stack.shadow_address, "127.0.0.1:0", PlaneLimits(1))
    )
    try:
        yield Plane(downloads, running, loop)
    finally:
        loop.run(running.stop())
        loop.close()
        engine.dispose()


@dataclass
class Device:
    simulator: FleetSimulator
    loop: LoopThread
    device_id: str

    def outcome(self) -> DeviceOutcome:
        return self.simulator.outcomes()[self.device_id]

    def wait(self, done: Callable[[DeviceOutcome], bool]) -> DeviceOutcome:
        outcomes = self.loop.run(
            self.simulator.wait_until(lambda o: done(o[self.device_id]), WAIT_SECONDS),
            timeout=WAIT_SECONDS + 10,
        )
        return outcomes[self.device_id]


@pytest.fixture
def make_device(fleet: Fleet, plane: Plane) -> Iterator[Callable[[RetryPolicy], Device]]:
    """One simulated device on `plane`, with the given download retry policy and a slow link
    (about 5 s per download, so a test can act while one runs)."""
    loops: list[tuple[LoopThread, FleetSimulator]] = []

    def make(retry: RetryPolicy) -> Device:
        endpoint = fleet.stack.register("dev-plane")
        password = endpoint.password or ""
        settings = FleetSettings(
            mqtt_host=fleet.stack.mqtt_host,
            mqtt_port=fleet.stack.mqtt_port,
            download_base_url=plane.base_url,
            trusted_keys={fleet.signer.key_id: fleet.signer.public_key_raw},
            work_dir=fleet.tmp / "sim",
            retry=retry,
            faults=Faults(slow=1.0, slow_bytes_per_second=40_000),
        )
        loop = LoopThread()

        async def build() -> FleetSimulator:
            return FleetSimulator(settings, [("dev-plane", password)])

        simulator = loop.run(build())
        loops.append((loop, simulator))
        loop.run(simulator.start())
        return Device(simulator, loop, "dev-plane")

    try:
        yield make
    finally:
        for loop, simulator in loops:
            loop.run(simulator.stop())
            loop.close()


def target(fleet: Fleet, plane: Plane, version: str) -> str:
    artifact = fleet.upload(IMAGE + version.encode(), version)
    url = f"{plane.base_url}/v1/artifacts/{artifact.artifact_id}"
    fleet.target("dev-plane", version, url)
    return url


def wait_logged(caplog: pytest.LogCaptureFixture, words: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while words not in caplog.text:
        assert time.monotonic() < deadline, f"the agent never logged {words!r}"
        time.sleep(0.05)


def test_busy_plane_429_is_retried_and_given_up_after_max_attempts(
    fleet: Fleet,
    plane: Plane,
    make_device: Callable[[RetryPolicy], Device],
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = make_device(RetryPolicy(0.2, 1.0, 4))  # 429 says Retry-After: 5, so 5-7.5 s each
    caplog.set_level(logging.INFO, logger="device_agent")
    # Busy, then free: the agent waits (Retry-After 5 s, jittered) and gets it.
    plane.hold_every_slot(True)
    target(fleet, plane, "2.0.0")
    wait_logged(caplog, "HTTP 429 too_many_downloads")
    plane.hold_every_slot(False)
    outcome = device.wait(lambda o: o.phase in (Phase.SUCCEEDED, Phase.FAILED))
    assert (outcome.running.version, outcome.phase) == ("2.0.0", Phase.SUCCEEDED), outcome
    # Busy for good: bounded retries, then failed with the reason; the running slot stays.
    plane.hold_every_slot(True)
    target(fleet, plane, "3.0.0")
    outcome = device.wait(
        lambda o: o.target is not None and o.target.version == "3.0.0" and o.phase is Phase.FAILED
    )
    assert outcome.running.version == "2.0.0"
    assert outcome.error is not None
    assert "gave up after 4 attempts" in outcome.error and "429" in outcome.error, outcome.error
    assert fleet.reported("dev-plane")["version"] == "2.0.0"


def test_an_expired_url_is_replaced_by_a_new_token(
    fleet: Fleet,
    plane: Plane,
    make_device: Callable[[RetryPolicy], Device],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Waits drawn up to 1-2 s: five retries all landing before the test lengthens the TTL
    # (it polls every 50 ms) would take an absurd run of near-zero draws.
    device = make_device(RetryPolicy(1.0, 2.0, 6))
    caplog.set_level(logging.INFO, logger="device_agent")
    plane.downloads.url_ttl_seconds = 0  # every one-time URL is expired when it is used
    target(fleet, plane, "2.0.0")
    wait_logged(caplog, "HTTP 410 url_expired")
    plane.downloads.url_ttl_seconds = 600
    outcome = device.wait(lambda o: o.phase in (Phase.SUCCEEDED, Phase.FAILED))
    assert (outcome.running.version, outcome.phase) == ("2.0.0", Phase.SUCCEEDED), outcome
    # Expired every time: a new token each attempt, and no endless loop.
    plane.downloads.url_ttl_seconds = 0
    target(fleet, plane, "3.0.0")
    outcome = device.wait(
        lambda o: o.target is not None and o.target.version == "3.0.0" and o.phase is Phase.FAILED
    )
    assert outcome.running.version == "2.0.0"
    assert outcome.error is not None and "gave up after 6 attempts" in outcome.error
    assert "url_expired" in outcome.error


def test_a_newer_desired_mid_download_replaces_the_download(
    fleet: Fleet, plane: Plane, make_device: Callable[[RetryPolicy], Device]
) -> None:
    device = make_device(RetryPolicy())
    target(fleet, plane, "2.0.0")
    device.wait(
        lambda o: (
            o.phase is Phase.DOWNLOADING and o.target is not None and o.target.version == "2.0.0"
        )
    )
    url = target(fleet, plane, "3.0.0")
    outcome = device.wait(lambda o: o.phase in (Phase.SUCCEEDED, Phase.FAILED, Phase.ROLLED_BACK))
    assert (outcome.running.version, outcome.running.url, outcome.phase) == (
        "3.0.0",
        url,
        Phase.SUCCEEDED,
    )
    assert outcome.boots == 2  # one reboot: 2.0.0 was never installed
    firmware = fleet.reported("dev-plane")
    assert (firmware["version"], firmware["state"]) == ("3.0.0", "succeeded")
