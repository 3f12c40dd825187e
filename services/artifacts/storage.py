"""Where artifact bytes live, behind one small interface: a local directory or S3 (boto3).

Blobs are content-addressed by sha256, and a blob appears under its address only when it is
complete: the local backend writes to a temp name in the same file system and `os.replace`s
it; the S3 backend streams a multipart upload to a staging key and copies it into place (one
`PutObject` for a blob smaller than a part). `BlobWriter.abort` leaves nothing behind, not a
temp file, not an unfinished multipart upload.

The base classes wrap every foreign exception (OSError, botocore's) into `StorageError`, so
callers handle one error type whatever the backend (python-tuf's `FetcherInterface` pattern).
"""

from __future__ import annotations

import abc
import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from services.artifacts.domain import SHA256_PATTERN
from services.artifacts.errors import StorageError

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

STALE_TEMP_SECONDS = 24 * 3600


@dataclass(frozen=True)
class LocalFile:
    """A blob the download plane serves itself."""

    path: Path


@dataclass(frozen=True)
class RemoteUrl:
    """A blob the device fetches from elsewhere (a presigned URL); a secret until it expires."""

    url: str


@contextlib.contextmanager
def _translated(foreign: tuple[type[BaseException], ...], action: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except foreign as exc:
        raise StorageError(f"storage failed to {action}: {type(exc).__name__}") from exc


def _check_address(sha256: str) -> str:
    if not SHA256_PATTERN.fullmatch(sha256):
        raise StorageError("a blob address is 64 lowercase hex digits")
    return sha256


class BlobWriter(abc.ABC):
    """One blob being written. Exactly one of `commit` or `abort` ends it."""

    foreign_errors: tuple[type[BaseException], ...] = (OSError,)

    def write(self, chunk: bytes) -> None:
        with _translated(self.foreign_errors, "write a blob"):
            self._write(chunk)

    def commit(self, sha256: str) -> None:
        """Publish the bytes under their address (the caller computed and checked it)."""
        with _translated(self.foreign_errors, "store a blob"):
            self._commit(_check_address(sha256))

    def abort(self) -> None:
        """Forget the bytes; never raises, since it runs while another error propagates."""
        with contextlib.suppress(StorageError), _translated(self.foreign_errors, "clean up"):
            self._abort()

    @abc.abstractmethod
    def _write(self, chunk: bytes) -> None: ...

    @abc.abstractmethod
    def _commit(self, sha256: str) -> None: ...

    @abc.abstractmethod
    def _abort(self) -> None: ...


class Storage(abc.ABC):
    """A content-addressed blob store."""

    foreign_errors: tuple[type[BaseException], ...] = (OSError,)
    # True when devices fetch blobs from the backend itself (presigned URLs), False when the
    # download plane serves them.
    presigns = False

    def open_writer(self) -> BlobWriter:
        with _translated(self.foreign_errors, "start a blob"):
            return self._open_writer()

    def exists(self, sha256: str) -> bool:
        with _translated(self.foreign_errors, "look up a blob"):
            return self._exists(_check_address(sha256))

    def delete(self, sha256: str) -> None:
        """Delete a blob; deleting a missing blob is not an error."""
        with _translated(self.foreign_errors, "delete a blob"):
            self._delete(_check_address(sha256))

    def download_source(self, sha256: str, ttl_seconds: int) -> LocalFile | RemoteUrl:
        with _translated(self.foreign_errors, "locate a blob"):
            return self._download_source(_check_address(sha256), ttl_seconds)

    def addresses(self) -> list[str]:
        """Every stored blob's address (for operators' checks and the tests)."""
        with _translated(self.foreign_errors, "list blobs"):
            return sorted(self._addresses())

    def leftovers(self) -> list[str]:
        """Anything stored that is not a complete blob: temp files, staging objects and
        unfinished multipart uploads. Empty unless an upload is in flight (or a process died)."""
        with _translated(self.foreign_errors, "list leftovers"):
            return sorted(self._leftovers())

    @abc.abstractmethod
    def _open_writer(self) -> BlobWriter: ...

    @abc.abstractmethod
    def _exists(self, sha256: str) -> bool: ...

    @abc.abstractmethod
    def _delete(self, sha256: str) -> None: ...

    @abc.abstractmethod
    def _download_source(self, sha256: str, ttl_seconds: int) -> LocalFile | RemoteUrl: ...

    @abc.abstractmethod
    def _addresses(self) -> list[str]: ...

    @abc.abstractmethod
    def _leftovers(self) -> list[str]: ...


# --- local directory ----------------------------------------------------------------------------


class _LocalWriter(BlobWriter):
    def __init__(self, storage: LocalStorage) -> None:
        self._storage = storage
        self._temp = storage.temp_dir / f"{uuid.uuid4().hex}.part"
        self._file = open(self._temp, "xb")  # noqa: SIM115 - closed by commit or abort

    def _write(self, chunk: bytes) -> None:
        self._file.write(chunk)

    def _commit(self, sha256: str) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            final = self._storage.blob_path(sha256)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._temp, final)
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        self._file.close()
        self._temp.unlink(missing_ok=True)


class LocalStorage(Storage):
    """Blobs as files `<root>/blobs/<sha[:2]>/<sha>`; uploads in progress in `<root>/tmp/`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs"
        self.temp_dir = root / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.temp_dir.mkdir(parents=True, exist_ok=True)

    def remove_stale_temp_files(self, now: float | None = None) -> int:
        """Temp files a crashed process left behind (older than a day: no upload takes that
        long, so a concurrent upload's file is never removed)."""
        now = time.time() if now is None else now
        removed = 0
        for entry in self.temp_dir.glob("*.part"):
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < now - STALE_TEMP_SECONDS:
                    entry.unlink()
                    removed += 1
        return removed

    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256[:2] / sha256

    def _open_writer(self) -> BlobWriter:
        return _LocalWriter(self)

    def _exists(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def _delete(self, sha256: str) -> None:
        self.blob_path(sha256).unlink(missing_ok=True)

    def _download_source(self, sha256: str, ttl_seconds: int) -> LocalFile:
        return LocalFile(self.blob_path(sha256))

    def _addresses(self) -> list[str]:
        return [p.name for p in self.blob_dir.glob("*/*") if p.is_file()]

    def _leftovers(self) -> list[str]:
        return [p.name for p in self.temp_dir.iterdir()]


# --- S3 -----------------------------------------------------------------------------------------

S3_FOREIGN_ERRORS: tuple[type[BaseException], ...] = (BotoCoreError, ClientError, OSError)
MIN_PART_BYTES = 5 * 1024 * 1024  # S3's minimum for every part but the last


@dataclass(frozen=True)
class S3Config:
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    part_bytes: int = 8 * 1024 * 1024
    create_bucket: bool = False


class _S3Writer(BlobWriter):
    foreign_errors = S3_FOREIGN_ERRORS

    def __init__(self, storage: S3Storage) -> None:
        self._s3 = storage
        self._buffer = bytearray()
        self._staging_key = f"{storage.config.prefix}staging/{uuid.uuid4().hex}"
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._completed = False

    def _write(self, chunk: bytes) -> None:
        self._buffer += chunk
        part_bytes = self._s3.config.part_bytes
        while len(self._buffer) >= part_bytes:
            self._upload_part(bytes(self._buffer[:part_bytes]))
            del self._buffer[:part_bytes]

    def _upload_part(self, body: bytes) -> None:
        client, bucket = self._s3.client, self._s3.config.bucket
        if self._upload_id is None:
            created = client.create_multipart_upload(Bucket=bucket, Key=self._staging_key)
            self._upload_id = created["UploadId"]
        number = len(self._parts) + 1
        answer = client.upload_part(
            Bucket=bucket,
            Key=self._staging_key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=body,
        )
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    def _commit(self, sha256: str) -> None:
        client, bucket = self._s3.client, self._s3.config.bucket
        final = self._s3.blob_key(sha256)
        try:
            if self._upload_id is None:
                client.put_object(Bucket=bucket, Key=final, Body=bytes(self._buffer))
                return
            if self._buffer:
                self._upload_part(bytes(self._buffer))
            client.complete_multipart_upload(
                Bucket=bucket,
                Key=self._staging_key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},  # type: ignore[typeddict-item]
            )
            self._completed = True
            if not self._s3._exists(sha256):
                # A managed copy: a server-side multipart copy when the blob is large.
                client.copy(
                    {"Bucket": bucket, "Key": self._staging_key},
                    bucket,
                    final,
                    Config=self._s3.transfer_config,
                )
            client.delete_object(Bucket=bucket, Key=self._staging_key)
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        client, bucket = self._s3.client, self._s3.config.bucket
        self._buffer.clear()
        if self._upload_id is not None and not self._completed:
            client.abort_multipart_upload(
                Bucket=bucket, Key=self._staging_key, UploadId=self._upload_id
            )
        if self._completed:
            client.delete_object(Bucket=bucket, Key=self._staging_key)


class S3Storage(Storage):
    """Blobs as objects `<prefix>blobs/<sha>`; devices download them by presigned GET URLs."""

    foreign_errors = S3_FOREIGN_ERRORS
    presigns = True

    def __init__(self, config: S3Config, client: S3Client | None = None) -> None:
        if config.part_bytes < MIN_PART_BYTES:
            raise ValueError(f"S3 parts must be at least {MIN_PART_BYTES} bytes")
        self.config = config
        self.transfer_config = TransferConfig(
            multipart_threshold=config.part_bytes, multipart_chunksize=config.part_bytes
        )
        if client is None:
            options: dict[str, Any] = {"signature_version": "s3v4"}
            if config.endpoint_url:
                options["s3"] = {"addressing_style": "path"}  # MinIO, moto, Ceph
            client = boto3.client(
                "s3",
                endpoint_url=config.endpoint_url or None,
                region_name=config.region or None,
                config=Config(**options),
            )
        self.client: S3Client = client
        if config.create_bucket:
            with _translated(self.foreign_errors, "create the bucket"):
                self._create_bucket()

    def _create_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.config.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.config.bucket)

    def blob_key(self, sha256: str) -> str:
        return f"{self.config.prefix}blobs/{sha256}"

    def _open_writer(self) -> BlobWriter:
        return _S3Writer(self)

    def _exists(self, sha256: str) -> bool:
        try:
            self.client.head_object(Bucket=self.config.bucket, Key=self.blob_key(sha256))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def _delete(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.config.bucket, Key=self.blob_key(sha256))

    def _download_source(self, sha256: str, ttl_seconds: int) -> RemoteUrl:
        url = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.config.bucket, "Key": self.blob_key(sha256)},
            ExpiresIn=ttl_seconds,
        )
        return RemoteUrl(url)

    def _keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.config.bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys

    def _addresses(self) -> list[str]:
        prefix = f"{self.config.prefix}blobs/"
        return [key[len(prefix) :] for key in self._keys(prefix)]

    def _leftovers(self) -> list[str]:
        staging = self._keys(f"{self.config.prefix}staging/")
        uploads = self.client.list_multipart_uploads(
            Bucket=self.config.bucket, Prefix=f"{self.config.prefix}staging/"
        )
        return staging + [f"multipart:{u['Key']}" for u in uploads.get("Uploads", [])]
