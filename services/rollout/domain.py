"""The rollout data model and its rules, except planning (that is `planner.py`).

Owns: rollout definitions and their validation, the resolved target list, per-device executions
and how a device's `reported.firmware` block moves them, the rollout's runtime state and the
operator commands (start, pause, resume, approve, abort) as pure functions. Does not own: how
targets are resolved (the shadow's `QueryFleet`), storage, gRPC, Celery.

Everything is a frozen dataclass; time is a parameter (`now`, epoch seconds).

The device agent reports `{"firmware": {"version", "url", "state", "target", "error"}}`
(`device_agent/domain.py: firmware_report`): `version` / `url` are always what runs now; `state`
is the phase of the update in hand (downloading, verifying, installing, rebooting, succeeded,
failed, rolled_back; `rejected` is accepted too, for an agent that refuses an update outright);
`target` is `{"version", "url"}` of that update. A report without `state` just says what runs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from services.rollout.errors import (
    InvalidReportError,
    InvalidRolloutError,
    InvalidStateError,
    InvalidTargetsError,
)

# The same rule as the shadow service's device ids (topic-safe); repeated so the rollout domain
# does not import another service's domain.
DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
ROLLOUT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
TAG_KEY_PATTERN = re.compile(r"[A-Za-z0-9_:-]{1,64}")
MAX_VERSION_CHARS = 64
MAX_URL_CHARS = 2048
MAX_FILTER_CHARS = 4096
MAX_TAGS = 50
MAX_TAG_VALUE_CHARS = 256
MAX_STAGES = 20
MAX_EXPLICIT_TARGETS = 100_000
MAX_RETRIES = 10
MIN_TIMEOUT_SECONDS = 60.0  # AWS IoT Jobs: 1 minute ..
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600.0  # .. 7 days
MAX_RATE_PER_MINUTE = 1_000_000
MAX_BACKOFF_SECONDS = 3600.0
MAX_ERROR_CHARS = 300  # as the agent's own bound


# --- definition ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Firmware:
    """The `firmware` block a rollout puts in desired state (and a device's previous one)."""

    version: str
    url: str

    def __post_init__(self) -> None:
        if not self.version or len(self.version) > MAX_VERSION_CHARS:
            raise InvalidRolloutError(f"firmware version must be 1-{MAX_VERSION_CHARS} chars")
        if not self.url or len(self.url) > MAX_URL_CHARS:
            raise InvalidRolloutError(f"firmware url must be 1-{MAX_URL_CHARS} chars")

    def desired(self) -> dict[str, Any]:
        """The desired-state patch that asks a device to run this firmware."""
        return {"firmware": {"version": self.version, "url": self.url}}


@dataclass(frozen=True)
class TargetSelector:
    """Which devices a rollout targets: exactly one of explicit ids, tags (all must match), or
    a fleet filter text. The planner never sees it: it gets the resolved `Target` list."""

    device_ids: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    fleet_filter: str | None = None

    def __post_init__(self) -> None:
        kinds = sum((bool(self.device_ids), bool(self.tags), self.fleet_filter is not None))
        if kinds != 1:
            raise InvalidRolloutError(
                "a target selector names exactly one of: device ids, tags, a fleet filter"
            )
        if len(self.device_ids) > MAX_EXPLICIT_TARGETS:
            raise InvalidRolloutError(f"at most {MAX_EXPLICIT_TARGETS} explicit device ids")
        for device_id in self.device_ids:
            if not DEVICE_ID_PATTERN.fullmatch(device_id):
                raise InvalidRolloutError(f"invalid device id {device_id[:140]!r}")
        if len(set(self.device_ids)) != len(self.device_ids):
            raise InvalidRolloutError("device ids are repeated")
        if len(self.tags) > MAX_TAGS:
            raise InvalidRolloutError(f"at most {MAX_TAGS} tags")
        for key, value in self.tags:
            if not TAG_KEY_PATTERN.fullmatch(key):
                raise InvalidRolloutError(f"invalid tag key {key[:70]!r}")
            if len(value) > MAX_TAG_VALUE_CHARS:
                raise InvalidRolloutError(f"tag {key} value is over {MAX_TAG_VALUE_CHARS} chars")
        if self.fleet_filter is not None and not 0 < len(self.fleet_filter) <= MAX_FILTER_CHARS:
            raise InvalidRolloutError(f"the fleet filter must be 1-{MAX_FILTER_CHARS} chars")


@dataclass(frozen=True)
class FailureThreshold:
    """Abort when, among at least `min_finished` settled devices of a stage, `count` failed or
    `percent` of them failed (exactly one of the two). FAILED, TIMED_OUT (retries used up) and
    REJECTED count as failures."""

    count: int | None = None
    percent: float | None = None
    min_finished: int = 1

    def __post_init__(self) -> None:
        if (self.count is None) == (self.percent is None):
            raise InvalidRolloutError("a failure threshold is a count or a percent, not both")
        if self.count is not None and self.count < 1:
            raise InvalidRolloutError("a failure threshold count must be at least 1")
        if self.percent is not None and not (0 < self.percent <= 100):
            raise InvalidRolloutError("a failure threshold percent must be in (0, 100]")
        if self.min_finished < 1:
            raise InvalidRolloutError("min_finished must be at least 1")

    def breached(self, failed: int, finished: int) -> bool:
        if finished < self.min_finished or failed == 0:
            return False
        if self.count is not None:
            return failed >= self.count
        assert self.percent is not None
        return failed * 100 >= self.percent * finished


@dataclass(frozen=True)
class Stage:
    """One stage. Sizes are cumulative: `percent=10` means "10% of the targets are in by the end
    of this stage" (rounded up, ADR 30). Exactly one of `percent` / `count`."""

    percent: float | None = None
    count: int | None = None
    # Share of this stage's own devices that must succeed before the next stage starts.
    success_threshold_percent: float = 100.0
    failure_threshold: FailureThreshold | None = None
    # How long the stage must stay at its success threshold before the next stage starts.
    soak_seconds: float = 0.0
    # An operator approves (ApproveStage) before this stage starts; never on the first stage.
    approval_required: bool = False

    def __post_init__(self) -> None:
        if (self.percent is None) == (self.count is None):
            raise InvalidRolloutError("a stage size is a percent or a count, not both")
        if self.percent is not None and not (0 < self.percent <= 100):
            raise InvalidRolloutError("a stage percent must be in (0, 100]")
        if self.count is not None and self.count < 1:
            raise InvalidRolloutError("a stage count must be at least 1")
        if not (0 <= self.success_threshold_percent <= 100):
            raise InvalidRolloutError("a success threshold must be in [0, 100]")
        if not (0 <= self.soak_seconds <= MAX_TIMEOUT_SECONDS):
            raise InvalidRolloutError("soak time must be between 0 and 7 days")

    def size(self, total: int) -> int:
        """This stage's cumulative size for `total` targets, before the monotone cap."""
        if self.count is not None:
            return min(self.count, total)
        assert self.percent is not None
        # Round up so a 1% canary of 50 devices is 1 device, never 0 (ADR 30). The epsilon
        # keeps 10% of 30 at 3 despite 0.1 * 30 == 3.0000000000000004.
        return min(total, math.ceil(self.percent * total / 100 - 1e-9))


@dataclass(frozen=True)
class ExponentialRamp:
    """AWS IoT Jobs' exponential rollout: start at `base_per_minute`, multiply by
    `increment_factor` each time another `notified_step` devices were notified (or
    `succeeded_step` succeeded), never above `max_per_minute`."""

    base_per_minute: int
    increment_factor: float
    notified_step: int | None = None
    succeeded_step: int | None = None
    max_per_minute: int = 1000

    def __post_init__(self) -> None:
        if not 1 <= self.base_per_minute <= MAX_RATE_PER_MINUTE:
            raise InvalidRolloutError(f"base rate must be 1-{MAX_RATE_PER_MINUTE} per minute")
        if not 1.1 <= self.increment_factor <= 5:
            raise InvalidRolloutError("the increment factor must be in [1.1, 5]")
        if (self.notified_step is None) == (self.succeeded_step is None):
            raise InvalidRolloutError(
                "a ramp is raised after N notified or after N succeeded, exactly one"
            )
        step = self.notified_step if self.notified_step is not None else self.succeeded_step
        if step is None or step < 1:
            raise InvalidRolloutError("the ramp step must be at least 1 device")
        if not self.base_per_minute <= self.max_per_minute <= MAX_RATE_PER_MINUTE:
            raise InvalidRolloutError("the ramp's maximum must be at least its base rate")

    def per_minute(self, notified: int, succeeded: int) -> int:
        if self.notified_step is not None:
            raises = notified // self.notified_step
        else:
            assert self.succeeded_step is not None
            raises = succeeded // self.succeeded_step
        # Bounded exponent: log(1e6)/log(1.1) < 150, so no float overflow and no huge power.
        rate = self.base_per_minute * self.increment_factor ** min(raises, 150)
        return int(min(self.max_per_minute, math.floor(rate + 1e-9)))


@dataclass(frozen=True)
class Rate:
    """How fast devices are notified (first notifications and retries alike): a fixed
    `max_per_minute`, an exponential `ramp`, or neither (no limit)."""

    max_per_minute: int | None = None
    ramp: ExponentialRamp | None = None

    def __post_init__(self) -> None:
        if self.max_per_minute is not None and self.ramp is not None:
            raise InvalidRolloutError("a rate is a fixed maximum or a ramp, not both")
        if self.max_per_minute is not None and not (
            1 <= self.max_per_minute <= MAX_RATE_PER_MINUTE
        ):
            raise InvalidRolloutError(f"the rate must be 1-{MAX_RATE_PER_MINUTE} per minute")

    def per_minute(self, notified: int, succeeded: int) -> int | None:
        """The current limit, or None for no limit."""
        if self.ramp is not None:
            return self.ramp.per_minute(notified, succeeded)
        return self.max_per_minute


@dataclass(frozen=True)
class RetryPolicy:
    """Retries (0-10 each) for FAILED and TIMED_OUT executions; REJECTED is never retried.
    Retry n waits `backoff_seconds * 2**(n-1)` (capped at an hour) after the failure."""

    failed: int = 0
    timed_out: int = 0
    backoff_seconds: float = 60.0

    def __post_init__(self) -> None:
        if not (0 <= self.failed <= MAX_RETRIES and 0 <= self.timed_out <= MAX_RETRIES):
            raise InvalidRolloutError(f"retries must be 0-{MAX_RETRIES}")
        if not 0 <= self.backoff_seconds <= MAX_BACKOFF_SECONDS:
            raise InvalidRolloutError("retry backoff must be 0-3600 seconds")

    def delay(self, attempt: int) -> float:
        """The wait after attempt `attempt` (1-based) failed, before the next one."""
        return float(min(MAX_BACKOFF_SECONDS, self.backoff_seconds * 2 ** min(attempt - 1, 20)))


@dataclass(frozen=True)
class RolloutDefinition:
    rollout_id: str
    artifact_id: str
    firmware: Firmware
    selector: TargetSelector
    stages: tuple[Stage, ...]
    rate: Rate = field(default_factory=Rate)
    # Per attempt, counted from the notification: a device that never answers times out too.
    timeout_seconds: float = 3600.0
    retries: RetryPolicy = field(default_factory=RetryPolicy)
    # On abort, QUEUED executions are always canceled; with this, devices that took the update
    # (or are installing it) are also sent back to the firmware they ran before.
    rollback_on_abort: bool = False
    # The tag whose values the canary is spread over (ADR 31).
    stratify_by: str = "site"

    def __post_init__(self) -> None:
        if not ROLLOUT_ID_PATTERN.fullmatch(self.rollout_id):
            raise InvalidRolloutError(f"invalid rollout id {self.rollout_id[:70]!r}")
        if not self.artifact_id or len(self.artifact_id) > 128:
            raise InvalidRolloutError("artifact id must be 1-128 chars")
        if not 1 <= len(self.stages) <= MAX_STAGES:
            raise InvalidRolloutError(f"a rollout has 1-{MAX_STAGES} stages")
        if self.stages[0].approval_required:
            raise InvalidRolloutError(
                "the first stage starts with StartRollout; approval is for later stages"
            )
        last = self.stages[-1]
        if last.percent != 100:
            raise InvalidRolloutError("the last stage must be percent=100 (every target)")
        percents = [s.percent for s in self.stages if s.percent is not None]
        counts = [s.count for s in self.stages if s.count is not None]
        if percents != sorted(set(percents)) or counts != sorted(set(counts)):
            raise InvalidRolloutError("stage sizes must grow from stage to stage")
        if not MIN_TIMEOUT_SECONDS <= self.timeout_seconds <= MAX_TIMEOUT_SECONDS:
            raise InvalidRolloutError("the timeout must be between 1 minute and 7 days")
        if not TAG_KEY_PATTERN.fullmatch(self.stratify_by):
            raise InvalidRolloutError(f"invalid stratify_by tag key {self.stratify_by[:70]!r}")

    def stage_sizes(self, total: int) -> tuple[int, ...]:
        """Cumulative device counts per stage for `total` targets; never decreasing."""
        sizes: list[int] = []
        for stage in self.stages:
            sizes.append(max(stage.size(total), sizes[-1] if sizes else 0))
        return tuple(sizes)


# --- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One resolved target device: its id, its tags, and the firmware it runs now (known to
    the resolver from the shadow and the artifact service), or None if unknown."""

    device_id: str
    tags: tuple[tuple[str, str], ...] = ()
    firmware: Firmware | None = None

    def stratum(self, key: str) -> str:
        for tag_key, value in self.tags:
            if tag_key == key:
                return value
        return ""


def validate_targets(targets: tuple[Target, ...]) -> None:
    seen: set[str] = set()
    for target in targets:
        if not DEVICE_ID_PATTERN.fullmatch(target.device_id):
            raise InvalidTargetsError(f"invalid device id {target.device_id[:140]!r}")
        if target.device_id in seen:
            raise InvalidTargetsError(f"device {target.device_id} is listed twice")
        seen.add(target.device_id)


# --- executions ---------------------------------------------------------------------------------


class ExecutionStatus(StrEnum):
    QUEUED = "QUEUED"  # notified, the device has not reported starting
    IN_PROGRESS = "IN_PROGRESS"  # the device reported a step
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    REJECTED = "REJECTED"  # the device refused the update (signature, compatibility, ...)
    CANCELED = "CANCELED"  # aborted before it started
    ROLLED_BACK = "ROLLED_BACK"  # the rollout sent it back to its previous firmware (abort)


ACTIVE = frozenset({ExecutionStatus.QUEUED, ExecutionStatus.IN_PROGRESS})
FAILURES = frozenset({ExecutionStatus.FAILED, ExecutionStatus.TIMED_OUT, ExecutionStatus.REJECTED})

PROGRESS_STEPS = frozenset({"downloading", "verifying", "installing", "rebooting"})
REPORT_STATES = PROGRESS_STEPS | {"succeeded", "failed", "rejected", "rolled_back"}


@dataclass(frozen=True)
class Execution:
    """One device in one rollout. Created when the device is first notified."""

    device_id: str
    stage: int  # the stage that notified it first
    stratum: str
    previous: Firmware | None  # what it ran before; the rollback target
    status: ExecutionStatus
    attempt: int  # 1 for the first notification, +1 per retry
    notified_at: tuple[float, ...]  # one per attempt, for the rate limit
    updated_at: float
    step: str | None = None  # the agent's step while IN_PROGRESS
    reason: str = ""
    rollback_requested_at: float | None = None
    withdrawn: bool = False  # desired state set back after a final failure or a cancel

    @property
    def rollback_pending(self) -> bool:
        # A rollback that timed out is settled (TIMED_OUT); a late confirmation still counts.
        # FAILED / REJECTED devices never switched: they run the previous version already.
        return self.rollback_requested_at is not None and self.status not in (
            ExecutionStatus.ROLLED_BACK,
            ExecutionStatus.TIMED_OUT,
            ExecutionStatus.FAILED,
            ExecutionStatus.REJECTED,
        )


def retries_left(execution: Execution, policy: RetryPolicy) -> int:
    if execution.status == ExecutionStatus.FAILED:
        return max(0, policy.failed + 1 - execution.attempt)
    if execution.status == ExecutionStatus.TIMED_OUT:
        return max(0, policy.timed_out + 1 - execution.attempt)
    return 0


def is_settled(execution: Execution, policy: RetryPolicy, *, retrying: bool = True) -> bool:
    """Final: nothing more will happen to it unless a device reports (no retry, no rollback).
    `retrying=False` for a rollout that retries nothing any more (aborted)."""
    if execution.status in ACTIVE or execution.rollback_pending:
        return False
    return not retrying or retries_left(execution, policy) == 0


@dataclass(frozen=True)
class FirmwareReport:
    """A device's `reported.firmware` block, bounded and shape-checked."""

    version: str  # the version running now
    state: str | None = None
    target_version: str | None = None  # the update the state is about
    error: str | None = None

    @classmethod
    def from_reported(cls, reported: Mapping[str, Any]) -> FirmwareReport | None:
        """The firmware part of a reported document, None if it has none."""
        block = reported.get("firmware")
        if block is None:
            return None
        if not isinstance(block, Mapping):
            raise InvalidReportError("reported.firmware must be an object")
        version = _bounded_version(block.get("version"), "reported.firmware.version")
        state = block.get("state")
        if state is not None and (not isinstance(state, str) or state not in REPORT_STATES):
            raise InvalidReportError(
                f"reported.firmware.state must be one of {', '.join(sorted(REPORT_STATES))}"
            )
        target = block.get("target")
        target_version = None
        if target is not None:
            if not isinstance(target, Mapping):
                raise InvalidReportError("reported.firmware.target must be an object")
            target_version = _bounded_version(
                target.get("version"), "reported.firmware.target.version"
            )
        error = block.get("error")
        if error is not None and not isinstance(error, str):
            raise InvalidReportError("reported.firmware.error must be a string")
        return cls(version, state, target_version, error[:MAX_ERROR_CHARS] if error else None)


def _bounded_version(value: Any, name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_VERSION_CHARS:
        raise InvalidReportError(f"{name} must be a string of 1-{MAX_VERSION_CHARS} chars")
    return value


def apply_report(
    execution: Execution, target: Firmware, report: FirmwareReport, now: float
) -> Execution:
    """The execution after its device reported `report`; `target` is the rollout's firmware.

    Reports about another update (a stale message, an earlier rollout) change nothing, except
    that a device asked to roll back that reports running its previous version is ROLLED_BACK.
    A device whose install fails while its rollback is requested is FAILED, not ROLLED_BACK: it
    runs its previous version either way, and the failure is what the operator needs to see.
    """
    status = execution.status
    previous = execution.previous
    failed_install = (
        status in ACTIVE
        and report.state in ("failed", "rolled_back", "rejected")
        and report.target_version in (None, target.version)
    )
    if (
        not failed_install
        and execution.rollback_requested_at is not None
        and status != ExecutionStatus.ROLLED_BACK
        and previous is not None
        and report.version == previous.version
        and report.state in (None, "succeeded", "rolled_back")
    ):
        return replace(execution, status=ExecutionStatus.ROLLED_BACK, step=None, updated_at=now)
    if status in (ExecutionStatus.CANCELED, ExecutionStatus.ROLLED_BACK):
        return execution
    state = report.state
    if state is None or state == "succeeded":
        # A late success after a timeout still counts: the device does run the new firmware.
        # Not once the rollout gave up on it (withdrawn): its desired is the old one again.
        runs_target = report.version == target.version
        late = status == ExecutionStatus.TIMED_OUT and not execution.withdrawn
        if runs_target and (status in ACTIVE or late):
            return replace(
                execution, status=ExecutionStatus.SUCCEEDED, step=None, reason="", updated_at=now
            )
        return execution
    if report.target_version not in (None, target.version) or status not in ACTIVE:
        return execution
    if state in PROGRESS_STEPS:
        if status == ExecutionStatus.IN_PROGRESS and execution.step == state:
            return execution
        return replace(execution, status=ExecutionStatus.IN_PROGRESS, step=state, updated_at=now)
    if state == "rolled_back":
        # The agent undid the install by itself (failed health check): a failure.
        reason = f"device rolled back to {report.version}"
        new_status = ExecutionStatus.FAILED
    elif state == "failed":
        reason = "device reported failure"
        new_status = ExecutionStatus.FAILED
    else:
        assert state == "rejected"
        reason = "device rejected the update"
        new_status = ExecutionStatus.REJECTED
    if report.error:
        reason = f"{reason}: {report.error}"
    return replace(execution, status=new_status, step=None, reason=reason, updated_at=now)


# --- the rollout's own state and the operator's commands ----------------------------------------


class RolloutStatus(StrEnum):
    CREATED = "CREATED"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    WAITING_APPROVAL = "WAITING_APPROVAL"
    ABORTED = "ABORTED"
    COMPLETED = "COMPLETED"


LIVE = frozenset({RolloutStatus.RUNNING, RolloutStatus.PAUSED, RolloutStatus.WAITING_APPROVAL})


@dataclass(frozen=True)
class RolloutState:
    status: RolloutStatus = RolloutStatus.CREATED
    stage_index: int = 0
    started_at: float | None = None
    stage_started_at: float | None = None
    # When the current stage first met its success threshold: the soak runs from here.
    threshold_met_at: float | None = None
    approved_through: int = 0  # stages up to this index were approved (stage 0 by Start)
    accepted_through: int = -1  # stages an operator let pass despite a missed threshold
    threshold_missed: bool = False  # the current pause is a missed success threshold
    reason: str = ""
    finished_at: float | None = None


@dataclass(frozen=True)
class Rollout:
    definition: RolloutDefinition
    state: RolloutState = field(default_factory=RolloutState)


def start(rollout: Rollout, now: float) -> Rollout:
    if rollout.state.status != RolloutStatus.CREATED:
        raise InvalidStateError(f"a {rollout.state.status} rollout cannot start")
    return replace(
        rollout,
        state=replace(
            rollout.state, status=RolloutStatus.RUNNING, started_at=now, stage_started_at=now
        ),
    )


def pause(rollout: Rollout, now: float, reason: str = "paused by an operator") -> Rollout:
    if rollout.state.status not in (RolloutStatus.RUNNING, RolloutStatus.WAITING_APPROVAL):
        raise InvalidStateError(f"a {rollout.state.status} rollout cannot pause")
    del now  # part of every command's signature; pausing keeps no timestamp
    return replace(
        rollout, state=replace(rollout.state, status=RolloutStatus.PAUSED, reason=reason[:500])
    )


def resume(rollout: Rollout, now: float) -> Rollout:
    """Resume a paused rollout. If it paused on a missed success threshold, resuming is the
    operator's decision to let that stage pass anyway."""
    state = rollout.state
    if state.status != RolloutStatus.PAUSED:
        raise InvalidStateError(f"a {state.status} rollout cannot resume")
    accepted = state.stage_index if state.threshold_missed else state.accepted_through
    return replace(
        rollout,
        state=replace(
            state,
            status=RolloutStatus.RUNNING,
            reason="",
            threshold_missed=False,
            accepted_through=accepted,
            # The soak restarts: the operator's look at the stage is the new reference.
            threshold_met_at=now if state.threshold_missed else state.threshold_met_at,
        ),
    )


def approve_stage(rollout: Rollout, stage_index: int, now: float) -> Rollout:
    """Approve stage `stage_index` (the next one, or any later one in advance)."""
    del now
    state = rollout.state
    if state.status not in LIVE:
        raise InvalidStateError(f"a {state.status} rollout takes no approval")
    if not state.stage_index < stage_index < len(rollout.definition.stages):
        raise InvalidStateError(f"stage {stage_index} is not a stage still to come")
    status = state.status
    if status == RolloutStatus.WAITING_APPROVAL and stage_index == state.stage_index + 1:
        status = RolloutStatus.RUNNING
    return replace(
        rollout,
        state=replace(
            state, status=status, approved_through=max(state.approved_through, stage_index)
        ),
    )


def abort(rollout: Rollout, now: float, reason: str = "aborted by an operator") -> Rollout:
    """Stop the rollout; the next `plan` cancels what has not started (and rolls back)."""
    state = rollout.state
    if state.status in (RolloutStatus.ABORTED, RolloutStatus.COMPLETED):
        raise InvalidStateError(f"a {state.status} rollout cannot abort")
    return replace(
        rollout,
        state=replace(state, status=RolloutStatus.ABORTED, reason=reason[:500], finished_at=now),
    )
