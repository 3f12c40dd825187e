"""gRPC adapter of the rollout service: proto messages in, `RolloutService` calls, protos out.

`STATUS_CODES` is the one place where rollout errors become gRPC status codes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import grpc

from protos.rollout.v1 import rollout_pb2 as pb
from protos.rollout.v1 import rollout_pb2_grpc as pb_grpc
from services.common.grpc_errors import error_translator, status_for
from services.rollout.domain import (
    ACTIVE,
    ExecutionStatus,
    ExponentialRamp,
    FailureThreshold,
    Firmware,
    Rate,
    RetryPolicy,
    RolloutDefinition,
    RolloutStatus,
    Stage,
    TargetSelector,
)
from services.rollout.errors import (
    ConcurrentUpdateError,
    InvalidReportError,
    InvalidRolloutError,
    InvalidStateError,
    InvalidTargetsError,
    RolloutError,
    RolloutExistsError,
    RolloutNotFoundError,
    ShadowUnavailableError,
    TargetConflictError,
)
from services.rollout.service import RolloutService, RolloutView

STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    InvalidRolloutError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidTargetsError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidReportError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidStateError: grpc.StatusCode.FAILED_PRECONDITION,
    TargetConflictError: grpc.StatusCode.FAILED_PRECONDITION,
    RolloutNotFoundError: grpc.StatusCode.NOT_FOUND,
    RolloutExistsError: grpc.StatusCode.ALREADY_EXISTS,
    # A race lost three times in a row: the client may retry (Google's API guidance: ABORTED).
    ConcurrentUpdateError: grpc.StatusCode.ABORTED,
    ShadowUnavailableError: grpc.StatusCode.UNAVAILABLE,
}

translate_errors = error_translator(RolloutError, STATUS_CODES)

STATUS_TO_PROTO = {status: pb.RolloutStatus.Value(status.value) for status in RolloutStatus}

WATCH_INTERVAL = 0.5  # seconds between two polls of a watched rollout, unless asked otherwise
WATCH_INTERVAL_BOUNDS = (0.2, 10.0)


# --- proto -> domain ------------------------------------------------------------------------------


def _stage(stage: pb.Stage) -> Stage:
    threshold = None
    if stage.HasField("failure_threshold"):
        t = stage.failure_threshold
        threshold = FailureThreshold(
            count=t.count if t.HasField("count") else None,
            percent=t.percent if t.HasField("percent") else None,
            min_finished=t.min_finished or 1,
        )
    return Stage(
        percent=stage.percent if stage.HasField("percent") else None,
        count=stage.count if stage.HasField("count") else None,
        success_threshold_percent=(
            stage.success_threshold_percent
            if stage.HasField("success_threshold_percent")
            else 100.0
        ),
        failure_threshold=threshold,
        soak_seconds=stage.soak_seconds,
        approval_required=stage.approval_required,
    )


def _rate(rate: pb.Rate) -> Rate:
    ramp = None
    if rate.HasField("ramp"):
        r = rate.ramp
        ramp = ExponentialRamp(
            base_per_minute=r.base_per_minute,
            increment_factor=r.increment_factor,
            notified_step=r.notified_step if r.HasField("notified_step") else None,
            succeeded_step=r.succeeded_step if r.HasField("succeeded_step") else None,
            max_per_minute=r.max_per_minute or 1000,
        )
    return Rate(
        max_per_minute=rate.max_per_minute if rate.HasField("max_per_minute") else None,
        ramp=ramp,
    )


def definition_from_proto(spec: pb.RolloutSpec) -> RolloutDefinition:
    """A validated definition; a rule broken raises InvalidRolloutError (INVALID_ARGUMENT)."""
    selector = spec.selector
    retries = spec.retries
    return RolloutDefinition(
        rollout_id=spec.rollout_id,
        artifact_id=spec.artifact_id,
        firmware=Firmware(spec.firmware.version, spec.firmware.url),
        selector=TargetSelector(
            device_ids=tuple(selector.device_ids),
            tags=tuple(sorted(selector.tags.items())),
            fleet_filter=selector.fleet_filter if selector.HasField("fleet_filter") else None,
        ),
        stages=tuple(_stage(s) for s in spec.stages),
        rate=_rate(spec.rate),
        timeout_seconds=spec.timeout_seconds if spec.HasField("timeout_seconds") else 3600.0,
        retries=RetryPolicy(
            failed=retries.failed,
            timed_out=retries.timed_out,
            backoff_seconds=(
                retries.backoff_seconds if retries.HasField("backoff_seconds") else 60.0
            ),
        ),
        rollback_on_abort=spec.rollback_on_abort,
        stratify_by=spec.stratify_by or "site",
    )


# --- domain -> proto ------------------------------------------------------------------------------


def definition_to_proto(d: RolloutDefinition) -> pb.RolloutSpec:
    stages = []
    for s in d.stages:
        stage = pb.Stage(
            success_threshold_percent=s.success_threshold_percent,
            soak_seconds=s.soak_seconds,
            approval_required=s.approval_required,
        )
        if s.percent is not None:
            stage.percent = s.percent
        if s.count is not None:
            stage.count = s.count
        if s.failure_threshold is not None:
            t = s.failure_threshold
            stage.failure_threshold.min_finished = t.min_finished
            if t.count is not None:
                stage.failure_threshold.count = t.count
            if t.percent is not None:
                stage.failure_threshold.percent = t.percent
        stages.append(stage)
    spec = pb.RolloutSpec(
        rollout_id=d.rollout_id,
        artifact_id=d.artifact_id,
        firmware=pb.Firmware(version=d.firmware.version, url=d.firmware.url),
        selector=pb.TargetSelector(device_ids=d.selector.device_ids, tags=dict(d.selector.tags)),
        stages=stages,
        timeout_seconds=d.timeout_seconds,
        retries=pb.RetryPolicy(
            failed=d.retries.failed,
            timed_out=d.retries.timed_out,
            backoff_seconds=d.retries.backoff_seconds,
        ),
        rollback_on_abort=d.rollback_on_abort,
        stratify_by=d.stratify_by,
    )
    if d.selector.fleet_filter is not None:
        spec.selector.fleet_filter = d.selector.fleet_filter
    if d.rate.max_per_minute is not None:
        spec.rate.max_per_minute = d.rate.max_per_minute
    if d.rate.ramp is not None:
        r = d.rate.ramp
        spec.rate.ramp.base_per_minute = r.base_per_minute
        spec.rate.ramp.increment_factor = r.increment_factor
        spec.rate.ramp.max_per_minute = r.max_per_minute
        if r.notified_step is not None:
            spec.rate.ramp.notified_step = r.notified_step
        if r.succeeded_step is not None:
            spec.rate.ramp.succeeded_step = r.succeeded_step
    return spec


def view_to_proto(view: RolloutView) -> pb.Rollout:
    record = view.record
    state = record.rollout.state
    p = view.progress
    progress = pb.Progress(
        targets=p.targets,
        stage_size=p.stage_size,
        not_started=p.not_started,
        by_status={status.value: count for status, count in p.by_status},
        rollbacks_pending=p.rollbacks_pending,
        stages=[
            pb.StageProgress(
                stage_index=index,
                by_status={status.value: counts[status] for status in ExecutionStatus},
            )
            for index, counts in enumerate(view.stages)
        ],
    )
    return pb.Rollout(
        spec=definition_to_proto(record.rollout.definition),
        status=STATUS_TO_PROTO[state.status],
        stage_index=state.stage_index,
        reason=state.reason,
        started_at=state.started_at or 0.0,
        finished_at=state.finished_at or 0.0,
        progress=progress,
        created_at_ms=record.created_at_ms,
    )


def watch_interval(request: pb.WatchRolloutRequest) -> float:
    if not request.HasField("interval_seconds"):
        return WATCH_INTERVAL
    low, high = WATCH_INTERVAL_BOUNDS
    value = request.interval_seconds
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidRolloutError(f"interval_seconds must be between {low} and {high}")
    return value


def _settled(view: RolloutView, claiming: bool) -> bool:
    """Nothing more will happen to the rollout: COMPLETED, or ABORTED once its last pass let
    its devices go (ADR 35: claims are released when nothing is in flight and no rollback is
    pending). The claims matter as well as the counts: right after an operator's abort, before
    the next pass, a rollback_on_abort rollout shows no rollback pending yet."""
    status = view.record.rollout.state.status
    if status == RolloutStatus.COMPLETED:
        return True
    if status != RolloutStatus.ABORTED or claiming:
        return False
    in_flight = sum(count for s, count in view.progress.by_status if s in ACTIVE)
    return in_flight == 0 and view.progress.rollbacks_pending == 0


class RolloutServicer(pb_grpc.RolloutServiceServicer):
    def __init__(self, service: RolloutService) -> None:
        self.service = service

    def _view(self, rollout_id: str) -> pb.Rollout:
        return view_to_proto(self.service.get(rollout_id))

    @translate_errors
    def CreateRollout(
        self, request: pb.CreateRolloutRequest, context: grpc.ServicerContext
    ) -> pb.Rollout:
        record = self.service.create(definition_from_proto(request.spec))
        return self._view(record.rollout.definition.rollout_id)

    @translate_errors
    def StartRollout(
        self, request: pb.StartRolloutRequest, context: grpc.ServicerContext
    ) -> pb.Rollout:
        self.service.start(request.rollout_id)
        return self._view(request.rollout_id)

    @translate_errors
    def PauseRollout(
        self, request: pb.PauseRolloutRequest, context: grpc.ServicerContext
    ) -> pb.Rollout:
        self.service.pause(request.rollout_id, request.reason)
        return self._view(request.rollout_id)

    @translate_errors
    def ResumeRollout(
        self, request: pb.ResumeRolloutRequest, context: grpc.ServicerContext
    ) -> pb.Rollout:
        self.service.resume(request.rollout_id)
        return self._view(request.rollout_id)

    @translate_errors
    def ApproveStage(
        self, request: pb.ApproveStageRequest, context: grpc.ServicerContext
    ) -> pb.Rollout:
        self.service.approve_stage(request.rollout_id, request.stage_index)
        return self._view(request.rollout_id)

    @translate_errors
    def AbortRollout(
        self, request: pb.AbortRolloutRequest, context: grpc.ServicerContext
    ) -> pb.Rollout:
        self.service.abort(request.rollout_id, request.reason)
        return self._view(request.rollout_id)

    @translate_errors
    def GetRollout(
        self, request: pb.GetRolloutRequest, context: grpc.ServicerContext
    ) -> pb.Rollout:
        return self._view(request.rollout_id)

    @translate_errors
    def ListRollouts(
        self, request: pb.ListRolloutsRequest, context: grpc.ServicerContext
    ) -> pb.ListRolloutsResponse:
        status = None
        if request.status != pb.ROLLOUT_STATUS_UNSPECIFIED:
            status = RolloutStatus(pb.RolloutStatus.Name(request.status))
        views, token = self.service.list_rollouts(request.page_size, request.page_token, status)
        return pb.ListRolloutsResponse(
            rollouts=[view_to_proto(v) for v in views], next_page_token=token
        )

    def WatchRollout(
        self, request: pb.WatchRolloutRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Rollout]:
        """Polls the database, not in-process events: passes run in other processes too.
        Each poll reads the rollout's row only; the executions are read again only when its
        revision moved (every write bumps it, ADR 36), and a rollout is sent only when what
        the client would see differs from what it was sent last."""
        # `translate_errors` cannot wrap a generator (it would return before the first read).
        try:
            interval = watch_interval(request)
            rollout_id = request.rollout_id
            gone = threading.Event()
            context.add_callback(gone.set)  # the client went away or the deadline passed
            revision: int | None = None
            sent: pb.Rollout | None = None
            while context.is_active():
                if self.service.revision(rollout_id) != revision:
                    view = self.service.get(rollout_id)
                    revision = view.record.revision
                    current = view_to_proto(view)
                    if current != sent:
                        yield current
                        sent = current
                    aborted = view.record.rollout.state.status == RolloutStatus.ABORTED
                    # Releasing the claims is a write too: it moves the revision.
                    if _settled(view, aborted and self.service.holds_claims(rollout_id)):
                        return
                if gone.wait(interval):
                    return
        except RolloutError as exc:
            context.abort(status_for(exc, STATUS_CODES), str(exc))
