"""What the client returns: plain frozen dataclasses and parsed JSON, never protos.

Protos are converted here, at the edge, by named constructors (`from_proto`); `to_dict` gives
the JSON form the CLI prints with `--json`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from protos.artifacts.v1 import artifacts_pb2 as apb
from protos.rollout.v1 import rollout_pb2 as rpb
from protos.shadow.v1 import shadow_pb2 as spb

T = TypeVar("T")


def _json(text: str) -> Any:
    return json.loads(text) if text else {}


class _Plain:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    # Empty when there are no more pages.
    next_page_token: str


@dataclass(frozen=True)
class Device(_Plain):
    device_id: str
    tags: dict[str, str]
    created_at_ms: int
    shadow_version: int

    @classmethod
    def from_proto(cls, device: spb.Device) -> Device:
        return cls(device.device_id, dict(device.tags), device.created_at_ms, device.shadow_version)


@dataclass(frozen=True)
class Credentials(_Plain):
    username: str
    # Returned once, at registration; the service keeps only a hash.
    password: str = dataclasses.field(repr=False)


@dataclass(frozen=True)
class RegisteredDevice(_Plain):
    device: Device
    credentials: Credentials


@dataclass(frozen=True)
class Shadow(_Plain):
    device_id: str
    version: int
    # The AWS-style document: {"state": {"desired", "reported", "delta"}, "metadata", ...}.
    document: dict[str, Any]

    @classmethod
    def from_proto(cls, shadow: spb.Shadow) -> Shadow:
        return cls(shadow.device_id, shadow.version, _json(shadow.document_json))


@dataclass(frozen=True)
class ShadowUpdate(_Plain):
    version: int
    accepted: dict[str, Any]
    document: dict[str, Any]
    delta: dict[str, Any]

    @classmethod
    def from_proto(cls, reply: spb.UpdateShadowResponse) -> ShadowUpdate:
        return cls(
            reply.version,
            _json(reply.accepted_json),
            _json(reply.document_json),
            _json(reply.delta_json),
        )


@dataclass(frozen=True)
class Artifact(_Plain):
    artifact_id: str
    name: str
    version: str
    compatible_hardware: list[str]
    size: int
    sha256: str
    # The exact signed text: verify the signature over these bytes, not a re-serialization.
    manifest_json: str
    # Base64 of the Ed25519 signature.
    signature: str
    key_id: str
    created_at_ms: int
    download_url: str
    # The anti-rollback floor the build declares (signed in the manifest too); None if none.
    rollback_floor: str | None = None

    @property
    def manifest(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.manifest_json)
        return parsed

    @classmethod
    def from_proto(cls, artifact: apb.Artifact) -> Artifact:
        return cls(
            artifact.artifact_id,
            artifact.name,
            artifact.version,
            list(artifact.compatible_hardware),
            artifact.size,
            artifact.sha256,
            artifact.manifest_json,
            base64.b64encode(artifact.signature).decode(),
            artifact.key_id,
            artifact.created_at_ms,
            artifact.download_url,
            artifact.rollback_floor if artifact.HasField("rollback_floor") else None,
        )


@dataclass(frozen=True)
class SigningKey(_Plain):
    key_id: str
    algorithm: str
    public_key_pem: str
    # Base64 of the raw 32-byte key: what an agent config's `trusted_keys` holds.
    public_key: str

    @classmethod
    def from_proto(cls, key: apb.SigningKey) -> SigningKey:
        return cls(
            key.key_id,
            key.algorithm,
            key.public_key_pem,
            base64.b64encode(key.public_key).decode(),
        )


# ---- rollouts --------------------------------------------------------------------------------

ROLLOUT_STATUSES = ("CREATED", "RUNNING", "PAUSED", "WAITING_APPROVAL", "ABORTED", "COMPLETED")
# Execution statuses, in the order the service lists them.
EXECUTION_STATUSES = (
    "QUEUED",
    "IN_PROGRESS",
    "SUCCEEDED",
    "FAILED",
    "TIMED_OUT",
    "REJECTED",
    "CANCELED",
    "ROLLED_BACK",
)
FAILURES = ("FAILED", "TIMED_OUT", "REJECTED")


@dataclass(frozen=True)
class FailureThreshold(_Plain):
    """Abort when `count` (or `percent`) of at least `min_finished` settled devices failed."""

    count: int | None = None
    percent: float | None = None
    min_finished: int = 1


@dataclass(frozen=True)
class RolloutStage(_Plain):
    """A cumulative stage size: `percent` or `count` of the targets (exactly one)."""

    percent: float | None = None
    count: int | None = None
    success_threshold_percent: float = 100.0
    failure_threshold: FailureThreshold | None = None
    soak_seconds: float = 0.0
    approval_required: bool = False

    @property
    def size(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count)

    def to_proto(self) -> rpb.Stage:
        stage = rpb.Stage(
            success_threshold_percent=self.success_threshold_percent,
            soak_seconds=self.soak_seconds,
            approval_required=self.approval_required,
        )
        if self.percent is not None:
            stage.percent = self.percent
        if self.count is not None:
            stage.count = self.count
        if self.failure_threshold is not None:
            t = self.failure_threshold
            stage.failure_threshold.min_finished = t.min_finished
            if t.count is not None:
                stage.failure_threshold.count = t.count
            if t.percent is not None:
                stage.failure_threshold.percent = t.percent
        return stage

    @classmethod
    def from_proto(cls, stage: rpb.Stage) -> RolloutStage:
        threshold = None
        if stage.HasField("failure_threshold"):
            t = stage.failure_threshold
            threshold = FailureThreshold(
                t.count if t.HasField("count") else None,
                t.percent if t.HasField("percent") else None,
                t.min_finished or 1,
            )
        return cls(
            stage.percent if stage.HasField("percent") else None,
            stage.count if stage.HasField("count") else None,
            (
                stage.success_threshold_percent
                if stage.HasField("success_threshold_percent")
                else 100.0
            ),
            threshold,
            stage.soak_seconds,
            stage.approval_required,
        )


@dataclass(frozen=True)
class RolloutSpec(_Plain):
    """What a rollout does. Exactly one selector: `device_ids`, `tags` or `fleet_filter`.
    `None` leaves a setting to the service's default (timeout 3600 s, no rate limit)."""

    rollout_id: str
    artifact_id: str
    firmware_version: str
    firmware_url: str
    stages: list[RolloutStage]
    device_ids: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    fleet_filter: str | None = None
    max_per_minute: int | None = None
    timeout_seconds: float | None = None
    retries_failed: int = 0
    retries_timed_out: int = 0
    retry_backoff_seconds: float | None = None
    rollback_on_abort: bool = False
    stratify_by: str = ""  # empty: the service's default ("site")

    def to_proto(self) -> rpb.RolloutSpec:
        spec = rpb.RolloutSpec(
            rollout_id=self.rollout_id,
            artifact_id=self.artifact_id,
            firmware=rpb.Firmware(version=self.firmware_version, url=self.firmware_url),
            selector=rpb.TargetSelector(device_ids=self.device_ids, tags=self.tags),
            stages=[s.to_proto() for s in self.stages],
            retries=rpb.RetryPolicy(failed=self.retries_failed, timed_out=self.retries_timed_out),
            rollback_on_abort=self.rollback_on_abort,
            stratify_by=self.stratify_by,
        )
        if self.fleet_filter is not None:
            spec.selector.fleet_filter = self.fleet_filter
        if self.max_per_minute is not None:
            spec.rate.max_per_minute = self.max_per_minute
        if self.timeout_seconds is not None:
            spec.timeout_seconds = self.timeout_seconds
        if self.retry_backoff_seconds is not None:
            spec.retries.backoff_seconds = self.retry_backoff_seconds
        return spec

    @classmethod
    def from_proto(cls, spec: rpb.RolloutSpec) -> RolloutSpec:
        selector = spec.selector
        return cls(
            rollout_id=spec.rollout_id,
            artifact_id=spec.artifact_id,
            firmware_version=spec.firmware.version,
            firmware_url=spec.firmware.url,
            stages=[RolloutStage.from_proto(s) for s in spec.stages],
            device_ids=list(selector.device_ids),
            tags=dict(selector.tags),
            fleet_filter=selector.fleet_filter if selector.HasField("fleet_filter") else None,
            max_per_minute=(
                spec.rate.max_per_minute if spec.rate.HasField("max_per_minute") else None
            ),
            timeout_seconds=spec.timeout_seconds if spec.HasField("timeout_seconds") else None,
            retries_failed=spec.retries.failed,
            retries_timed_out=spec.retries.timed_out,
            retry_backoff_seconds=(
                spec.retries.backoff_seconds if spec.retries.HasField("backoff_seconds") else None
            ),
            rollback_on_abort=spec.rollback_on_abort,
            stratify_by=spec.stratify_by,
        )


def _counts(by_status: Any) -> dict[str, int]:
    return {status: int(by_status.get(status, 0)) for status in EXECUTION_STATUSES}


@dataclass(frozen=True)
class StageProgress(_Plain):
    stage_index: int
    by_status: dict[str, int]

    @property
    def failure_rate(self) -> float | None:
        """Failed among the settled devices of the stage (None before any settled). A failure
        that a retry may still turn around counts here; the service's threshold waits."""
        failed = sum(self.by_status.get(s, 0) for s in FAILURES)
        settled = failed + self.by_status.get("SUCCEEDED", 0)
        return failed / settled if settled else None


@dataclass(frozen=True)
class RolloutProgress(_Plain):
    targets: int
    stage_size: int
    not_started: int
    by_status: dict[str, int]
    rollbacks_pending: int
    stages: list[StageProgress]

    @classmethod
    def from_proto(cls, p: rpb.Progress) -> RolloutProgress:
        return cls(
            p.targets,
            p.stage_size,
            p.not_started,
            _counts(p.by_status),
            p.rollbacks_pending,
            [StageProgress(s.stage_index, _counts(s.by_status)) for s in p.stages],
        )


@dataclass(frozen=True)
class Rollout(_Plain):
    spec: RolloutSpec
    status: str  # one of ROLLOUT_STATUSES
    stage_index: int
    reason: str
    started_at: float  # Unix seconds; 0 before it started
    finished_at: float  # 0 while it runs
    progress: RolloutProgress
    created_at_ms: int

    @classmethod
    def from_proto(cls, rollout: rpb.Rollout) -> Rollout:
        return cls(
            RolloutSpec.from_proto(rollout.spec),
            rpb.RolloutStatus.Name(rollout.status),
            rollout.stage_index,
            rollout.reason,
            rollout.started_at,
            rollout.finished_at,
            RolloutProgress.from_proto(rollout.progress),
            rollout.created_at_ms,
        )
