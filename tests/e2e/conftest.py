"""The whole stack as `make up` starts it (real processes), on PostgreSQL and Mosquitto, for
end-to-end rollout tests: the rollout, shadow and artifact APIs with the operator's token, and
helpers to register devices in bulk, upload an artifact and wait for a rollout's end state.

The stack gets a fresh PostgreSQL database (dropped afterwards), a free MQTT port, and the
settings of a Celery-driven rollout service (`OTA_CELERY_BROKER_URL` on a flushed Redis db):
a devstack that runs Celery workers uses them, one that does not runs the rollout service's
own loop every `OTA_ROLLOUT_RECONCILE_SECONDS`. Either way the tests see the same APIs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from protos.artifacts.v1 import artifacts_pb2 as apb
from protos.artifacts.v1 import artifacts_pb2_grpc as apb_grpc
from protos.rollout.v1 import rollout_pb2 as rpb
from protos.rollout.v1 import rollout_pb2_grpc as rpb_grpc
from protos.shadow.v1 import shadow_pb2 as spb
from protos.shadow.v1 import shadow_pb2_grpc as spb_grpc
from services.artifacts import signing
from services.common.auth import bearer_channel
from tests.artifacts.conftest import LoopThread, upload_requests
from tests.conftest import POSTGRES_ADMIN_DSN, service_missing

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("OTA_TEST_REDIS_URL", "redis://127.0.0.1:6379")
CELERY_DB = 5
RECONCILE_SECONDS = "1"
IN_FLIGHT = 64  # RegisterDevice / GetShadow calls kept in flight


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any OTA_* setting, so only the test decides them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTA_")}
    env.update({"PYTHONPATH": str(REPO), **extra})
    return env


def devstack(cwd: Path, command: str, env: Mapping[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.devstack", command],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def flush_redis_db(url: str) -> None:
    """Empty the Redis db the Celery broker will use (a previous run's queued tasks)."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5)
        client.flushdb()
        client.close()
    except redis.RedisError as exc:
        service_missing("Redis", exc)


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new PostgreSQL database for one stack, dropped (with its connections) afterwards."""
    name = f"ota_e2e_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        service_missing("PostgreSQL", exc)
        raise
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class RolloutStack:
    """The running stack seen by an operator: its endpoints and token, the three APIs, the
    artifact signing key the devices trust, and a loop thread for simulated devices."""

    root: Path
    endpoints: dict[str, Any]
    shadow: spb_grpc.ShadowServiceStub
    artifacts: apb_grpc.ArtifactServiceStub
    rollouts: rpb_grpc.RolloutServiceStub
    signer: signing.Signer
    loop: LoopThread

    @property
    def mqtt_host(self) -> str:
        return str(self.endpoints["mqtt"]["host"])

    @property
    def mqtt_port(self) -> int:
        return int(self.endpoints["mqtt"]["port"])

    @property
    def download_base_url(self) -> str:
        return str(self.endpoints["downloads"])

    def register(self, devices: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
        """Register devices (id -> tags), calls pipelined; returns id -> MQTT password."""
        passwords: dict[str, str] = {}
        ids = list(devices)
        for start in range(0, len(ids), IN_FLIGHT):
            chunk = ids[start : start + IN_FLIGHT]
            calls = [
                self.shadow.RegisterDevice.future(
                    spb.RegisterDeviceRequest(device_id=d, tags=dict(devices[d])), timeout=60
                )
                for d in chunk
            ]
            for device_id, call in zip(chunk, calls, strict=True):
                passwords[device_id] = call.result().credentials.password
        return passwords

    def upload(self, data: bytes, version: str, hardware: str = "gw-100") -> apb.Artifact:
        requests = upload_requests(data, "firmware", version, (hardware,), 256 * 1024)
        artifact: apb.Artifact = self.artifacts.UploadArtifact(requests, timeout=60)
        return artifact

    def documents(self, device_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Each device's shadow document ({} when it has no shadow yet), calls pipelined."""
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(device_ids), IN_FLIGHT):
            chunk = device_ids[start : start + IN_FLIGHT]
            calls = [
                self.shadow.GetShadow.future(spb.GetShadowRequest(device_id=d), timeout=30)
                for d in chunk
            ]
            for device_id, call in zip(chunk, calls, strict=True):
                try:
                    found[device_id] = json.loads(call.result().document_json)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    found[device_id] = {}
        return found

    def set_desired(self, patches: Mapping[str, Mapping[str, Any]]) -> None:
        request = spb.BatchUpdateDesiredRequest(
            items=[
                spb.DesiredPatch(device_id=d, desired_json=json.dumps(p))
                for d, p in patches.items()
            ]
        )
        reply = self.shadow.BatchUpdateDesired(request, timeout=60)
        refused = [r for r in reply.results if r.status != spb.BatchItemResult.OK]
        assert not refused, refused[:5]

    def get_rollout(self, rollout_id: str) -> rpb.Rollout:
        rollout: rpb.Rollout = self.rollouts.GetRollout(
            rpb.GetRolloutRequest(rollout_id=rollout_id), timeout=30
        )
        return rollout

    def wait_rollout(
        self,
        rollout_id: str,
        done: Callable[[rpb.Rollout], bool],
        timeout: float,
        describe: Callable[[], str] = lambda: "",
    ) -> rpb.Rollout:
        """The rollout once `done(rollout)` holds, polled with GetRollout; AssertionError with
        its last state (and `describe()`, e.g. the devices' summary) if it never does within
        a generous bound: a liveness check, not a timing assertion."""
        deadline = time.monotonic() + timeout
        while True:
            rollout = self.get_rollout(rollout_id)
            if done(rollout):
                return rollout
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"rollout {rollout_id} never reached its end state within {timeout:g} s: "
                    f"{rpb.RolloutStatus.Name(rollout.status)} stage {rollout.stage_index} "
                    f"reason {rollout.reason!r} progress {dict(rollout.progress.by_status)} "
                    f"pending rollbacks {rollout.progress.rollbacks_pending}; {describe()}"
                    f"; logs in {self.endpoints['logs']}"
                )
            time.sleep(0.5)


def settled(rollout: rpb.Rollout) -> bool:
    """COMPLETED, or ABORTED with nothing in flight and no rollback pending (what ends a
    WatchRollout stream)."""
    if rollout.status == rpb.COMPLETED:
        return True
    counts = rollout.progress.by_status
    in_flight = counts.get("QUEUED", 0) + counts.get("IN_PROGRESS", 0)
    return (
        rollout.status == rpb.ABORTED and not in_flight and not rollout.progress.rollbacks_pending
    )


@pytest.fixture(scope="module")
def rollout_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RolloutStack]:
    """`make up` in a temp dir: Mosquitto on a free port, PostgreSQL, the rollout service's
    pass every second (its own loop, or Celery beat where devstack starts a worker)."""
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        service_missing("Mosquitto", FileNotFoundError("no mosquitto binary"))
    celery_url = f"{REDIS_URL}/{CELERY_DB}"
    flush_redis_db(celery_url)
    root = tmp_path_factory.mktemp("rollout-stack")
    with fresh_database() as database_url:
        env = clean_env(
            OTA_DATABASE_URL=database_url,
            OTA_MQTT_BROKER="mosquitto",
            OTA_MQTT_PORT=str(free_port()),
            OTA_CELERY_BROKER_URL=celery_url,
            OTA_ROLLOUT_RECONCILE_SECONDS=RECONCILE_SECONDS,
        )
        devstack(root, "up", env)
        loop = LoopThread()
        channels: list[grpc.Channel] = []
        try:
            endpoints = json.loads((root / ".devstack" / "endpoints.json").read_text())
            token = endpoints["operator_token"]

            def channel(address: str) -> grpc.Channel:
                made = bearer_channel(address, token)
                channels.append(made)
                return made

            signer = signing.load_or_create(root / ".devstack" / "artifact-signing-key.pem")
            yield RolloutStack(
                root,
                endpoints,
                spb_grpc.ShadowServiceStub(channel(endpoints["shadow"])),
                apb_grpc.ArtifactServiceStub(channel(endpoints["artifacts"])),
                rpb_grpc.RolloutServiceStub(channel(endpoints["rollout"])),
                signer,
                loop,
            )
        finally:
            for made in channels:
                made.close()
            loop.close()
            devstack(root, "down", env)
