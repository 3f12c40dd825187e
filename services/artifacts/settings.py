"""Settings of the artifact service process (gRPC + download plane), read once from the
environment (README's configuration table). S3 credentials are not settings of ours: boto3
reads them from its standard chain (AWS_ACCESS_KEY_ID, instance roles, ...)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.common.config import ConfigError, env_bool, env_int, env_str

DEFAULT_DATABASE_URL = "sqlite:///.devstack/ota.db"
GIB = 1024 * 1024 * 1024
MIB = 1024 * 1024


@dataclass(frozen=True)
class ArtifactSettings:
    database_url: str = DEFAULT_DATABASE_URL
    db_pool_size: int = 10
    listen: str = "127.0.0.1:50052"
    workers: int = 16
    download_listen: str = "127.0.0.1:8080"
    # The public base of the download plane as devices reach it ("" = http://<download_listen>).
    download_base_url: str = ""
    shadow_address: str = "127.0.0.1:50051"
    # Sent to the shadow service on every call (OTA_SERVICE_TOKEN), when it requires one.
    service_token: str | None = None
    # The rollout service, asked before a delete whether a live rollout uses the artifact;
    # empty: no rollout service, nothing is ever in use.
    rollout_address: str = ""
    storage: str = "local"  # local | s3
    artifacts_dir: str = ".devstack/artifacts"
    max_bytes: int = 2 * GIB
    signing_key_path: str = ".devstack/artifact-signing-key.pem"
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_part_bytes: int = 8 * MIB
    s3_create_bucket: bool = False
    token_ttl_seconds: int = 120
    url_ttl_seconds: int = 600
    max_concurrent_downloads: int = 100
    max_bytes_per_second: int = 0  # 0 = no cap
    auth_cache_seconds: int = 30  # 0 = ask the shadow service on every request

    def __post_init__(self) -> None:
        if self.storage not in ("local", "s3"):
            raise ConfigError(f"OTA_ARTIFACTS_STORAGE must be local or s3, got {self.storage!r}")
        if self.storage == "s3" and not self.s3_bucket:
            raise ConfigError("OTA_S3_BUCKET is required when OTA_ARTIFACTS_STORAGE=s3")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ArtifactSettings:
        env = os.environ if env is None else env
        return cls(
            database_url=env_str(env, "OTA_DATABASE_URL", DEFAULT_DATABASE_URL),
            db_pool_size=env_int(env, "OTA_DB_POOL_SIZE", cls.db_pool_size, 1, 200),
            listen=env_str(env, "OTA_ARTIFACTS_LISTEN", cls.listen),
            workers=env_int(env, "OTA_ARTIFACTS_WORKERS", cls.workers, 1, 256),
            download_listen=env_str(env, "OTA_DOWNLOAD_LISTEN", cls.download_listen),
            download_base_url=env_str(env, "OTA_DOWNLOAD_BASE_URL", ""),
            shadow_address=env_str(env, "OTA_SHADOW_ADDRESS", cls.shadow_address),
            service_token=env_str(env, "OTA_SERVICE_TOKEN", "") or None,
            rollout_address=env_str(env, "OTA_ROLLOUT_ADDRESS", ""),
            storage=env_str(env, "OTA_ARTIFACTS_STORAGE", cls.storage).lower(),
            artifacts_dir=env_str(env, "OTA_ARTIFACTS_DIR", cls.artifacts_dir),
            max_bytes=env_int(env, "OTA_ARTIFACTS_MAX_BYTES", cls.max_bytes, 1, 5 * 1024 * GIB),
            signing_key_path=env_str(env, "OTA_SIGNING_KEY_PATH", cls.signing_key_path),
            s3_bucket=env_str(env, "OTA_S3_BUCKET", ""),
            s3_prefix=env_str(env, "OTA_S3_PREFIX", ""),
            s3_endpoint_url=env_str(env, "OTA_S3_ENDPOINT_URL", ""),
            s3_region=env_str(env, "OTA_S3_REGION", ""),
            s3_part_bytes=env_int(env, "OTA_S3_PART_BYTES", cls.s3_part_bytes, 5 * MIB, 5 * GIB),
            s3_create_bucket=env_bool(env, "OTA_S3_CREATE_BUCKET", False),
            token_ttl_seconds=env_int(
                env, "OTA_DOWNLOAD_TOKEN_TTL_SECONDS", cls.token_ttl_seconds, 5, 3600
            ),
            url_ttl_seconds=env_int(
                env, "OTA_DOWNLOAD_URL_TTL_SECONDS", cls.url_ttl_seconds, 10, 3600
            ),
            max_concurrent_downloads=env_int(
                env, "OTA_DOWNLOAD_MAX_CONCURRENT", cls.max_concurrent_downloads, 1, 100_000
            ),
            max_bytes_per_second=env_int(env, "OTA_DOWNLOAD_MAX_BYTES_PER_SECOND", 0, 0, 1 << 40),
            auth_cache_seconds=env_int(
                env, "OTA_DOWNLOAD_AUTH_CACHE_SECONDS", cls.auth_cache_seconds, 0, 3600
            ),
        )
