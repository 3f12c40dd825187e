"""The rollout planner: `plan(rollout, executions, targets, now) -> Plan`, pure and deterministic.

One call is one reconcile pass. It reads the rollout (definition + state), every execution and
the resolved target list, and returns what to do (`Plan.actions`) together with the rollout and
executions as they are once those actions are taken. The caller persists `Plan.rollout` and
`Plan.changed` in one transaction, then carries out the side-effect actions (`Notify`,
`RollBack`, `Withdraw`: desired-state writes through `BatchUpdateDesired`). Because the
notifications are recorded in the executions the plan returns, running `plan` again on its own
result notifies nobody twice.

A pass, in order: executions past their timeout become TIMED_OUT; a stage over its failure
threshold aborts the rollout; an aborted rollout cancels what has not started and (with its
rollback policy) rolls back what has; a running rollout retries failed devices, notifies new
devices up to the current stage's size and the rate, and advances, waits for approval, pauses
or completes. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from services.rollout.domain import (
    ACTIVE,
    FAILURES,
    LIVE,
    Execution,
    ExecutionStatus,
    Firmware,
    Rollout,
    RolloutDefinition,
    RolloutStatus,
    Target,
    is_settled,
    retries_left,
    validate_targets,
)
from services.rollout.errors import InvalidTargetsError

RATE_WINDOW_SECONDS = 60.0

# --- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Notify:
    """Set the device's desired firmware to the rollout's (attempt 1, or a retry)."""

    device_id: str
    attempt: int
    firmware: Firmware

    def desired(self) -> dict[str, Any]:
        """The desired patch. A retry must change the desired document, or the shadow sends no
        new delta and the agent keeps ignoring a target that failed once; so attempt n > 1
        names the same artifact with `?attempt=n` on its url (ADR 33). The artifact service and
        the agent read the artifact id from the url's path only."""
        if self.attempt == 1:
            return self.firmware.desired()
        parts = urlsplit(self.firmware.url)
        query = [
            (k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "attempt"
        ]
        query.append(("attempt", str(self.attempt)))
        url = urlunsplit(parts._replace(query=urlencode(query)))
        return {"firmware": {"version": self.firmware.version, "url": url}}


@dataclass(frozen=True)
class RollBack:
    """Set the device's desired firmware back to what it ran before the rollout (abort)."""

    device_id: str
    firmware: Firmware

    def desired(self) -> dict[str, Any]:
        return self.firmware.desired()


@dataclass(frozen=True)
class Withdraw:
    """Take the rollout's firmware out of the device's desired state: it was canceled before it
    started, or failed for good. Back to its previous firmware (which it reports, so no delta),
    or, if that is unknown, the desired `firmware` leaf is deleted."""

    device_id: str
    firmware: Firmware | None

    def desired(self) -> dict[str, Any]:
        return self.firmware.desired() if self.firmware is not None else {"firmware": None}


@dataclass(frozen=True)
class MarkTimedOut:
    device_id: str
    attempt: int


@dataclass(frozen=True)
class StageStarted:
    stage_index: int


@dataclass(frozen=True)
class AwaitApproval:
    stage_index: int  # the stage that waits for ApproveStage


@dataclass(frozen=True)
class Pause:
    reason: str


@dataclass(frozen=True)
class Abort:
    reason: str


@dataclass(frozen=True)
class Complete:
    succeeded: int
    failed: int


Action = (
    Notify
    | RollBack
    | Withdraw
    | MarkTimedOut
    | StageStarted
    | AwaitApproval
    | Pause
    | Abort
    | Complete
)


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    rollout: Rollout  # the rollout after this pass
    executions: tuple[Execution, ...]  # every execution after this pass, by device id
    changed: tuple[Execution, ...]  # the new or modified ones (what to write), by device id


# --- canary sampling ----------------------------------------------------------------------------


def _rank(rollout_id: str, text: str) -> bytes:
    # A hash, not creation order or Python's salted hash(): stable across processes and
    # releases, and salted by the rollout so each rollout canaries different devices (ADR 31).
    return hashlib.sha256(f"{rollout_id}\x00{text}".encode()).digest()[:8]


def _select(
    definition: RolloutDefinition,
    candidates: Iterable[Target],
    taken: Counter[str],
    limit: int,
) -> list[Target]:
    """Up to `limit` candidates, round-robin over strata: always from the stratum with the
    fewest devices in the rollout so far (ties by the stratum's hash), in hash order inside it."""
    rollout_id = definition.rollout_id
    groups: dict[str, list[tuple[bytes, Target]]] = {}
    for target in candidates:
        stratum = target.stratum(definition.stratify_by)
        groups.setdefault(stratum, []).append((_rank(rollout_id, target.device_id), target))
    for members in groups.values():
        members.sort(key=lambda pair: (pair[0], pair[1].device_id), reverse=True)  # pop() = min
    heap = [(taken[s], _rank(rollout_id, "stratum\x00" + s), s) for s in groups]
    heapq.heapify(heap)
    chosen: list[Target] = []
    while heap and len(chosen) < limit:
        count, rank, stratum = heapq.heappop(heap)
        members = groups[stratum]
        chosen.append(members.pop()[1])
        if members:
            heapq.heappush(heap, (count + 1, rank, stratum))
    return chosen


def stratified_order(definition: RolloutDefinition, targets: Sequence[Target]) -> list[Target]:
    """The order in which a rollout takes `targets` when none has joined late: the first
    `stage_sizes(len(targets))[0]` of it are the canary."""
    return _select(definition, targets, Counter(), len(targets))


# --- the pass -----------------------------------------------------------------------------------


def rate_allowance(
    definition: RolloutDefinition, executions: Iterable[Execution], now: float
) -> int | None:
    """How many notifications the rate allows right now (None: no limit). Sliding window: the
    notifications in (now - 60 s, now] plus the new ones stay within the per-minute limit."""
    notified = 0
    succeeded = 0
    recent = 0
    for execution in executions:
        notified += len(execution.notified_at)
        succeeded += execution.status == ExecutionStatus.SUCCEEDED
        recent += sum(1 for t in execution.notified_at if now - RATE_WINDOW_SECONDS < t <= now)
    limit = definition.rate.per_minute(notified, succeeded)
    if limit is None:
        return None
    return max(0, limit - recent)


def _breached_stage(
    definition: RolloutDefinition, executions: Iterable[Execution]
) -> tuple[int, int, int] | None:
    """The first stage over its failure threshold as (stage, failed, finished), or None."""
    finished: Counter[int] = Counter()
    failed: Counter[int] = Counter()
    for execution in executions:
        if is_settled(execution, definition.retries):
            finished[execution.stage] += 1
            failed[execution.stage] += execution.status in FAILURES
    for index, stage in enumerate(definition.stages):
        threshold = stage.failure_threshold
        if threshold is not None and threshold.breached(failed[index], finished[index]):
            return index, failed[index], finished[index]
    return None


class _Pass:
    """The mutable scratch state of one `plan` call; nothing of it escapes."""

    def __init__(self, rollout: Rollout, executions: Iterable[Execution], now: float) -> None:
        self.definition = rollout.definition
        self.state = rollout.state
        self.now = now
        self.actions: list[Action] = []
        self.by_id: dict[str, Execution] = {}
        for execution in executions:
            if execution.device_id in self.by_id:
                raise InvalidTargetsError(f"device {execution.device_id} has two executions")
            self.by_id[execution.device_id] = execution
        self.original = dict(self.by_id)

    def sorted_executions(self) -> list[Execution]:
        return [self.by_id[d] for d in sorted(self.by_id)]

    def time_out(self) -> None:
        timeout = self.definition.timeout_seconds
        for execution in self.sorted_executions():
            if execution.status in ACTIVE and self.now - execution.notified_at[-1] >= timeout:
                self.by_id[execution.device_id] = replace(
                    execution,
                    status=ExecutionStatus.TIMED_OUT,
                    step=None,
                    reason=f"no result within {timeout:g} s",
                    updated_at=self.now,
                )
                self.actions.append(MarkTimedOut(execution.device_id, execution.attempt))
            elif (
                execution.rollback_pending
                and execution.rollback_requested_at is not None
                and self.now - execution.rollback_requested_at >= timeout
            ):
                self.by_id[execution.device_id] = replace(
                    execution,
                    status=ExecutionStatus.TIMED_OUT,
                    reason=f"rollback not confirmed within {timeout:g} s",
                    updated_at=self.now,
                )
                self.actions.append(MarkTimedOut(execution.device_id, execution.attempt))

    def check_failure_thresholds(self) -> None:
        breach = _breached_stage(self.definition, self.by_id.values())
        if breach is None:
            return
        stage, failed, finished = breach
        reason = f"stage {stage}: {failed} of {finished} finished devices failed"
        self.state = replace(
            self.state, status=RolloutStatus.ABORTED, reason=reason, finished_at=self.now
        )
        self.actions.append(Abort(reason))

    def withdraw(self, execution: Execution, status: ExecutionStatus | None = None) -> None:
        self.by_id[execution.device_id] = replace(
            execution,
            status=status or execution.status,
            withdrawn=True,
            updated_at=self.now,
        )
        self.actions.append(Withdraw(execution.device_id, execution.previous))

    def clean_up_abort(self) -> None:
        rollback = self.definition.rollback_on_abort
        for execution in self.sorted_executions():
            if execution.status == ExecutionStatus.QUEUED:
                self.withdraw(execution, ExecutionStatus.CANCELED)
            elif (
                execution.status in FAILURES
                and not execution.withdrawn
                and execution.rollback_requested_at is None  # its desired is the old one already
            ):
                self.withdraw(execution)
            elif (
                rollback
                and execution.status in (ExecutionStatus.SUCCEEDED, ExecutionStatus.IN_PROGRESS)
                and execution.rollback_requested_at is None
                and execution.previous is not None
            ):
                self.by_id[execution.device_id] = replace(
                    execution, rollback_requested_at=self.now, updated_at=self.now
                )
                self.actions.append(RollBack(execution.device_id, execution.previous))

    def withdraw_exhausted(self) -> None:
        for execution in self.sorted_executions():
            if (
                execution.status in FAILURES
                and not execution.withdrawn
                and retries_left(execution, self.definition.retries) == 0
            ):
                self.withdraw(execution)

    def retry(self, allowance: int | None) -> int | None:
        policy = self.definition.retries
        due = [
            e
            for e in self.by_id.values()
            if retries_left(e, policy) > 0 and self.now >= e.updated_at + policy.delay(e.attempt)
        ]
        due.sort(key=lambda e: (e.updated_at, e.device_id))
        for execution in due:
            if allowance == 0:
                break
            attempt = execution.attempt + 1
            self.by_id[execution.device_id] = replace(
                execution,
                status=ExecutionStatus.QUEUED,
                attempt=attempt,
                notified_at=(*execution.notified_at, self.now),
                step=None,
                reason="",
                updated_at=self.now,
            )
            self.actions.append(Notify(execution.device_id, attempt, self.definition.firmware))
            allowance = None if allowance is None else allowance - 1
        return allowance

    def notify_new(self, targets: Sequence[Target], size: int, allowance: int | None) -> int | None:
        room = size - len(self.by_id)
        if allowance is not None:
            room = min(room, allowance)
        if room <= 0:
            return allowance
        stratify_by = self.definition.stratify_by
        taken: Counter[str] = Counter(e.stratum for e in self.by_id.values())
        candidates = (t for t in targets if t.device_id not in self.by_id)
        for target in _select(self.definition, candidates, taken, room):
            self.by_id[target.device_id] = Execution(
                device_id=target.device_id,
                stage=self.state.stage_index,
                stratum=target.stratum(stratify_by),
                previous=target.firmware,
                status=ExecutionStatus.QUEUED,
                attempt=1,
                notified_at=(self.now,),
                updated_at=self.now,
            )
            self.actions.append(Notify(target.device_id, 1, self.definition.firmware))
        if allowance is None:
            return None
        return allowance - min(room, allowance)

    def run(self, targets: Sequence[Target]) -> None:
        """Notify and move through stages while the rollout is RUNNING."""
        definition = self.definition
        sizes = definition.stage_sizes(len(targets))
        allowance = rate_allowance(definition, self.by_id.values(), self.now)
        allowance = self.retry(allowance)
        while True:
            index = self.state.stage_index
            stage = definition.stages[index]
            allowance = self.notify_new(targets, sizes[index], allowance)
            if len(self.by_id) < sizes[index]:
                return  # the stage is not filled yet (rate-limited)
            if index == len(definition.stages) - 1:
                if all(is_settled(e, definition.retries) for e in self.by_id.values()):
                    self.complete()
                return
            members = [e for e in self.by_id.values() if e.stage == index]
            succeeded = sum(e.status == ExecutionStatus.SUCCEEDED for e in members)
            met = (
                succeeded * 100 >= stage.success_threshold_percent * len(members)
                or self.state.accepted_through >= index
            )
            if not met:
                if all(is_settled(e, definition.retries) for e in members):
                    reason = (
                        f"stage {index}: {succeeded} of {len(members)} devices succeeded, "
                        f"below the {stage.success_threshold_percent:g}% success threshold"
                    )
                    self.state = replace(
                        self.state,
                        status=RolloutStatus.PAUSED,
                        threshold_missed=True,
                        reason=reason,
                    )
                    self.actions.append(Pause(reason))
                return
            if self.state.threshold_met_at is None:
                self.state = replace(self.state, threshold_met_at=self.now)
            assert self.state.threshold_met_at is not None
            if self.now < self.state.threshold_met_at + stage.soak_seconds:
                return
            following = index + 1
            if (
                definition.stages[following].approval_required
                and self.state.approved_through < following
            ):
                self.state = replace(
                    self.state,
                    status=RolloutStatus.WAITING_APPROVAL,
                    reason=f"stage {following} waits for approval",
                )
                self.actions.append(AwaitApproval(following))
                return
            self.state = replace(
                self.state,
                stage_index=following,
                stage_started_at=self.now,
                threshold_met_at=None,
                reason="",
            )
            self.actions.append(StageStarted(following))

    def complete(self) -> None:
        succeeded = sum(e.status == ExecutionStatus.SUCCEEDED for e in self.by_id.values())
        failed = sum(e.status in FAILURES for e in self.by_id.values())
        self.state = replace(
            self.state, status=RolloutStatus.COMPLETED, reason="", finished_at=self.now
        )
        self.actions.append(Complete(succeeded, failed))

    def result(self, rollout: Rollout) -> Plan:
        executions = tuple(self.sorted_executions())
        changed = tuple(e for e in executions if self.original.get(e.device_id) != e)
        new_rollout = rollout if self.state == rollout.state else replace(rollout, state=self.state)
        return Plan(tuple(self.actions), new_rollout, executions, changed)


def plan(
    rollout: Rollout,
    executions: Iterable[Execution],
    targets: Sequence[Target],
    now: float,
) -> Plan:
    """One reconcile pass over a rollout. `targets` is the selector resolved now (devices that
    started matching since the last pass join here, under the rate limit); `executions` are all
    of this rollout's executions with every report applied (`domain.apply_report`)."""
    validate_targets(tuple(targets))
    work = _Pass(rollout, executions, now)
    status = work.state.status
    if status == RolloutStatus.CREATED:
        return work.result(rollout)
    work.time_out()
    if work.state.status in LIVE:
        work.check_failure_thresholds()
    if work.state.status == RolloutStatus.ABORTED:
        work.clean_up_abort()
    elif work.state.status in LIVE:
        work.withdraw_exhausted()
        if work.state.status == RolloutStatus.RUNNING:
            work.run(targets)
    return work.result(rollout)


# --- progress -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """What GetRollout / WatchRollout report: counts, not device lists."""

    status: RolloutStatus
    stage_index: int
    stage_size: int  # cumulative devices the current stage takes in
    targets: int
    not_started: int  # targets without an execution yet
    by_status: tuple[tuple[ExecutionStatus, int], ...]  # every status, in enum order
    rollbacks_pending: int


SETTLED_AFTER_ROLLBACK = frozenset(
    {
        ExecutionStatus.ROLLED_BACK,
        ExecutionStatus.TIMED_OUT,
        ExecutionStatus.FAILED,
        ExecutionStatus.REJECTED,
    }
)


def progress_from_counts(
    rollout: Rollout,
    counts: Iterable[tuple[ExecutionStatus, bool, int]],
    targets: int,
) -> Progress:
    """`progress` from (status, rollback requested, count) groups instead of executions
    (the same result: `Execution.rollback_pending` is "requested and not settled")."""
    by_status: Counter[ExecutionStatus] = Counter()
    pending = 0
    for status, requested, count in counts:
        by_status[status] += count
        if requested and status not in SETTLED_AFTER_ROLLBACK:
            pending += count
    return _summary(rollout, by_status, pending, sum(by_status.values()), targets)


def progress(rollout: Rollout, executions: Iterable[Execution], targets: int) -> Progress:
    """A summary of a rollout for `targets` resolved targets."""
    counts: Counter[ExecutionStatus] = Counter()
    pending = 0
    notified: set[str] = set()
    for execution in executions:
        counts[execution.status] += 1
        pending += execution.rollback_pending
        notified.add(execution.device_id)
    return _summary(rollout, counts, pending, len(notified), targets)


def _summary(
    rollout: Rollout,
    counts: Counter[ExecutionStatus],
    pending: int,
    notified: int,
    targets: int,
) -> Progress:
    state = rollout.state
    sizes = rollout.definition.stage_sizes(targets)
    return Progress(
        status=state.status,
        stage_index=state.stage_index,
        stage_size=sizes[state.stage_index],
        targets=targets,
        not_started=max(0, targets - notified),
        by_status=tuple((status, counts[status]) for status in ExecutionStatus),
        rollbacks_pending=pending,
    )
