"""Property tests of the planner over whole rollouts, run against a pure fake fleet.

`FakeFleet` is a small, reviewed stand-in for devices: each takes a desired firmware, reports
steps like the device agent does, and then succeeds, fails, refuses, never answers, or fails
only its first attempt. `simulate` is the loop the service will run: apply the reports, call
`plan`, persist the plan, carry out its actions; then checks run over the whole trace.
Simulated time only: nothing here sleeps or measures time.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from services.rollout.domain import (
    ACTIVE,
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
    apply_report,
    is_settled,
    resume,
    start,
)
from services.rollout.planner import (
    Abort,
    Action,
    Notify,
    RollBack,
    Withdraw,
    plan,
    stratified_order,
)
from tests.unit import rollout_builders
from tests.unit.rollout_builders import NEW, OLD

TICK = 15.0
HEALTHY, FAILING, REJECTING, SILENT, FLAKY = "healthy", "failing", "rejecting", "silent", "flaky"


@dataclass
class FakeDevice:
    device_id: str
    behavior: str
    running: Firmware = OLD
    command: Firmware | None = None
    command_at: float = 0.0
    attempts: int = 0  # commands for the new firmware received
    last_step: str | None = None
    resync: bool = False  # report what runs at the next step

    def delay(self) -> float:
        # 10-39 s per update, spread by id so devices finish out of notification order
        return 10.0 + hashlib.sha256(self.device_id.encode()).digest()[0] % 30


@dataclass
class FakeFleet:
    devices: dict[str, FakeDevice]
    received: list[tuple[float, Notify | RollBack | Withdraw]] = field(default_factory=list)

    def deliver(self, action: Action, now: float) -> None:
        """A desired-state write reaching the device (as a delta)."""
        if not isinstance(action, Notify | RollBack | Withdraw):
            return
        self.received.append((now, action))
        device = self.devices[action.device_id]
        wanted = action.firmware
        if wanted is None or wanted == device.running:
            # the update in hand (if any) is called off: the agent reports what it runs
            device.command, device.resync = None, True
            return
        device.command, device.command_at, device.last_step = wanted, now, None
        if wanted == NEW:
            device.attempts += 1

    def step(self, now: float) -> list[tuple[str, FirmwareReport]]:
        """What the devices report by `now`, as the agent's reported.firmware blocks parse."""
        reports = []
        for device in self.devices.values():
            report = self._advance(device, now)
            if report is not None:
                reports.append((device.device_id, report))
        return reports

    def _advance(self, device: FakeDevice, now: float) -> FirmwareReport | None:
        if device.resync:
            device.resync = False
            return FirmwareReport(device.running.version)
        wanted = device.command
        if wanted is None or (device.behavior == SILENT and wanted == NEW):
            return None
        elapsed = now - device.command_at
        if elapsed < device.delay() / 2:
            return None
        if elapsed < device.delay():
            if device.last_step == "downloading":
                return None
            device.last_step = "downloading"
            return FirmwareReport(device.running.version, "downloading", wanted.version)
        device.command = None
        fails = device.behavior == FAILING or (device.behavior == FLAKY and device.attempts == 1)
        if wanted == NEW and fails:
            # the agent's health check failed: it went back to the old slot by itself
            return FirmwareReport(device.running.version, "rolled_back", wanted.version, "health")
        if wanted == NEW and device.behavior == REJECTING:
            return FirmwareReport(device.running.version, "rejected", wanted.version, "hw")
        device.running = wanted
        return FirmwareReport(wanted.version, "succeeded", wanted.version)


@dataclass
class Trace:
    rollout: Rollout
    executions: dict[str, Execution]
    actions: list[tuple[float, Action]]
    fleet: FakeFleet
    passes: int
    resumes: int  # stages an operator let pass after a missed success threshold


def fake_fleet(behaviors: dict[str, str]) -> FakeFleet:
    return FakeFleet({d: FakeDevice(d, b) for d, b in behaviors.items()})


def finished(rollout: Rollout, executions: dict[str, Execution]) -> bool:
    status = rollout.state.status
    if status == RolloutStatus.COMPLETED:
        return True
    policy = rollout.definition.retries
    return status == RolloutStatus.ABORTED and all(
        is_settled(e, policy, retrying=False) for e in executions.values()
    )


def simulate(
    definition: RolloutDefinition,
    targets_at: Callable[[float], Sequence[Target]],
    fleet: FakeFleet,
    *,
    max_seconds: float = 2 * 24 * 3600.0,
    check_pass: Callable[[Rollout, dict[str, Execution], Sequence[Target], float], None]
    | None = None,
) -> Trace:
    rollout = start(Rollout(definition), 0.0)
    executions: dict[str, Execution] = {}
    actions: list[tuple[float, Action]] = []
    now, passes, resumes = 0.0, 0, 0
    while now <= max_seconds:
        for device_id, report in fleet.step(now):
            if device_id in executions:
                executions[device_id] = apply_report(executions[device_id], NEW, report, now)
        targets = targets_at(now)
        if check_pass is not None:
            check_pass(rollout, executions, targets, now)
        result = plan(rollout, list(executions.values()), targets, now)
        passes += 1
        rollout = result.rollout
        if rollout.state.status == RolloutStatus.PAUSED and rollout.state.threshold_missed:
            rollout = resume(rollout, now)  # the operator looks and lets the stage pass
            resumes += 1
        for execution in result.changed:
            executions[execution.device_id] = execution
        assert len(executions) == len(result.executions)
        for action in result.actions:
            actions.append((now, action))
            fleet.deliver(action, now)
        if finished(rollout, executions):
            break
        now += TICK
    return Trace(rollout, executions, actions, fleet, passes, resumes)


def targets_for(device_ids: Sequence[str], sites: int) -> list[Target]:
    return [
        Target(d, (("site", f"site-{i % sites}"),), firmware=OLD) for i, d in enumerate(device_ids)
    ]


def notifies(trace: Trace) -> list[tuple[float, Notify]]:
    return [(t, a) for t, a in trace.actions if isinstance(a, Notify)]


# --- strategies ----------------------------------------------------------------------------------

STAGE_PLANS = (
    (Stage(percent=100),),
    (Stage(percent=10), Stage(percent=100)),
    (Stage(percent=1), Stage(percent=10), Stage(percent=50), Stage(percent=100)),
    (Stage(count=3, soak_seconds=120), Stage(percent=50), Stage(percent=100)),
    (Stage(percent=20, success_threshold_percent=50), Stage(percent=100)),
)


@st.composite
def rollouts(draw: st.DrawFn) -> tuple[RolloutDefinition, dict[str, str], int]:
    count = draw(st.integers(min_value=0, max_value=80))
    sites = draw(st.integers(min_value=1, max_value=6))
    behaviors = {
        f"dev-{i:03d}": draw(
            st.sampled_from((HEALTHY, HEALTHY, HEALTHY, HEALTHY, FAILING, REJECTING, SILENT, FLAKY))
        )
        for i in range(count)
    }
    rate = draw(
        st.one_of(
            st.just(Rate()),
            st.builds(Rate, max_per_minute=st.integers(min_value=1, max_value=40)),
            st.builds(
                lambda base, factor, step: Rate(
                    ramp=ExponentialRamp(base, factor, notified_step=step, max_per_minute=60)
                ),
                st.integers(min_value=1, max_value=10),
                st.floats(min_value=1.1, max_value=5),
                st.integers(min_value=1, max_value=20),
            ),
        )
    )
    stages = draw(st.sampled_from(STAGE_PLANS))
    if draw(st.booleans()):
        threshold = FailureThreshold(percent=draw(st.sampled_from((20.0, 50.0))), min_finished=3)
        stages = (replace(stages[0], failure_threshold=threshold), *stages[1:])
    definition = rollout_builders.definition(
        rollout_id=draw(st.sampled_from(("r-1", "night-42"))),
        stages=stages,
        rate=rate,
        retries=RetryPolicy(
            failed=draw(st.integers(min_value=0, max_value=3)),
            timed_out=draw(st.integers(min_value=0, max_value=2)),
            backoff_seconds=draw(st.sampled_from((0.0, 30.0, 120.0))),
        ),
        rollback_on_abort=draw(st.booleans()),
    )
    return definition, behaviors, sites


def check_stage_size_and_rate(
    rollout: Rollout, executions: dict[str, Execution], targets: Sequence[Target], now: float
) -> None:
    """Before each pass: what the previous passes did stays within the stage and the rate."""
    definition = rollout.definition
    size = definition.stage_sizes(len(targets))[rollout.state.stage_index]
    assert len(executions) <= size
    if rollout.state.status == RolloutStatus.RUNNING:
        assert rollout.state.stage_index < len(definition.stages)


# --- properties ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(rollouts())
def test_every_rollout_ends_within_its_limits(
    case: tuple[RolloutDefinition, dict[str, str], int],
) -> None:
    definition, behaviors, sites = case
    targets = targets_for(sorted(behaviors), sites)
    limits: list[tuple[float, int | None, int]] = []  # (now, limit, recent) before each pass

    def before_pass(
        rollout: Rollout, executions: dict[str, Execution], ts: Sequence[Target], now: float
    ) -> None:
        check_stage_size_and_rate(rollout, executions, ts, now)
        notified = sum(len(e.notified_at) for e in executions.values())
        succeeded = sum(e.status == ExecutionStatus.SUCCEEDED for e in executions.values())
        recent = sum(1 for e in executions.values() for t in e.notified_at if now - 60 < t <= now)
        limits.append((now, definition.rate.per_minute(notified, succeeded), recent))

    fleet = fake_fleet(behaviors)
    trace = simulate(definition, lambda now: targets, fleet, check_pass=before_pass)
    state = trace.rollout.state

    # it ends: completed, or aborted with nothing left in flight
    assert state.status in (RolloutStatus.COMPLETED, RolloutStatus.ABORTED)
    policy = definition.retries
    retrying = state.status != RolloutStatus.ABORTED
    assert all(is_settled(e, policy, retrying=retrying) for e in trace.executions.values())
    if state.status == RolloutStatus.COMPLETED:
        assert set(trace.executions) == set(behaviors)  # every target has a final state

    # the rate: the notifications of each pass fit what the minute before it left
    per_pass = Counter(t for t, _ in notifies(trace))
    for now, limit, recent in limits:
        if limit is not None:
            assert per_pass[now] + recent <= limit
    # a device is notified once per attempt, and attempts are bounded by the retries
    seen = Counter((a.device_id, a.attempt) for _, a in notifies(trace))
    assert max(seen.values(), default=1) == 1
    most = 1 + max(policy.failed, policy.timed_out)
    assert all(attempt <= most for _, attempt in seen)
    assert {d for d, _ in seen} == set(trace.executions)

    # after an abort nobody new is notified
    aborted_at = [t for t, a in trace.actions if isinstance(a, Abort)]
    if aborted_at:
        assert all(t < aborted_at[0] for t, _ in notifies(trace))
        assert state.status == RolloutStatus.ABORTED

    # outcomes match what the devices do
    for device_id, execution in trace.executions.items():
        behavior = behaviors[device_id]
        rolled_back = execution.status == ExecutionStatus.ROLLED_BACK
        if state.status == RolloutStatus.COMPLETED:
            expected = {
                HEALTHY: ExecutionStatus.SUCCEEDED,
                FAILING: ExecutionStatus.FAILED,
                REJECTING: ExecutionStatus.REJECTED,
                SILENT: ExecutionStatus.TIMED_OUT,
                FLAKY: (ExecutionStatus.SUCCEEDED if policy.failed else ExecutionStatus.FAILED),
            }[behavior]
            assert execution.status == expected
            if behavior == SILENT:
                assert execution.attempt == 1 + policy.timed_out
            if behavior == FAILING:
                assert execution.attempt == 1 + policy.failed
        if rolled_back:
            assert definition.rollback_on_abort
            assert fleet.devices[device_id].running == OLD
        if execution.status in (ExecutionStatus.FAILED, ExecutionStatus.TIMED_OUT):
            assert execution.withdrawn or execution.rollback_requested_at is not None


@settings(max_examples=30, deadline=None)
@given(
    st.integers(min_value=1, max_value=60),
    st.integers(min_value=1, max_value=40),
    st.integers(min_value=1, max_value=20),
    st.integers(min_value=0, max_value=40),
)
def test_devices_joining_mid_rollout_join_under_the_rate(
    initial: int, joining: int, per_minute: int, join_after_ticks: int
) -> None:
    ids = [f"dev-{i:03d}" for i in range(initial + joining)]
    all_targets = targets_for(ids, 3)
    join_at = join_after_ticks * TICK

    def targets_at(now: float) -> Sequence[Target]:
        return all_targets if now >= join_at else all_targets[:initial]

    definition = rollout_builders.definition(
        rollout_id="r-join",
        selector=TargetSelector(fleet_filter='tags.model == "x1"'),
        stages=(Stage(percent=100),),
        rate=Rate(max_per_minute=per_minute),
    )
    trace = simulate(definition, targets_at, fake_fleet(dict.fromkeys(ids, HEALTHY)))
    times = [t for t, _ in notifies(trace)]
    for t in times:  # every sliding minute, not just each pass
        assert sum(1 for u in times if t - 60 < u <= t) <= per_minute
    late = {t.device_id for t in all_targets[initial:]}
    assert all(t >= join_at for t, a in notifies(trace) if a.device_id in late)
    assert trace.rollout.state.status == RolloutStatus.COMPLETED
    completed_at = trace.rollout.state.finished_at
    assert completed_at is not None
    # Devices that start matching while the rollout runs join it; a completed rollout is over.
    joined = ids if join_at <= completed_at else ids[:initial]
    assert {d: e.status for d, e in trace.executions.items()} == dict.fromkeys(
        joined, ExecutionStatus.SUCCEEDED
    )


@settings(max_examples=30, deadline=None)
@given(
    st.integers(min_value=100, max_value=300),
    st.integers(min_value=1, max_value=8),
    st.sampled_from(("r-1", "canary-7", "night-42")),
)
def test_a_bad_canary_aborts_and_rolls_back_only_the_canary(
    count: int, sites: int, rollout_id: str
) -> None:
    ids = [f"dev-{i:04d}" for i in range(count)]
    targets = targets_for(ids, sites)
    definition = rollout_builders.definition(
        rollout_id=rollout_id,
        stages=(
            Stage(percent=10, failure_threshold=FailureThreshold(percent=20, min_finished=5)),
            Stage(percent=50),
            Stage(percent=100),
        ),
        rate=Rate(max_per_minute=1000),
        rollback_on_abort=True,
    )
    # 30% of installs fail, spread evenly over the order the rollout takes devices in
    order = [t.device_id for t in stratified_order(definition, targets)]
    behaviors = {d: FAILING if i % 10 < 3 else HEALTHY for i, d in enumerate(order)}
    canary = set(order[: definition.stage_sizes(count)[0]])
    fleet = fake_fleet(behaviors)
    trace = simulate(definition, lambda now: targets, fleet)

    state = trace.rollout.state
    assert (state.status, state.stage_index) == (RolloutStatus.ABORTED, 0)
    assert state.reason.startswith("stage 0:")
    assert set(trace.executions) == canary
    assert {a.device_id for _, a in fleet.received} <= canary  # nobody else was touched
    # Failing devices are FAILED, unless the abort called their install off before it failed;
    # healthy ones took the update (or were about to) and were sent back, and confirmed it.
    back = {ExecutionStatus.ROLLED_BACK, ExecutionStatus.CANCELED}
    for device_id in canary:
        status = trace.executions[device_id].status
        failing = behaviors[device_id] == FAILING
        assert status in (back | {ExecutionStatus.FAILED} if failing else back)
    failed = [d for d, e in trace.executions.items() if e.status == ExecutionStatus.FAILED]
    assert failed and all(behaviors[d] == FAILING for d in failed)
    rolled_back = [d for d, e in trace.executions.items() if e.rollback_requested_at is not None]
    assert rolled_back  # some canary devices had succeeded before the threshold tripped
    assert all(device.running == OLD for device in fleet.devices.values())
    assert not any(e.status in ACTIVE for e in trace.executions.values())
