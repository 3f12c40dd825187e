"""The shadow service's tables (SQLAlchemy Core). Alembic migrations in `migrations/` create them.

One row per device holds its credentials hash, tags and whole shadow, so a fan-out touches one
row per device and a fleet query reads one table (docs/adr/0002-one-row-per-device.md).
"""

from sqlalchemy import JSON, BigInteger, Boolean, Column, Integer, MetaData, String, Table, Text
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

# JSONB on PostgreSQL (indexable, compared by value), JSON text on SQLite.
Json = JSON().with_variant(JSONB(), "postgresql")

devices = Table(
    "devices",
    metadata,
    Column("device_id", String(128), primary_key=True),
    Column("credential_hash", String(255), nullable=False),
    Column("tags", Json, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("desired", Json, nullable=False),
    Column("reported", Json, nullable=False),
    Column("shadow_metadata", Json, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("has_shadow", Boolean, nullable=False),
)

# The outbox: every accepted update adds its delta / documents messages here in the same
# transaction; the MQTT gateway publishes them and then deletes them (docs/adr/0006-outbox.md).
# `bucket` (crc32 of the device id mod 1024) lets several publishers split the events.
shadow_events = Table(
    "shadow_events",
    metadata,
    Column(
        "event_id",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("bucket", Integer, nullable=False),
    Column("device_id", String(128), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("delta_json", Text, nullable=True),
    Column("documents_json", Text, nullable=False),
    sqlite_autoincrement=True,
)
