"""Fixtures of the artifact service tests: real storage (a directory, or S3 on moto's standalone
server on loopback), the real database (the shared `engine` fixture: SQLite and PostgreSQL),
the real shadow service over gRPC, the gRPC artifact service and the HTTP download plane on
free loopback ports.

Clocks are parameters: `FakeClock` drives token and URL expiry, and the download plane's pacing
clock and sleep can be replaced so bandwidth caps are checked without measuring time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import pytest
from sqlalchemy import Engine, text

from protos.artifacts.v1 import artifacts_pb2 as apb
from protos.artifacts.v1 import artifacts_pb2_grpc as apb_grpc
from protos.shadow.v1 import shadow_pb2 as spb
from services.artifacts import signing
from services.artifacts.download_plane import PlaneLimits, RunningPlane, start_download_plane
from services.artifacts.server import MIGRATIONS, VERSION_TABLE, create_server
from services.artifacts.service import ArtifactService, DownloadService, InUseCheck, never_in_use
from services.artifacts.settings import ArtifactSettings
from services.artifacts.storage import LocalStorage, S3Config, S3Storage, Storage
from services.artifacts.store import ArtifactStore
from services.common import db
from tests.conftest import RunningShadow

T = TypeVar("T")
MIB = 1024 * 1024
UPLOAD_END = apb.UploadArtifactRequest(end=apb.UploadEnd())


class FakeClock:
    """Wall-clock seconds that move only when a test says so."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class LoopThread:
    """An asyncio loop in a thread, for the download plane while tests make blocking calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# --- S3 on moto's standalone server -------------------------------------------------------------


@pytest.fixture(autouse=True)
def _aws_test_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    # moto accepts any credentials; these keep boto3 from looking for real ones.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def make_s3_storage(endpoint: str, part_bytes: int = 5 * MIB) -> S3Storage:
    bucket = f"ota-test-{uuid.uuid4().hex[:16]}"
    return S3Storage(
        S3Config(
            bucket=bucket,
            prefix="artifacts/",
            endpoint_url=endpoint,
            region="us-east-1",
            part_bytes=part_bytes,
            create_bucket=True,
        )
    )


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "artifacts")
    return make_s3_storage(request.getfixturevalue("moto_endpoint"))


@pytest.fixture
def local_storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "artifacts")


# --- database, signer ---------------------------------------------------------------------------


@pytest.fixture
def artifact_store(engine: Engine) -> ArtifactStore:
    """The artifact tables in the same database as the shadow's, migrated and empty."""
    db.run_migrations(engine, MIGRATIONS, VERSION_TABLE)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE artifacts, download_tokens, download_urls"))
    return ArtifactStore(engine)


@pytest.fixture
def signer(tmp_path: Path) -> signing.Signer:
    return signing.load_or_create(tmp_path / "keys" / "signing.pem")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --- the running stack --------------------------------------------------------------------------


@dataclass
class Device:
    device_id: str
    password: str

    @property
    def auth(self) -> tuple[str, str]:
        return (self.device_id, self.password)


@dataclass
class ArtifactStack:
    """The shadow service, the artifact service and its download plane, all running."""

    shadow: RunningShadow
    service: ArtifactService
    downloads: DownloadService
    storage: Storage
    store: ArtifactStore
    channel: grpc.Channel
    stub: apb_grpc.ArtifactServiceStub
    plane: RunningPlane
    base_url: str
    http: httpx.Client
    clock: FakeClock
    loop: LoopThread
    _devices: int = field(default=0)

    # --- operators ----------------------------------------------------------------------------

    def upload(
        self,
        data: bytes,
        name: str = "firmware",
        version: str = "1.0.0",
        compatible: tuple[str, ...] = ("gw-100",),
        chunk_bytes: int = 256 * 1024,
        **declared: Any,
    ) -> apb.Artifact:
        return self.stub.UploadArtifact(
            upload_requests(data, name, version, compatible, chunk_bytes, **declared)
        )

    # --- devices ------------------------------------------------------------------------------

    def device(self, device_id: str | None = None) -> Device:
        self._devices += 1
        device_id = device_id or f"dev-{self._devices}"
        reply = self.shadow.stub.RegisterDevice(spb.RegisterDeviceRequest(device_id=device_id))
        return Device(device_id, reply.credentials.password)

    def target(self, device: Device, artifact: apb.Artifact | str, version: str = "1.0.0") -> None:
        """Set the device's desired firmware, as a rollout does."""
        url = artifact if isinstance(artifact, str) else artifact.download_url
        desired = {"firmware": {"version": version, "url": url}}
        self.shadow.stub.UpdateShadow(
            spb.UpdateShadowRequest(
                device_id=device.device_id, request_json=json.dumps({"state": {"desired": desired}})
            )
        )

    def request_token(self, device: Device, artifact_id: str) -> httpx.Response:
        return self.http.post(f"/v1/artifacts/{artifact_id}/token", auth=device.auth)

    def token(self, device: Device, artifact_id: str) -> str:
        response = self.request_token(device, artifact_id)
        assert response.status_code == 201, response.text
        return str(response.json()["token"])

    def exchange(self, device: Device, token: str) -> httpx.Response:
        return self.http.post("/v1/downloads", json={"token": token}, auth=device.auth)

    def grant(self, device: Device, artifact_id: str) -> dict[str, Any]:
        response = self.exchange(device, self.token(device, artifact_id))
        assert response.status_code == 200, response.text
        grant: dict[str, Any] = response.json()
        return grant

    def get(self, url: str, device: Device | None, **headers: str) -> httpx.Response:
        """GET with headers named in Python style: if_range=... sends If-Range."""
        auth = device.auth if device is not None else None
        sent = {name.replace("_", "-"): value for name, value in headers.items()}
        return self.http.get(url, auth=auth, headers=sent)


def upload_requests(
    data: bytes,
    name: str,
    version: str,
    compatible: tuple[str, ...],
    chunk_bytes: int,
    **declared: Any,
) -> Iterator[apb.UploadArtifactRequest]:
    yield apb.UploadArtifactRequest(
        metadata=apb.ArtifactMetadata(
            name=name, version=version, compatible_hardware=list(compatible), **declared
        )
    )
    for start in range(0, len(data), chunk_bytes):
        yield apb.UploadArtifactRequest(chunk=data[start : start + chunk_bytes])
    yield UPLOAD_END


StackFactory = Callable[..., ArtifactStack]


@pytest.fixture
def make_stack(
    shadow_server: RunningShadow,
    artifact_store: ArtifactStore,
    signer: signing.Signer,
    clock: FakeClock,
) -> Iterator[StackFactory]:
    """Builds a running stack on the given storage, with the given limits and hooks."""
    stacks: list[tuple[ArtifactStack, grpc.Server, grpc.Channel]] = []

    def build(
        storage: Storage,
        limits: PlaneLimits | None = None,
        max_bytes: int = 64 * MIB,
        is_in_use: InUseCheck = never_in_use,
        pace_clock: Callable[[], float] = time.monotonic,
        pace_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        token_ttl: int = 120,
        url_ttl: int = 600,
        auth_cache_seconds: float = 30.0,
    ) -> ArtifactStack:
        service = ArtifactService(artifact_store, storage, signer, max_bytes, is_in_use, clock)
        downloads = DownloadService(artifact_store, storage, token_ttl, url_ttl, clock)
        loop = LoopThread()
        plane = loop.run(
            start_download_plane(
                downloads,
                shadow_server.address,
                "127.0.0.1:0",
                limits or PlaneLimits(),
                clock=pace_clock,
                sleep=pace_sleep,
                auth_cache_seconds=auth_cache_seconds,
            )
        )
        base_url = plane.plane.base_url
        server, port = create_server(
            ArtifactSettings(listen="127.0.0.1:0", workers=8), service, base_url
        )
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stack = ArtifactStack(
            shadow=shadow_server,
            service=service,
            downloads=downloads,
            storage=storage,
            store=artifact_store,
            channel=channel,
            stub=apb_grpc.ArtifactServiceStub(channel),
            plane=plane,
            base_url=base_url,
            http=httpx.Client(base_url=base_url, timeout=30),
            clock=clock,
            loop=loop,
        )
        stacks.append((stack, server, channel))
        return stack

    yield build
    for stack, server, channel in stacks:
        stack.http.close()
        channel.close()
        server.stop(None)
        with contextlib.suppress(Exception):
            stack.loop.run(stack.plane.stop())
        stack.loop.close()


@pytest.fixture
def stack(make_stack: StackFactory, storage: Storage) -> ArtifactStack:
    """A running stack on each storage backend (and, through `engine`, on each database)."""
    return make_stack(storage)


@pytest.fixture
def local_stack(make_stack: StackFactory, local_storage: LocalStorage) -> ArtifactStack:
    """A running stack whose download plane serves the bytes itself."""
    return make_stack(local_storage)
