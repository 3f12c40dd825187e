"""Unit tests of the rollout planner, one rule at a time, on hand-built executions."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.artifacts.domain import artifact_url, targeted_artifact
from services.rollout.domain import (
    Execution,
    ExecutionStatus,
    ExponentialRamp,
    FailureThreshold,
    Firmware,
    Rate,
    RetryPolicy,
    Rollout,
    RolloutStatus,
    Stage,
    Target,
    abort,
    apply_report,
    approve_stage,
    resume,
    start,
)
from services.rollout.errors import InvalidTargetsError
from services.rollout.planner import (
    Abort,
    AwaitApproval,
    Complete,
    MarkTimedOut,
    Notify,
    Pause,
    Plan,
    RollBack,
    StageStarted,
    Withdraw,
    plan,
    progress,
    rate_allowance,
    stratified_order,
)
from tests.unit.rollout_builders import NEW, OLD, definition, report

SITES = ("berlin", "lyon", "oslo", "porto")


def fleet(n: int, sites: tuple[str, ...] = SITES, firmware: Firmware | None = OLD) -> list[Target]:
    """`n` devices created site by site: creation order puts a whole site first."""
    per_site = -(-n // len(sites))
    return [Target(f"dev-{i:05d}", (("site", sites[i // per_site]),), firmware) for i in range(n)]


def started(**changes: Any) -> Rollout:
    return start(Rollout(definition(**changes)), 0.0)


def notified(p: Plan) -> list[str]:
    return [a.device_id for a in p.actions if isinstance(a, Notify)]


def reported(p: Plan, device_ids: list[str], block: dict[str, Any], now: float) -> list[Execution]:
    parsed = report(block)
    chosen = set(device_ids)
    return [apply_report(e, NEW, parsed, now) if e.device_id in chosen else e for e in p.executions]


def succeed(p: Plan, device_ids: list[str], now: float) -> list[Execution]:
    return reported(p, device_ids, {"version": "2.0.0", "state": "succeeded"}, now)


def fail(p: Plan, device_ids: list[str], now: float) -> list[Execution]:
    block = {"version": "1.0.0", "state": "failed", "target": {"version": "2.0.0"}}
    return reported(p, device_ids, block, now)


# --- sampling and sizes --------------------------------------------------------------------------


def test_nothing_happens_before_start() -> None:
    rollout = Rollout(definition())
    p = plan(rollout, [], fleet(20), 0.0)
    assert p.actions == ()
    assert p.rollout is rollout


def test_the_canary_is_spread_over_sites_not_creation_order() -> None:
    targets = fleet(200)
    p = plan(started(), [], targets, 0.0)
    canary = notified(p)
    assert len(canary) == 20  # 10% of 200
    sites = Counter(dict(targets[int(d[4:])].tags)["site"] for d in canary)
    assert sites == {"berlin": 5, "lyon": 5, "oslo": 5, "porto": 5}
    assert all(a == Notify(a.device_id, 1, NEW) for a in p.actions if isinstance(a, Notify))
    assert [e.stratum for e in p.changed].count("oslo") == 5


def test_uneven_sites_are_round_robin_until_the_small_one_runs_out() -> None:
    targets = [Target(f"a{i}", (("site", "big"),)) for i in range(50)]
    targets += [Target("b0", (("site", "small"),)), Target("c0")]  # c0 has no site tag
    order = stratified_order(definition(), targets)
    assert {t.stratum("site") for t in order[:3]} == {"big", "small", ""}
    assert {t.stratum("site") for t in order[3:]} == {"big"}


def test_the_order_is_stable_and_differs_between_rollouts() -> None:
    targets = fleet(100)
    first = stratified_order(definition(), targets)
    assert stratified_order(definition(), list(reversed(targets))) == first
    other = stratified_order(definition(rollout_id="r-2"), targets)
    assert [t.device_id for t in other] != [t.device_id for t in first]


def test_a_plan_replayed_on_its_own_result_notifies_nobody_twice() -> None:
    targets = fleet(50)
    first = plan(started(), [], targets, 0.0)
    again = plan(first.rollout, first.executions, targets, 1.0)
    assert len(notified(first)) == 5
    assert notified(again) == []
    assert again.changed == ()


def test_executions_remember_what_the_device_ran_before() -> None:
    targets = [Target("a", firmware=OLD), Target("b", firmware=None)]
    p = plan(started(stages=(Stage(percent=100),)), [], targets, 0.0)
    assert {e.device_id: e.previous for e in p.executions} == {"a": OLD, "b": None}


@settings(max_examples=30, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(min_value=0, max_value=60))
def test_the_plan_does_not_depend_on_input_order(rng: random.Random, failures: int) -> None:
    targets = fleet(60)
    rollout = started(
        stages=(Stage(percent=50), Stage(percent=100)),
        retries=RetryPolicy(failed=1, backoff_seconds=0),
        rate=Rate(max_per_minute=25),
    )
    p = plan(rollout, [], targets, 0.0)
    executions = fail(p, notified(p)[: failures // 2], 30.0)
    executions = succeed(replace(p, executions=tuple(executions)), notified(p)[failures:], 30.0)
    expected = plan(p.rollout, executions, targets, 60.0)
    rng.shuffle(executions)
    shuffled_targets = list(targets)
    rng.shuffle(shuffled_targets)
    assert plan(p.rollout, executions, shuffled_targets, 60.0) == expected


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(InvalidTargetsError):
        plan(started(), [], [Target("a"), Target("a")], 0.0)
    p = plan(started(stages=(Stage(percent=100),)), [], [Target("a")], 0.0)
    with pytest.raises(InvalidTargetsError):
        plan(p.rollout, [*p.executions, *p.executions], [Target("a")], 1.0)


def test_no_targets_completes_at_once() -> None:
    p = plan(started(), [], [], 5.0)
    assert p.actions == (StageStarted(1), Complete(0, 0))
    assert (p.rollout.state.status, p.rollout.state.finished_at) == (RolloutStatus.COMPLETED, 5.0)


# --- rate ----------------------------------------------------------------------------------------


def test_fixed_rate_is_a_sliding_minute() -> None:
    rollout = started(stages=(Stage(percent=100),), rate=Rate(max_per_minute=7))
    targets = fleet(30)
    p = plan(rollout, [], targets, 0.0)
    assert len(notified(p)) == 7
    p = plan(p.rollout, p.executions, targets, 59.9)
    assert notified(p) == []
    p = plan(p.rollout, p.executions, targets, 60.0)
    assert len(notified(p)) == 7
    assert rate_allowance(p.rollout.definition, p.executions, 60.0) == 0


def test_ramp_raises_the_rate_after_each_step() -> None:
    ramp = ExponentialRamp(base_per_minute=2, increment_factor=2, notified_step=4)
    rollout = started(stages=(Stage(percent=100),), rate=Rate(ramp=ramp))
    targets = fleet(100)
    counts = []
    p = plan(rollout, [], targets, 0.0)
    counts.append(len(notified(p)))
    for minute in range(1, 5):
        p = plan(p.rollout, p.executions, targets, 60.0 * minute)
        counts.append(len(notified(p)))
    # 2 (0 notified so far), 2 (2), 4 (4), 8 (8), 32 (16 notified: 2 * 2**4)
    assert counts == [2, 2, 4, 8, 32]


# --- timeouts, retries ---------------------------------------------------------------------------


def test_timeouts_retries_and_giving_up() -> None:
    retries = RetryPolicy(failed=1, timed_out=1, backoff_seconds=100)
    rollout = started(stages=(Stage(percent=100),), retries=retries)
    targets = [Target("a", firmware=OLD), Target("b", firmware=OLD)]
    p = plan(rollout, [], targets, 0.0)
    p = plan(p.rollout, fail(p, ["b"], 10.0), targets, 109.0)
    assert p.actions == ()  # "b" waits for its backoff, "a" is not late yet
    p = plan(p.rollout, p.executions, targets, 110.0)
    assert p.actions == (Notify("b", 2, NEW),)
    p = plan(p.rollout, p.executions, targets, 600.0)
    assert p.actions == (MarkTimedOut("a", 1),)
    p = plan(p.rollout, p.executions, targets, 699.0)
    assert p.actions == ()
    p = plan(p.rollout, p.executions, targets, 700.0)
    assert p.actions == (Notify("a", 2, NEW),)
    a = p.executions[0]
    assert (a.status, a.attempt, a.notified_at) == (ExecutionStatus.QUEUED, 2, (0.0, 700.0))
    p = plan(p.rollout, fail(p, ["b"], 710.0), targets, 1300.0)
    assert p.actions == (
        MarkTimedOut("a", 2),
        Withdraw("a", OLD),
        Withdraw("b", OLD),
        Complete(0, 2),
    )
    assert Withdraw("a", OLD).desired() == OLD.desired()
    assert [e.status for e in p.executions] == [ExecutionStatus.TIMED_OUT, ExecutionStatus.FAILED]
    assert p.rollout.state.status == RolloutStatus.COMPLETED


def test_a_retry_changes_the_desired_url_but_not_the_artifact() -> None:
    assert Notify("a", 1, NEW).desired() == NEW.desired()
    assert Notify("a", 3, NEW).desired() == {
        "firmware": {"version": "2.0.0", "url": "https://ota.example/v1/artifacts/fw-2?attempt=3"}
    }
    signed = Firmware("2.0.0", "https://cdn.example/v1/artifacts/fw-2?region=eu&attempt=2")
    assert Notify("a", 3, signed).desired()["firmware"]["url"] == (
        "https://cdn.example/v1/artifacts/fw-2?region=eu&attempt=3"
    )


def test_the_artifact_service_still_finds_the_artifact_of_a_retry() -> None:
    url = artifact_url("https://ota.example", "ab" * 16)
    desired = Notify("a", 2, Firmware("2.0.0", url)).desired()
    assert targeted_artifact(desired) == "ab" * 16


def test_a_withdraw_without_a_known_previous_version_deletes_the_leaf() -> None:
    assert Withdraw("a", None).desired() == {"firmware": None}


def test_retries_share_the_rate_with_new_devices() -> None:
    retries = RetryPolicy(failed=3, backoff_seconds=0)
    rollout = started(stages=(Stage(percent=100),), retries=retries, rate=Rate(max_per_minute=2))
    targets = fleet(10)
    p = plan(rollout, [], targets, 0.0)
    first = notified(p)
    p = plan(p.rollout, fail(p, first, 30.0), targets, 60.0)
    assert p.actions == tuple(Notify(d, 2, NEW) for d in sorted(first))


# --- stages --------------------------------------------------------------------------------------


def test_advance_after_success_and_soak() -> None:
    rollout = started(stages=(Stage(percent=10, soak_seconds=300), Stage(percent=100)))
    targets = fleet(40)
    p = plan(rollout, [], targets, 0.0)
    canary = notified(p)
    p = plan(p.rollout, succeed(p, canary[:3], 50.0), targets, 60.0)
    assert p.actions == ()
    p = plan(p.rollout, succeed(p, canary[3:], 70.0), targets, 80.0)
    assert p.actions == ()
    assert p.rollout.state.threshold_met_at == 80.0
    p = plan(p.rollout, p.executions, targets, 379.0)
    assert p.actions == ()
    p = plan(p.rollout, p.executions, targets, 380.0)
    assert p.actions[0] == StageStarted(1)
    assert len(notified(p)) == 36
    assert {e.stage for e in p.executions if e.device_id not in canary} == {1}
    p = plan(p.rollout, succeed(p, notified(p), 400.0), targets, 410.0)
    assert p.actions == (Complete(40, 0),)


def test_a_lower_success_threshold_advances_before_every_device_is_done() -> None:
    rollout = started(stages=(Stage(percent=10, success_threshold_percent=75), Stage(100)))
    targets = fleet(40)
    p = plan(rollout, [], targets, 0.0)
    p = plan(p.rollout, succeed(p, notified(p)[:3], 10.0), targets, 20.0)
    assert p.actions[0] == StageStarted(1)


def test_approval_is_awaited_then_given() -> None:
    rollout = started(stages=(Stage(percent=10), Stage(percent=100, approval_required=True)))
    targets = fleet(20)
    p = plan(rollout, [], targets, 0.0)
    p = plan(p.rollout, succeed(p, notified(p), 10.0), targets, 20.0)
    assert p.actions == (AwaitApproval(1),)
    assert p.rollout.state.status == RolloutStatus.WAITING_APPROVAL
    p = plan(p.rollout, p.executions, targets, 30.0)
    assert p.actions == ()
    p = plan(approve_stage(p.rollout, 1, 40.0), p.executions, targets, 40.0)
    assert p.actions[0] == StageStarted(1)
    assert len(notified(p)) == 18


def test_a_missed_success_threshold_pauses_and_resume_lets_it_pass() -> None:
    rollout = started(stages=(Stage(percent=20), Stage(percent=100)))
    targets = fleet(20)
    p = plan(rollout, [], targets, 0.0)
    canary = notified(p)
    executions = [
        e if e.device_id == canary[0] else replace(e, status=ExecutionStatus.SUCCEEDED)
        for e in fail(p, canary[:1], 5.0)
    ]
    p = plan(p.rollout, executions, targets, 7.0)
    assert p.rollout.state.status == RolloutStatus.PAUSED
    assert p.actions == (
        Withdraw(canary[0], OLD),
        Pause("stage 0: 3 of 4 devices succeeded, below the 100% success threshold"),
    )
    p = plan(resume(p.rollout, 100.0), p.executions, targets, 100.0)
    assert p.actions[0] == StageStarted(1)
    assert len(notified(p)) == 16


# --- abort ---------------------------------------------------------------------------------------


def canary_then_failures(rollback: bool) -> tuple[Plan, list[str], list[Target]]:
    threshold = FailureThreshold(count=2, min_finished=3)
    rollout = started(
        stages=(Stage(percent=25, failure_threshold=threshold), Stage(percent=100)),
        rollback_on_abort=rollback,
    )
    targets = fleet(16)
    p = plan(rollout, [], targets, 0.0)
    canary = notified(p)
    assert len(canary) == 4
    executions = succeed(p, canary[:1], 10.0)
    executions = reported(
        replace(p, executions=tuple(executions)),
        canary[1:2],
        {"version": "1.0.0", "state": "downloading", "target": {"version": "2.0.0"}},
        10.0,
    )
    p = plan(p.rollout, executions, targets, 11.0)
    p = plan(p.rollout, fail(p, canary[2:3], 20.0), targets, 21.0)
    assert p.rollout.state.status == RolloutStatus.RUNNING  # one failure: under the threshold
    return p, canary, targets


def test_failures_over_the_threshold_abort_cancel_and_roll_back() -> None:
    p, canary, targets = canary_then_failures(rollback=True)
    # canary[3] refuses the update: the second failure among 3 finished crosses the threshold
    executions = [
        replace(e, status=ExecutionStatus.REJECTED) if e.device_id == canary[3] else e
        for e in p.executions
    ]
    p = plan(p.rollout, executions, targets, 30.0)
    state = p.rollout.state
    assert (state.status, state.reason, state.finished_at) == (
        RolloutStatus.ABORTED,
        "stage 0: 2 of 3 finished devices failed",
        30.0,
    )
    by_id = {e.device_id: e for e in p.executions}
    assert p.actions[0] == Abort("stage 0: 2 of 3 finished devices failed")
    assert set(p.actions[1:]) == {
        RollBack(canary[0], OLD),  # took the update
        RollBack(canary[1], OLD),  # was installing it
        Withdraw(canary[3], OLD),  # canary[2] was withdrawn when it failed for good
    }
    assert by_id[canary[0]].rollback_requested_at == 30.0
    # the abort is final: nothing new, nothing repeated
    again = plan(p.rollout, p.executions, targets, 10_000.0)
    assert set(again.actions) == {MarkTimedOut(canary[0], 1), MarkTimedOut(canary[1], 1)}
    reasons = {e.device_id: e.reason for e in again.executions}
    assert reasons[canary[0]] == "rollback not confirmed within 600 s"
    assert reasons[canary[1]] == "no result within 600 s"  # its update attempt ran out first
    assert {e.status for e in again.changed} == {ExecutionStatus.TIMED_OUT}
    assert len(p.executions) == 4


def test_abort_cancels_what_has_not_started() -> None:
    p, canary, targets = canary_then_failures(rollback=False)
    p = plan(abort(p.rollout, 40.0), p.executions, targets, 40.0)
    assert p.actions == (Withdraw(canary[3], OLD),)
    by_id = {e.device_id: e for e in p.executions}
    assert by_id[canary[3]].status == ExecutionStatus.CANCELED
    assert by_id[canary[1]].status == ExecutionStatus.IN_PROGRESS  # left to finish
    assert by_id[canary[2]].withdrawn  # failed for good already (no retries)


def test_devices_with_an_unknown_previous_version_are_not_rolled_back() -> None:
    rollout = started(stages=(Stage(percent=100),), rollback_on_abort=True)
    targets = [Target("a", firmware=None), Target("b", firmware=OLD)]
    p = plan(rollout, [], targets, 0.0)
    p = plan(abort(p.rollout, 5.0), succeed(p, ["a", "b"], 1.0), targets, 5.0)
    assert p.actions == (RollBack("b", OLD),)


# --- progress ------------------------------------------------------------------------------------


def test_progress_counts_what_a_dashboard_shows() -> None:
    rollout = started(rollback_on_abort=True)
    targets = fleet(40)
    p = plan(rollout, [], targets, 0.0)
    canary = notified(p)
    p = plan(abort(p.rollout, 5.0), succeed(p, canary[:2], 1.0), targets, 5.0)
    summary = progress(p.rollout, p.executions, len(targets))
    counts = dict(summary.by_status)
    assert (summary.status, summary.stage_index, summary.stage_size) == (
        RolloutStatus.ABORTED,
        0,
        4,
    )
    assert (summary.targets, summary.not_started, summary.rollbacks_pending) == (40, 36, 2)
    assert counts[ExecutionStatus.SUCCEEDED] == 2
    assert counts[ExecutionStatus.CANCELED] == 2
    assert sum(counts.values()) == 4
