"""The rollout's Celery worker as a user runs it (`python -m services.rollout.worker --beat`,
a subprocess) against the real shadow service over gRPC: on the embedded default (SQLite and
kombu's SQLAlchemy transport, no server) and on PostgreSQL + Redis.

The fan-out is checked where devices would see it: the shadow service's outbox holds one
delta message per desired change, so "every device notified exactly once" is "exactly one
delta carrying the new firmware per device".
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, text

from protos.shadow.v1 import shadow_pb2 as shadow_pb
from services.rollout.domain import (
    Firmware,
    Rollout,
    RolloutDefinition,
    RolloutStatus,
    Stage,
    TargetSelector,
)
from services.rollout.service import RolloutService, ShadowClient
from services.rollout.store import RolloutStore
from tests.conftest import RunningShadow, service_missing

REPO = Path(__file__).resolve().parents[2]
DEVICES = 200
CHUNK = 50
PR_SET_PDEATHSIG = 1
OLD = Firmware("1.0.0", "https://artifacts.example/v1/artifacts/old")
NEW = Firmware("2.0.0", "https://artifacts.example/v1/artifacts/new")


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, however it dies (Linux prctl), so a
    killed test run leaves no worker behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_for(what: str, condition: Callable[[], bool], seconds: float = 90) -> None:
    """Wait for a state the processes reach on their own (a bound, not a timing assertion)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not reached in {seconds} s")


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def tasks_succeeded(self, name: str) -> int:
        return sum(
            f"Task {name}[" in line and "succeeded" in line
            for line in self.log.read_text(errors="replace").splitlines()
        )

    def ready(self) -> bool:
        return "ready." in self.log.read_text(errors="replace")


@dataclass
class Setup:
    engine: Engine
    shadow: RunningShadow
    service: RolloutService
    env: dict[str, str]
    tmp: Path
    workers: list[Worker]

    def start_worker(self, name: str = "ota-rollout", **env: str) -> Worker:
        log = self.tmp / f"worker-{len(self.workers)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "services.rollout.worker", "--beat", "--name", name],
            cwd=self.tmp,
            env={**self.env, **env},
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        worker = Worker(process, log)
        self.workers.append(worker)
        return worker

    def register(self, count: int) -> list[str]:
        ids = [f"cel-{i:03d}" for i in range(count)]
        reported = json.dumps({"state": {"reported": {"firmware": vars(OLD)}}})
        for i, device_id in enumerate(ids):
            tags = {"site": ("north", "south")[i % 2], "group": "celery"}
            self.shadow.stub.RegisterDevice(
                shadow_pb.RegisterDeviceRequest(device_id=device_id, tags=tags)
            )
            self.shadow.stub.UpdateShadow(
                shadow_pb.UpdateShadowRequest(device_id=device_id, request_json=reported)
            )
        return ids

    def create(self, rollout_id: str) -> None:
        definition = RolloutDefinition(
            rollout_id=rollout_id,
            artifact_id="a" * 32,
            firmware=NEW,
            selector=TargetSelector(tags=(("group", "celery"),)),
            stages=(Stage(percent=100.0),),
        )
        self.service.store.create(Rollout(definition), int(time.time() * 1000))
        self.service.start(rollout_id)

    def notified(self) -> Counter[str]:
        """device id -> the delta messages carrying the new firmware in the shadow's outbox."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT device_id, delta_json FROM shadow_events WHERE delta_json IS NOT NULL")
            ).all()
        counts: Counter[str] = Counter()
        for device_id, delta_json in rows:
            firmware = json.loads(delta_json).get("state", json.loads(delta_json)).get("firmware")
            if isinstance(firmware, dict) and firmware.get("version") == NEW.version:
                counts[device_id] += 1
        return counts

    def pending_writes(self) -> int:
        return self.service.store.count_dispatches()

    def status(self, rollout_id: str) -> RolloutStatus:
        return self.service.store.get(rollout_id).rollout.state.status


def _redis_db(number: int) -> str:
    url = f"redis://127.0.0.1:6379/{number}"
    try:
        redis.Redis.from_url(url).flushdb()
    except redis.RedisError as exc:
        service_missing("Redis at 127.0.0.1:6379", exc)
    return url


@pytest.fixture
def setup(rollout_engine: Engine, shadow_server: RunningShadow, tmp_path: Path) -> Iterator[Setup]:
    """A worker's world: the embedded default (SQLite, a SQLite-file broker) or the production
    one (PostgreSQL, Redis), whichever database the test runs on."""
    engine, shadow = rollout_engine, shadow_server
    embedded = engine.dialect.name == "sqlite"
    broker_url = f"sqla+sqlite:///{tmp_path / 'celery.db'}" if embedded else _redis_db(11)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTA_")}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "OTA_DATABASE_URL": engine.url.render_as_string(hide_password=False),
            "OTA_SHADOW_ADDRESS": shadow.address,
            "OTA_CELERY_BROKER_URL": broker_url,
            "OTA_ROLLOUT_RECONCILE_SECONDS": "1",
            "OTA_ROLLOUT_FANOUT_CHUNK": str(CHUNK),
            "OTA_ROLLOUT_DISPATCH_LEASE_SECONDS": "3",
            # Its own queue: another test run on this machine's Redis takes none of its tasks.
            "OTA_CELERY_QUEUE": f"ota-rollout-test-{uuid.uuid4().hex[:12]}",
        }
    )
    service = RolloutService(RolloutStore(engine), ShadowClient(shadow.channel))
    running = Setup(engine, shadow, service, env, tmp_path, [])
    try:
        yield running
    finally:
        for worker in running.workers:
            worker.stop()
        if not embedded:
            redis.Redis.from_url(broker_url).flushdb()


def test_a_worker_fans_a_rollout_out_in_chunks_and_the_tick_completes_it(setup: Setup) -> None:
    """On both databases: sqlite = embedded broker, postgres = Redis."""
    ids = setup.register(DEVICES)
    setup.create("celery-all")
    worker = setup.start_worker()
    wait_for("every device notified", lambda: len(setup.notified()) == DEVICES)
    wait_for("the outbox drained", lambda: setup.pending_writes() == 0)
    assert set(setup.notified()) == set(ids)
    assert set(setup.notified().values()) == {1}  # once each
    # Chunk tasks, not one task (or one call) per device.
    wait_for("send tasks logged", lambda: worker.tasks_succeeded("ota.rollout.send") >= 1)
    assert worker.tasks_succeeded("ota.rollout.send") <= DEVICES // CHUNK + 2
    # The devices succeed; the periodic tick (beat) notices and completes the rollout.
    done = json.dumps({"state": {"reported": {"firmware": {**vars(NEW), "state": "succeeded"}}}})
    for device_id in ids:
        setup.shadow.stub.UpdateShadow(
            shadow_pb.UpdateShadowRequest(device_id=device_id, request_json=done)
        )
    wait_for("rollout completed", lambda: setup.status("celery-all") == RolloutStatus.COMPLETED)
    assert worker.tasks_succeeded("ota.rollout.tick") >= 1
    assert list(setup.tmp.glob("celerybeat-schedule*")) == []  # beat keeps its schedule in memory
    assert set(setup.notified().values()) == {1}  # completing it notified nobody again


def _processes_with(queue: str) -> list[int]:
    """Pids of live processes started with OTA_CELERY_QUEUE=queue."""
    marker = f"OTA_CELERY_QUEUE={queue}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


def _blocked_deletes(engine: Engine) -> int:
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND query LIKE 'DELETE FROM rollout_dispatches%'"
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_a_worker_killed_mid_fan_out_loses_nothing_and_notifies_nobody_twice(
    setup: Setup,
) -> None:
    """The worst moment to die: a chunk was taken by the shadow service, but the worker had
    not yet recorded that it was sent. The test holds that chunk's outbox rows with a key-share
    lock (a sender's DELETE waits on it; leasing does not), SIGKILLs the worker while it waits,
    and starts a new one."""
    ids = setup.register(DEVICES)
    setup.create("celery-kill")
    setup.service.reconcile("celery-kill")  # the pass: every write is in the outbox, unsent
    assert setup.pending_writes() == DEVICES
    second_chunk = sorted(ids)[CHUNK : 2 * CHUNK]
    with setup.engine.connect() as holder:
        holder.execute(
            text(
                "SELECT device_id FROM rollout_dispatches WHERE device_id = ANY(:ids) FOR KEY SHARE"
            ),
            {"ids": second_chunk},
        )
        worker = setup.start_worker()
        wait_for("a sender blocked after sending", lambda: _blocked_deletes(setup.engine) == 1)
        sent = setup.notified()
        assert set(second_chunk) <= set(sent)  # the shadow took the chunk ...
        worker.process.send_signal(signal.SIGKILL)  # ... and its worker dies before forgetting it
        worker.process.wait(30)
        # Nothing of it lives on (Celery's own --beat would leave its beat process ticking).
        assert _processes_with(setup.env["OTA_CELERY_QUEUE"]) == []
        holder.rollback()
    assert 0 < setup.pending_writes() < DEVICES  # killed mid-fan-out: some sent, some not
    setup.start_worker()
    wait_for("the outbox drained", lambda: setup.pending_writes() == 0)
    notified = setup.notified()
    assert set(notified) == set(ids)  # nothing lost
    assert set(notified.values()) == {1}  # nothing doubled


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_two_workers_with_a_beat_each_notify_every_device_once(setup: Setup) -> None:
    """Scaled out: two worker processes on one Redis queue, each with its own beat (so ticks
    come twice as often and lease the outbox concurrently), one thread each so that a busy one
    leaves the next task to the other. Every device is notified exactly once and the rollout
    completes."""
    ids = setup.register(DEVICES)
    workers = [
        setup.start_worker(name, OTA_ROLLOUT_WORKER_CONCURRENCY="1")
        for name in ("ota-rollout-a", "ota-rollout-b")
    ]
    wait_for("both workers ready", lambda: all(w.ready() for w in workers))
    setup.create("celery-two")
    wait_for("every device notified", lambda: len(setup.notified()) == DEVICES)
    wait_for("the outbox drained", lambda: setup.pending_writes() == 0)
    assert set(setup.notified()) == set(ids)
    assert set(setup.notified().values()) == {1}  # once each, with two workers leasing
    sends = sum(w.tasks_succeeded("ota.rollout.send") for w in workers)
    assert 1 <= sends <= DEVICES // CHUNK + 2
    done = json.dumps({"state": {"reported": {"firmware": {**vars(NEW), "state": "succeeded"}}}})
    for device_id in ids:
        setup.shadow.stub.UpdateShadow(
            shadow_pb.UpdateShadowRequest(device_id=device_id, request_json=done)
        )
    wait_for("rollout completed", lambda: setup.status("celery-two") == RolloutStatus.COMPLETED)
    # Both processes served the queue (ticks from two beats, chunks): neither was idle.
    wait_for(
        "both workers took tasks",
        lambda: all(
            w.tasks_succeeded("ota.rollout.tick") + w.tasks_succeeded("ota.rollout.send") > 0
            for w in workers
        ),
    )
    assert set(setup.notified().values()) == {1}
