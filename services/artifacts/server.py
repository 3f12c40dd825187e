"""Wiring of the artifact service process: settings -> engine, storage, signer -> services ->
the gRPC server and the download plane, both in one process (one asyncio loop for HTTP, the
gRPC server's own thread pool)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from protos.artifacts.v1 import artifacts_pb2, artifacts_pb2_grpc
from services.artifacts import signing
from services.artifacts.download_plane import PlaneLimits, RunningPlane, start_download_plane
from services.artifacts.rollout_usage import RolloutUsage
from services.artifacts.service import (
    ArtifactService,
    DownloadService,
    InUseCheck,
    never_in_use,
)
from services.artifacts.servicer import ArtifactServicer
from services.artifacts.settings import ArtifactSettings
from services.artifacts.storage import LocalStorage, S3Config, S3Storage, Storage
from services.artifacts.store import ArtifactStore
from services.common import db, gc_tuning
from services.common.auth import server_interceptors
from services.common.grpc_server import add_health_and_reflection, bind, new_server
from services.common.observability import (
    configure_logging,
    server_metrics_interceptor,
    start_metrics_server,
)

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_artifacts"
SERVICE_NAME = artifacts_pb2.DESCRIPTOR.services_by_name["ArtifactService"].full_name

log = logging.getLogger(__name__)


@dataclass
class Services:
    artifacts: ArtifactService
    downloads: DownloadService


def build_storage(settings: ArtifactSettings) -> Storage:
    if settings.storage == "s3":
        return S3Storage(
            S3Config(
                bucket=settings.s3_bucket,
                prefix=settings.s3_prefix,
                endpoint_url=settings.s3_endpoint_url or None,
                region=settings.s3_region or None,
                part_bytes=settings.s3_part_bytes,
                create_bucket=settings.s3_create_bucket,
            )
        )
    local = LocalStorage(Path(settings.artifacts_dir))
    local.remove_stale_temp_files()
    return local


def build_services(
    settings: ArtifactSettings,
    storage: Storage | None = None,
    is_in_use: InUseCheck | None = None,
    migrate: bool = True,
) -> Services:
    if is_in_use is None:
        is_in_use = (
            RolloutUsage(settings.rollout_address, settings.service_token)
            if settings.rollout_address
            else never_in_use
        )
    engine = db.make_engine(settings.database_url, settings.db_pool_size)
    if migrate:
        db.run_migrations(engine, MIGRATIONS, VERSION_TABLE)
    store = ArtifactStore(engine)
    storage = storage if storage is not None else build_storage(settings)
    signer = signing.load_or_create(Path(settings.signing_key_path))
    return Services(
        ArtifactService(store, storage, signer, settings.max_bytes, is_in_use),
        DownloadService(store, storage, settings.token_ttl_seconds, settings.url_ttl_seconds),
    )


def create_server(
    settings: ArtifactSettings,
    service: ArtifactService,
    download_base_url: str,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> tuple[grpc.Server, int]:
    """A ready-to-start gRPC server bound to `settings.listen` (port 0 picks a free port);
    `interceptors` carry operator authentication (services/common/auth.py)."""
    server = new_server(settings.workers, interceptors)
    artifacts_pb2_grpc.add_ArtifactServiceServicer_to_server(
        ArtifactServicer(service, download_base_url), server
    )
    add_health_and_reflection(server, [SERVICE_NAME])
    return server, bind(server, settings.listen)


async def start_plane(settings: ArtifactSettings, downloads: DownloadService) -> RunningPlane:
    """The download plane of these settings, serving in the running loop."""
    return await start_download_plane(
        downloads,
        settings.shadow_address,
        settings.download_listen,
        PlaneLimits(settings.max_concurrent_downloads, settings.max_bytes_per_second),
        settings.download_base_url,
        auth_cache_seconds=settings.auth_cache_seconds,
        shadow_token=settings.service_token,
    )


async def serve(settings: ArtifactSettings) -> None:
    services = build_services(settings)
    plane = await start_plane(settings, services.downloads)
    interceptors = [server_metrics_interceptor(), *server_interceptors()]
    server, port = create_server(settings, services.artifacts, plane.plane.base_url, interceptors)
    server.start()
    log.info(
        "artifact service listening on port %d, download plane on port %d (%s storage)",
        port,
        plane.port,
        settings.storage,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        server.stop(5.0)
        await plane.stop()


def main() -> None:
    """`python -m services.artifacts` serves; `python -m services.artifacts resign` re-signs
    every stored manifest with the configured key (key rotation, docs/adr/0012) and exits."""
    configure_logging("artifacts")
    settings = ArtifactSettings.from_env()
    command = sys.argv[1:]
    if command == ["resign"]:
        service = build_services(settings).artifacts
        count = service.resign()
        log.info("re-signed %d manifests with key %s", count, service.signer.key_id)
        return
    if command:
        raise SystemExit("usage: python -m services.artifacts [resign]")
    start_metrics_server()
    gc_tuning.tune_for_service()
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
