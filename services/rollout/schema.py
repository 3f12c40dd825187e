"""The rollout service's tables (SQLAlchemy Core). Alembic migrations in `migrations/` create them.

- `rollouts`: one row per rollout, its definition and runtime state as JSON, and a `revision`
  that every write bumps (optimistic concurrency: a reconcile pass, a device report and an
  operator command never overwrite one another).
- `rollout_executions`: one row per (rollout, device), created when the device is notified.
- `rollout_claims`: which live rollout holds a device; the primary key is what makes "a device
  is in at most one live rollout" hold under concurrency.
- `rollout_dispatches`: the desired-state writes a committed pass still has to send (an outbox):
  written in the pass's transaction, deleted once `BatchUpdateDesired` took them, so a crash
  between commit and fan-out loses nothing. One row per device: the newest write wins.
  `leased_until` is set when a batch of them is handed to a fan-out task; a write whose lease
  ran out unsent (its worker died) is leased and handed out again.
"""

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

Json = JSON().with_variant(JSONB(), "postgresql")

rollouts = Table(
    "rollouts",
    metadata,
    Column("rollout_id", String(64), primary_key=True),
    Column("definition", Json, nullable=False),
    Column("state", Json, nullable=False),
    Column("status", String(32), nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("target_count", Integer, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Index("rollouts_status", "status"),
)

rollout_executions = Table(
    "rollout_executions",
    metadata,
    Column("rollout_id", String(64), primary_key=True),
    Column("device_id", String(128), primary_key=True),
    Column("stage", Integer, nullable=False),
    Column("stratum", String(256), nullable=False),
    Column("previous", Json, nullable=True),
    Column("status", String(16), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("notified_at", Json, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("step", String(32), nullable=True),
    Column("reason", Text, nullable=False),
    Column("rollback_requested_at", Float, nullable=True),
    Column("withdrawn", Boolean, nullable=False),
    Index("rollout_executions_device", "device_id"),
)

rollout_claims = Table(
    "rollout_claims",
    metadata,
    Column("device_id", String(128), primary_key=True),
    Column("rollout_id", String(64), nullable=False),
    Index("rollout_claims_rollout", "rollout_id"),
)

rollout_dispatches = Table(
    "rollout_dispatches",
    metadata,
    Column("device_id", String(128), primary_key=True),
    Column("rollout_id", String(64), nullable=False),
    Column("desired_json", Text, nullable=False),
    Column("leased_until", Float, nullable=True),
    Index("rollout_dispatches_rollout", "rollout_id"),
)
