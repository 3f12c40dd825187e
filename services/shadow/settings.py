"""Settings of the shadow service process, read once from the environment (README's table)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common.config import env_int, env_str
from services.shadow.domain import ShadowLimits

DEFAULT_DATABASE_URL = "sqlite:///.devstack/ota.db"


@dataclass(frozen=True)
class ShadowSettings:
    database_url: str = DEFAULT_DATABASE_URL
    listen: str = "127.0.0.1:50051"
    # Few: busy threads in one GIL get less done the more there are (docs/performance.md);
    # each gateway's outbox long poll (ReadEvents) holds one while it waits.
    workers: int = 8
    db_pool_size: int = 10
    max_batch_items: int = 10_000
    limits: ShadowLimits = field(default_factory=ShadowLimits)
    # Mosquitto dynamic-security admin account; unset: no broker accounts to manage (amqtt
    # asks this service to authenticate devices instead).
    broker_admin_url: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ShadowSettings:
        env = os.environ if env is None else env
        return cls(
            database_url=env_str(env, "OTA_DATABASE_URL", DEFAULT_DATABASE_URL),
            listen=env_str(env, "OTA_SHADOW_LISTEN", cls.listen),
            workers=env_int(env, "OTA_SHADOW_WORKERS", cls.workers, 1, 256),
            db_pool_size=env_int(env, "OTA_DB_POOL_SIZE", cls.db_pool_size, 1, 200),
            max_batch_items=env_int(
                env, "OTA_SHADOW_MAX_BATCH_ITEMS", cls.max_batch_items, 1, 100_000
            ),
            limits=_limits(env),
            broker_admin_url=env_str(env, "OTA_BROKER_ADMIN_URL", ""),
        )


def _limits(env: Mapping[str, str]) -> ShadowLimits:
    document_bytes = env_int(env, "OTA_SHADOW_MAX_DOCUMENT_BYTES", 8192, 256, 1024 * 1024)
    return ShadowLimits(
        max_document_bytes=document_bytes,
        max_request_bytes=2 * document_bytes,  # room for nulls, clientToken and version
        max_depth=env_int(env, "OTA_SHADOW_MAX_DEPTH", 6, 1, 32),
    )
