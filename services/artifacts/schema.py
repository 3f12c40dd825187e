"""The artifact service's tables (SQLAlchemy Core). Alembic migrations in `migrations/` create them.

They share the shadow service's database (`OTA_DATABASE_URL`) but no table and no foreign key
with it: devices are the shadow service's, asked for over gRPC. Tokens and one-time URLs are
stored by the sha256 of their secret, never the secret (docs/adr/0013-stored-single-use-tokens.md).
"""

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

Json = JSON().with_variant(JSONB(), "postgresql")

artifacts = Table(
    "artifacts",
    metadata,
    Column("artifact_id", String(32), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("version", String(128), nullable=False),
    Column("compatible", Json, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("manifest", Text, nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Column("key_id", String(16), nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("rollback_floor", String(128), nullable=True),  # migration 0002
    UniqueConstraint("name", "version", name="artifacts_name_version"),
    Index("artifacts_sha256", "sha256"),
    Index("artifacts_listing", "created_at_ms", "artifact_id"),
)

download_tokens = Table(
    "download_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("device_id", String(128), nullable=False),
    Column("artifact_id", String(32), nullable=False),
    Column("expires_at_ms", BigInteger, nullable=False),
    Column("used", Boolean, nullable=False),
    Index("download_tokens_expiry", "expires_at_ms"),
)

download_urls = Table(
    "download_urls",
    metadata,
    Column("url_hash", String(64), primary_key=True),
    Column("device_id", String(128), nullable=False),
    Column("artifact_id", String(32), nullable=False),
    Column("expires_at_ms", BigInteger, nullable=False),
    Column("completed", Boolean, nullable=False),
    Index("download_urls_expiry", "expires_at_ms"),
)
