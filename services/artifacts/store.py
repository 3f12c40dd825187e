"""Persistence of artifact metadata, download tokens and one-time URLs (SQLAlchemy Core).

The store knows rows and transactions, not rules: redeeming a token takes a callback (built on
a pure rule from `domain`) and runs it under a row lock, so a token is exchanged at most once
even when a device sends the same token twice at the same moment. Times are stored as epoch
milliseconds; the domain's are seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from services.artifacts.domain import Cursor, TokenRecord, UrlRecord
from services.artifacts.errors import ArtifactExistsError, ArtifactNotFoundError
from services.artifacts.schema import artifacts, download_tokens, download_urls


@dataclass(frozen=True)
class ArtifactRecord:
    artifact_id: str
    name: str
    version: str
    compatible: tuple[str, ...]
    size: int
    sha256: str
    manifest: str  # canonical JSON, exactly the signed bytes
    signature: bytes
    key_id: str
    created_at_ms: int
    rollback_floor: str | None = None  # also in `manifest` when set


def _record(row: Any) -> ArtifactRecord:
    return ArtifactRecord(
        artifact_id=row.artifact_id,
        name=row.name,
        version=row.version,
        compatible=tuple(row.compatible),
        size=row.size,
        sha256=row.sha256,
        manifest=row.manifest,
        signature=bytes(row.signature),
        key_id=row.key_id,
        created_at_ms=row.created_at_ms,
        rollback_floor=row.rollback_floor,
    )


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class ArtifactStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- artifacts --------------------------------------------------------------------------

    def insert_artifact(self, record: ArtifactRecord) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    artifacts.insert(),
                    {
                        "artifact_id": record.artifact_id,
                        "name": record.name,
                        "version": record.version,
                        "compatible": list(record.compatible),
                        "size": record.size,
                        "sha256": record.sha256,
                        "manifest": record.manifest,
                        "signature": record.signature,
                        "key_id": record.key_id,
                        "created_at_ms": record.created_at_ms,
                        "rollback_floor": record.rollback_floor,
                    },
                )
        except IntegrityError:
            raise ArtifactExistsError(
                f"artifact {record.name} {record.version} already exists"
            ) from None

    def exists(self, name: str, version: str) -> bool:
        with self.engine.connect() as conn:
            found = conn.execute(
                select(artifacts.c.artifact_id).where(
                    artifacts.c.name == name, artifacts.c.version == version
                )
            ).first()
        return found is not None

    def get_artifact(self, artifact_id: str) -> ArtifactRecord:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(artifacts).where(artifacts.c.artifact_id == artifact_id)
            ).first()
        if row is None:
            raise ArtifactNotFoundError(f"no artifact {artifact_id}")
        return _record(row)

    def list_artifacts(
        self, name: str | None, after: Cursor | None, limit: int
    ) -> list[ArtifactRecord]:
        """Newest first: by creation time, then id, both descending."""
        query = select(artifacts)
        if name:
            query = query.where(artifacts.c.name == name)
        if after is not None:
            query = query.where(
                or_(
                    artifacts.c.created_at_ms < after.created_at_ms,
                    and_(
                        artifacts.c.created_at_ms == after.created_at_ms,
                        artifacts.c.artifact_id < after.artifact_id,
                    ),
                )
            )
        query = query.order_by(
            artifacts.c.created_at_ms.desc(), artifacts.c.artifact_id.desc()
        ).limit(limit)
        with self.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def delete_artifact(self, artifact_id: str) -> tuple[ArtifactRecord, bool]:
        """Delete the row; returns it and whether its blob is now unreferenced."""
        with self.engine.begin() as conn:
            row = conn.execute(
                select(artifacts).where(artifacts.c.artifact_id == artifact_id).with_for_update()
            ).first()
            if row is None:
                raise ArtifactNotFoundError(f"no artifact {artifact_id}")
            conn.execute(delete(artifacts).where(artifacts.c.artifact_id == artifact_id))
            others = conn.execute(
                select(func.count()).select_from(artifacts).where(artifacts.c.sha256 == row.sha256)
            ).scalar_one()
        return _record(row), others == 0

    def update_signature(self, artifact_id: str, signature: bytes, key_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(artifacts)
                .where(artifacts.c.artifact_id == artifact_id)
                .values(signature=signature, key_id=key_id)
            )

    def blob_in_use(self, sha256: str) -> bool:
        with self.engine.connect() as conn:
            found = conn.execute(
                select(artifacts.c.artifact_id).where(artifacts.c.sha256 == sha256).limit(1)
            ).first()
        return found is not None

    # --- tokens and URLs --------------------------------------------------------------------

    def insert_token(self, token_hash: str, token: TokenRecord) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                download_tokens.insert(),
                {
                    "token_hash": token_hash,
                    "device_id": token.device_id,
                    "artifact_id": token.artifact_id,
                    "expires_at_ms": _ms(token.expires_at),
                    "used": token.used,
                },
            )

    def redeem_token(
        self,
        token_hash: str,
        redeem: Callable[[TokenRecord | None], tuple[str, UrlRecord] | None],
    ) -> TokenRecord:
        """Lock the token, let `redeem` judge it (it raises to refuse), mark it used and, when
        `redeem` returns one, store the URL it grants, all in one transaction."""
        with self.engine.begin() as conn:
            row = conn.execute(
                select(download_tokens)
                .where(download_tokens.c.token_hash == token_hash)
                .with_for_update()
            ).first()
            record = (
                None
                if row is None
                else TokenRecord(row.device_id, row.artifact_id, row.expires_at_ms / 1000, row.used)
            )
            grant = redeem(record)
            assert record is not None  # redeem refuses unknown tokens
            conn.execute(
                update(download_tokens)
                .where(download_tokens.c.token_hash == token_hash)
                .values(used=True)
            )
            if grant is not None:
                url_hash, url = grant
                conn.execute(
                    download_urls.insert(),
                    {
                        "url_hash": url_hash,
                        "device_id": url.device_id,
                        "artifact_id": url.artifact_id,
                        "expires_at_ms": _ms(url.expires_at),
                        "completed": url.completed,
                    },
                )
        return record

    def get_url_and_artifact(self, url_hash: str) -> tuple[UrlRecord | None, ArtifactRecord | None]:
        """A URL and the artifact it names in one query (the download path's only read)."""
        query = (
            select(download_urls, artifacts)
            .select_from(
                download_urls.outerjoin(
                    artifacts, artifacts.c.artifact_id == download_urls.c.artifact_id
                )
            )
            .where(download_urls.c.url_hash == url_hash)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None, None
        url = UrlRecord(row.device_id, row.artifact_id, row.expires_at_ms / 1000, row.completed)
        return url, (_record(row) if row.sha256 is not None else None)

    def complete_url(self, url_hash: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(download_urls)
                .where(download_urls.c.url_hash == url_hash)
                .values(completed=True)
            )

    def purge_expired(self, before: float) -> int:
        """Forget tokens and URLs that expired before `before`; returns how many."""
        with self.engine.begin() as conn:
            purged = 0
            for table in (download_tokens, download_urls):
                result = conn.execute(delete(table).where(table.c.expires_at_ms < _ms(before)))
                purged += result.rowcount
        return purged

    def count_rows(self) -> dict[str, int]:
        """Rows per table (operators' checks and the tests)."""
        tables: Sequence[Any] = (artifacts, download_tokens, download_urls)
        with self.engine.connect() as conn:
            return {
                table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
                for table in tables
            }
