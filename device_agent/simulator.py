"""A fleet of simulated devices in one process, for rollout tests and benchmarks.

Each simulated device is the real `Agent` (the same `decide`, downloader, verification, boot
step and reports), with its own MQTT connection under its own credentials, and the download
plane reached through one HTTP session shared by the whole fleet. What is simulated is only the
hardware: `MemoryInstaller` keeps the two slots and the boot pointer in memory (it hashes the
image it is given, then drops the bytes), `MemoryStateFiles` keeps the agent's state and the
pending-commit marker in memory, and a "reboot" is a new `Agent` over the same installer and
state. Partial downloads go to a small per-device directory, as on a device, and are removed
once installed.

Faults are assigned per device from a seeded random draw, so a run is repeatable: an install
that fails (reported `failed`), a health check that fails (`rolled_back`), a download corrupted
after it arrived (`failed`, sha256), a device that drops offline when its download starts and
comes back later (resumes, then succeeds), a slow link (bytes/s cap), a silent device (stays
connected, reports its state, but ignores every command: it never answers a rollout). Faults
can also be given per device (`FleetSimulator(..., faults_of=...)`), so one fleet can hold
groups with different faults.

It does not own the stack: the broker, shadow, gateway and download plane run elsewhere, and
the devices must exist there already (registered, or written into the broker's accounts).

    python -m device_agent.simulator --credentials devices.json --download-base-url URL \\
        --trusted-key KEY_ID=BASE64 [--mqtt-host H --mqtt-port P] [--seconds 60]

prints the time to connect every device and the memory per device (RSS delta / devices).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from device_agent.agent import Agent, Downloader, ProgressCallback
from device_agent.boot import AgentState, StateFiles
from device_agent.config import AgentConfig
from device_agent.domain import Firmware, Manifest, Phase, RetryPolicy, Target
from device_agent.errors import InstallError
from device_agent.installer import SLOTS, Slot, sha256_of

log = logging.getLogger("device_agent.simulator")

# New faults go last: the seeded draw of the earlier ones stays the same.
FAULTS = ("fail_install", "fail_health", "corrupt", "offline", "slow", "silent")
TERMINAL = (Phase.SUCCEEDED, Phase.FAILED, Phase.ROLLED_BACK)


# --- the simulated hardware ---------------------------------------------------------------------


class MemoryInstaller:
    """The `Installer` interface over memory: two slots and a boot pointer. `install` hashes
    the image it is handed (the bytes must be the verified ones) and keeps only the digest."""

    __slots__ = ("_boot", "_slots", "broken_builds", "fail_health", "fail_install")

    def __init__(
        self,
        factory: Firmware,
        fail_install: bool = False,
        fail_health: bool = False,
        broken_builds: AbstractSet[str] = frozenset(),
    ):
        self._slots: dict[str, Slot] = {"a": Slot("a", factory, None)}
        self._boot = "a"
        self.fail_install = fail_install
        self.fail_health = fail_health
        # Versions that fail their health check (one set shared by the whole fleet).
        self.broken_builds = broken_builds

    def booted(self) -> Slot:
        return self._slots[self._boot]

    def inactive(self) -> str:
        return "b" if self._boot == "a" else "a"

    def install(self, slot: str, image: Path, firmware: Firmware, sha256: str) -> None:
        if slot not in SLOTS or slot == self._boot:
            raise InstallError(f"refusing to install into slot {slot!r}")
        try:
            digest = sha256_of(image)
        finally:
            image.unlink(missing_ok=True)
        if digest != sha256:
            raise InstallError(f"the image handed to slot {slot} is not the verified one")
        if self.fail_install:
            raise InstallError(f"simulated install failure writing slot {slot}")
        self._slots[slot] = Slot(slot, firmware, digest)

    def activate(self, slot: str) -> None:
        if slot not in self._slots:
            raise InstallError(f"slot {slot} holds no image")
        self._boot = slot

    def health_check(self, slot: str) -> str | None:
        if slot not in self._slots:
            return f"slot {slot} holds no image"
        image = self._slots[slot]
        if self.fail_health and image.sha256 is not None:
            return "simulated health check failure"
        if image.firmware.version in self.broken_builds:
            return f"build {image.firmware.version} fails its health check (simulated)"
        return None


class MemoryStateFiles(StateFiles):
    """`StateFiles` kept in memory: the agent's state and the pending-commit marker."""

    def __init__(self, factory_floor: str) -> None:  # no directory: nothing on disk
        self.factory_floor = factory_floor
        self._saved: AgentState | None = None
        self._pending_marker: dict[str, Any] | None = None

    def load(self) -> AgentState:
        if self._saved is None:
            return AgentState.from_json(None, self.factory_floor)
        return self._saved

    def save(self, state: AgentState) -> None:
        self._saved = state

    def pending(self) -> dict[str, Any] | None:
        return dict(self._pending_marker) if self._pending_marker is not None else None

    def set_pending(self, pending: dict[str, Any]) -> None:
        self._pending_marker = dict(pending)

    def clear_pending(self) -> None:
        self._pending_marker = None


# --- faults -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Faults:
    """Fractions of the fleet given each fault (disjoint sets, at most 1 in total), drawn from
    `seed`: the same seed and device list give the same devices the same faults."""

    fail_install: float = 0.0
    fail_health: float = 0.0
    corrupt: float = 0.0
    offline: float = 0.0
    slow: float = 0.0
    silent: float = 0.0
    offline_seconds: float = 3.0
    slow_bytes_per_second: int = 64 * 1024
    seed: int = 0

    def __post_init__(self) -> None:
        fractions = [getattr(self, name) for name in FAULTS]
        if any(not 0 <= f <= 1 for f in fractions) or sum(fractions) > 1:
            raise ValueError("fault fractions must be in [0, 1] and sum to at most 1")
        if self.offline_seconds < 0 or self.slow_bytes_per_second <= 0:
            raise ValueError("offline_seconds must be >= 0 and slow_bytes_per_second > 0")

    def assign(self, device_ids: Sequence[str]) -> dict[str, str]:
        """device id -> fault, for round(fraction * n) devices of each fault."""
        order = list(device_ids)
        random.Random(self.seed).shuffle(order)
        assigned: dict[str, str] = {}
        start = 0
        for name in FAULTS:
            count = round(getattr(self, name) * len(order))
            for device_id in order[start : start + count]:
                assigned[device_id] = name
            start += count
        return assigned


class SimDownloader(Downloader):
    """The agent's downloader with the device's link faults: a byte cap, a corruption of the
    received file, or a signal to drop offline once the download has started."""

    def __init__(
        self, config: AgentConfig, session: aiohttp.ClientSession, device: SimulatedDevice
    ) -> None:
        super().__init__(config, session)
        self.device = device

    async def obtain(
        self, target: Target, floor: str | None, progress: ProgressCallback
    ) -> tuple[Path, Manifest]:
        device = self.device
        if device.fault == "offline" and not device.went_offline:
            device.went_offline = True
            device.drop()
        if device.fault == "slow":
            progress = _throttled(progress, device.faults.slow_bytes_per_second)
        path, manifest = await super().obtain(target, floor, progress)
        if device.fault == "corrupt":
            _flip_a_byte(path)
        return path, manifest


def _throttled(progress: ProgressCallback, bytes_per_second: int) -> ProgressCallback:
    last = 0

    async def slow(received: int, size: int) -> None:
        nonlocal last
        # Sleeping in the read loop stops reading the socket: TCP backpressure, like a slow link.
        await asyncio.sleep(max(0, received - last) / bytes_per_second)
        last = received
        await progress(received, size)

    return slow


def _flip_a_byte(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]) if byte else b"\0")


# --- devices ------------------------------------------------------------------------------------


class SimAgent(Agent):
    def __init__(self, config: AgentConfig, device: SimulatedDevice) -> None:
        super().__init__(config, installer=device.installer, files=device.files)
        self.device = device

    async def handle(self, document: Any, resync: bool) -> None:
        if self.device.fault == "silent":
            self.device.ignore(document, resync)
            return
        await super().handle(document, resync)

    def new_downloader(self, session: aiohttp.ClientSession) -> Downloader:
        return SimDownloader(self.config, session, self.device)

    def on_connected(self) -> None:
        self.device.on_connected()


@dataclass(frozen=True)
class DeviceOutcome:
    """What a simulated device runs and the last outcome it reported."""

    device_id: str
    running: Firmware
    phase: Phase | None  # of the last update (None: none yet); job phase while one runs
    target: Target | None
    error: str | None
    fault: str | None
    boots: int
    connected: bool


class SimulatedDevice:
    # Thousands of these live in one process: no per-instance dict, no task or event of its
    # own (the agent is switched off by `Agent.stop()`).
    __slots__ = (
        "agent",
        "boots",
        "config",
        "dropping",
        "fault",
        "faults",
        "files",
        "ignored",
        "installer",
        "powered",
        "ready",
        "went_offline",
    )

    def __init__(self, config: AgentConfig, fault: str | None, faults: Faults) -> None:
        self.config = config
        self.fault = fault
        self.faults = faults
        self.installer = MemoryInstaller(
            Firmware(config.factory_version, None),
            fail_install=fault == "fail_install",
            fail_health=fault == "fail_health",
        )
        self.files = MemoryStateFiles(config.factory_version)
        self.agent = SimAgent(config, self)
        # Resolved when the agent is next connected (`FleetSimulator.start` waits on it).
        self.ready: asyncio.Future[None] | None = None
        self.powered = True
        self.dropping = False
        self.went_offline = False
        self.boots = 0
        # A silent device's record of the firmware blocks it was sent and ignored.
        self.ignored: list[dict[str, Any]] | None = [] if fault == "silent" else None

    def ignore(self, document: Any, resync: bool) -> None:
        """Note (only) the desired firmware block of a command a silent device ignores."""
        block = document.get("state") if isinstance(document, dict) else None
        if resync and isinstance(block, dict):
            block = block.get("desired")
        firmware = block.get("firmware") if isinstance(block, dict) else None
        if isinstance(firmware, dict) and self.ignored is not None:
            self.ignored.append(dict(firmware))

    def on_connected(self) -> None:
        if self.ready is not None:
            if not self.ready.done():
                self.ready.set_result(None)
            self.ready = None

    def power_off(self) -> None:
        self.powered = False
        self.agent.stop()

    def drop(self) -> None:
        """Go offline (the agent stops, as at a power cut between steps) for a while."""
        self.dropping = True
        self.agent.stop()

    async def live(self, session: aiohttp.ClientSession) -> None:
        """Run the agent; "reboot" into a new one when it asks; come back after a drop."""
        while self.powered:
            self.boots += 1
            rebooting = await self.agent.run(session)
            if not self.powered:
                return
            if self.dropping:
                self.dropping = False
                await asyncio.sleep(self.faults.offline_seconds)
                if not self.powered:
                    return
            elif not rebooting:
                return
            self.agent = SimAgent(self.config, self)

    def outcome(self) -> DeviceOutcome:
        state = self.files.load()
        busy = state.memory.busy
        phase: Phase | None
        target: Target | None
        if busy is not None and state.job_phase is not None:
            phase, target, error = state.job_phase, busy, None
        else:
            phase, target, error = state.last.phase, state.last.target, state.last.error
        return DeviceOutcome(
            self.config.device_id,
            self.installer.booted().firmware,
            phase,
            target,
            error,
            self.fault,
            self.boots,
            self.agent.connected,
        )


# --- the fleet ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetSettings:
    mqtt_host: str
    mqtt_port: int
    download_base_url: str
    trusted_keys: dict[str, bytes]  # key_id -> raw Ed25519 public key, shared by all devices
    work_dir: Path  # partial downloads, one small directory per downloading device
    hardware: str = "gw-100"
    factory_version: str = "1.0.0"
    keepalive: int = 60
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(0.5, 10.0, 12))
    faults: Faults = field(default_factory=Faults)
    connect_concurrency: int = 200  # devices connecting at once (a storm refuses connections)
    http_connections: int = 100  # the shared session's pool (the plane's default 429 limit)


class FleetSimulator:
    """`start()` connects every device (returns the seconds it took), `outcomes()` reads what
    each runs and reported, `wait_until(...)` waits for a fleet-wide condition, `stop()`
    disconnects them all. Run it in one asyncio loop."""

    def __init__(
        self,
        settings: FleetSettings,
        devices: Iterable[tuple[str, str]],
        faults_of: Mapping[str, str | None] | None = None,
    ) -> None:
        """`faults_of`: each device's fault (None: none), instead of the draw from
        `settings.faults` (whose other settings, offline seconds and slow rate, still apply)."""
        self.settings = settings
        credentials = list(devices)
        if faults_of is None:
            assigned = settings.faults.assign([d for d, _ in credentials])
        else:
            unknown = {f for f in faults_of.values() if f is not None} - set(FAULTS)
            if unknown:
                raise ValueError(f"unknown faults: {', '.join(sorted(unknown))}")
            assigned = {d: f for d, f in faults_of.items() if f is not None}
        self.devices: dict[str, SimulatedDevice] = {}
        for device_id, password in credentials:
            config = AgentConfig(
                device_id=device_id,
                password=password,
                mqtt_host=settings.mqtt_host,
                mqtt_port=settings.mqtt_port,
                download_base_url=settings.download_base_url,
                trusted_keys=settings.trusted_keys,
                hardware=settings.hardware,
                data_dir=settings.work_dir / device_id,
                factory_version=settings.factory_version,
                retry=settings.retry,
                keepalive=settings.keepalive,
            )
            self.devices[device_id] = SimulatedDevice(
                config, assigned.get(device_id), settings.faults
            )
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, timeout: float = 600.0) -> float:
        """Start every device; return once all are connected and subscribed (seconds taken)."""
        timeout_settings = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
        connector = aiohttp.TCPConnector(limit=self.settings.http_connections)
        self._session = aiohttp.ClientSession(timeout=timeout_settings, connector=connector)
        gate = asyncio.Semaphore(self.settings.connect_concurrency)
        began = time.perf_counter()

        async def connect(device: SimulatedDevice) -> None:
            async with gate:
                assert self._session is not None
                ready = device.ready = asyncio.get_running_loop().create_future()
                self._tasks.append(asyncio.create_task(device.live(self._session)))
                await ready

        await asyncio.wait_for(
            asyncio.gather(*(connect(d) for d in self.devices.values())), timeout
        )
        return time.perf_counter() - began

    async def stop(self) -> None:
        for device in self.devices.values():
            device.power_off()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def outcomes(self) -> dict[str, DeviceOutcome]:
        return {device_id: d.outcome() for device_id, d in self.devices.items()}

    def faults(self) -> dict[str, str | None]:
        return {device_id: d.fault for device_id, d in self.devices.items()}

    def break_build(self, version: str, device_ids: Iterable[str] | None = None) -> None:
        """From now on, each of these devices (default: all) that installs `version` fails its
        health check after the reboot and rolls back by itself: a bad build, as a canary
        should catch it."""
        chosen = (
            self.devices.values() if device_ids is None else [self.devices[d] for d in device_ids]
        )
        shared: dict[AbstractSet[str], frozenset[str]] = {}  # one set per distinct old set
        for device in chosen:
            old = device.installer.broken_builds
            if old not in shared:
                shared[old] = frozenset({*old, version})
            device.installer.broken_builds = shared[old]

    async def wait_until(
        self,
        done: Callable[[dict[str, DeviceOutcome]], bool],
        timeout: float = 300.0,
        poll: float = 0.2,
    ) -> dict[str, DeviceOutcome]:
        """The outcomes once `done(outcomes)` holds; TimeoutError (with a summary) if never."""
        deadline = time.monotonic() + timeout
        while True:
            outcomes = self.outcomes()
            if done(outcomes):
                return outcomes
            if time.monotonic() > deadline:
                raise TimeoutError(f"fleet never settled: {summary(outcomes)}")
            await asyncio.sleep(poll)

    async def wait_settled(self, version: str, timeout: float = 300.0) -> dict[str, DeviceOutcome]:
        """The outcomes once every device has finished its update to `version`: it runs it, or
        its last outcome for that version is a final failed or rolled_back."""

        def settled(outcome: DeviceOutcome) -> bool:
            if outcome.running.version == version:
                return outcome.phase is Phase.SUCCEEDED or outcome.phase is None
            interrupted = outcome.error is not None and "interrupted" in outcome.error
            return (
                outcome.target is not None
                and outcome.target.version == version
                and outcome.phase in (Phase.FAILED, Phase.ROLLED_BACK)
                and not interrupted
            )

        return await self.wait_until(lambda o: all(settled(x) for x in o.values()), timeout)


def summary(outcomes: Mapping[str, DeviceOutcome]) -> dict[str, int]:
    """How many devices are in each (running version, phase)."""
    counts = Counter(
        f"{o.running.version}/{o.phase.value if o.phase else 'idle'}" for o in outcomes.values()
    )
    return dict(sorted(counts.items()))


# --- measuring ----------------------------------------------------------------------------------


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
    except OSError:
        return 0
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class FleetMeasurement:
    devices: int
    connect_seconds: float
    rss_before: int
    rss_after: int

    @property
    def bytes_per_device(self) -> float:
        return (self.rss_after - self.rss_before) / max(1, self.devices)

    def describe(self) -> str:
        return (
            f"{self.devices} devices connected in {self.connect_seconds:.1f} s "
            f"({self.devices / max(self.connect_seconds, 1e-9):,.0f}/s); memory "
            f"{self.bytes_per_device / 1024:.1f} KiB per device (RSS "
            f"{self.rss_before / 2**20:.0f} -> {self.rss_after / 2**20:.0f} MiB)"
        )


async def start_measured(
    settings: FleetSettings, devices: Iterable[tuple[str, str]], timeout: float = 600.0
) -> tuple[FleetSimulator, FleetMeasurement]:
    """Build and start a fleet, measuring RSS before the devices exist and once all are
    connected (the delta is what the devices cost: objects, connections, buffers)."""
    credentials = list(devices)
    rss_before = rss_bytes()
    fleet = FleetSimulator(settings, credentials)
    seconds = await fleet.start(timeout)
    await asyncio.sleep(1.0)  # let the resync answers and acknowledgements arrive
    return fleet, FleetMeasurement(len(credentials), seconds, rss_before, rss_bytes())


# --- the command line ---------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m device_agent.simulator")
    parser.add_argument(
        "--credentials",
        required=True,
        type=Path,
        help='JSON file: {"<device id>": "<password>", ...} (from RegisterDevice)',
    )
    parser.add_argument("--mqtt-host", default="127.0.0.1")
    parser.add_argument("--mqtt-port", type=int, default=1883)
    parser.add_argument("--download-base-url", required=True)
    parser.add_argument(
        "--trusted-key", action="append", required=True, help="KEY_ID=BASE64 (raw Ed25519)"
    )
    parser.add_argument("--hardware", default="gw-100")
    parser.add_argument("--factory-version", default="1.0.0")
    parser.add_argument("--work-dir", type=Path, default=Path("sim-devices"))
    parser.add_argument("--seconds", type=float, default=0, help="run this long (0: until ^C)")
    parser.add_argument("--seed", type=int, default=0)
    for name in FAULTS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=0.0)
    parser.add_argument("--offline-seconds", type=float, default=3.0)
    parser.add_argument("--slow-bytes-per-second", type=int, default=64 * 1024)
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> None:
    keys = {}
    for item in args.trusted_key:
        key_id, _, encoded = item.partition("=")
        keys[key_id] = base64.b64decode(encoded, validate=True)
    credentials = json.loads(args.credentials.read_text())
    faults = Faults(
        **{name: getattr(args, name) for name in FAULTS},
        offline_seconds=args.offline_seconds,
        slow_bytes_per_second=args.slow_bytes_per_second,
        seed=args.seed,
    )
    settings = FleetSettings(
        mqtt_host=args.mqtt_host,
        mqtt_port=args.mqtt_port,
        download_base_url=args.download_base_url,
        trusted_keys=keys,
        work_dir=args.work_dir,
        hardware=args.hardware,
        factory_version=args.factory_version,
        faults=faults,
    )
    fleet, measured = await start_measured(settings, credentials.items())
    print(measured.describe(), flush=True)
    try:
        deadline = time.monotonic() + args.seconds if args.seconds else None
        while deadline is None or time.monotonic() < deadline:
            left = 5.0 if deadline is None else deadline - time.monotonic()
            await asyncio.sleep(max(0.0, min(5.0, left)))
            print(summary(fleet.outcomes()), flush=True)
    finally:
        await fleet.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
