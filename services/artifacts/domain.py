"""The artifact and download rules, pure: validation, manifests, tokens, URLs, ranges, pacing.

Plain functions and frozen dataclasses over plain data. No gRPC, SQL, HTTP server, boto3 or
file I/O here, and no clock: every rule that depends on time takes `now` (seconds since the
epoch). The service, the store, the servicer and the download plane translate and call these.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from services.artifacts.errors import (
    ArtifactTooLargeError,
    BadRequestError,
    ContentMismatchError,
    InvalidArtifactError,
    RangeNotSatisfiableError,
    TokenExpiredError,
    TokenNotFoundError,
    TokenUsedError,
    UnauthenticatedError,
    UrlExpiredError,
    UrlNotFoundError,
    UrlUsedError,
    WrongDeviceError,
)

ARTIFACT_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
HARDWARE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")  # the shadow service's rule
# The regular expression semver.org 2.0.0 recommends, whole-string.
SEMVER_PATTERN = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?"
)
MAX_VERSION_CHARS = 128
MAX_HARDWARE_ENTRIES = 64
MAX_AUTH_HEADER_CHARS = 1024
MAX_PASSWORD_CHARS = 256
ARTIFACTS_PATH = "/v1/artifacts/"


# --- artifact metadata ------------------------------------------------------------------------


def validate_artifact_id(artifact_id: str) -> str:
    if not ARTIFACT_ID_PATTERN.fullmatch(artifact_id):
        raise InvalidArtifactError("artifact_id must be 32 lowercase hex digits")
    return artifact_id


def validate_name(name: str) -> str:
    # Names never become paths (storage is content-addressed), but they reach file names on
    # devices and in operators' tools, so anything path-like is refused outright.
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidArtifactError(
            "name must be 1-128 characters of [A-Za-z0-9._-], start with a letter or digit "
            "and contain no '..'"
        )
    return name


def validate_version(version: str) -> str:
    if len(version) > MAX_VERSION_CHARS or not SEMVER_PATTERN.fullmatch(version):
        raise InvalidArtifactError(f"version {version[:MAX_VERSION_CHARS]!r} is not semver 2.0.0")
    return version


def version_key(version: str) -> tuple[Any, ...]:
    """A sort key giving semver 2.0.0 precedence (build metadata ignored), as the device agent
    orders versions (device_agent/domain.py; tests/artifacts checks that they agree)."""
    match = SEMVER_PATTERN.fullmatch(validate_version(version))
    assert match is not None
    major, minor, patch, pre = int(match[1]), int(match[2]), int(match[3]), match[4]
    if pre is None:
        return (major, minor, patch, 1, ())
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (major, minor, patch, 0, parts)


def validate_rollback_floor(floor: str, version: str) -> str:
    """A declared anti-rollback floor: semver, and not above the build's own version (a build
    whose floor is above itself would lock the device out of the build it runs)."""
    if len(floor) > MAX_VERSION_CHARS or not SEMVER_PATTERN.fullmatch(floor):
        raise InvalidArtifactError(
            f"rollback_floor {floor[:MAX_VERSION_CHARS]!r} is not semver 2.0.0"
        )
    if version_key(floor) > version_key(version):
        raise InvalidArtifactError(f"rollback_floor {floor} is above the version {version}")
    return floor


def validate_compatible(hardware: tuple[str, ...]) -> tuple[str, ...]:
    if not 1 <= len(hardware) <= MAX_HARDWARE_ENTRIES:
        raise InvalidArtifactError(
            f"compatible_hardware must list 1-{MAX_HARDWARE_ENTRIES} hardware ids"
        )
    for entry in hardware:
        if not HARDWARE_PATTERN.fullmatch(entry):
            raise InvalidArtifactError(
                "each compatible_hardware entry is 1-64 characters of [A-Za-z0-9._:-], "
                "starting with a letter or digit"
            )
    if len(set(hardware)) != len(hardware):
        raise InvalidArtifactError("compatible_hardware lists an entry twice")
    return hardware


def normalize_sha256(value: str) -> str:
    lowered = value.lower()
    if not SHA256_PATTERN.fullmatch(lowered):
        raise InvalidArtifactError("sha256 must be 64 hex digits")
    return lowered


@dataclass(frozen=True)
class ArtifactSpec:
    """What an uploader declares before the bytes: validated on creation."""

    name: str
    version: str
    compatible: tuple[str, ...]
    sha256: str | None = None
    size: int | None = None
    rollback_floor: str | None = None  # the build's anti-rollback floor (docs/adr/0023)

    def __post_init__(self) -> None:
        validate_name(self.name)
        validate_version(self.version)
        validate_compatible(self.compatible)
        if self.rollback_floor is not None:
            validate_rollback_floor(self.rollback_floor, self.version)
        if self.sha256 is not None:
            object.__setattr__(self, "sha256", normalize_sha256(self.sha256))
        if self.size is not None and self.size <= 0:
            raise InvalidArtifactError("a declared size must be positive")


@dataclass(frozen=True)
class Digest:
    size: int
    sha256: str


class UploadMeter:
    """Counts and hashes an upload chunk by chunk, refusing it as soon as it is too large.

    Holds only a running hash and a count, so it checks an upload of any size in constant
    memory; `finish` compares the result with what the uploader declared.
    """

    def __init__(self, spec: ArtifactSpec, max_bytes: int) -> None:
        self.spec = spec
        self.max_bytes = max_bytes
        self.size = 0
        self._hash = hashlib.sha256()
        if spec.size is not None and spec.size > max_bytes:
            raise ArtifactTooLargeError(
                f"declared size {spec.size} is over the limit of {max_bytes} bytes"
            )

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise ArtifactTooLargeError(f"upload is over the limit of {self.max_bytes} bytes")
        if self.spec.size is not None and self.size > self.spec.size:
            raise ContentMismatchError(f"upload is longer than the declared {self.spec.size} bytes")
        self._hash.update(chunk)

    def finish(self) -> Digest:
        if self.size == 0:
            raise InvalidArtifactError("an artifact must not be empty")
        if self.spec.size is not None and self.size != self.spec.size:
            raise ContentMismatchError(
                f"upload ended after {self.size} of the declared {self.spec.size} bytes"
            )
        sha256 = self._hash.hexdigest()
        if self.spec.sha256 is not None and not hmac.compare_digest(sha256, self.spec.sha256):
            raise ContentMismatchError(
                f"sha256 of the upload is {sha256}, not the declared {self.spec.sha256}"
            )
        return Digest(self.size, sha256)


# --- manifests ----------------------------------------------------------------------------------


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """The one byte form a signature covers: sorted keys, no whitespace, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class Manifest:
    """What the signature vouches for; the device checks every field before installing."""

    artifact_id: str
    name: str
    version: str
    size: int
    sha256: str
    compatible: tuple[str, ...]
    rollback_floor: str | None = None

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "artifact_id": self.artifact_id,
            "name": self.name,
            "version": self.version,
            "size": self.size,
            "sha256": self.sha256,
            "compatible": list(self.compatible),
        }
        # Only when declared: the manifests of builds without one keep their exact bytes, so
        # their stored signatures stay valid and older agents see nothing new.
        if self.rollback_floor is not None:
            data["rollback_floor"] = self.rollback_floor
        return data

    def canonical(self) -> bytes:
        return canonical_json(self.as_json())


def build_manifest(artifact_id: str, spec: ArtifactSpec, digest: Digest) -> Manifest:
    return Manifest(
        artifact_id=validate_artifact_id(artifact_id),
        name=spec.name,
        version=spec.version,
        size=digest.size,
        sha256=digest.sha256,
        compatible=spec.compatible,
        rollback_floor=spec.rollback_floor,
    )


# --- list cursors -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """Position in the newest-first listing: after (created_at_ms, artifact_id)."""

    created_at_ms: int
    artifact_id: str

    def encode(self) -> str:
        return base64.urlsafe_b64encode(
            f"{self.created_at_ms}:{self.artifact_id}".encode()
        ).decode()


def decode_cursor(token: str) -> Cursor | None:
    if not token:
        return None
    try:
        created, artifact_id = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        if len(created) > 19 or not created.isdigit():
            raise ValueError(created)
        return Cursor(int(created), validate_artifact_id(artifact_id))
    except (binascii.Error, UnicodeDecodeError, ValueError, InvalidArtifactError):
        raise InvalidArtifactError("page_token is not one this service issued") from None


# --- device targeting ---------------------------------------------------------------------------


def artifact_url(base_url: str, artifact_id: str) -> str:
    """The URL a rollout puts in desired state: it names the artifact and is no secret."""
    return f"{base_url.rstrip('/')}{ARTIFACTS_PATH}{validate_artifact_id(artifact_id)}"


def targeted_artifact(desired: Any) -> str | None:
    """The artifact id that a desired state's `firmware.url` names, or None.

    Only the path is compared (`.../v1/artifacts/<id>`), so the same rollout works behind any
    host name or load balancer in front of the download plane.
    """
    if not isinstance(desired, Mapping):
        return None
    firmware = desired.get("firmware")
    if not isinstance(firmware, Mapping):
        return None
    url = firmware.get("url")
    if not isinstance(url, str) or len(url) > 2048:
        return None
    try:
        path = urlsplit(url).path
    except ValueError:
        return None
    _, marker, artifact_id = path.rpartition(ARTIFACTS_PATH)
    if not marker or not ARTIFACT_ID_PATTERN.fullmatch(artifact_id):
        return None
    return artifact_id


# --- device credentials -------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceCredentials:
    device_id: str
    password: str = field(repr=False)  # never in a log line or a traceback


def parse_basic_auth(header: str | None) -> DeviceCredentials:
    """HTTP Basic credentials (device id : MQTT password), bounded and shape-checked."""
    if not header:
        raise UnauthenticatedError("device credentials are required (HTTP Basic)")
    if len(header) > MAX_AUTH_HEADER_CHARS:
        raise UnauthenticatedError("authorization header is too long")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        raise UnauthenticatedError("only HTTP Basic authentication is accepted")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise UnauthenticatedError("malformed HTTP Basic credentials") from None
    # Split at the last colon: a device id may hold colons ([A-Za-z0-9_.:-]), the passwords
    # RegisterDevice hands out never do (URL-safe base64).
    device_id, colon, password = decoded.rpartition(":")
    if not colon or not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise UnauthenticatedError("malformed HTTP Basic credentials")
    if not password or len(password) > MAX_PASSWORD_CHARS:
        raise UnauthenticatedError("malformed HTTP Basic credentials")
    return DeviceCredentials(device_id, password)


# --- tokens and one-time URLs -------------------------------------------------------------------


def secret_digest(secret: str) -> str:
    """What the store keeps of a token or URL secret: its sha256, so a database leak grants
    no downloads."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    """A device token: lets one device exchange once for one artifact's download URL."""

    device_id: str
    artifact_id: str
    expires_at: float
    used: bool = False


@dataclass(frozen=True)
class UrlRecord:
    """A one-time download URL: one device, one artifact, until expiry or a completed download."""

    device_id: str
    artifact_id: str
    expires_at: float
    completed: bool = False


def check_token(record: TokenRecord | None, device_id: str, now: float) -> TokenRecord:
    """The token rule. Another device's token is refused before anything else is said of it."""
    if record is None:
        raise TokenNotFoundError("unknown download token")
    if record.device_id != device_id:
        raise WrongDeviceError("this token was issued to another device")
    if now >= record.expires_at:
        raise TokenExpiredError("the download token has expired")
    if record.used:
        raise TokenUsedError("the download token was already exchanged")
    return record


def check_url(record: UrlRecord | None, device_id: str, now: float) -> UrlRecord:
    """The one-time URL rule: its device only, before expiry, until a download completes."""
    if record is None:
        raise UrlNotFoundError("unknown download URL")
    if record.device_id != device_id:
        raise WrongDeviceError("this download URL was issued to another device")
    if now >= record.expires_at:
        raise UrlExpiredError("the download URL has expired")
    if record.completed:
        raise UrlUsedError("the download URL is used up: its download has completed")
    return record


# --- HTTP ranges --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ByteRange:
    """Inclusive byte positions, as in a Content-Range header."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"

    def reaches_end(self, size: int) -> bool:
        """A response that sends this range in full delivers the artifact's last byte."""
        return self.end == size - 1


_RANGE_SPEC = re.compile(r"(\d{0,19})-(\d{0,19})")


def parse_range(
    header: str | None, size: int, if_range: str | None = None, etag: str = ""
) -> ByteRange | None:
    """The single byte range a request asks for, or None for the whole artifact.

    Stricter than RFC 9110 allows on purpose: a malformed header or several ranges are a 400
    (a device agent should hear about its bug, not silently get the whole file), a range that
    selects no byte is a 416. An `If-Range` naming another ETag asks for the whole artifact.
    """
    if header is None or not header.strip():
        return None
    if if_range is not None and if_range.strip() != etag:
        return None
    unit, eq, ranges = header.strip().partition("=")
    if not eq or unit.strip().lower() != "bytes":
        raise BadRequestError("Range must be 'bytes=start-end', 'bytes=start-' or 'bytes=-n'")
    if "," in ranges:
        raise BadRequestError("only one byte range per request is served")
    match = _RANGE_SPEC.fullmatch(ranges.strip())
    if match is None or match.group(1) == match.group(2) == "":
        raise BadRequestError("Range must be 'bytes=start-end', 'bytes=start-' or 'bytes=-n'")
    first, last = match.group(1), match.group(2)
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiableError("the range selects no byte", size)
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        raise BadRequestError("a Range's end must not be before its start")
    if start >= size:
        raise RangeNotSatisfiableError(f"the artifact has {size} bytes", size)
    return ByteRange(start, min(end, size - 1))


# --- bandwidth pacing ---------------------------------------------------------------------------


class TokenBucket:
    """A byte budget refilled at `rate` bytes/s, holding at most `burst` bytes.

    `reserve` takes bytes now (the budget may go negative) and says how long the caller must
    wait before sending them, so callers together never exceed the rate, whatever their number.
    The clock is the caller's: `now` comes in, a wait in seconds goes out.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def reserve(self, amount: int, now: float) -> float:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        self.tokens -= amount
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate
