"""The agent's rules, pure: what a delta commands, what makes an artifact trustworthy, how long to
wait before a retry, and what to report.

Plain functions and frozen dataclasses over plain data. No MQTT, HTTP, files or clock here:
every rule that depends on time takes `now`, every random choice takes the random number. The
agent (`agent.py`) and the installers translate and call these. The byte form a signature covers
is defined here again (`canonical_json`), not imported from the artifact service: a device never
carries the server's code; a test checks that both agree.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.errors import BadCommandError, DownloadError, VerificationError

ARTIFACTS_PATH = "/v1/artifacts/"
ARTIFACT_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
KEY_ID_PATTERN = re.compile(r"[0-9a-f]{16}")
SEMVER_PATTERN = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?"
)
MAX_VERSION_CHARS = 128
MAX_URL_CHARS = 2048
MAX_MANIFEST_CHARS = 16 * 1024
MAX_ERROR_CHARS = 300


# --- versions -----------------------------------------------------------------------------------


def version_key(version: str) -> tuple[Any, ...]:
    """A sort key giving semver 2.0.0 precedence (build metadata ignored); ValueError if bad."""
    match = SEMVER_PATTERN.fullmatch(version) if len(version) <= MAX_VERSION_CHARS else None
    if match is None:
        raise ValueError(f"{version[:MAX_VERSION_CHARS]!r} is not a semver 2.0.0 version")
    major, minor, patch, pre = int(match[1]), int(match[2]), int(match[3]), match[4]
    if pre is None:
        return (major, minor, patch, 1, ())
    # Numeric identifiers sort before alphanumeric ones, and numerically among themselves.
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (major, minor, patch, 0, parts)


def is_below(version: str, floor: str | None) -> bool:
    return floor is not None and version_key(version) < version_key(floor)


def raise_floor(floor: str | None, declared: str | None) -> str | None:
    """The anti-rollback floor after committing a build that declares `declared` in its signed
    manifest (None: it declares none). The floor is the build's claim, not the version it has:
    a build declaring nothing leaves it as it is, so a fleet can go back to the build it ran
    before (docs/adr/0023). It never goes down."""
    if declared is None:
        return floor
    if floor is None or version_key(declared) > version_key(floor):
        return declared
    return floor


# --- the command ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Firmware:
    """A firmware version and the URL it came from (None for the factory image)."""

    version: str
    url: str | None = None


@dataclass(frozen=True)
class Target:
    """What a desired `firmware` block commands: validated on creation by `parse_target`."""

    version: str
    url: str
    artifact_id: str


def artifact_id_of(url: str) -> str | None:
    try:
        path = urlsplit(url).path
    except ValueError:
        return None
    _, marker, artifact_id = path.rpartition(ARTIFACTS_PATH)
    return artifact_id if marker and ARTIFACT_ID_PATTERN.fullmatch(artifact_id) else None


def origin(url: str) -> str:
    """scheme://host:port, lowercased, with the default port made explicit."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port}"


def parse_target(block: Any, running: Firmware, download_origin: str | None) -> Target:
    """The target named by a `firmware` block (from a delta: only the differing leaves, so the
    rest is what runs). Raises BadCommandError saying what is wrong."""
    if not isinstance(block, Mapping):
        raise BadCommandError("desired firmware must be an object with version and url")
    unknown = set(block) - {"version", "url"}
    if unknown:
        raise BadCommandError(f"desired firmware has unknown fields: {sorted(unknown)[:5]}")
    version = block.get("version", running.version)
    url = block.get("url", running.url)
    if not isinstance(version, str) or len(version) > MAX_VERSION_CHARS:
        raise BadCommandError("desired firmware.version must be a string of at most 128 chars")
    try:
        version_key(version)
    except ValueError as exc:
        raise BadCommandError(f"desired firmware.version: {exc}") from None
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise BadCommandError("desired firmware.url must be a non-empty string (2048 chars max)")
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        raise BadCommandError("desired firmware.url is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadCommandError("desired firmware.url must be an http(s) URL")
    if download_origin is not None and origin(url) != origin(download_origin):
        raise BadCommandError(
            f"desired firmware.url points to {origin(url)}, not the download plane this device "
            "trusts"
        )
    artifact_id = artifact_id_of(url)
    if artifact_id is None:
        raise BadCommandError("desired firmware.url must end in /v1/artifacts/<32 hex digits>")
    return Target(version, url, artifact_id)


class Verdict(Enum):
    IGNORE = "ignore"
    START = "start"
    REJECT = "reject"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str
    target: Target | None = None
    shadow_version: int | None = None  # the version to remember as seen


@dataclass(frozen=True)
class Memory:
    """What the agent remembers between messages (persisted): the newest shadow version seen,
    the job in hand, and the last target that failed (not retried until desired changes)."""

    shadow_version: int = 0
    busy: Target | None = None
    failed: Target | None = None
    failed_block: str | None = None  # a malformed block already reported, as canonical JSON


def _message_version(message: Mapping[str, Any]) -> int | None:
    version = message.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        return None
    return version


def decide(
    message: Any,
    memory: Memory,
    running: Firmware,
    download_origin: str | None,
    resync: bool = False,
) -> Decision:
    """What a delta message (or, with `resync`, a whole shadow document) commands.

    Stale and duplicate deltas (version not newer than the newest seen) are ignored; a resync
    document may repeat the newest version. A firmware block that differs from what runs is the
    update command; a malformed one is rejected with a clear error, once.
    """
    if not isinstance(message, Mapping):
        return Decision(Verdict.IGNORE, "not a JSON object")
    version = _message_version(message)
    if version is None:
        return Decision(Verdict.IGNORE, "no shadow version")
    if version < memory.shadow_version or (version == memory.shadow_version and not resync):
        return Decision(Verdict.IGNORE, f"stale shadow version {version}")
    state = message.get("state")
    state = state if isinstance(state, Mapping) else {}
    if resync:
        desired = state.get("desired")
        block = desired.get("firmware") if isinstance(desired, Mapping) else None
        full: Firmware = Firmware(running.version, None)  # a whole block: nothing implied
    else:
        block = state.get("firmware")
        full = running
    if block is None:
        return Decision(Verdict.IGNORE, "no firmware change", shadow_version=version)
    try:
        target = parse_target(block, full, download_origin)
    except BadCommandError as exc:
        key = canonical_json({"block": block}).decode()
        if memory.failed_block == key:
            return Decision(Verdict.IGNORE, "malformed block already reported", None, version)
        return Decision(Verdict.REJECT, str(exc), None, version)
    if target.version == running.version and target.url == running.url:
        return Decision(Verdict.IGNORE, "already running it", None, version)
    if target == memory.busy:
        return Decision(Verdict.IGNORE, "already updating to it", None, version)
    if target == memory.failed:
        return Decision(Verdict.IGNORE, "this target already failed", None, version)
    return Decision(Verdict.START, "update", target, version)


# --- what the artifact service signs ----------------------------------------------------------


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """The one byte form a signature covers: sorted keys, no whitespace, ASCII only (the same
    rule as services/artifacts/domain.py; tests/agent checks that they agree)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class Grant:
    """The answer to the token exchange: a one-time URL and the signed manifest."""

    url: str
    expires_at: float
    size: int
    sha256: str
    manifest: str
    signature: bytes
    key_id: str


def parse_grant(body: Any, max_bytes: int) -> Grant:
    """The exchange's JSON body, bounded and validated; DownloadError if it is not one."""
    try:
        if not isinstance(body, Mapping):
            raise ValueError("not an object")
        url, size, sha256 = body["url"], body["size"], body["sha256"]
        manifest, signature, key_id = body["manifest"], body["signature"], body["key_id"]
        expires_at = body.get("expires_at", 0)
        if not isinstance(url, str) or not 0 < len(url) <= MAX_URL_CHARS:
            raise ValueError("url")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError("size")
        if not isinstance(sha256, str) or not SHA256_PATTERN.fullmatch(sha256):
            raise ValueError("sha256")
        if not isinstance(manifest, str) or len(manifest) > MAX_MANIFEST_CHARS:
            raise ValueError("manifest")
        if not isinstance(signature, str) or len(signature) > 200:
            raise ValueError("signature")
        if not isinstance(key_id, str) or not KEY_ID_PATTERN.fullmatch(key_id):
            raise ValueError("key_id")
        if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
            raise ValueError("expires_at")
        raw_signature = base64.b64decode(signature, validate=True)
    except (KeyError, ValueError, binascii.Error) as exc:
        raise DownloadError(f"the download grant is malformed ({exc})") from None
    if size > max_bytes:
        raise DownloadError(f"the artifact is {size} bytes, over this device's cap of {max_bytes}")
    return Grant(url, float(expires_at), size, sha256, manifest, raw_signature, key_id)


@dataclass(frozen=True)
class Manifest:
    artifact_id: str
    name: str
    version: str
    size: int
    sha256: str
    compatible: tuple[str, ...]
    rollback_floor: str | None = None  # the floor this build raises the device's to, if any


def _parse_manifest(text: str) -> Manifest:
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        compatible = data["compatible"]
        if not isinstance(compatible, list) or not all(isinstance(h, str) for h in compatible):
            raise ValueError("compatible")
        manifest = Manifest(
            artifact_id=str(data["artifact_id"]),
            name=str(data["name"]),
            version=str(data["version"]),
            size=int(data["size"]),
            sha256=str(data["sha256"]),
            compatible=tuple(compatible),
            rollback_floor=_declared_floor(data),
        )
        version_key(manifest.version)
        if manifest.rollback_floor is not None and version_key(
            manifest.rollback_floor
        ) > version_key(manifest.version):
            raise ValueError("rollback_floor is above version")
    except (KeyError, TypeError, ValueError) as exc:
        raise VerificationError(f"the signed manifest is malformed ({exc})") from None
    return manifest


def _declared_floor(data: Mapping[str, Any]) -> str | None:
    """The manifest's `rollback_floor`: absent (most builds) or a semver string."""
    if "rollback_floor" not in data:
        return None
    floor = data["rollback_floor"]
    if not isinstance(floor, str):
        raise ValueError("rollback_floor is not a string")
    version_key(floor)
    return floor


def verify_manifest(
    grant: Grant,
    trusted_keys: Mapping[str, bytes],
    target: Target,
    hardware: str,
    floor: str | None,
) -> Manifest:
    """Everything that can be checked before the bytes: signature over the exact manifest
    bytes with a trusted key, then what it vouches for against the command and this device."""
    key = trusted_keys.get(grant.key_id)
    if key is None:
        raise VerificationError(f"the manifest is signed with key {grant.key_id}, not trusted")
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(grant.signature, grant.manifest.encode())
    except (InvalidSignature, ValueError):
        raise VerificationError("the manifest signature does not verify") from None
    manifest = _parse_manifest(grant.manifest)
    if manifest.artifact_id != target.artifact_id:
        raise VerificationError(
            f"the manifest is for artifact {manifest.artifact_id}, not {target.artifact_id}"
        )
    if manifest.version != target.version:
        raise VerificationError(
            f"the artifact is version {manifest.version}, desired is {target.version}"
        )
    if (manifest.size, manifest.sha256) != (grant.size, grant.sha256):
        raise VerificationError("the grant's size or sha256 differs from the signed manifest")
    if hardware not in manifest.compatible:
        raise VerificationError(
            f"the artifact is not compatible with hardware {hardware!r} "
            f"(it is for {', '.join(manifest.compatible[:5])})"
        )
    if is_below(manifest.version, floor):
        raise VerificationError(
            f"version {manifest.version} is below the anti-rollback floor {floor}"
        )
    return manifest


def verify_content(manifest: Manifest, size: int, sha256: str) -> None:
    """The downloaded bytes against the signed manifest."""
    if size != manifest.size:
        raise VerificationError(f"downloaded {size} bytes, the manifest says {manifest.size}")
    if sha256 != manifest.sha256:
        raise VerificationError("the sha256 of the download does not match the manifest")


# --- retries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    base_seconds: float = 1.0
    cap_seconds: float = 60.0
    max_attempts: int = 6

    def __post_init__(self) -> None:
        if self.base_seconds <= 0 or self.cap_seconds < self.base_seconds:
            raise ValueError("retry base must be > 0 and cap >= base")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")


def backoff_delay(attempt: int, policy: RetryPolicy, rand: float, retry_after: float = 0) -> float:
    """Seconds to wait before retry number `attempt` (0-based): "full jitter" (a uniform draw in
    [0, min(cap, base * 2**attempt)], `rand` in [0, 1)), never less than a server's Retry-After
    (itself jittered up by up to half, so a crowd told "5 s" does not return in one burst)."""
    ceiling = min(policy.cap_seconds, policy.base_seconds * float(2 ** min(attempt, 62)))
    delay: float = rand * ceiling
    if retry_after > 0:
        delay = max(delay, retry_after * (1 + rand / 2))
    return delay


class HttpAction(Enum):
    RETRY = "retry"  # wait (backoff) and repeat the same request
    NEW_GRANT = "new_grant"  # start again at the token step
    FROM_ZERO = "from_zero"  # drop the partial bytes, download again
    FAIL = "fail"  # give up: report failed


def classify_http(status: int, code: str | None) -> HttpAction:
    """What the download protocol says to do on each answer (docs/download-protocol.md)."""
    if status == 416:
        return HttpAction.FROM_ZERO
    if status == 429 or status >= 500:
        return HttpAction.RETRY
    if status == 410 and code in ("token_expired", "token_used", "url_expired"):
        return HttpAction.NEW_GRANT
    if status == 404 and code in ("token_not_found", "url_not_found"):
        return HttpAction.NEW_GRANT
    # 400, 401, 403, 404 artifact_not_found, 410 url_used (bytes lost), anything unknown
    return HttpAction.FAIL


# --- reports -------------------------------------------------------------------------------------


class Phase(Enum):
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    REBOOTING = "rebooting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


def short_error(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def firmware_report(
    phase: Phase | None,
    running: Firmware,
    target: Target | None = None,
    percent: int | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The `reported` section: `firmware.version` and `url` are always what runs (so the delta
    stays until the target really runs); the rest describes the update in hand. Every key is
    present, None (JSON null, which deletes the leaf) where it does not apply, so no stale
    `state`, `error` or `percent` survives from an earlier report (a device that never updated
    has no phase: all four are null)."""
    firmware: dict[str, Any] = {
        "version": running.version,
        "url": running.url,
        "state": phase.value if phase is not None else None,
        "percent": percent if phase is Phase.DOWNLOADING else None,
        "error": short_error(error) if error and phase is not None else None,
        "target": (
            {"version": target.version, "url": target.url}
            if target is not None and phase is not None
            else None
        ),
    }
    return {"firmware": firmware}


def percent_of(received: int, size: int) -> int:
    if size <= 0:
        return 0
    return max(0, min(100, received * 100 // size))


def should_report_progress(last_percent: int | None, percent: int, step: int = 25) -> bool:
    """Report progress every `step` percent, not every chunk (the gateway rate-limits)."""
    return last_percent is None or percent // step > last_percent // step
