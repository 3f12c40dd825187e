"""artifacts, download tokens and one-time download URLs.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "artifacts",
        sa.Column("artifact_id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("compatible", Json, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("manifest", sa.Text, nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("name", "version", name="artifacts_name_version"),
    )
    op.create_index("artifacts_sha256", "artifacts", ["sha256"])
    op.create_index("artifacts_listing", "artifacts", ["created_at_ms", "artifact_id"])
    op.create_table(
        "download_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("artifact_id", sa.String(32), nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger, nullable=False),
        sa.Column("used", sa.Boolean, nullable=False),
    )
    op.create_index("download_tokens_expiry", "download_tokens", ["expires_at_ms"])
    op.create_table(
        "download_urls",
        sa.Column("url_hash", sa.String(64), primary_key=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("artifact_id", sa.String(32), nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger, nullable=False),
        sa.Column("completed", sa.Boolean, nullable=False),
    )
    op.create_index("download_urls_expiry", "download_urls", ["expires_at_ms"])


def downgrade() -> None:
    op.drop_table("download_urls")
    op.drop_table("download_tokens")
    op.drop_table("artifacts")
