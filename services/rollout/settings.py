"""Settings of the rollout service process, read once from the environment (README's table)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.common.config import env_int, env_str

DEFAULT_DATABASE_URL = "sqlite:///.devstack/ota.db"


@dataclass(frozen=True)
class RolloutSettings:
    database_url: str = DEFAULT_DATABASE_URL
    listen: str = "127.0.0.1:50053"
    shadow_address: str = "127.0.0.1:50051"
    # The token this service sends to the shadow service (role `admin` or `service`).
    service_token: str | None = None
    workers: int = 32  # each open WatchRollout stream holds one
    db_pool_size: int = 10
    # Seconds between reconcile + fan-out passes over every rollout with work: run by Celery
    # beat when a Celery broker is set, else by the service process's own loop; 0 = no passes.
    reconcile_seconds: int = 1
    # Celery broker of the fan-out workers (redis://... in production); unset: no Celery, the
    # service process runs the passes and sends the writes itself.
    celery_broker_url: str | None = None
    # Desired writes per BatchUpdateDesired call (one chunk task each).
    fanout_chunk: int = 500
    # A leased batch of desired writes that was not sent (a worker died) is leased and sent
    # again after this many seconds; re-sending is harmless (the shadow skips unchanged writes).
    dispatch_lease_seconds: int = 30
    # The Celery queue the rollout's tasks go to and its workers read.
    celery_queue: str = "ota-rollout"
    # Threads of one Celery worker process.
    worker_concurrency: int = 4

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RolloutSettings:
        env = os.environ if env is None else env
        return cls(
            database_url=env_str(env, "OTA_DATABASE_URL", DEFAULT_DATABASE_URL),
            listen=env_str(env, "OTA_ROLLOUT_LISTEN", cls.listen),
            shadow_address=env_str(env, "OTA_SHADOW_ADDRESS", cls.shadow_address),
            service_token=env.get("OTA_SERVICE_TOKEN", "").strip() or None,
            workers=env_int(env, "OTA_ROLLOUT_WORKERS", cls.workers, 1, 256),
            db_pool_size=env_int(env, "OTA_DB_POOL_SIZE", cls.db_pool_size, 1, 200),
            reconcile_seconds=env_int(
                env, "OTA_ROLLOUT_RECONCILE_SECONDS", cls.reconcile_seconds, 0, 3600
            ),
            celery_broker_url=env.get("OTA_CELERY_BROKER_URL", "").strip() or None,
            celery_queue=env_str(env, "OTA_CELERY_QUEUE", cls.celery_queue),
            fanout_chunk=env_int(env, "OTA_ROLLOUT_FANOUT_CHUNK", cls.fanout_chunk, 1, 1000),
            dispatch_lease_seconds=env_int(
                env, "OTA_ROLLOUT_DISPATCH_LEASE_SECONDS", cls.dispatch_lease_seconds, 1, 3600
            ),
            worker_concurrency=env_int(
                env, "OTA_ROLLOUT_WORKER_CONCURRENCY", cls.worker_concurrency, 1, 64
            ),
        )
