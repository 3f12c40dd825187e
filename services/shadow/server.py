"""Wiring of the shadow service process: settings -> engine -> store -> service -> gRPC server."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import grpc
from sqlalchemy.engine import make_url

from protos.shadow.v1 import shadow_pb2, shadow_pb2_grpc
from services.broker.dynsec import DynsecAccounts
from services.common import db
from services.common.auth import server_interceptors
from services.common.grpc_server import (
    add_health_and_reflection,
    bind,
    new_server,
    run_until_signalled,
)
from services.common.mqtt import MqttEndpoint
from services.common.observability import (
    configure_logging,
    server_metrics_interceptor,
    start_metrics_server,
)
from services.shadow.service import ShadowService
from services.shadow.servicer import ShadowServicer
from services.shadow.settings import ShadowSettings
from services.shadow.store import ShadowStore

MIGRATIONS = Path(__file__).parent / "migrations"
SERVICE_NAME = shadow_pb2.DESCRIPTOR.services_by_name["ShadowService"].full_name

log = logging.getLogger(__name__)


def build_service(settings: ShadowSettings, migrate: bool = True) -> ShadowService:
    engine = db.make_engine(settings.database_url, settings.db_pool_size)
    if migrate:
        db.run_migrations(engine, MIGRATIONS, "alembic_version_shadow")
    accounts = None
    if settings.broker_admin_url:
        # A client id per process: two shadow replicas with one id would knock each other
        # off the broker.
        accounts = DynsecAccounts(
            MqttEndpoint.parse(settings.broker_admin_url),
            f"ota-shadow-dynsec-{socket.gethostname()}-{os.getpid()}",
        )
    return ShadowService(
        ShadowStore(engine),
        settings.limits,
        settings.max_batch_items,
        broker_accounts=accounts,
    )


def create_server(
    settings: ShadowSettings,
    service: ShadowService,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> tuple[grpc.Server, int]:
    """A ready-to-start server bound to `settings.listen` (port 0 picks a free port);
    `interceptors` carry operator authentication (services/common/auth.py)."""
    server = new_server(settings.workers, interceptors)
    shadow_pb2_grpc.add_ShadowServiceServicer_to_server(ShadowServicer(service), server)
    add_health_and_reflection(server, [SERVICE_NAME])
    return server, bind(server, settings.listen)


def main() -> None:
    configure_logging("shadow")
    settings = ShadowSettings.from_env()
    start_metrics_server()
    interceptors = [server_metrics_interceptor(), *server_interceptors()]
    server, port = create_server(settings, build_service(settings), interceptors)
    database = make_url(settings.database_url).render_as_string(hide_password=True)
    log.info("shadow service listening on port %d (database %s)", port, database)
    run_until_signalled(server)


if __name__ == "__main__":
    main()
