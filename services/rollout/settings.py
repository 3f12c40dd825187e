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
    workers: int = 8
    db_pool_size: int = 10
    # Seconds between the process's own reconcile + fan-out passes over every live rollout;
    # 0 turns the loop off (when Celery beat drives the passes instead).
    reconcile_seconds: int = 5

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
        )
