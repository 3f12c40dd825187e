"""`ota_client.rollout_spec`: `otactl rollouts create` flags and YAML files -> `RolloutSpec`."""

from __future__ import annotations

from typing import Any

import pytest

from ota_client.errors import SpecError
from ota_client.models import FailureThreshold, RolloutSpec, RolloutStage
from ota_client.rollout_spec import from_flags, from_mapping, load_yaml

FULL_FILE = """
id: fw-2
artifact: art-1
tags: {ring: beta, site: berlin, rack: 7}
stages:
  - size: 1%
  - size: 50
    failure_threshold: 3
    soak: 30
  - size: 100%
    success_threshold: 95%
    approval: true
failure_threshold: 20%
min_finished: 5
soak: 600
max_per_minute: 100
timeout: 1800
retries_failed: 1
retries_timed_out: 2
retry_backoff: 30
rollback_on_abort: true
stratify_by: rack
"""


def flags(**given: Any) -> RolloutSpec:
    base: dict[str, Any] = {
        "rollout_id": "r1",
        "artifact": "art-1",
        "devices": "d1,d2",
        "stages": ["100%"],
    }
    return from_flags(**{**base, **given})


def test_a_full_file_maps_every_field() -> None:
    spec = from_mapping(load_yaml(FULL_FILE), "2.0.0", "https://dl/v1/artifacts/art-1")
    assert (spec.rollout_id, spec.artifact_id) == ("fw-2", "art-1")
    assert (spec.firmware_version, spec.firmware_url) == ("2.0.0", "https://dl/v1/artifacts/art-1")
    assert spec.tags == {"ring": "beta", "site": "berlin", "rack": "7"}
    assert spec.device_ids == [] and spec.fleet_filter is None
    top = FailureThreshold(percent=20.0, min_finished=5)
    assert spec.stages == [
        RolloutStage(percent=1.0, failure_threshold=top, soak_seconds=600),
        # A stage's own value wins over the top-level default.
        RolloutStage(count=50, failure_threshold=FailureThreshold(count=3, min_finished=5),
                     soak_seconds=30),
        RolloutStage(percent=100.0, success_threshold_percent=95.0, failure_threshold=top,
                     soak_seconds=600, approval_required=True),
    ]  # fmt: skip
    assert spec.max_per_minute == 100
    assert spec.timeout_seconds == 1800.0
    assert (spec.retries_failed, spec.retries_timed_out, spec.retry_backoff_seconds) == (1, 2, 30)
    assert spec.rollback_on_abort is True
    assert spec.stratify_by == "rack"


def test_the_proto_round_trip_keeps_every_field() -> None:
    spec = from_mapping(load_yaml(FULL_FILE), "2.0.0", "https://dl/a")
    assert RolloutSpec.from_proto(spec.to_proto()) == spec
    minimal = flags()
    assert RolloutSpec.from_proto(minimal.to_proto()) == minimal
    assert not minimal.to_proto().HasField("timeout_seconds")  # left to the service's default


def test_flags_map_onto_the_same_fields() -> None:
    spec = flags(
        devices=None,
        tags=["ring=beta", "site=berlin"],
        stages=["10%", "50", "100%"],
        failure_threshold="20%",
        min_finished=4,
        success_threshold="90",
        soak=60.0,
        approval=True,
        max_per_minute=30,
        timeout=120.0,
        retries_failed=1,
        retries_timed_out=0,
        rollback_on_abort=True,
    )
    threshold = FailureThreshold(percent=20.0, min_finished=4)
    common: dict[str, Any] = {
        "failure_threshold": threshold,
        "success_threshold_percent": 90.0,
        "soak_seconds": 60.0,
        "approval_required": True,
    }
    assert spec.stages == [
        # `--approval` gates every stage but the first, which `start` starts.
        RolloutStage(percent=10.0, **{**common, "approval_required": False}),
        RolloutStage(count=50, **common),
        RolloutStage(percent=100.0, **common),
    ]
    assert spec.tags == {"ring": "beta", "site": "berlin"}
    assert (spec.max_per_minute, spec.timeout_seconds) == (30, 120.0)
    assert (spec.retries_failed, spec.retries_timed_out, spec.rollback_on_abort) == (1, 0, True)
    assert flags(failure_threshold="3").stages[0].failure_threshold == FailureThreshold(count=3)


def test_selectors() -> None:
    assert flags(devices=" d1, d2,,d1 ").device_ids == ["d1", "d2"]
    spec = flags(devices=None, fleet_filter='tags.ring == "beta"')
    assert spec.fleet_filter == 'tags.ring == "beta"'
    as_list = from_mapping({"id": "r", "artifact": "a", "devices": ["x"], "stages": ["100%"]})
    assert as_list.device_ids == ["x"]
    assert as_list.stages == [RolloutStage(percent=100.0)]  # a bare size is a stage


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"rollout_id": None}, "--id is required"),
        ({"artifact": ""}, "--artifact is required"),
        ({"stages": []}, "--stage is required"),
        ({"devices": None}, "exactly one of --devices, --tag or --filter"),
        ({"tags": ["a=b"]}, "(given: --devices, --tag)"),
        ({"tags": ["novalue"]}, "--tag 'novalue' is not key=value"),
        ({"stages": ["ten"]}, "'ten' is not a whole number"),
        ({"stages": ["0"]}, "must be at least 1"),
        ({"stages": ["0%"]}, "above 0 up to 100"),
        ({"stages": ["150%"]}, "above 0 up to 100"),
        ({"failure_threshold": "x%"}, "--failure-threshold: 'x%' is not a percent"),
        ({"min_finished": 3}, "--min-finished needs a failure threshold"),
        ({"success_threshold": "101%"}, "--success-threshold"),
        ({"soak": -1.0}, "--soak: must be at least 0 seconds"),
        ({"timeout": 0.0}, "--timeout: must be above 0 seconds"),
        ({"max_per_minute": 0}, "--max-per-minute: must be at least 1"),
        ({"retries_failed": -1}, "--retries-failed: must be at least 0"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(given: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as caught:
        flags(**given)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id: [unclosed", "line 1"),
        ("- just a list", "must hold a mapping"),
        ("", "must hold a mapping"),
        ("id: r\nartifact: a\ndevices: [d]\nstages: [100%]\ncolour: red", "unknown key(s) colour"),
        ("id: r\nartifact: a\ndevices: [d]\nstages: 100%", "stages must be a list"),
        ("id: r\nartifact: a\ndevices: [d]\nstages: [{soak: 5}]", "stages[0].size is required"),
        (
            "id: r\nartifact: a\ndevices: [d]\nstages: [{size: 100%, wait: 5}]",
            "unknown key(s) wait",
        ),
        ("id: r\nartifact: a\ndevices: [d]\nstages: [{size: 2.5}]", "write 2.5% for a percent"),
        ("id: r\nartifact: a\ndevices: [d]\nstages: [{size: 100%, soak: soon}]", "stages[0].soak"),
        ("id: r\nartifact: a\ndevices: [d]\nstages: [100%]\napproval: 'yes'", "true or false"),
        ("id: r\nartifact: a\ndevices: [d]\nstages: [100%]\nrollback_on_abort: 1", "true or false"),
        ("id: r\nartifact: a\ntags: [a, b]\nstages: [100%]", "tags: must be a mapping"),
        ("id: r\nartifact: a\ntags: {a: [1]}\nstages: [100%]", "tags.a: must be a string"),
        ("id: 7\nartifact: a\ndevices: [d]\nstages: [100%]", "id: must be a non-empty string"),
    ],
)
def test_bad_files_are_refused_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        from_mapping(load_yaml(text, "r.yaml"))
    assert message in str(caught.value)
