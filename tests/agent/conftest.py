"""The whole device-facing stack for agent tests, and the agent as users run it.

`fleet` = the integration `stack` (a real broker, Mosquitto on PostgreSQL or amqtt on SQLite,
the shadow service, a gateway) + the artifact service over gRPC and its download plane over HTTP
(local storage, its own SQLite file), all on free loopback ports. Agents run as processes:
`python -m device_agent --config FILE`, each with its own data directory.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.artifacts.v1 import artifacts_pb2 as apb
from protos.artifacts.v1 import artifacts_pb2_grpc as apb_grpc
from services.artifacts import signing
from services.artifacts.download_plane import PlaneLimits, RunningPlane, start_download_plane
from services.artifacts.server import MIGRATIONS, VERSION_TABLE
from services.artifacts.server import create_server as create_artifact_server
from services.artifacts.service import ArtifactService, DownloadService
from services.artifacts.settings import ArtifactSettings
from services.artifacts.storage import LocalStorage
from services.artifacts.store import ArtifactStore
from services.common import db
from tests.artifacts.conftest import LoopThread, upload_requests
from tests.integration.conftest import Stack, stack

__all__ = ["stack"]  # the integration fixture, reused as is

WAIT_SECONDS = 60.0
# A health check a user would configure: the image must not say it is broken.
HEALTH_COMMAND = [
    sys.executable,
    "-c",
    "import os, sys; "
    "sys.exit(b'UNHEALTHY' in open(os.environ['OTA_SLOT_DIR'] + '/image', 'rb').read())",
]


@dataclass
class AgentProcess:
    device_id: str
    config_path: Path
    data_dir: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, crash_at: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k != "OTA_AGENT_CRASH_AT"}
        if crash_at:
            env["OTA_AGENT_CRASH_AT"] = crash_at
        self.process = subprocess.Popen(
            [sys.executable, "-m", "device_agent", "--config", str(self.config_path)],
            env=env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def wait_killed(self) -> int:
        assert self.process is not None
        return self.process.wait(WAIT_SECONDS)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
        self.process = None

    def booted_slot(self) -> dict[str, Any]:
        root = self.data_dir / "system"
        name = (root / "boot").read_text().strip()
        meta: dict[str, Any] = json.loads((root / "slots" / name / "slot.json").read_text())
        meta["slot"] = name
        return meta

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Fleet:
    stack: Stack
    artifacts: apb_grpc.ArtifactServiceStub
    base_url: str
    signer: signing.Signer
    tmp: Path
    agents: list[AgentProcess] = field(default_factory=list)

    def upload(
        self,
        data: bytes,
        version: str,
        compatible: tuple[str, ...] = ("gw-100",),
        name: str = "firmware",
        **declared: Any,
    ) -> apb.Artifact:
        requests = upload_requests(data, name, version, compatible, 256 * 1024, **declared)
        return self.artifacts.UploadArtifact(requests)

    def agent(
        self,
        device_id: str,
        factory_version: str = "1.0.0",
        trusted_keys: dict[str, str] | None = None,
        **extra: Any,
    ) -> AgentProcess:
        endpoint = self.stack.register(device_id)
        assert endpoint.password is not None
        data_dir = self.tmp / "devices" / device_id
        data_dir.mkdir(parents=True)
        config = {
            "device_id": device_id,
            "password": endpoint.password,
            "mqtt_host": endpoint.host,
            "mqtt_port": endpoint.port,
            "download_base_url": self.base_url,
            "trusted_keys": trusted_keys
            or {self.signer.key_id: base64.b64encode(self.signer.public_key_raw).decode()},
            "hardware": "gw-100",
            "data_dir": str(data_dir),
            "factory_version": factory_version,
            "health_command": HEALTH_COMMAND,
            "retry": {"base_seconds": 0.05, "cap_seconds": 0.5, "max_attempts": 4},
            **extra,
        }
        config_path = data_dir.parent / f"{device_id}.json"
        config_path.write_text(json.dumps(config))
        agent = AgentProcess(device_id, config_path, data_dir, data_dir.parent / f"{device_id}.log")
        self.agents.append(agent)
        return agent

    def target(self, device_id: str, version: str, url: str) -> None:
        self.stack.update_desired({device_id: {"firmware": {"version": version, "url": url}}})

    def reported(self, device_id: str) -> dict[str, Any]:
        try:
            state = self.stack.document(device_id).get("state", {})
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # no shadow until the first report
                return {}
            raise
        firmware: dict[str, Any] = state.get("reported", {}).get("firmware", {})
        return firmware

    def wait_reported(
        self, agent: AgentProcess, done: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        """The reported firmware once `done` holds (fails, with the agent's log, if it never
        does within a generous bound: a liveness check, not a timing assertion)."""
        deadline = time.monotonic() + WAIT_SECONDS
        firmware: dict[str, Any] = {}
        while time.monotonic() < deadline:
            firmware = self.reported(agent.device_id)
            if done(firmware):
                return firmware
            time.sleep(0.1)
        raise AssertionError(f"reported firmware stayed {firmware}\n--- log\n{agent.log_text()}")


@pytest.fixture
def fleet(stack: Stack, tmp_path: Path) -> Iterator[Fleet]:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'artifacts.db'}")
    db.run_migrations(engine, MIGRATIONS, VERSION_TABLE)
    store = ArtifactStore(engine)
    storage = LocalStorage(tmp_path / "artifact-bytes")
    signer = signing.load_or_create(tmp_path / "keys" / "signing.pem")
    service = ArtifactService(store, storage, signer, 64 * 1024 * 1024)
    downloads = DownloadService(store, storage)
    loop = LoopThread()
    plane: RunningPlane = loop.run(
        start_download_plane(downloads, stack.shadow_address, "127.0.0.1:0", PlaneLimits())
    )
    base_url = plane.plane.base_url
    server, port = create_artifact_server(
        ArtifactSettings(listen="127.0.0.1:0", workers=4), service, base_url
    )
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stack.start_gateway()
    built = Fleet(stack, apb_grpc.ArtifactServiceStub(channel), base_url, signer, tmp_path)
    try:
        yield built
    finally:
        for agent in built.agents:
            agent.stop()
        channel.close()
        server.stop(None)
        with contextlib.suppress(Exception):
            loop.run(plane.stop())
        loop.close()
        engine.dispose()
