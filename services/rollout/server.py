"""Wiring of the rollout service process: settings -> engine -> store + shadow client ->
service -> gRPC server. With a Celery broker set, Celery workers run the passes and the
fan-out (services/rollout/tasks.py) and commands ask them for a pass at once; without one, a
loop in this process does."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from protos.rollout.v1 import rollout_pb2, rollout_pb2_grpc
from services.common import db
from services.common.auth import bearer_channel, server_interceptors
from services.common.grpc_server import (
    add_health_and_reflection,
    bind,
    new_server,
    run_until_signalled,
)
from services.common.observability import (
    configure_logging,
    server_metrics_interceptor,
    start_metrics_server,
)
from services.rollout.errors import RolloutError
from services.rollout.service import RolloutService, ShadowClient
from services.rollout.servicer import RolloutServicer
from services.rollout.settings import RolloutSettings
from services.rollout.store import RolloutStore

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_rollout"
SERVICE_NAME = rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name

log = logging.getLogger(__name__)


def build_service(
    settings: RolloutSettings,
    migrate: bool = True,
    kick: Callable[[str], None] | None = None,
) -> RolloutService:
    engine = db.make_engine(settings.database_url, settings.db_pool_size)
    if migrate:
        db.run_migrations(engine, MIGRATIONS, VERSION_TABLE)
    channel = bearer_channel(settings.shadow_address, settings.service_token)
    return RolloutService(
        RolloutStore(engine), ShadowClient(channel), fan_out_chunk=settings.fanout_chunk, kick=kick
    )


def create_server(
    settings: RolloutSettings,
    service: RolloutService,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> tuple[grpc.Server, int]:
    """A ready-to-start server bound to `settings.listen` (port 0 picks a free port)."""
    server = new_server(settings.workers, interceptors)
    rollout_pb2_grpc.add_RolloutServiceServicer_to_server(RolloutServicer(service), server)
    add_health_and_reflection(server, [SERVICE_NAME])
    return server, bind(server, settings.listen)


def run_passes(service: RolloutService, interval: float, stopping: threading.Event) -> None:
    """Every `interval` seconds: a reconcile pass over every rollout with work, then the
    fan-out. A failed pass is logged and tried again at the next tick."""
    while not stopping.wait(interval):
        try:
            service.reconcile_all()
            service.fan_out()
        except RolloutError as exc:
            log.warning("reconcile pass failed: %s", exc)


def main() -> None:
    configure_logging("rollout")
    start_metrics_server()
    settings = RolloutSettings.from_env()
    kick = None
    if settings.celery_broker_url:
        from services.rollout import tasks

        kick = tasks.kick
    service = build_service(settings, kick=kick)
    server, port = create_server(
        settings, service, [server_metrics_interceptor(), *server_interceptors()]
    )
    stopping = threading.Event()
    if settings.reconcile_seconds and not settings.celery_broker_url:
        threading.Thread(
            target=run_passes,
            args=(service, float(settings.reconcile_seconds), stopping),
            name="reconcile",
            daemon=True,
        ).start()
    log.info("rollout service listening on port %d (shadow at %s)", port, settings.shadow_address)
    try:
        run_until_signalled(server)
    finally:
        stopping.set()


if __name__ == "__main__":
    main()
