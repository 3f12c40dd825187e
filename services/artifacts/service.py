"""The artifact service's use cases, free of any transport: validate, then storage + store.

`ArtifactService` is what operators reach over gRPC: upload (stream, meter, sign, record),
read, list, delete. `DownloadService` is what devices reach over the download plane: a token
for the artifact their desired state names, its exchange for a one-time URL, and the checks on
each download. Device authentication and the desired state come in as plain values: asking the
shadow service is the download plane's job, so these use cases stay synchronous and testable.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from services.artifacts import domain
from services.artifacts.domain import ArtifactSpec, TokenRecord, UrlRecord
from services.artifacts.errors import (
    ArtifactError,
    ArtifactExistsError,
    ArtifactInUseError,
    ArtifactNotFoundError,
    BadRequestError,
    InvalidArtifactError,
    NotTargetedError,
)
from services.artifacts.signing import Signer
from services.artifacts.storage import LocalFile, RemoteUrl, Storage
from services.artifacts.store import ArtifactRecord, ArtifactStore
from services.common.observability import ARTIFACT_UPLOADS

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_SECRET_CHARS = 128
PURGE_GRACE_SECONDS = 3600  # expired tokens and URLs are kept an hour, to answer "expired"

InUseCheck = Callable[[str], bool]


def never_in_use(artifact_id: str) -> bool:
    """The default until the rollout service exists (issue: rollouts): nothing is in use."""
    return False


@dataclass(frozen=True)
class ArtifactPage:
    artifacts: list[ArtifactRecord]
    next_page_token: str


class ArtifactService:
    def __init__(
        self,
        store: ArtifactStore,
        storage: Storage,
        signer: Signer,
        max_bytes: int,
        is_in_use: InUseCheck = never_in_use,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.store = store
        self.storage = storage
        self.signer = signer
        self.max_bytes = max_bytes
        self.is_in_use = is_in_use
        self.clock = clock
        self.new_id = new_id

    def upload(self, spec: ArtifactSpec, chunks: Iterable[bytes]) -> ArtifactRecord:
        """Stream `chunks` into storage while metering them; sign and record the artifact.

        Any failure (limits, mismatch, a cancelled stream, storage, a duplicate) aborts the
        blob writer, so nothing of a rejected upload stays stored.
        """
        try:
            record = self._upload(spec, chunks)
        except ArtifactError as exc:
            ARTIFACT_UPLOADS.labels(exc.code).inc()
            raise
        except BaseException:  # the stream was cancelled, or a bug
            ARTIFACT_UPLOADS.labels("aborted").inc()
            raise
        ARTIFACT_UPLOADS.labels("ok").inc()
        return record

    def _upload(self, spec: ArtifactSpec, chunks: Iterable[bytes]) -> ArtifactRecord:
        if self.store.exists(spec.name, spec.version):
            raise ArtifactExistsError(f"artifact {spec.name} {spec.version} already exists")
        meter = domain.UploadMeter(spec, self.max_bytes)
        writer = self.storage.open_writer()
        try:
            for chunk in chunks:
                meter.add(chunk)
                writer.write(chunk)
            digest = meter.finish()
            writer.commit(digest.sha256)
        except BaseException:
            writer.abort()
            raise
        manifest = domain.build_manifest(self.new_id(), spec, digest)
        canonical = manifest.canonical()
        record = ArtifactRecord(
            artifact_id=manifest.artifact_id,
            name=spec.name,
            version=spec.version,
            compatible=spec.compatible,
            size=digest.size,
            sha256=digest.sha256,
            manifest=canonical.decode(),
            signature=self.signer.sign(canonical),
            key_id=self.signer.key_id,
            created_at_ms=int(self.clock() * 1000),
            rollback_floor=spec.rollback_floor,
        )
        try:
            self.store.insert_artifact(record)
        except BaseException:
            self._drop_blob_if_unreferenced(digest.sha256)
            raise
        log.info(
            "artifact %s stored: %s %s, %d bytes",
            record.artifact_id,
            spec.name,
            spec.version,
            digest.size,
            extra={"artifact_id": record.artifact_id},
        )
        return record

    def get(self, artifact_id: str) -> ArtifactRecord:
        return self.store.get_artifact(domain.validate_artifact_id(artifact_id))

    def list(self, name: str, page_size: int, page_token: str) -> ArtifactPage:
        if name:
            domain.validate_name(name)
        if page_size < 0:
            raise InvalidArtifactError("page_size must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        found = self.store.list_artifacts(name or None, domain.decode_cursor(page_token), size + 1)
        next_token = ""
        if len(found) > size:
            last = found[size - 1]
            next_token = domain.Cursor(last.created_at_ms, last.artifact_id).encode()
        return ArtifactPage(found[:size], next_token)

    def delete(self, artifact_id: str) -> None:
        domain.validate_artifact_id(artifact_id)
        if self.is_in_use(artifact_id):
            raise ArtifactInUseError(f"artifact {artifact_id} is used by a rollout")
        record, unreferenced = self.store.delete_artifact(artifact_id)
        if unreferenced:
            self.storage.delete(record.sha256)
        log.info("artifact %s deleted", artifact_id, extra={"artifact_id": artifact_id})

    def resign(self) -> int:
        """Sign every stored manifest that another key signed with the current key (step 3
        of a key rotation, docs/adr/0012); returns how many were re-signed. The manifest bytes
        do not change, so a device holding them needs only the new signature."""
        resigned = 0
        cursor: domain.Cursor | None = None
        while True:
            page = self.store.list_artifacts(None, cursor, MAX_PAGE_SIZE)
            for record in page:
                if record.key_id != self.signer.key_id:
                    signature = self.signer.sign(record.manifest.encode())
                    self.store.update_signature(record.artifact_id, signature, self.signer.key_id)
                    resigned += 1
            if len(page) < MAX_PAGE_SIZE:
                return resigned
            cursor = domain.Cursor(page[-1].created_at_ms, page[-1].artifact_id)

    def _drop_blob_if_unreferenced(self, sha256: str) -> None:
        try:
            if not self.store.blob_in_use(sha256):
                self.storage.delete(sha256)
        except Exception:  # already failing: report the first error, not this one
            log.warning("could not remove the blob of a failed upload", exc_info=True)


# --- downloads ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_in: int


@dataclass(frozen=True)
class DownloadGrant:
    """What a device gets for its token. `url_secret` is set for the local backend (the plane
    builds its URL), `remote_url` for S3 (a presigned GET)."""

    artifact: ArtifactRecord
    expires_at: float
    url_secret: str | None = None
    remote_url: str | None = None


@dataclass(frozen=True)
class OpenDownload:
    url_hash: str
    artifact: ArtifactRecord
    source: LocalFile


def _bounded_secret(secret: str, what: str) -> str:
    if not secret or len(secret) > MAX_SECRET_CHARS or not secret.isascii():
        raise BadRequestError(f"malformed {what}")
    return secret


class DownloadService:
    def __init__(
        self,
        store: ArtifactStore,
        storage: Storage,
        token_ttl_seconds: int = 120,
        url_ttl_seconds: int = 600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.storage = storage
        self.token_ttl_seconds = token_ttl_seconds
        self.url_ttl_seconds = url_ttl_seconds
        self.clock = clock

    def issue_token(self, device_id: str, artifact_id: str, desired: Any) -> IssuedToken:
        """A token for an authenticated device whose desired state (`desired`, None when it
        has no shadow) names this artifact."""
        domain.validate_artifact_id(artifact_id)
        self.store.get_artifact(artifact_id)  # 404 for an unknown artifact
        if domain.targeted_artifact(desired) != artifact_id:
            raise NotTargetedError("the device's desired state does not name this artifact")
        now = self.clock()
        token = secrets.token_urlsafe(32)
        record = TokenRecord(device_id, artifact_id, now + self.token_ttl_seconds)
        self.store.insert_token(domain.secret_digest(token), record)
        self.store.purge_expired(now - PURGE_GRACE_SECONDS)
        return IssuedToken(token, self.token_ttl_seconds)

    def exchange(self, device_id: str, token: str) -> DownloadGrant:
        """Redeem a token (once) for a one-time URL bound to the same device and artifact."""
        token_hash = domain.secret_digest(_bounded_secret(token, "token"))
        now = self.clock()
        expires_at = now + self.url_ttl_seconds
        url_secret = secrets.token_urlsafe(32)
        local = not self.storage.presigns

        def redeem(record: TokenRecord | None) -> tuple[str, UrlRecord] | None:
            checked = domain.check_token(record, device_id, now)
            if not local:
                return None
            url = UrlRecord(device_id, checked.artifact_id, expires_at)
            return domain.secret_digest(url_secret), url

        token_record = self.store.redeem_token(token_hash, redeem)
        artifact = self.store.get_artifact(token_record.artifact_id)
        if local:
            return DownloadGrant(artifact, expires_at, url_secret=url_secret)
        source = self.storage.download_source(artifact.sha256, self.url_ttl_seconds)
        assert isinstance(source, RemoteUrl)
        return DownloadGrant(artifact, expires_at, remote_url=source.url)

    def open_download(self, device_id: str, url_secret: str) -> OpenDownload:
        """The checks before a download through a one-time URL; the plane sends the bytes."""
        url_hash = domain.secret_digest(_bounded_secret(url_secret, "download URL"))
        url, artifact = self.store.get_url_and_artifact(url_hash)
        domain.check_url(url, device_id, self.clock())
        if artifact is None:
            raise ArtifactNotFoundError("the artifact was deleted")
        source = self.storage.download_source(artifact.sha256, self.url_ttl_seconds)
        assert isinstance(source, LocalFile)
        return OpenDownload(url_hash, artifact, source)

    def complete(self, url_hash: str) -> None:
        """A download through this URL delivered the artifact's last byte: the URL is used up."""
        self.store.complete_url(url_hash)
