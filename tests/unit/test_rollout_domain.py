"""Unit tests of the rollout data model: definition validation, stage sizes, rates, retries,
device reports moving executions, and the operator commands."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.rollout.domain import (
    Execution,
    ExecutionStatus,
    ExponentialRamp,
    FailureThreshold,
    Firmware,
    FirmwareReport,
    Rate,
    RetryPolicy,
    Rollout,
    RolloutDefinition,
    RolloutStatus,
    Stage,
    Target,
    TargetSelector,
    abort,
    apply_report,
    approve_stage,
    is_settled,
    pause,
    resume,
    retries_left,
    start,
    validate_targets,
)
from services.rollout.errors import (
    InvalidReportError,
    InvalidRolloutError,
    InvalidStateError,
    InvalidTargetsError,
)
from tests.unit import rollout_builders
from tests.unit.rollout_builders import NEW, OLD, report

# The domain rules are read over a four-stage rollout.
FOUR_STAGES = (Stage(percent=1), Stage(percent=10), Stage(percent=50), Stage(percent=100))


def definition(**changes: Any) -> RolloutDefinition:
    return rollout_builders.definition(**{"stages": FOUR_STAGES, **changes})


def execution(status: ExecutionStatus = ExecutionStatus.QUEUED, **changes: Any) -> Execution:
    base = Execution(
        device_id="d-1",
        stage=0,
        stratum="berlin",
        previous=OLD,
        status=status,
        attempt=1,
        notified_at=(100.0,),
        updated_at=100.0,
    )
    return replace(base, **changes)


def progress(state: str, target: str = "2.0.0", running: str = "1.0.0") -> FirmwareReport:
    return report({"version": running, "state": state, "target": {"version": target}})


# --- definitions ---------------------------------------------------------------------------------


def test_a_valid_definition_builds() -> None:
    d = definition()
    assert d.stage_sizes(200) == (2, 20, 100, 200)
    assert d.firmware.desired() == {
        "firmware": {"version": "2.0.0", "url": "https://ota.example/v1/artifacts/fw-2"}
    }


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"stages": ()}, "1-20 stages"),
        ({"stages": (Stage(percent=50),)}, "last stage must be percent=100"),
        ({"stages": (Stage(percent=50), Stage(percent=10), Stage(percent=100))}, "must grow"),
        ({"stages": (Stage(count=5), Stage(count=5), Stage(percent=100))}, "must grow"),
        (
            {"stages": (Stage(percent=100, approval_required=True),)},
            "first stage starts with StartRollout",
        ),
        ({"timeout_seconds": 59.0}, "between 1 minute and 7 days"),
        ({"timeout_seconds": 8 * 24 * 3600.0}, "between 1 minute and 7 days"),
        ({"rollout_id": "a/b"}, "invalid rollout id"),
        ({"artifact_id": ""}, "artifact id"),
        ({"stratify_by": "tags.site"}, "stratify_by"),
    ],
)
def test_invalid_definitions_say_why(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRolloutError, match=message):
        definition(**changes)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Stage(), "percent or a count"),
        (lambda: Stage(percent=10, count=3), "percent or a count"),
        (lambda: Stage(percent=0), r"\(0, 100\]"),
        (lambda: Stage(percent=101), r"\(0, 100\]"),
        (lambda: Stage(count=0), "at least 1"),
        (lambda: Stage(percent=5, success_threshold_percent=120), "success threshold"),
        (lambda: Stage(percent=5, soak_seconds=-1), "soak"),
        (lambda: FailureThreshold(), "count or a percent"),
        (lambda: FailureThreshold(count=1, percent=5), "count or a percent"),
        (lambda: FailureThreshold(percent=0), r"\(0, 100\]"),
        (lambda: FailureThreshold(count=1, min_finished=0), "min_finished"),
        (lambda: ExponentialRamp(10, 1.0, notified_step=5), r"\[1.1, 5\]"),
        (lambda: ExponentialRamp(10, 5.5, notified_step=5), r"\[1.1, 5\]"),
        (lambda: ExponentialRamp(10, 2, notified_step=5, succeeded_step=5), "exactly one"),
        (lambda: ExponentialRamp(10, 2), "exactly one"),
        (lambda: ExponentialRamp(10, 2, notified_step=0), "at least 1"),
        (lambda: ExponentialRamp(0, 2, notified_step=1), "base rate"),
        (lambda: ExponentialRamp(100, 2, notified_step=1, max_per_minute=50), "maximum"),
        (lambda: Rate(max_per_minute=0), "per minute"),
        (lambda: Rate(max_per_minute=5, ramp=ExponentialRamp(1, 2, 1)), "not both"),
        (lambda: RetryPolicy(failed=11), "0-10"),
        (lambda: RetryPolicy(timed_out=-1), "0-10"),
        (lambda: RetryPolicy(backoff_seconds=4000), "backoff"),
        (lambda: Firmware("", "u"), "version"),
        (lambda: Firmware("1", ""), "url"),
        (lambda: TargetSelector(), "exactly one"),
        (lambda: TargetSelector(device_ids=("a",), fleet_filter="x"), "exactly one"),
        (lambda: TargetSelector(device_ids=("a", "a")), "repeated"),
        (lambda: TargetSelector(device_ids=("a/+",)), "invalid device id"),
        (lambda: TargetSelector(tags=(("a.b", "x"),)), "invalid tag key"),
        (lambda: TargetSelector(fleet_filter=""), "1-4096"),
    ],
)
def test_invalid_parts_say_why(build: Any, message: str) -> None:
    with pytest.raises(InvalidRolloutError, match=message):
        build()


def test_selectors_of_each_kind_build() -> None:
    assert TargetSelector(device_ids=("a", "b")).device_ids == ("a", "b")
    assert TargetSelector(tags=(("site", "berlin"),)).tags == (("site", "berlin"),)
    text = 'tags.site == "berlin"'
    assert TargetSelector(fleet_filter=text).fleet_filter == text


# --- stage sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stages", "total", "sizes"),
    [
        ((Stage(percent=1), Stage(percent=100)), 50, (1, 50)),  # rounds up: never a 0 canary
        ((Stage(percent=10), Stage(percent=100)), 30, (3, 30)),  # 0.1 * 30 is not 4
        ((Stage(percent=1), Stage(percent=10), Stage(percent=100)), 0, (0, 0, 0)),
        ((Stage(count=5), Stage(percent=10), Stage(percent=100)), 20, (5, 5, 20)),  # monotone
        ((Stage(count=500), Stage(percent=100)), 20, (20, 20)),  # capped at the targets
        ((Stage(percent=33.3), Stage(percent=100)), 1000, (333, 1000)),
    ],
)
def test_stage_sizes(stages: tuple[Stage, ...], total: int, sizes: tuple[int, ...]) -> None:
    assert definition(stages=stages).stage_sizes(total) == sizes


@given(
    st.lists(st.floats(min_value=0.01, max_value=99.99), max_size=5, unique=True),
    st.integers(min_value=0, max_value=100_000),
)
def test_stage_sizes_grow_end_at_all_and_round_up(percents: list[float], total: int) -> None:
    stages = (*(Stage(percent=p) for p in sorted(percents)), Stage(percent=100))
    sizes = definition(stages=stages).stage_sizes(total)
    assert list(sizes) == sorted(sizes)
    assert sizes[-1] == total
    for p, size in zip(sorted(percents), sizes, strict=False):
        assert size >= p * total / 100 - 1e-6  # never below the percent
        assert size <= p * total / 100 + 1  # at most one more
        if total:
            assert size >= 1


# --- rates, retries ------------------------------------------------------------------------------


def test_fixed_rate_and_no_rate() -> None:
    assert Rate(max_per_minute=50).per_minute(10_000, 10_000) == 50
    assert Rate().per_minute(0, 0) is None


def test_ramp_after_notified() -> None:
    ramp = ExponentialRamp(10, 2.0, notified_step=100, max_per_minute=70)
    assert [ramp.per_minute(n, 0) for n in (0, 99, 100, 250, 300, 10_000)] == [
        10,
        10,
        20,
        40,
        70,
        70,
    ]


def test_ramp_after_succeeded_ignores_notified() -> None:
    ramp = ExponentialRamp(10, 1.5, succeeded_step=20)
    assert ramp.per_minute(1000, 0) == 10
    assert ramp.per_minute(1000, 40) == 22  # 10 * 1.5**2 = 22.5, rounded down


def test_retry_counts_and_backoff() -> None:
    policy = RetryPolicy(failed=2, timed_out=1, backoff_seconds=30)
    failed = execution(ExecutionStatus.FAILED)
    assert retries_left(failed, policy) == 2
    assert retries_left(replace(failed, attempt=3), policy) == 0
    assert retries_left(execution(ExecutionStatus.TIMED_OUT, attempt=2), policy) == 0
    assert retries_left(execution(ExecutionStatus.REJECTED), policy) == 0
    assert [policy.delay(a) for a in (1, 2, 3)] == [30, 60, 120]
    assert RetryPolicy(backoff_seconds=3000).delay(5) == 3600
    assert not is_settled(failed, policy)
    assert is_settled(replace(failed, attempt=3), policy)
    assert is_settled(failed, policy, retrying=False)  # an aborted rollout retries nothing
    assert not is_settled(execution(ExecutionStatus.SUCCEEDED, rollback_requested_at=5.0), policy)


def test_failure_threshold_counts_and_percents() -> None:
    by_count = FailureThreshold(count=3, min_finished=5)
    assert not by_count.breached(3, 4)  # too few finished to judge
    assert by_count.breached(3, 5)
    assert not by_count.breached(2, 50)
    by_percent = FailureThreshold(percent=20, min_finished=10)
    assert by_percent.breached(2, 10)
    assert not by_percent.breached(1, 10)
    assert not by_percent.breached(0, 100)


def test_targets_are_validated() -> None:
    validate_targets((Target("a"), Target("b")))
    with pytest.raises(InvalidTargetsError, match="twice"):
        validate_targets((Target("a"), Target("a")))
    with pytest.raises(InvalidTargetsError, match="invalid device id"):
        validate_targets((Target("$SYS"),))
    assert Target("a", (("site", "x"), ("model", "m"))).stratum("model") == "m"
    assert Target("a").stratum("site") == ""


# --- reports -------------------------------------------------------------------------------------


def test_report_parsing_follows_the_agent() -> None:
    full = {
        "version": "1.0.0",
        "url": "u",
        "state": "downloading",
        "percent": 25,
        "error": None,
        "target": {"version": "2.0.0", "url": "v"},
    }
    assert report(full) == FirmwareReport("1.0.0", "downloading", "2.0.0", None)
    assert report({"version": "2.0.0"}) == FirmwareReport("2.0.0")
    assert FirmwareReport.from_reported({"other": 1}) is None
    long_error = report({"version": "1", "state": "failed", "error": "x" * 1000})
    assert long_error.error == "x" * 300


@pytest.mark.parametrize(
    ("firmware", "message"),
    [
        ("2.0", "must be an object"),
        ({}, "version must be"),
        ({"version": "v" * 65}, "version must be"),
        ({"version": "1", "state": "exploded"}, "state must be one of"),
        ({"version": "1", "state": 3}, "state must be one of"),
        ({"version": "1", "target": "2"}, "target must be an object"),
        ({"version": "1", "target": {}}, "target.version"),
        ({"version": "1", "error": 5}, "error must be a string"),
    ],
)
def test_bad_reports_are_refused(firmware: Any, message: str) -> None:
    with pytest.raises(InvalidReportError, match=message):
        FirmwareReport.from_reported({"firmware": firmware})


def test_a_device_walks_through_its_steps_to_success() -> None:
    e = execution()
    for t, step in enumerate(("downloading", "verifying", "installing", "rebooting"), start=101):
        e = apply_report(e, NEW, progress(step), float(t))
        assert (e.status, e.step, e.updated_at) == (ExecutionStatus.IN_PROGRESS, step, float(t))
    e = apply_report(e, NEW, report({"version": "2.0.0", "state": "succeeded"}), 200.0)
    assert (e.status, e.step, e.updated_at) == (ExecutionStatus.SUCCEEDED, None, 200.0)


def test_a_repeated_step_changes_nothing() -> None:
    e = apply_report(execution(), NEW, progress("downloading"), 101.0)
    assert apply_report(e, NEW, progress("downloading"), 150.0) is e


def test_a_plain_report_of_the_new_version_is_success() -> None:
    e = apply_report(execution(), NEW, report({"version": "2.0.0"}), 101.0)
    assert e.status == ExecutionStatus.SUCCEEDED


def test_failures_carry_the_agents_error() -> None:
    failed = report(
        {"version": "1.0.0", "state": "failed", "target": {"version": "2.0.0"}, "error": "sha"}
    )
    e = apply_report(execution(ExecutionStatus.IN_PROGRESS), NEW, failed, 101.0)
    assert (e.status, e.reason) == (ExecutionStatus.FAILED, "device reported failure: sha")
    rolled = apply_report(execution(), NEW, progress("rolled_back"), 101.0)
    assert (rolled.status, rolled.reason) == (
        ExecutionStatus.FAILED,
        "device rolled back to 1.0.0",
    )
    rejected = apply_report(execution(), NEW, progress("rejected"), 101.0)
    assert rejected.status == ExecutionStatus.REJECTED


def test_reports_about_another_update_change_nothing() -> None:
    e = execution(ExecutionStatus.IN_PROGRESS, step="downloading")
    assert apply_report(e, NEW, progress("failed", target="3.0.0"), 101.0) is e
    assert apply_report(e, NEW, report({"version": "1.0.0"}), 101.0) is e
    assert apply_report(e, NEW, report({"version": "3.0.0", "state": "succeeded"}), 101.0) is e


def test_final_states_stay_except_a_late_success() -> None:
    for status in (ExecutionStatus.FAILED, ExecutionStatus.REJECTED, ExecutionStatus.CANCELED):
        e = execution(status)
        assert apply_report(e, NEW, progress("downloading"), 101.0) is e
        assert apply_report(e, NEW, report({"version": "2.0.0"}), 101.0) is e
    late = apply_report(
        execution(ExecutionStatus.TIMED_OUT), NEW, report({"version": "2.0.0"}), 9.0
    )
    assert late.status == ExecutionStatus.SUCCEEDED
    given_up = execution(ExecutionStatus.TIMED_OUT, withdrawn=True)  # desired is old again
    assert apply_report(given_up, NEW, report({"version": "2.0.0"}), 9.0) is given_up


def test_a_rollback_ends_when_the_device_runs_its_previous_version() -> None:
    e = execution(ExecutionStatus.SUCCEEDED, rollback_requested_at=300.0)
    assert e.rollback_pending
    e = apply_report(e, NEW, progress("installing", target="1.0.0", running="2.0.0"), 301.0)
    assert e.status == ExecutionStatus.SUCCEEDED  # still on its way back
    e = apply_report(e, NEW, report({"version": "1.0.0", "state": "succeeded"}), 302.0)
    assert (e.status, e.rollback_pending) == (ExecutionStatus.ROLLED_BACK, False)
    assert apply_report(e, NEW, report({"version": "2.0.0"}), 303.0) is e


def test_an_install_failing_during_a_rollback_is_a_failure() -> None:
    e = execution(ExecutionStatus.IN_PROGRESS, step="installing", rollback_requested_at=300.0)
    e = apply_report(e, NEW, progress("rolled_back"), 301.0)
    assert (e.status, e.reason, e.rollback_pending) == (
        ExecutionStatus.FAILED,
        "device rolled back to 1.0.0",
        False,
    )


def test_without_a_rollback_request_the_previous_version_is_no_rollback() -> None:
    e = execution(ExecutionStatus.SUCCEEDED)
    assert apply_report(e, NEW, report({"version": "1.0.0"}), 101.0) is e


# --- operator commands ---------------------------------------------------------------------------


def test_commands_move_the_rollout_through_its_statuses() -> None:
    r = Rollout(definition(stages=(Stage(percent=10), Stage(100, approval_required=True))))
    assert r.state.status == RolloutStatus.CREATED
    r = start(r, 10.0)
    assert (r.state.status, r.state.started_at, r.state.stage_started_at) == (
        RolloutStatus.RUNNING,
        10.0,
        10.0,
    )
    r = pause(r, 20.0)
    assert (r.state.status, r.state.reason) == (RolloutStatus.PAUSED, "paused by an operator")
    r = resume(r, 30.0)
    assert (r.state.status, r.state.accepted_through) == (RolloutStatus.RUNNING, -1)
    r = approve_stage(r, 1, 40.0)
    assert (r.state.status, r.state.approved_through) == (RolloutStatus.RUNNING, 1)
    r = abort(r, 50.0, "bad batch")
    assert (r.state.status, r.state.reason, r.state.finished_at) == (
        RolloutStatus.ABORTED,
        "bad batch",
        50.0,
    )


def test_resume_after_a_missed_threshold_accepts_the_stage() -> None:
    r = start(Rollout(definition()), 0.0)
    r = replace(
        r, state=replace(r.state, status=RolloutStatus.PAUSED, threshold_missed=True, stage_index=1)
    )
    r = resume(r, 70.0)
    assert (r.state.accepted_through, r.state.threshold_met_at, r.state.threshold_missed) == (
        1,
        70.0,
        False,
    )


def test_approval_while_waiting_resumes_the_rollout() -> None:
    r = start(Rollout(definition()), 0.0)
    r = replace(r, state=replace(r.state, status=RolloutStatus.WAITING_APPROVAL))
    assert approve_stage(r, 1, 5.0).state.status == RolloutStatus.RUNNING
    # approving a later stage in advance does not release the wait for the next one
    assert approve_stage(r, 2, 5.0).state.status == RolloutStatus.WAITING_APPROVAL


@pytest.mark.parametrize(
    ("status", "command"),
    [
        (RolloutStatus.RUNNING, lambda r: start(r, 1.0)),
        (RolloutStatus.CREATED, lambda r: pause(r, 1.0)),
        (RolloutStatus.RUNNING, lambda r: resume(r, 1.0)),
        (RolloutStatus.CREATED, lambda r: approve_stage(r, 1, 1.0)),
        (RolloutStatus.RUNNING, lambda r: approve_stage(r, 0, 1.0)),
        (RolloutStatus.RUNNING, lambda r: approve_stage(r, 4, 1.0)),
        (RolloutStatus.ABORTED, lambda r: abort(r, 1.0)),
        (RolloutStatus.COMPLETED, lambda r: abort(r, 1.0)),
    ],
)
def test_commands_the_status_does_not_allow_are_refused(
    status: RolloutStatus, command: Any
) -> None:
    r = Rollout(definition())
    r = replace(r, state=replace(r.state, status=status))
    with pytest.raises(InvalidStateError):
        command(r)
