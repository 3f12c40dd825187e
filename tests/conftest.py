"""Shared fixtures: real databases and a real gRPC shadow server on port 0.

Outside CI a missing PostgreSQL skips its tests; with CI=true it fails them, so CI can never
pass by skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest
from moto.server import ThreadedMotoServer
from sqlalchemy import Engine, text

from protos.shadow.v1 import shadow_pb2_grpc
from services.common import db
from services.shadow.server import MIGRATIONS, create_server
from services.shadow.service import ShadowService
from services.shadow.settings import ShadowSettings
from services.shadow.store import ShadowStore

POSTGRES_ADMIN_DSN = os.environ.get(
    "OTA_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def service_missing(name: str, error: Exception) -> None:
    """A real service the test needs is not there: a failure in CI, a skip on a laptop."""
    message = f"{name} is not reachable: {error}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: every real service must be running)")
    pytest.skip(f"{message} (skipped outside CI only)")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    name = f"ota_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        service_missing("PostgreSQL", exc)
        raise
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_engine(postgres_url: str) -> Iterator[Engine]:
    engine = db.make_engine(postgres_url, pool_size=20)
    db.run_migrations(engine, MIGRATIONS, "alembic_version_shadow")
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated, empty database: a SQLite file, or the session's PostgreSQL database."""
    if request.param == "sqlite":
        sqlite = db.make_engine(f"sqlite:///{tmp_path / 'ota.db'}")
        db.run_migrations(sqlite, MIGRATIONS, "alembic_version_shadow")
        yield sqlite
        sqlite.dispose()
        return
    pg: Engine = request.getfixturevalue("postgres_engine")
    with pg.begin() as conn:
        conn.execute(text("TRUNCATE devices, shadow_events"))
    yield pg


@pytest.fixture
def shadow_service(engine: Engine) -> ShadowService:
    return ShadowService(ShadowStore(engine))


@dataclass
class RunningShadow:
    service: ShadowService
    channel: grpc.Channel
    stub: shadow_pb2_grpc.ShadowServiceStub
    address: str


@pytest.fixture
def shadow_server(shadow_service: ShadowService) -> Iterator[RunningShadow]:
    """The shadow service over real gRPC on a free loopback port."""
    server, port = create_server(ShadowSettings(listen="127.0.0.1:0"), shadow_service)
    server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address)
    try:
        yield RunningShadow(
            shadow_service, channel, shadow_pb2_grpc.ShadowServiceStub(channel), address
        )
    finally:
        channel.close()
        server.stop(None)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 as an HTTP server on a free loopback port, for the whole session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    try:
        server.start()
    except OSError as exc:
        service_missing("moto S3 server", exc)
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
