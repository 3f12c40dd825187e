"""Fixtures for the rollout service: a migrated database (SQLite or PostgreSQL, from the shared
`engine` fixture), the real shadow service over gRPC, and the rollout service over real gRPC on
port 0 with a clock the test sets (time is a parameter: no test waits)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from sqlalchemy import Engine, text

from protos.rollout.v1 import rollout_pb2_grpc
from services.common import db
from services.rollout.server import MIGRATIONS, VERSION_TABLE, create_server
from services.rollout.service import RolloutService, ShadowClient
from services.rollout.settings import RolloutSettings
from services.rollout.store import RolloutStore
from tests.conftest import RunningShadow

T0 = 1_800_000_000.0


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


class CallCounter(grpc.UnaryUnaryClientInterceptor):
    """Counts the calls made per method on a real channel (to check batching)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], details: Any, request: Any
    ) -> Any:
        name = details.method.rsplit("/", 1)[-1]
        self.calls[name] = self.calls.get(name, 0) + 1
        return continuation(details, request)


@dataclass
class RunningRollout:
    service: RolloutService
    stub: rollout_pb2_grpc.RolloutServiceStub
    clock: Clock
    shadow: RunningShadow
    shadow_calls: CallCounter = field(default_factory=CallCounter)


@pytest.fixture
def rollout_engine(engine: Engine) -> Engine:
    db.run_migrations(engine, MIGRATIONS, VERSION_TABLE)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(
                text("TRUNCATE rollouts, rollout_executions, rollout_claims, rollout_dispatches")
            )
    return engine


@pytest.fixture
def rollout(rollout_engine: Engine, shadow_server: RunningShadow) -> Iterator[RunningRollout]:
    counter = CallCounter()
    shadow_channel = grpc.intercept_channel(grpc.insecure_channel(shadow_server.address), counter)
    clock = Clock()
    service = RolloutService(RolloutStore(rollout_engine), ShadowClient(shadow_channel), clock)
    server, port = create_server(RolloutSettings(listen="127.0.0.1:0"), service)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield RunningRollout(
            service, rollout_pb2_grpc.RolloutServiceStub(channel), clock, shadow_server, counter
        )
    finally:
        channel.close()
        shadow_channel.close()
        server.stop(None)
