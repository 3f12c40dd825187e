"""Writes refuse to commit once their caller's deadline has passed (ADR 42), on SQLite and
PostgreSQL: nothing of the write is stored, no outbox message is left. Over real gRPC a call
with or without a deadline still commits as before. (tests/integration/test_gateway_resilience.py
holds a row lock until the gateway gives up: the stale report never lands.)"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from protos.shadow.v1 import shadow_pb2 as pb
from services.shadow.errors import CallerGoneError
from services.shadow.service import DesiredItem, ShadowService
from services.shadow.servicer import commit_deadline
from tests.conftest import RunningShadow

DEVICE = "dl-1"
REPORT = '{"state": {"reported": {"fw": "2.0"}}}'


def stored(service: ShadowService) -> tuple[int, Any, int]:
    """The device's shadow version, its reported section and the outbox's length."""
    state = service.store.get_shadow(DEVICE)
    events = service.read_events(0, 0, 1, 1000, 0)
    return state.version, state.reported, len(events)


WRITES: dict[str, Callable[[ShadowService, float], object]] = {
    "UpdateShadow": lambda s, d: s.update_shadow(DEVICE, REPORT, d),
    "BatchUpdateShadow": lambda s, d: s.batch_update([(DEVICE, REPORT), (DEVICE, REPORT)], d),
    "BatchUpdateDesired": lambda s, d: s.batch_update_desired(
        [DesiredItem(DEVICE, '{"fw": "3.0"}', None, None)], deadline=d
    ),
    "DeleteShadow": lambda s, d: s.delete_shadow(DEVICE, None, d),
}


@pytest.mark.parametrize("write", WRITES)
def test_a_write_past_its_deadline_stores_nothing(
    shadow_service: ShadowService, write: str
) -> None:
    shadow_service.register_device(DEVICE, {})
    shadow_service.update_shadow(DEVICE, '{"state": {"reported": {"fw": "1.0"}}}')
    before = stored(shadow_service)
    with pytest.raises(CallerGoneError, match="deadline passed"):
        WRITES[write](shadow_service, time.monotonic() - 0.001)
    assert stored(shadow_service) == before


@pytest.mark.parametrize("write", WRITES)
def test_a_write_within_its_deadline_commits(shadow_service: ShadowService, write: str) -> None:
    shadow_service.register_device(DEVICE, {})
    shadow_service.update_shadow(DEVICE, '{"state": {"reported": {"fw": "1.0"}}}')
    before = stored(shadow_service)
    WRITES[write](shadow_service, time.monotonic() + 60)
    assert stored(shadow_service) != before


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_calls_with_or_without_a_deadline_commit(
    shadow_server: RunningShadow, timeout: float | None
) -> None:
    stub = shadow_server.stub
    stub.RegisterDevice(pb.RegisterDeviceRequest(device_id=DEVICE))
    request = pb.UpdateShadowRequest(device_id=DEVICE, request_json=REPORT)
    assert stub.UpdateShadow(request, timeout=timeout).version == 1
    batch = pb.BatchUpdateShadowRequest(
        items=[pb.ShadowUpdate(device_id=DEVICE, request_json=REPORT)]
    )
    assert stub.BatchUpdateShadow(batch, timeout=timeout).results[0].version == 2
    desired = pb.BatchUpdateDesiredRequest(
        items=[pb.DesiredPatch(device_id=DEVICE, desired_json=json.dumps({"fw": "3.0"}))]
    )
    assert stub.BatchUpdateDesired(desired, timeout=timeout).results[0].version == 3


class Context:
    """The one thing `commit_deadline` asks of a gRPC servicer context."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


@pytest.mark.parametrize(
    ("remaining", "margin"),
    [(10.0, 1.0), (2.0, 0.5), (0.4, 0.1)],
)
def test_the_commit_deadline_keeps_a_margin_before_the_callers(
    remaining: float, margin: float
) -> None:
    before = time.monotonic()
    deadline = commit_deadline(Context(remaining))  # type: ignore[arg-type]
    after = time.monotonic()
    assert deadline is not None
    assert before + remaining - margin <= deadline <= after + remaining - margin


def test_no_deadline_without_a_callers_deadline() -> None:
    assert commit_deadline(Context(None)) is None  # type: ignore[arg-type]
