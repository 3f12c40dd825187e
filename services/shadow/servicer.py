"""gRPC adapter of the shadow service: proto messages in, `ShadowService` calls, protos out.

`STATUS_CODES` is the one place where shadow errors become gRPC status codes.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from operator import attrgetter

import grpc

from protos.shadow.v1 import shadow_pb2 as pb
from protos.shadow.v1 import shadow_pb2_grpc as pb_grpc
from services.common.grpc_errors import error_translator
from services.common.observability import SHADOW_BATCH_ITEMS, SHADOW_UPDATES
from services.shadow import domain
from services.shadow.errors import (
    BrokerUnavailableError,
    CallerGoneError,
    DeviceExistsError,
    DeviceNotFoundError,
    DocumentTooLargeError,
    InvalidRequestError,
    RateLimitedError,
    ShadowError,
    ShadowNotFoundError,
    VersionConflictError,
)
from services.shadow.service import DesiredItem, Page, ShadowService
from services.shadow.store import DeviceRecord

STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    DeviceNotFoundError: grpc.StatusCode.NOT_FOUND,
    ShadowNotFoundError: grpc.StatusCode.NOT_FOUND,
    DeviceExistsError: grpc.StatusCode.ALREADY_EXISTS,
    # A stale version in a read-modify-write: ABORTED, as Google's API guidance has it.
    VersionConflictError: grpc.StatusCode.ABORTED,
    DocumentTooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RateLimitedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BrokerUnavailableError: grpc.StatusCode.UNAVAILABLE,
    CallerGoneError: grpc.StatusCode.DEADLINE_EXCEEDED,
}

BATCH_STATUS = {
    "OK": pb.BatchItemResult.OK,
    "NOT_FOUND": pb.BatchItemResult.NOT_FOUND,
    "VERSION_CONFLICT": pb.BatchItemResult.VERSION_CONFLICT,
    "INVALID": pb.BatchItemResult.INVALID,
    "TOO_LARGE": pb.BatchItemResult.TOO_LARGE,
}


READ_STATUS = {
    "FOUND": pb.ShadowRead.FOUND,
    "NO_SHADOW": pb.ShadowRead.NO_SHADOW,
    "DEVICE_NOT_FOUND": pb.ShadowRead.DEVICE_NOT_FOUND,
}

# Outcome labels of ota_shadow_updates_total: BATCH_STATUS's names in lower case.
UPDATE_OUTCOMES: dict[type, str] = {
    VersionConflictError: "version_conflict",
    DeviceNotFoundError: "not_found",
    DocumentTooLargeError: "too_large",
    RateLimitedError: "rate_limited",
    CallerGoneError: "deadline_exceeded",
}


def update_outcome(kind: type) -> str:
    """The outcome label of an update result or error class (a few fixed values)."""
    if not issubclass(kind, ShadowError):
        return "ok"
    for cls in kind.__mro__:
        if cls in UPDATE_OUTCOMES:
            return UPDATE_OUTCOMES[cls]
    return "invalid" if issubclass(kind, InvalidRequestError) else "error"


def count_updates(rpc: str, items: int, outcomes: Iterable[tuple[str, int]]) -> None:
    """One increment per (outcome, count) of a batch, not one per item."""
    if items:
        SHADOW_BATCH_ITEMS.labels(rpc).inc(items)
    for outcome, n in outcomes:
        SHADOW_UPDATES.labels(rpc, outcome).inc(n)


def _trailers(exc: ShadowError) -> list[tuple[str, str]]:
    """The shadow protocol's code, and the current version after a conflict."""
    metadata = [("ota-code", str(exc.code))]
    if isinstance(exc, VersionConflictError):
        metadata.append(("ota-current-version", str(exc.current_version)))
    return metadata


translate_errors = error_translator(ShadowError, STATUS_CODES, _trailers)


COMMIT_MARGIN_SECONDS = 1.0


def commit_deadline(context: grpc.ServicerContext) -> float | None:
    """The `time.monotonic()` after which a write of this call must not commit (ADR 42): the
    call's deadline less a margin (a quarter of the time left, at most one second), so a
    write that still commits has locked its rows before its caller can have given up; None
    when the caller set no deadline."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + remaining - min(COMMIT_MARGIN_SECONDS, remaining / 4)


def device_to_proto(record: DeviceRecord) -> pb.Device:
    return pb.Device(
        device_id=record.device_id,
        tags=record.tags,
        created_at_ms=record.created_at_ms,
        shadow_version=record.shadow_version,
    )


def _page_to_proto(page: Page) -> tuple[list[pb.Device], str]:
    return [device_to_proto(d) for d in page.devices], page.next_page_token


class ShadowServicer(pb_grpc.ShadowServiceServicer):
    def __init__(self, service: ShadowService) -> None:
        self.service = service

    @translate_errors
    def RegisterDevice(
        self, request: pb.RegisterDeviceRequest, context: grpc.ServicerContext
    ) -> pb.RegisterDeviceResponse:
        record, password = self.service.register_device(request.device_id, dict(request.tags))
        return pb.RegisterDeviceResponse(
            device=device_to_proto(record),
            credentials=pb.MqttCredentials(username=record.device_id, password=password),
        )

    @translate_errors
    def GetDevice(self, request: pb.GetDeviceRequest, context: grpc.ServicerContext) -> pb.Device:
        return device_to_proto(self.service.get_device(request.device_id))

    @translate_errors
    def ListDevices(
        self, request: pb.ListDevicesRequest, context: grpc.ServicerContext
    ) -> pb.ListDevicesResponse:
        page = self.service.list_devices(dict(request.tags), request.page_size, request.page_token)
        devices, token = _page_to_proto(page)
        return pb.ListDevicesResponse(devices=devices, next_page_token=token)

    @translate_errors
    def DeleteDevice(
        self, request: pb.DeleteDeviceRequest, context: grpc.ServicerContext
    ) -> pb.DeleteDeviceResponse:
        self.service.delete_device(request.device_id)
        return pb.DeleteDeviceResponse()

    @translate_errors
    def AuthenticateDevice(
        self, request: pb.AuthenticateDeviceRequest, context: grpc.ServicerContext
    ) -> pb.AuthenticateDeviceResponse:
        ok = self.service.verify_device_credentials(request.device_id, request.password)
        return pb.AuthenticateDeviceResponse(authenticated=ok)

    @translate_errors
    def GetShadow(self, request: pb.GetShadowRequest, context: grpc.ServicerContext) -> pb.Shadow:
        state, document = self.service.get_shadow(request.device_id)
        return pb.Shadow(
            device_id=request.device_id, version=state.version, document_json=domain.dumps(document)
        )

    @translate_errors
    def BatchGetShadows(
        self, request: pb.BatchGetShadowsRequest, context: grpc.ServicerContext
    ) -> pb.BatchGetShadowsResponse:
        reads = self.service.batch_get_shadows(list(request.device_ids))
        return pb.BatchGetShadowsResponse(
            shadows=[
                pb.ShadowRead(
                    device_id=r.device_id,
                    status=READ_STATUS[r.status],
                    document_json=domain.dumps(r.document) if r.document is not None else "",
                )
                for r in reads
            ]
        )

    @translate_errors
    def UpdateShadow(
        self, request: pb.UpdateShadowRequest, context: grpc.ServicerContext
    ) -> pb.UpdateShadowResponse:
        try:
            result = self.service.update_shadow(
                request.device_id, request.request_json, commit_deadline(context)
            )
        except ShadowError as exc:
            SHADOW_UPDATES.labels("UpdateShadow", update_outcome(type(exc))).inc()
            raise
        SHADOW_UPDATES.labels("UpdateShadow", "ok").inc()
        return pb.UpdateShadowResponse(
            version=result.current.version,
            accepted_json=domain.dumps(result.accepted),
            document_json=domain.dumps(
                domain.shadow_document(result.current, result.timestamp, result.client_token)
            ),
            delta_json=domain.dumps(result.delta),
        )

    @translate_errors
    def DeleteShadow(
        self, request: pb.DeleteShadowRequest, context: grpc.ServicerContext
    ) -> pb.DeleteShadowResponse:
        expected = request.expected_version if request.HasField("expected_version") else None
        version = self.service.delete_shadow(request.device_id, expected, commit_deadline(context))
        return pb.DeleteShadowResponse(version=version)

    @translate_errors
    def BatchUpdateDesired(
        self, request: pb.BatchUpdateDesiredRequest, context: grpc.ServicerContext
    ) -> pb.BatchUpdateDesiredResponse:
        items = [
            DesiredItem(
                device_id=item.device_id,
                desired_json=item.desired_json,
                expected_version=(
                    item.expected_version if item.HasField("expected_version") else None
                ),
                client_token=item.client_token or None,
            )
            for item in request.items
        ]
        results = self.service.batch_update_desired(
            items, request.skip_unchanged, commit_deadline(context)
        )
        statuses = Counter(map(attrgetter("status"), results))
        count_updates(
            "BatchUpdateDesired", len(items), ((k.lower(), n) for k, n in statuses.items())
        )
        return pb.BatchUpdateDesiredResponse(
            results=[
                pb.BatchItemResult(
                    device_id=r.device_id,
                    status=BATCH_STATUS[r.status],
                    version=r.version,
                    message=r.message,
                    unchanged=r.unchanged,
                )
                for r in results
            ]
        )

    @translate_errors
    def BatchUpdateShadow(
        self, request: pb.BatchUpdateShadowRequest, context: grpc.ServicerContext
    ) -> pb.BatchUpdateShadowResponse:
        outcomes = self.service.batch_update(
            [(item.device_id, item.request_json) for item in request.items],
            commit_deadline(context),
        )
        kinds = Counter(map(type, outcomes))
        count_updates(
            "BatchUpdateShadow", len(outcomes), ((update_outcome(k), n) for k, n in kinds.items())
        )
        results = []
        for item, outcome in zip(request.items, outcomes, strict=True):
            if isinstance(outcome, ShadowError):
                results.append(
                    pb.ShadowUpdateResult(
                        device_id=item.device_id, code=outcome.code, message=str(outcome)
                    )
                )
            else:
                results.append(
                    pb.ShadowUpdateResult(
                        device_id=item.device_id,
                        code=200,
                        accepted_json=domain.dumps(outcome.accepted),
                        version=outcome.current.version,
                    )
                )
        return pb.BatchUpdateShadowResponse(results=results)

    @translate_errors
    def QueryFleet(
        self, request: pb.QueryFleetRequest, context: grpc.ServicerContext
    ) -> pb.QueryFleetResponse:
        page = self.service.query_fleet(
            request.filter, request.page_size, request.page_token, request.count
        )
        devices, token = _page_to_proto(page)
        return pb.QueryFleetResponse(
            devices=devices, next_page_token=token, total_count=page.total_count or 0
        )

    @translate_errors
    def ReadEvents(
        self, request: pb.ReadEventsRequest, context: grpc.ServicerContext
    ) -> pb.ReadEventsResponse:
        events = self.service.read_events(
            request.after_event_id,
            request.partition,
            max(request.partitions, 1),
            request.limit,
            request.wait_ms / 1000,
        )
        return pb.ReadEventsResponse(
            events=[
                pb.ShadowEvent(
                    event_id=e.event_id,
                    device_id=e.device_id,
                    version=e.version,
                    delta_json=e.delta_json or "",
                    documents_json=e.documents_json,
                )
                for e in events
            ]
        )

    @translate_errors
    def AckEvents(
        self, request: pb.AckEventsRequest, context: grpc.ServicerContext
    ) -> pb.AckEventsResponse:
        deleted = self.service.ack_events(list(request.event_ids))
        return pb.AckEventsResponse(deleted=deleted)
