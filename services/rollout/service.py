"""The rollout service's use cases: operator commands, the reconcile pass, the fan-out and
device reports. Plain functions over ids, so a Celery task (or the server's own loop) can call
them; none waits on another.

Wiring of one pass (ADR 32, 35): resolve the targets through the shadow service, load the
executions, refresh the waiting ones from the devices' reported state, call `planner.plan`,
then save `Plan.rollout`, `Plan.changed`, the desired writes to send (the dispatch outbox) and
the device claims in one transaction. Only after that commit does `fan_out` send the writes, in
`BatchUpdateDesired` chunks, never one RPC per device.

Owns the shadow-service client (`ShadowClient`): the one place that speaks the shadow's gRPC.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc

from protos.shadow.v1 import shadow_pb2 as shadow_pb
from protos.shadow.v1 import shadow_pb2_grpc as shadow_grpc
from services.common.observability import (
    ROLLOUT_EXECUTIONS,
    ROLLOUT_FANOUT_CHUNKS,
    ROLLOUT_NOTIFIED,
    ROLLOUT_PASS_SECONDS,
)
from services.rollout import domain
from services.rollout.domain import (
    ACTIVE,
    LIVE,
    Execution,
    ExecutionStatus,
    Firmware,
    FirmwareReport,
    Rollout,
    RolloutDefinition,
    RolloutStatus,
    Target,
    TargetSelector,
)
from services.rollout.errors import (
    ConcurrentUpdateError,
    InvalidReportError,
    InvalidRolloutError,
    ShadowUnavailableError,
    TargetConflictError,
)
from services.rollout.planner import (
    Notify,
    Progress,
    RollBack,
    Withdraw,
    plan,
    progress_from_counts,
)
from services.rollout.store import RolloutRecord, RolloutStore

log = logging.getLogger(__name__)

FAN_OUT_CHUNK = 500  # desired writes per BatchUpdateDesired call
PAGE_SIZE = 1000  # devices per ListDevices / QueryFleet page
IN_FLIGHT = 64  # concurrent GetDevice calls while resolving an explicit list of devices
READ_BATCH = 1000  # devices per BatchGetShadows call (the shadow service's limit)
ATTEMPTS = 3  # tries of a read-modify-write that lost a race
MAX_LIST_PAGE = 1000


# --- the shadow service, seen from here -------------------------------------------------------


def _firmware_of(reported: Mapping[str, Any]) -> Firmware | None:
    block = reported.get("firmware")
    if not isinstance(block, Mapping):
        return None
    version, url = block.get("version"), block.get("url")
    if not isinstance(version, str) or not isinstance(url, str):
        return None
    try:
        return Firmware(version, url)
    except InvalidRolloutError:
        return None  # out of bounds: treat as unknown, so the device is not rolled back to it


class ShadowClient:
    """Reads targets and reported state from the shadow service and writes desired state."""

    def __init__(self, channel: grpc.Channel, timeout: float = 30.0) -> None:
        self.stub = shadow_grpc.ShadowServiceStub(channel)
        self.timeout = timeout

    def resolve(self, selector: TargetSelector) -> list[Target]:
        """The devices `selector` names now, with their tags (firmware left unknown)."""
        try:
            if selector.device_ids:
                return self._explicit(selector.device_ids)
            return self._paged(selector)
        except grpc.RpcError as exc:
            raise ShadowUnavailableError(f"shadow service: {_describe(exc)}") from None

    def _explicit(self, device_ids: Sequence[str]) -> list[Target]:
        targets: list[Target] = []
        for start in range(0, len(device_ids), IN_FLIGHT):
            calls = [
                self.stub.GetDevice.future(
                    shadow_pb.GetDeviceRequest(device_id=d), timeout=self.timeout
                )
                for d in device_ids[start : start + IN_FLIGHT]
            ]
            for call in calls:
                try:
                    device = call.result()
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.NOT_FOUND:
                        continue  # deleted (or never registered): not a target
                    raise
                targets.append(Target(device.device_id, tuple(sorted(device.tags.items()))))
        return targets

    def _paged(self, selector: TargetSelector) -> list[Target]:
        targets: list[Target] = []
        token = ""
        while True:
            page: shadow_pb.ListDevicesResponse | shadow_pb.QueryFleetResponse
            if selector.fleet_filter is not None:
                page = self.stub.QueryFleet(
                    shadow_pb.QueryFleetRequest(
                        filter=selector.fleet_filter, page_size=PAGE_SIZE, page_token=token
                    ),
                    timeout=self.timeout,
                )
            else:
                page = self.stub.ListDevices(
                    shadow_pb.ListDevicesRequest(
                        tags=dict(selector.tags), page_size=PAGE_SIZE, page_token=token
                    ),
                    timeout=self.timeout,
                )
            targets.extend(Target(d.device_id, tuple(sorted(d.tags.items()))) for d in page.devices)
            token = page.next_page_token
            if not token:
                return targets

    def reported(self, device_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Each device's `state.reported` ({} when it has none; deleted devices are left out).
        One BatchGetShadows call per READ_BATCH devices."""
        found: dict[str, dict[str, Any]] = {}
        unique = sorted(set(device_ids))
        try:
            for start in range(0, len(unique), READ_BATCH):
                reply = self.stub.BatchGetShadows(
                    shadow_pb.BatchGetShadowsRequest(device_ids=unique[start : start + READ_BATCH]),
                    timeout=self.timeout,
                )
                for read in reply.shadows:
                    if read.status == shadow_pb.ShadowRead.NO_SHADOW:
                        found[read.device_id] = {}
                    elif read.status == shadow_pb.ShadowRead.FOUND:
                        document = json.loads(read.document_json)
                        reported = document.get("state", {}).get("reported") or {}
                        found[read.device_id] = reported if isinstance(reported, dict) else {}
        except grpc.RpcError as exc:
            raise ShadowUnavailableError(f"shadow service: {_describe(exc)}") from None
        return found

    def update_desired(self, items: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """One BatchUpdateDesired call; returns the (device id, reason) of items not applied."""
        # skip_unchanged: a write sent twice (a fan-out task delivered again after its worker
        # died) changes nothing and notifies nobody the second time.
        request = shadow_pb.BatchUpdateDesiredRequest(
            items=[shadow_pb.DesiredPatch(device_id=d, desired_json=j) for d, j in items],
            skip_unchanged=True,
        )
        try:
            response = self.stub.BatchUpdateDesired(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise ShadowUnavailableError(f"shadow service: {_describe(exc)}") from None
        return [
            (r.device_id, f"{shadow_pb.BatchItemResult.Status.Name(r.status)}: {r.message}")
            for r in response.results
            if r.status != shadow_pb.BatchItemResult.OK
        ]


def _describe(exc: grpc.RpcError) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return f"{code.name if code else 'error'}: {details}"


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutView:
    """What GetRollout returns: the rollout, its progress and per-stage status counts."""

    record: RolloutRecord
    progress: Progress
    stages: tuple[Counter[ExecutionStatus], ...]


@dataclass(frozen=True)
class PassResult:
    rollout_id: str
    status: RolloutStatus
    notified: int
    rolled_back: int
    withdrawn: int
    actions: tuple[object, ...]


def _waiting_for_device(execution: Execution) -> bool:
    """A report from the device can still change this execution."""
    if execution.status in ACTIVE or execution.rollback_pending:
        return True
    return execution.status == ExecutionStatus.TIMED_OUT and not execution.withdrawn


def _apply(
    execution: Execution, target: Firmware, reported: Mapping[str, Any] | None, now: float
) -> Execution:
    if reported is None:
        return execution
    try:
        report = FirmwareReport.from_reported(reported)
    except InvalidReportError as exc:
        log.warning("ignoring a bad report from %s: %s", execution.device_id, exc)
        return execution
    return execution if report is None else domain.apply_report(execution, target, report, now)


def _record_pass(
    rollout_id: str,
    before: RolloutStatus,
    after: Rollout,
    executions: Iterable[Execution],
    finished: bool,
    actions: Sequence[object],
) -> None:
    """Metrics and log lines of one pass (counted in memory, from the pass's own result)."""
    status = after.state.status
    if status != before:
        log.info(
            "rollout %s: %s -> %s%s",
            rollout_id,
            before.value,
            status.value,
            f" ({after.state.reason})" if after.state.reason else "",
            extra={"rollout_id": rollout_id, "stage": after.state.stage_index},
        )
    notified = sum(isinstance(a, Notify) for a in actions)
    if notified:
        ROLLOUT_NOTIFIED.inc(notified)
    counts = Counter(e.status for e in executions)
    for execution_status in ExecutionStatus:
        if finished:
            with contextlib.suppress(KeyError):  # never set: nothing to forget
                ROLLOUT_EXECUTIONS.remove(rollout_id, execution_status.value)
        else:
            ROLLOUT_EXECUTIONS.labels(rollout_id, execution_status.value).set(
                counts[execution_status]
            )


def _dumps(document: Mapping[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"), sort_keys=True)


class RolloutService:
    def __init__(
        self,
        store: RolloutStore,
        shadow: ShadowClient,
        clock: Callable[[], float] = time.time,
        fan_out_chunk: int = FAN_OUT_CHUNK,
        kick: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.shadow = shadow
        self.clock = clock
        self.fan_out_chunk = fan_out_chunk
        # Asks for a pass over a rollout soon (a Celery task), after a command changed it;
        # without it the next periodic pass picks the change up.
        self.kick = kick

    # --- operator commands --------------------------------------------------------------------

    def create(self, definition: RolloutDefinition) -> RolloutRecord:
        targets = self.shadow.resolve(definition.selector)
        if definition.selector.device_ids:
            unknown = set(definition.selector.device_ids) - {t.device_id for t in targets}
            if unknown:
                raise InvalidRolloutError(
                    f"{len(unknown)} unknown device id(s), e.g. {', '.join(sorted(unknown)[:5])}"
                )
        self._refuse_conflicts(definition.rollout_id, targets)
        return self.store.create(Rollout(definition), int(self.clock() * 1000))

    def _refuse_conflicts(self, rollout_id: str, targets: Sequence[Target]) -> None:
        held = self.store.claims([t.device_id for t in targets])
        others = sorted(d for d, r in held.items() if r != rollout_id)
        if others:
            raise TargetConflictError(
                f"{len(others)} target(s) already in another live rollout, e.g. "
                + ", ".join(f"{d} ({held[d]})" for d in others[:5])
            )

    def start(self, rollout_id: str) -> RolloutRecord:
        def started(record: RolloutRecord) -> RolloutRecord:
            rollout = domain.start(record.rollout, self.clock())
            targets = self.shadow.resolve(rollout.definition.selector)
            self._refuse_conflicts(rollout_id, targets)
            return self.store.save(
                record,
                rollout,
                claim=[t.device_id for t in targets],
                target_count=len(targets),
            )

        return self._retrying(rollout_id, started)

    def pause(self, rollout_id: str, reason: str = "") -> RolloutRecord:
        return self._command(
            rollout_id,
            lambda r, now: domain.pause(r, now, reason or "paused by an operator"),
        )

    def resume(self, rollout_id: str) -> RolloutRecord:
        return self._command(rollout_id, domain.resume)

    def approve_stage(self, rollout_id: str, stage_index: int) -> RolloutRecord:
        return self._command(rollout_id, lambda r, now: domain.approve_stage(r, stage_index, now))

    def abort(self, rollout_id: str, reason: str = "") -> RolloutRecord:
        """Mark it ABORTED; the next pass cancels, withdraws and rolls back (ADR 34)."""
        return self._command(
            rollout_id, lambda r, now: domain.abort(r, now, reason or "aborted by an operator")
        )

    def _command(
        self, rollout_id: str, change: Callable[[Rollout, float], Rollout]
    ) -> RolloutRecord:
        return self._retrying(
            rollout_id,
            lambda record: self.store.save(record, change(record.rollout, self.clock())),
        )

    def _kick(self, rollout_id: str) -> None:
        if self.kick is None:
            return
        try:
            self.kick(rollout_id)
        except Exception as exc:  # the periodic pass still comes; a command must not fail
            log.warning("could not ask for a pass over %s: %s", rollout_id, exc)

    def _retrying(
        self, rollout_id: str, step: Callable[[RolloutRecord], RolloutRecord]
    ) -> RolloutRecord:
        for attempt in range(ATTEMPTS):
            try:
                record = step(self.store.get(rollout_id))
            except ConcurrentUpdateError:
                if attempt == ATTEMPTS - 1:
                    raise
                continue
            self._kick(rollout_id)
            return record
        raise AssertionError("unreachable")

    # --- reads --------------------------------------------------------------------------------

    def revision(self, rollout_id: str) -> int:
        """The rollout's revision: every write moves it (ADR 36), so a watcher reads the rest
        only when it moved."""
        return self.store.get(rollout_id).revision

    def holds_claims(self, rollout_id: str) -> bool:
        """Whether the rollout still holds devices' claims (an aborted one releases them)."""
        return self.store.claiming(rollout_id)

    def get(self, rollout_id: str) -> RolloutView:
        """The rollout and its counts, from one GROUP BY over its executions."""
        record = self.store.get(rollout_id)
        groups = self.store.execution_counts(rollout_id)
        stages = [Counter[ExecutionStatus]() for _ in record.rollout.definition.stages]
        for stage, status, _, count in groups:
            stages[stage][status] += count
        summary = progress_from_counts(
            record.rollout,
            [(status, requested, n) for _, status, requested, n in groups],
            record.target_count,
        )
        return RolloutView(record, summary, tuple(stages))

    def list_rollouts(
        self, page_size: int, page_token: str, status: RolloutStatus | None = None
    ) -> tuple[list[RolloutView], str]:
        if page_size < 0:
            raise InvalidRolloutError("page_size must not be negative")
        size = min(page_size or 100, MAX_LIST_PAGE)
        records = self.store.page(page_token, size, status)
        views = [self.get(r.rollout.definition.rollout_id) for r in records]
        token = records[-1].rollout.definition.rollout_id if len(records) == size else ""
        return views, token

    # --- the reconcile pass -------------------------------------------------------------------

    def reconcile(self, rollout_id: str, now: float | None = None) -> PassResult:
        """One planner pass over one rollout; its desired writes are committed to the outbox,
        to be sent by `fan_out`. Safe to repeat: a pass over its own result does nothing."""
        at = self.clock() if now is None else now
        for attempt in range(ATTEMPTS):
            try:
                with ROLLOUT_PASS_SECONDS.time():
                    return self._reconcile_once(rollout_id, at)
            except ConcurrentUpdateError:
                if attempt == ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def reconcile_all(self, now: float | None = None) -> list[PassResult]:
        """A pass over every rollout that may still have work (the periodic job)."""
        # Aborted rollouts matter while they hold devices (rollbacks and installs in flight).
        ids = set(self.store.ids_with_status(LIVE)) | set(self.store.claiming_rollout_ids())
        return [self.reconcile(rid, now) for rid in sorted(ids)]

    def _reconcile_once(self, rollout_id: str, now: float) -> PassResult:
        record = self.store.get(rollout_id)
        rollout = record.rollout
        definition = rollout.definition
        status = rollout.state.status
        if status in (RolloutStatus.CREATED, RolloutStatus.COMPLETED):
            return PassResult(rollout_id, status, 0, 0, 0, ())
        targets: list[Target] = []
        unclaimed: list[str] = []
        if status in LIVE:
            resolved = self.shadow.resolve(definition.selector)
            held = self.store.claims([t.device_id for t in resolved])
            # A device held by another live rollout stays out of this one (issue 6: at most one);
            # one that started matching the selector joins it, under the rate limit.
            targets = [t for t in resolved if held.get(t.device_id, rollout_id) == rollout_id]
            unclaimed = [t.device_id for t in targets if t.device_id not in held]
        stored = {e.device_id: e for e in self.store.executions(rollout_id)}
        waiting = sorted(d for d, e in stored.items() if _waiting_for_device(e))
        reported = self.shadow.reported(waiting)
        executions = [
            _apply(e, definition.firmware, reported.get(d), now) for d, e in stored.items()
        ]
        result = plan(rollout, executions, targets, now)
        final = {e.device_id: e for e in result.executions}
        new_ids = sorted(d for d in final if d not in stored)
        if new_ids:
            # What a device runs before it is notified is its rollback target (ADR 34).
            previous = self.shadow.reported(new_ids)
            for device_id in new_ids:
                firmware = _firmware_of(previous.get(device_id, {}))
                final[device_id] = replace(final[device_id], previous=firmware)
        changed = [e for d, e in sorted(final.items()) if stored.get(d) != e]
        dispatches = [
            (a.device_id, _dumps(a.desired()))
            for a in result.actions
            if isinstance(a, Notify | RollBack | Withdraw)
        ]
        new_status = result.rollout.state.status
        finished = new_status == RolloutStatus.COMPLETED or (
            new_status == RolloutStatus.ABORTED
            and not any(e.status in ACTIVE or e.rollback_pending for e in final.values())
        )
        target_count = len(targets) if status in LIVE else record.target_count
        claim = unclaimed if new_status in LIVE else []
        idle = (
            not changed
            and not dispatches
            and not claim
            and result.rollout == rollout
            and target_count == record.target_count
            and not (finished and self.store.claiming(rollout_id))
        )
        if not idle:  # a pass that changes nothing writes nothing
            self.store.save(
                record,
                result.rollout,
                changed,
                dispatches=dispatches,
                claim=claim,
                release_claims=finished,
                target_count=target_count,
            )
        _record_pass(rollout_id, status, result.rollout, final.values(), finished, result.actions)
        return PassResult(
            rollout_id,
            new_status,
            notified=sum(isinstance(a, Notify) for a in result.actions),
            rolled_back=sum(isinstance(a, RollBack) for a in result.actions),
            withdrawn=sum(isinstance(a, Withdraw) for a in result.actions),
            actions=result.actions,
        )

    # --- the fan-out --------------------------------------------------------------------------

    def fan_out(self, rollout_id: str | None = None) -> int:
        """Send the committed desired writes (of one rollout, or all) in BatchUpdateDesired
        chunks; returns how many were sent. A write leaves the outbox only once the shadow
        service took its chunk, so a crash here is finished by the next call."""
        sent = 0
        while True:
            batch = self.store.pending_dispatches(rollout_id, self.fan_out_chunk)
            if not batch:
                return sent
            refused = self.shadow.update_desired([(d.device_id, d.desired_json) for d in batch])
            for device_id, reason in refused:
                # NOT_FOUND (deleted device) or a document the shadow refuses: resending the
                # same write cannot help; the device's execution times out.
                log.warning("desired write for %s refused: %s", device_id, reason)
            self.store.delete_dispatches(batch)
            sent += len(batch)

    def lease_pending(
        self, lease_seconds: float, limit: int = 100 * FAN_OUT_CHUNK
    ) -> list[list[str]]:
        """Lease up to `limit` unsent desired writes and group their device ids into chunks of
        `fan_out_chunk`, one per fan-out task (`send_dispatches`)."""
        device_ids = self.store.lease_dispatches(limit, lease_seconds, self.clock())
        size = self.fan_out_chunk
        return [device_ids[i : i + size] for i in range(0, len(device_ids), size)]

    def send_dispatches(self, device_ids: Sequence[str]) -> int:
        """Send the unsent writes of these devices in one BatchUpdateDesired call and forget
        them; returns how many were sent. Idempotent: writes already sent are gone from the
        outbox, and one sent twice (a worker died before forgetting it) is skipped by the
        shadow as unchanged, so a device is notified once per desired version."""
        batch = self.store.dispatches_for(device_ids)
        if not batch:
            return 0
        try:
            refused = self.shadow.update_desired([(d.device_id, d.desired_json) for d in batch])
        except ShadowUnavailableError:
            ROLLOUT_FANOUT_CHUNKS.labels("unavailable").inc()
            raise
        ROLLOUT_FANOUT_CHUNKS.labels("sent").inc()
        for device_id, reason in refused:
            log.warning(
                "desired write for %s refused: %s",
                device_id,
                reason,
                extra={"device_id": device_id},
            )
        self.store.delete_dispatches(batch)
        return len(batch)

    # --- device reports -----------------------------------------------------------------------

    def apply_reports(
        self, reports: Iterable[tuple[str, Mapping[str, Any]]], now: float | None = None
    ) -> int:
        """Apply devices' reported documents (device id, `state.reported`) to their executions
        in live (or rolling-back) rollouts; returns how many executions changed. Devices in no
        rollout, and malformed reports, are ignored."""
        at = self.clock() if now is None else now
        latest = dict(reports)  # the newest report of a device wins
        held = self.store.claims(sorted(latest))
        by_rollout: dict[str, list[str]] = {}
        for device_id, rollout_id in held.items():
            by_rollout.setdefault(rollout_id, []).append(device_id)
        changed_total = 0
        for rollout_id, device_ids in sorted(by_rollout.items()):
            for attempt in range(ATTEMPTS):
                try:
                    record = self.store.get(rollout_id)
                    target = record.rollout.definition.firmware
                    changed = []
                    for execution in self.store.executions(rollout_id, sorted(device_ids)):
                        after = _apply(execution, target, latest[execution.device_id], at)
                        if after != execution:
                            changed.append(after)
                    if changed:
                        self.store.save(record, record.rollout, changed)
                    changed_total += len(changed)
                    break
                except ConcurrentUpdateError:
                    if attempt == ATTEMPTS - 1:
                        raise
        return changed_total
