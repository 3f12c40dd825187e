"""The rollout service over real gRPC, with the real shadow service, on SQLite and PostgreSQL.

Devices are simulated by writing their reported state through the shadow service
(UpdateShadow), exactly what the MQTT gateway does for a real agent. Reconcile passes and the
fan-out are the plain functions a Celery task will call; the clock is the test's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, cast

import grpc
import pytest

from protos.rollout.v1 import rollout_pb2 as pb
from protos.shadow.v1 import shadow_pb2 as shadow_pb
from services.rollout.store import RolloutStore
from tests.rollout.conftest import RunningRollout

OLD = {"version": "1.0.0", "url": "https://artifacts.example/v1/artifacts/fw-100"}
NEW = {"version": "2.0.0", "url": "https://artifacts.example/v1/artifacts/fw-200"}
SITES = ("berlin", "paris", "oslo")


# --- helpers over the APIs ------------------------------------------------------------------------


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return cast(grpc.Call, caught.value).code()


def register_fleet(
    r: RunningRollout, count: int, prefix: str = "dev", group: str = "a"
) -> list[str]:
    ids = []
    for i in range(count):
        device_id = f"{prefix}-{i:03d}"
        tags = {"site": SITES[i % len(SITES)], "group": group}
        r.shadow.stub.RegisterDevice(
            shadow_pb.RegisterDeviceRequest(device_id=device_id, tags=tags)
        )
        report(r, device_id, dict(OLD))
        ids.append(device_id)
    return ids


def report(r: RunningRollout, device_id: str, firmware: dict[str, Any]) -> None:
    request = {"state": {"reported": {"firmware": firmware}}}
    r.shadow.stub.UpdateShadow(
        shadow_pb.UpdateShadowRequest(device_id=device_id, request_json=json.dumps(request))
    )


def succeeded(r: RunningRollout, device_id: str) -> None:
    report(r, device_id, {**NEW, "state": "succeeded", "target": NEW})


def failed(r: RunningRollout, device_id: str) -> None:
    report(r, device_id, {**OLD, "state": "failed", "target": NEW, "error": "sha256 mismatch"})


def shadow_of(r: RunningRollout, device_id: str) -> dict[str, Any]:
    reply = r.shadow.stub.GetShadow(shadow_pb.GetShadowRequest(device_id=device_id))
    return cast(dict[str, Any], json.loads(reply.document_json))


def desired_firmware(r: RunningRollout, device_id: str) -> dict[str, Any] | None:
    desired = shadow_of(r, device_id)["state"].get("desired") or {}
    return cast(dict[str, Any] | None, desired.get("firmware"))


def targeted(r: RunningRollout, ids: Sequence[str]) -> list[str]:
    return [d for d in ids if (desired_firmware(r, d) or {}).get("version") == NEW["version"]]


def spec(
    rollout_id: str,
    *,
    device_ids: Sequence[str] = (),
    tags: dict[str, str] | None = None,
    fleet_filter: str | None = None,
    stages: Sequence[pb.Stage] = (),
    rollback_on_abort: bool = False,
) -> pb.RolloutSpec:
    selector = pb.TargetSelector(device_ids=list(device_ids), tags=tags or {})
    if fleet_filter is not None:
        selector.fleet_filter = fleet_filter
    return pb.RolloutSpec(
        rollout_id=rollout_id,
        artifact_id="fw-200",
        firmware=pb.Firmware(**NEW),
        selector=selector,
        stages=list(stages) or [pb.Stage(percent=10), pb.Stage(percent=100)],
        rollback_on_abort=rollback_on_abort,
    )


def create(r: RunningRollout, s: pb.RolloutSpec) -> pb.Rollout:
    return r.stub.CreateRollout(pb.CreateRolloutRequest(spec=s))


def start(r: RunningRollout, rollout_id: str) -> pb.Rollout:
    return r.stub.StartRollout(pb.StartRolloutRequest(rollout_id=rollout_id))


def get(r: RunningRollout, rollout_id: str) -> pb.Rollout:
    return r.stub.GetRollout(pb.GetRolloutRequest(rollout_id=rollout_id))


def run_pass(r: RunningRollout, rollout_id: str) -> None:
    r.service.reconcile(rollout_id)
    r.service.fan_out(rollout_id)


# --- operator commands ------------------------------------------------------------------------


def test_commands_move_the_rollout_and_refuse_what_its_status_forbids(
    rollout: RunningRollout,
) -> None:
    r = rollout
    register_fleet(r, 6)
    created = create(
        r,
        spec(
            "r1",
            tags={"group": "a"},
            stages=[
                pb.Stage(percent=50),
                pb.Stage(percent=100, approval_required=True),
            ],
        ),
    )
    assert created.status == pb.CREATED
    assert created.spec.selector.tags == {"group": "a"}
    assert code_of(lambda: r.stub.PauseRollout(pb.PauseRolloutRequest(rollout_id="r1"))) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert start(r, "r1").status == pb.RUNNING
    assert code_of(lambda: start(r, "r1")) == grpc.StatusCode.FAILED_PRECONDITION
    paused = r.stub.PauseRollout(pb.PauseRolloutRequest(rollout_id="r1", reason="night"))
    assert (paused.status, paused.reason) == (pb.PAUSED, "night")
    resumed = r.stub.ResumeRollout(pb.ResumeRolloutRequest(rollout_id="r1"))
    assert resumed.status == pb.RUNNING
    assert code_of(lambda: r.stub.ResumeRollout(pb.ResumeRolloutRequest(rollout_id="r1"))) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    bad_stage = pb.ApproveStageRequest(rollout_id="r1", stage_index=5)
    assert code_of(lambda: r.stub.ApproveStage(bad_stage)) == grpc.StatusCode.FAILED_PRECONDITION
    approved = r.stub.ApproveStage(pb.ApproveStageRequest(rollout_id="r1", stage_index=1))
    assert approved.status == pb.RUNNING
    aborted = r.stub.AbortRollout(pb.AbortRolloutRequest(rollout_id="r1"))
    assert (aborted.status, aborted.reason) == (pb.ABORTED, "aborted by an operator")
    assert code_of(lambda: start(r, "r1")) == grpc.StatusCode.FAILED_PRECONDITION
    abort_again = pb.AbortRolloutRequest(rollout_id="r1")
    assert code_of(lambda: r.stub.AbortRollout(abort_again)) == grpc.StatusCode.FAILED_PRECONDITION


def test_bad_definitions_and_unknown_rollouts_are_refused(rollout: RunningRollout) -> None:
    r = rollout
    ids = register_fleet(r, 3)
    no_full_stage = spec("bad", device_ids=ids, stages=[pb.Stage(percent=50)])
    assert code_of(lambda: create(r, no_full_stage)) == grpc.StatusCode.INVALID_ARGUMENT
    two_selectors = spec("bad", device_ids=ids, tags={"site": "oslo"})
    assert code_of(lambda: create(r, two_selectors)) == grpc.StatusCode.INVALID_ARGUMENT
    unknown = spec("bad", device_ids=[*ids, "ghost-1"])
    assert code_of(lambda: create(r, unknown)) == grpc.StatusCode.INVALID_ARGUMENT
    create(r, spec("ok", device_ids=ids))
    assert code_of(lambda: create(r, spec("ok", device_ids=ids))) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    assert code_of(lambda: get(r, "nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: start(r, "nope")) == grpc.StatusCode.NOT_FOUND


def test_list_rollouts_pages_with_a_cursor_and_filters_by_status(rollout: RunningRollout) -> None:
    r = rollout
    ids = register_fleet(r, 5)
    for i, device_id in enumerate(ids):
        create(r, spec(f"r{i}", device_ids=[device_id]))
    start(r, "r3")
    seen: list[str] = []
    token = ""
    while True:
        page = r.stub.ListRollouts(pb.ListRolloutsRequest(page_size=2, page_token=token))
        seen.extend(x.spec.rollout_id for x in page.rollouts)
        token = page.next_page_token
        if not token:
            break
    assert seen == ["r0", "r1", "r2", "r3", "r4"]
    running = r.stub.ListRollouts(pb.ListRolloutsRequest(status=pb.RUNNING))
    assert [x.spec.rollout_id for x in running.rollouts] == ["r3"]


# --- a whole rollout ---------------------------------------------------------------------------


def test_a_pass_notifies_exactly_the_canary_and_successes_advance_the_stage(
    rollout: RunningRollout,
) -> None:
    r = rollout
    ids = register_fleet(r, 20)
    register_fleet(r, 4, prefix="other", group="b")  # not targeted: must stay untouched
    create(r, spec("r1", tags={"group": "a"}))
    start(r, "r1")
    assert targeted(r, ids) == []  # starting notifies nobody by itself: the pass does

    run_pass(r, "r1")
    canary = targeted(r, ids)
    assert len(canary) == 2  # 10% of 20
    assert len({SITES[ids.index(d) % 3] for d in canary}) == 2  # spread over sites
    assert desired_firmware(r, canary[0]) == NEW
    progress = get(r, "r1").progress
    assert (progress.targets, progress.stage_size, progress.not_started) == (20, 2, 18)
    assert progress.by_status["QUEUED"] == 2
    assert progress.stages[0].by_status["QUEUED"] == 2

    run_pass(r, "r1")  # a pass over its own result notifies nobody twice
    assert r.service.fan_out("r1") == 0
    assert targeted(r, ids) == canary

    for device_id in canary:
        succeeded(r, device_id)
    # Reports read from the shadow, applied as the gateway's event consumer will apply them.
    pairs = [(d, shadow_of(r, d)["state"]["reported"]) for d in canary]
    assert r.service.apply_reports(pairs) == 2
    assert get(r, "r1").progress.by_status["SUCCEEDED"] == 2

    run_pass(r, "r1")  # the canary met its threshold: stage 1 takes everyone
    after = get(r, "r1")
    assert (after.status, after.stage_index) == (pb.RUNNING, 1)
    assert sorted(targeted(r, ids)) == ids
    for device_id in ids:
        if device_id not in canary:
            succeeded(r, device_id)
    run_pass(r, "r1")  # the pass itself reads the reports it missed from the shadow
    done = get(r, "r1")
    assert done.status == pb.COMPLETED
    assert done.progress.by_status["SUCCEEDED"] == 20
    assert done.progress.stages[1].by_status["SUCCEEDED"] == 18
    for device_id in ("other-000", "other-001", "other-002", "other-003"):
        assert desired_firmware(r, device_id) is None


def test_failures_in_the_canary_abort_and_roll_the_canary_back(rollout: RunningRollout) -> None:
    r = rollout
    ids = register_fleet(r, 40)
    threshold = pb.FailureThreshold(percent=30, min_finished=10)
    stages = [pb.Stage(percent=25, failure_threshold=threshold), pb.Stage(percent=100)]
    create(r, spec("r1", fleet_filter='tags.group == "a"', stages=stages, rollback_on_abort=True))
    start(r, "r1")
    run_pass(r, "r1")
    canary = targeted(r, ids)
    assert len(canary) == 10
    outside = [d for d in ids if d not in canary]
    versions = {d: shadow_of(r, d)["version"] for d in outside}

    for device_id in canary[:3]:
        failed(r, device_id)
    for device_id in canary[3:]:
        succeeded(r, device_id)
    r.clock.now += 120
    run_pass(r, "r1")

    aborted = get(r, "r1")
    assert aborted.status == pb.ABORTED
    assert "3 of 10" in aborted.reason
    assert aborted.progress.by_status["FAILED"] == 3
    assert aborted.progress.rollbacks_pending == 7
    # Every canary device is asked for its previous firmware again: rolled back, or withdrawn.
    for device_id in canary:
        assert desired_firmware(r, device_id) == OLD
    # No device outside the canary was touched: not one shadow write.
    for device_id in outside:
        assert desired_firmware(r, device_id) is None
        assert shadow_of(r, device_id)["version"] == versions[device_id]

    for device_id in canary[3:]:
        report(r, device_id, {**OLD, "state": "succeeded", "target": OLD})
    run_pass(r, "r1")
    final = get(r, "r1")
    assert final.progress.by_status["ROLLED_BACK"] == 7
    assert final.progress.rollbacks_pending == 0
    # Its devices are free again: another rollout may take them.
    create(r, spec("r2", device_ids=canary))
    assert start(r, "r2").status == pb.RUNNING


def test_a_conflicting_rollout_is_refused(rollout: RunningRollout) -> None:
    r = rollout
    ids = register_fleet(r, 6)
    create(r, spec("later", device_ids=ids[:2]))  # created first, started after "first"
    create(r, spec("first", tags={"site": "berlin"}))
    start(r, "first")
    berlin = [d for i, d in enumerate(ids) if i % 3 == 0]
    conflict = spec("second", device_ids=[ids[1], berlin[1]])
    with pytest.raises(grpc.RpcError) as caught:
        create(r, conflict)
    error = cast(grpc.Call, caught.value)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert berlin[1] in (error.details() or "") and "first" in (error.details() or "")
    assert code_of(lambda: start(r, "later")) == grpc.StatusCode.FAILED_PRECONDITION
    assert get(r, "later").status == pb.CREATED
    # Disjoint devices are fine.
    create(r, spec("disjoint", device_ids=[ids[1], ids[2]]))
    assert start(r, "disjoint").status == pb.RUNNING


def test_the_fan_out_sends_chunks_and_survives_a_crash_before_it(rollout: RunningRollout) -> None:
    r = rollout
    ids = register_fleet(r, 12)
    create(r, spec("r1", device_ids=ids, stages=[pb.Stage(percent=100)]))
    start(r, "r1")
    r.service.reconcile("r1")
    # The process "dies" after the commit, before the fan-out: the writes wait in the outbox.
    assert targeted(r, ids) == []
    assert len(RolloutStore(r.service.store.engine).pending_dispatches("r1", 100)) == 12
    r.service.fan_out_chunk = 5
    before = r.shadow_calls.calls.get("BatchUpdateDesired", 0)
    assert r.service.fan_out() == 12
    assert r.shadow_calls.calls["BatchUpdateDesired"] - before == 3  # 5 + 5 + 2, not 12
    assert sorted(targeted(r, ids)) == ids
    assert r.service.fan_out() == 0


def test_silent_devices_time_out_are_retried_within_bounds_then_withdrawn(
    rollout: RunningRollout,
) -> None:
    r = rollout
    ids = register_fleet(r, 3)
    s = spec("r1", device_ids=ids, stages=[pb.Stage(percent=100)])
    s.timeout_seconds = 60
    s.retries.timed_out = 1
    s.retries.backoff_seconds = 0
    create(r, s)
    start(r, "r1")
    run_pass(r, "r1")
    assert sorted(targeted(r, ids)) == ids
    succeeded(r, ids[0])

    r.clock.now += 61  # no answer from the other two within the timeout: retried at once
    run_pass(r, "r1")
    for device_id in ids[1:]:
        assert (desired_firmware(r, device_id) or {})["url"] == NEW["url"] + "?attempt=2"
    assert get(r, "r1").progress.by_status["QUEUED"] == 2

    r.clock.now += 61  # silent again, no retry left: TIMED_OUT, firmware withdrawn
    run_pass(r, "r1")
    done = get(r, "r1")
    assert done.status == pb.COMPLETED
    assert (done.progress.by_status["SUCCEEDED"], done.progress.by_status["TIMED_OUT"]) == (1, 2)
    for device_id in ids[1:]:
        assert desired_firmware(r, device_id) == OLD
    assert desired_firmware(r, ids[0]) == NEW


def test_the_periodic_pass_covers_every_live_rollout_and_devices_that_join(
    rollout: RunningRollout,
) -> None:
    r = rollout
    ids = register_fleet(r, 4)
    create(r, spec("r1", tags={"group": "a"}, stages=[pb.Stage(percent=100)]))
    start(r, "r1")
    r.service.reconcile_all()
    r.service.fan_out()
    assert sorted(targeted(r, ids)) == ids
    revision = r.service.store.get("r1").revision
    r.service.reconcile_all()
    assert r.service.store.get("r1").revision == revision  # an idle pass writes nothing

    joined = register_fleet(r, 1, prefix="late")  # starts matching the selector mid-rollout
    r.service.reconcile_all()
    r.service.fan_out()
    assert targeted(r, joined) == joined
    assert get(r, "r1").progress.targets == 5
