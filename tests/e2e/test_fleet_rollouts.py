"""Rollouts end to end: the stack `make up` starts (PostgreSQL, Mosquitto, shadow, gateway,
artifacts + download plane, rollout service) and 200 simulated devices in one FleetSimulator,
each the real agent. Operators' calls go through the gRPC APIs with the operator's token.

Three groups of devices (tag `group`), one rollout each, so no device is in two rollouts:
a (100 healthy devices, 1% -> 10% -> 50% -> 100%), b (60 devices, 30% fail the install: the
canary aborts the rollout) and c (40 devices, a quarter silent: they time out after one
retry). Devices carry a `site` tag so canaries are spread. No timing assertions: each test
waits, within a generous bound, for the rollout's end state.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from device_agent.domain import Phase, RetryPolicy
from device_agent.simulator import DeviceOutcome, Faults, FleetSettings, FleetSimulator, summary
from protos.artifacts.v1 import artifacts_pb2 as apb
from protos.rollout.v1 import rollout_pb2 as rpb
from services.rollout.domain import Target
from services.rollout.planner import stratified_order
from services.rollout.servicer import definition_from_proto
from tests.e2e.conftest import RolloutStack, settled

FACTORY = "1.0.0"
IMAGE = os.urandom(64 * 1024)
WAIT_SECONDS = 180.0
GROUPS = {"a": 100, "b": 60, "c": 40}
SITES = 4
FAIL_INSTALL_SEED = 3  # puts 2 of the 6 canary devices of rollout "e2e-b" among the failing
SILENT_SEED = 3


@dataclass
class Fleet:
    stack: RolloutStack
    simulator: FleetSimulator
    groups: dict[str, list[str]]
    tags: dict[str, dict[str, str]]
    silent: tuple[rpb.RolloutSpec, apb.Artifact] | None = None

    def summary(self, group: str) -> str:
        outcomes = self.simulator.outcomes()
        return f"devices of group {group}: {summary({d: outcomes[d] for d in self.groups[group]})}"


@pytest.fixture(scope="module")
def fleet(rollout_stack: RolloutStack) -> Iterator[Fleet]:
    stack = rollout_stack
    groups: dict[str, list[str]] = {}
    tags: dict[str, dict[str, str]] = {}
    for group, size in GROUPS.items():
        groups[group] = [f"fleet-{group}-{i:03d}" for i in range(size)]
        for i, device_id in enumerate(groups[group]):
            tags[device_id] = {"group": group, "site": f"site-{i % SITES}"}
    passwords = stack.register(tags)
    faults_of: dict[str, str | None] = {
        **Faults(fail_install=0.3, seed=FAIL_INSTALL_SEED).assign(groups["b"]),
        **Faults(silent=0.25, seed=SILENT_SEED).assign(groups["c"]),
    }
    settings = FleetSettings(
        mqtt_host=stack.mqtt_host,
        mqtt_port=stack.mqtt_port,
        download_base_url=stack.download_base_url,
        trusted_keys={stack.signer.key_id: stack.signer.public_key_raw},
        work_dir=stack.root / "sim",
        factory_version=FACTORY,
        retry=RetryPolicy(0.2, 5.0, 12),
    )

    async def build() -> FleetSimulator:
        return FleetSimulator(settings, passwords.items(), faults_of=faults_of)

    simulator = stack.loop.run(build())
    stack.loop.run(simulator.start(), timeout=WAIT_SECONDS)
    try:
        fleet = Fleet(stack, simulator, groups, tags)
        # The slowest scenario runs alongside the others (groups never overlap), its test
        # waits for it.
        fleet.silent = start_silent_rollout(fleet)
        yield fleet
    finally:
        stack.loop.run(simulator.stop(), timeout=WAIT_SECONDS)


def spec(
    fleet: Fleet,
    group: str,
    artifact: apb.Artifact,
    stages: list[rpb.Stage],
    **fields: Any,
) -> rpb.RolloutSpec:
    return rpb.RolloutSpec(
        rollout_id=f"e2e-{group}",  # fixed: the canary is a stable choice (ADR 31)
        artifact_id=artifact.artifact_id,
        firmware=rpb.Firmware(version=artifact.version, url=artifact.download_url),
        selector=rpb.TargetSelector(tags={"group": group}),
        stages=stages,
        **fields,
    )


def start(fleet: Fleet, rollout: rpb.RolloutSpec) -> None:
    rollouts = fleet.stack.rollouts
    created = rollouts.CreateRollout(rpb.CreateRolloutRequest(spec=rollout), timeout=60)
    assert created.status == rpb.CREATED
    started = rollouts.StartRollout(
        rpb.StartRolloutRequest(rollout_id=rollout.rollout_id), timeout=60
    )
    assert started.status == rpb.RUNNING


def run(fleet: Fleet, rollout: rpb.RolloutSpec, group: str) -> rpb.Rollout:
    """Create and start `rollout`, then wait until it settles."""
    start(fleet, rollout)
    return fleet.stack.wait_rollout(
        rollout.rollout_id, settled, WAIT_SECONDS, lambda: fleet.summary(group)
    )


def firmware_of(document: dict[str, Any], section: str) -> dict[str, Any] | None:
    block = document.get("state", {}).get(section, {}).get("firmware")
    return block if isinstance(block, dict) else None


def target_version(outcome: DeviceOutcome) -> str | None:
    return outcome.target.version if outcome.target is not None else None


def desired_written_at(document: dict[str, Any]) -> int | None:
    """When the desired firmware version was last written (the shadow's leaf timestamp)."""
    meta = document.get("metadata", {}).get("desired", {}).get("firmware", {})
    stamp = meta.get("version", {}).get("timestamp") if isinstance(meta, dict) else None
    return int(stamp) if isinstance(stamp, int | float) else None


def test_a_healthy_fleet_is_updated_stage_by_stage(fleet: Fleet) -> None:
    stack = fleet.stack
    ids = fleet.groups["a"]
    artifact = stack.upload(IMAGE, "2.0.0")
    stages = [rpb.Stage(percent=p) for p in (1, 10, 50, 100)]
    rollout = run(fleet, spec(fleet, "a", artifact, stages, timeout_seconds=120), "a")

    assert rollout.status == rpb.COMPLETED, rollout.reason
    assert rollout.stage_index == 3
    counts = {k: v for k, v in rollout.progress.by_status.items() if v}
    assert counts == {"SUCCEEDED": len(ids)}
    # Stage by stage: 1, 10, 50, 100 devices by the end of each (cumulative, ADR 30).
    per_stage = [s.by_status.get("SUCCEEDED", 0) for s in rollout.progress.stages]
    assert per_stage == [1, 9, 40, 50]
    outcomes = fleet.simulator.outcomes()
    assert {(outcomes[d].running.version, outcomes[d].phase) for d in ids} == {
        ("2.0.0", Phase.SUCCEEDED)
    }
    documents = stack.documents(ids)
    reported = {d: firmware_of(documents[d], "reported") or {} for d in ids}
    assert {(r.get("version"), r.get("url")) for r in reported.values()} == {
        ("2.0.0", artifact.download_url)
    }


@dataclass
class AbortedCanary:
    rollout: rpb.Rollout
    before: dict[str, Any]  # the desired firmware of the group before the rollout
    canary: set[str]
    failing: set[str]  # canary devices whose install fails
    documents_before: dict[str, dict[str, Any]]  # shadows before the rollout started
    documents: dict[str, dict[str, Any]]  # shadows once the rollout settled
    outcomes: dict[str, DeviceOutcome]


@pytest.fixture(scope="module")
def aborted_canary(fleet: Fleet) -> AbortedCanary:
    """Group b runs 1.1.0 (from a url: a firmware a rollback can return to; the devices that
    fail every install stay on the factory image), then a rollout of 2.0.0-b whose 10% canary
    holds failing devices, with a failure threshold and rollback_on_abort, runs until settled."""
    stack = fleet.stack
    ids = fleet.groups["b"]
    faults = fleet.simulator.faults()
    base = stack.upload(IMAGE, "1.1.0")
    before = {"version": "1.1.0", "url": base.download_url}
    stack.set_desired({d: {"firmware": before} for d in ids})
    stack.loop.run(
        fleet.simulator.wait_until(
            lambda o: all(
                target_version(o[d]) == "1.1.0" and o[d].phase in (Phase.SUCCEEDED, Phase.FAILED)
                for d in ids
            ),
            WAIT_SECONDS,
        ),
        timeout=WAIT_SECONDS + 10,
    )
    # The rollout takes a device's rollback target from its *reported* state (ADR 34), so wait
    # until the shadows hold the final reports too: the simulator knows a device is done a
    # little before its report lands (later still when the report is re-sent after a 503).
    # Started earlier, a device the shadow still shows on the factory image has no rollback
    # target, and the abort leaves it on 2.0.0-b.
    wait_reported(fleet, ids)

    artifact = stack.upload(IMAGE, "2.0.0-b")
    # The threshold judges the whole canary (min_finished = its 6 devices): with a smaller
    # min_finished the abort point depends on the order the reports land in (2 of 5, or 1 of 5
    # if four successes come first), and the 6th device is caught mid-update.
    stages = [
        rpb.Stage(percent=10, failure_threshold=rpb.FailureThreshold(percent=20, min_finished=6)),
        rpb.Stage(percent=100),
    ]
    rollout_spec = spec(fleet, "b", artifact, stages, timeout_seconds=60, rollback_on_abort=True)
    # The canary is the planner's (stable, seeded by the rollout id) stratified choice; with
    # 30% of the group failing it must hold enough failures to cross the threshold.
    definition = definition_from_proto(rollout_spec)
    targets = [Target(d, tuple(sorted(fleet.tags[d].items()))) for d in ids]
    canary_size = definition.stage_sizes(len(targets))[0]
    canary = {t.device_id for t in stratified_order(definition, targets)[:canary_size]}
    assert canary_size == 6
    failing = {d for d in canary if faults[d] == "fail_install"}
    assert len(failing) == 2, "precondition: the seeded draw puts 2 failures in the canary"

    documents_before = stack.documents(ids)
    rollout = run(fleet, rollout_spec, "b")
    return AbortedCanary(
        rollout,
        before,
        canary,
        failing,
        documents_before,
        stack.documents(ids),
        fleet.simulator.outcomes(),
    )


def wait_reported(fleet: Fleet, ids: list[str]) -> None:
    """Until every device's shadow reports, as settled, the firmware the simulator runs."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        outcomes = fleet.simulator.outcomes()
        documents = fleet.stack.documents(ids)
        lagging = {}
        for device_id in ids:
            reported = firmware_of(documents[device_id], "reported") or {}
            running = outcomes[device_id].running
            if (reported.get("version"), reported.get("url")) != (
                running.version,
                running.url,
            ) or reported.get("state") not in ("succeeded", "failed"):
                lagging[device_id] = reported
        if not lagging:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"shadows never caught up with the devices: {lagging}")
        time.sleep(0.2)


def test_a_failing_canary_aborts_and_nobody_else_is_touched(
    fleet: Fleet, aborted_canary: AbortedCanary
) -> None:
    ids = fleet.groups["b"]
    rollout = aborted_canary.rollout
    canary = aborted_canary.canary
    assert rollout.status == rpb.ABORTED
    assert rollout.stage_index == 0
    assert "2 of 6 finished devices failed" in rollout.reason, rollout.reason
    counts = {k: v for k, v in rollout.progress.by_status.items() if v}
    assert sum(counts.values()) == len(canary)
    assert counts.get("FAILED", 0) == len(aborted_canary.failing)
    # Only the canary's desired state was written by the rollout (its value, or the shadow's
    # own timestamp of it: a rollback to the firmware of before writes the same value again);
    # everyone else still has the desired firmware of before, untouched since.
    before, after = aborted_canary.documents_before, aborted_canary.documents
    assert all(firmware_of(before[d], "desired") == aborted_canary.before for d in ids)
    touched = {
        d
        for d in ids
        if firmware_of(after[d], "desired") != aborted_canary.before
        or desired_written_at(after[d]) != desired_written_at(before[d])
    }
    assert touched <= canary, {
        d: (firmware_of(after[d], "desired"), desired_written_at(after[d]))
        for d in sorted(touched - canary)[:3]
    }
    assert aborted_canary.failing <= touched  # their failed firmware was withdrawn
    outcomes = aborted_canary.outcomes
    assert not any(
        "2.0.0-b" in (outcomes[d].running.version, target_version(outcomes[d]))
        for d in set(ids) - canary
    )
    # The failed canary devices never left the factory image.
    for device_id in aborted_canary.failing:
        reported = firmware_of(after[device_id], "reported") or {}
        assert reported.get("version") == FACTORY, (device_id, reported)
        assert firmware_of(after[device_id], "desired") is None  # withdrawn


def test_the_canary_devices_that_took_the_update_are_rolled_back(
    aborted_canary: AbortedCanary,
) -> None:
    took = aborted_canary.canary - aborted_canary.failing
    reported = {d: firmware_of(aborted_canary.documents[d], "reported") or {} for d in took}
    wrong = {d: r for d, r in reported.items() if r.get("version") != "1.1.0"}
    assert not wrong, f"not back on 1.1.0: {wrong}"
    counts = {k: v for k, v in aborted_canary.rollout.progress.by_status.items() if v}
    assert counts.get("ROLLED_BACK", 0) == len(took), counts


def start_silent_rollout(fleet: Fleet) -> tuple[rpb.RolloutSpec, apb.Artifact]:
    """Group c's rollout: a quarter of its devices are silent, so they take two timeouts (60 s
    is the shortest the API takes) and one retry to settle."""
    artifact = fleet.stack.upload(IMAGE, "2.0.0-c")
    rollout = spec(
        fleet,
        "c",
        artifact,
        [rpb.Stage(percent=100, success_threshold_percent=50)],
        timeout_seconds=60,
        retries=rpb.RetryPolicy(timed_out=1, backoff_seconds=1),
    )
    start(fleet, rollout)
    return rollout, artifact


def test_silent_devices_time_out_after_their_retry(fleet: Fleet) -> None:
    ids = fleet.groups["c"]
    faults = fleet.simulator.faults()
    silent = {d for d in ids if faults[d] == "silent"}
    assert len(silent) == 10
    assert fleet.silent is not None
    rollout_spec, artifact = fleet.silent
    rollout = fleet.stack.wait_rollout(
        rollout_spec.rollout_id, settled, WAIT_SECONDS, lambda: fleet.summary("c")
    )

    assert rollout.status == rpb.COMPLETED, rollout.reason
    counts = {k: v for k, v in rollout.progress.by_status.items() if v}
    assert counts == {"SUCCEEDED": len(ids) - len(silent), "TIMED_OUT": len(silent)}
    outcomes = fleet.simulator.outcomes()
    for device_id in set(ids) - silent:
        assert outcomes[device_id].running.version == "2.0.0-c", device_id
    # Each silent device was sent the update exactly twice: attempt 1, then the one retry
    # (`?attempt=2` on the url, ADR 33), and never a third time.
    for device_id in silent:
        assert outcomes[device_id].running.version == FACTORY
        ignored = fleet.simulator.devices[device_id].ignored or []
        urls = [str(f.get("url")) for f in ignored if f.get("version") == "2.0.0-c"]
        assert sorted(set(urls)) == [artifact.download_url, f"{artifact.download_url}?attempt=2"], (
            device_id,
            ignored,
        )
