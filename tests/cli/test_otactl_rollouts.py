"""`otactl rollouts` as a subprocess against the real stack (`python -m services.devstack up`),
whose rollout service runs its own reconcile loop every second. Devices are simulated by
writing their reported firmware through `otactl shadow update`, as the gateway would for an
agent. Waits are for conditions, with generous bounds; nothing asserts on timing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cli.conftest import Result, Stack, ok, otactl

WAIT = 120.0  # seconds: a bound for a broken test, not a performance expectation


@pytest.fixture(scope="module")
def firmware(fast_stack: Stack) -> dict[str, Any]:
    """An uploaded artifact: what every rollout here sends."""
    build = fast_stack.root / "app-2.0.0.img"
    build.write_bytes(b"firmware 2.0.0 " * 1000)
    uploaded: dict[str, Any] = ok(
        fast_stack.root, "artifacts", "upload", str(build),
        "--name", "app", "--version", "2.0.0", "--hardware", "rpi4", "--json",
    ).json()  # fmt: skip
    return uploaded


def register(stack: Stack, *device_ids: str, tags: tuple[str, ...] = ()) -> None:
    for device_id in device_ids:
        tag_args = [a for t in tags for a in ("--tag", t)]
        ok(
            stack.root, "devices", "register", device_id, *tag_args,
            "--agent-config", f"agents/{device_id}.json",
        )  # fmt: skip
        report(stack, device_id, {"version": "1.0.0", "url": "https://old.example/fw-1"})


def report(stack: Stack, device_id: str, firmware: dict[str, Any]) -> None:
    reported = json.dumps({"firmware": firmware})
    ok(stack.root, "shadow", "update", device_id, "--reported", reported)


def show(stack: Stack, rollout_id: str) -> dict[str, Any]:
    shown: dict[str, Any] = ok(stack.root, "rollouts", "show", rollout_id, "--json").json()
    return shown


def wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"{what}: not reached in {WAIT} s"
        time.sleep(0.2)


def desired_version(stack: Stack, device_id: str) -> str | None:
    document = ok(stack.root, "shadow", "get", device_id, "--json").json()
    firmware = (document["state"].get("desired") or {}).get("firmware") or {}
    version: str | None = firmware.get("version")
    return version


def watch_lines(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


# ---- create, list, show, pause, resume, approve ------------------------------------------


def test_create_from_flags_and_a_file_then_start_list_show_pause_resume_approve(
    fast_stack: Stack, firmware: dict[str, Any]
) -> None:
    s = fast_stack
    register(s, "ro-flags-1", "ro-flags-2")
    register(s, "ro-file-1", "ro-file-2", "ro-file-3", tags=("ring=file",))

    created = ok(
        s.root, "rollouts", "create", "--id", "ro-flags", "--artifact", firmware["artifact_id"],
        "--devices", "ro-flags-1,ro-flags-2", "--stage", "50%", "--stage", "100%",
        "--failure-threshold", "50%", "--min-finished", "2", "--success-threshold", "90%",
        "--soak", "0", "--approval", "--max-per-minute", "100", "--timeout", "600",
        "--retries-failed", "1", "--retries-timed-out", "2", "--rollback-on-abort", "--json",
    ).json()  # fmt: skip
    spec = created["spec"]
    assert created["status"] == "CREATED"
    # The firmware is the artifact's: its version and its download url.
    assert (spec["firmware_version"], spec["firmware_url"]) == (
        firmware["version"],
        firmware["download_url"],
    )
    assert spec["device_ids"] == ["ro-flags-1", "ro-flags-2"]
    assert [(st["percent"], st["approval_required"]) for st in spec["stages"]] == [
        (50.0, False),
        (100.0, True),
    ]
    assert spec["stages"][0]["failure_threshold"] == {
        "count": None,
        "percent": 50.0,
        "min_finished": 2,
    }
    assert spec["stages"][0]["success_threshold_percent"] == 90.0
    assert (spec["max_per_minute"], spec["timeout_seconds"]) == (100, 600.0)
    assert (spec["retries_failed"], spec["retries_timed_out"]) == (1, 2)
    assert spec["rollback_on_abort"] is True

    rollout_file = s.root / "ro-file.yaml"
    rollout_file.write_text(
        f"id: ro-file\nartifact: {firmware['artifact_id']}\ntags: {{ring: file}}\n"
        "stages:\n  - size: 1\n  - size: 100%\n    soak: 5\nretries_failed: 1\n"
    )
    from_file = ok(s.root, "rollouts", "create", "--file", str(rollout_file), "--json").json()
    assert from_file["spec"]["tags"] == {"ring": "file"}
    assert [(st["count"], st["percent"]) for st in from_file["spec"]["stages"]] == [
        (1, None),
        (None, 100.0),
    ]
    assert "ro-file" in ok(s.root, "rollouts", "show", "ro-file").stdout

    started = ok(s.root, "rollouts", "start", "ro-flags", "--json").json()
    assert started["status"] == "RUNNING"
    listed = {r["spec"]["rollout_id"]: r for r in ok(s.root, "rollouts", "list", "--json").json()}
    assert (listed["ro-flags"]["status"], listed["ro-file"]["status"]) == ("RUNNING", "CREATED")
    running = ok(s.root, "rollouts", "list", "--status", "RUNNING", "--json").json()
    assert "ro-flags" in {r["spec"]["rollout_id"] for r in running}
    assert "ro-file" not in {r["spec"]["rollout_id"] for r in running}
    assert "ro-flags" in ok(s.root, "rollouts", "list").stdout

    # The service's own loop notifies the first stage: one of the two devices.
    wait_for("the canary notified", lambda: show(s, "ro-flags")["progress"]["not_started"] == 1)
    shown = show(s, "ro-flags")
    assert shown["progress"]["targets"] == 2
    assert [st["stage_index"] for st in shown["progress"]["stages"]] == [0, 1]
    assert sum(shown["progress"]["stages"][0]["by_status"].values()) == 1
    human = ok(s.root, "rollouts", "show", "ro-flags").stdout
    assert "failure rate" in human and "RUNNING" in human and firmware["download_url"] in human

    paused = ok(s.root, "rollouts", "pause", "ro-flags", "--reason", "night", "--json").json()
    assert (paused["status"], paused["reason"]) == ("PAUSED", "night")
    assert "PAUSED" in ok(s.root, "rollouts", "list", "--status", "PAUSED").stdout
    assert (
        "resumed rollout ro-flags: RUNNING" in ok(s.root, "rollouts", "resume", "ro-flags").stdout
    )
    approved = ok(s.root, "rollouts", "approve", "ro-flags", "1", "--json").json()
    assert approved["status"] == "RUNNING"

    # Refusals from the service exit 1 with its message.
    again = otactl(s.root, "rollouts", "start", "ro-flags")
    assert again.code == 1 and again.stderr.startswith("error: conflict:")
    bad_stage = otactl(s.root, "rollouts", "approve", "ro-flags", "7")
    assert bad_stage.code == 1
    unknown = otactl(s.root, "rollouts", "show", "no-such-rollout", "--json")
    assert (unknown.code, unknown.stdout) == (1, "")
    assert unknown.stderr.startswith("error: not found:")
    # A target already in a live rollout cannot join another one.
    overlap = otactl(
        s.root, "rollouts", "create", "--id", "ro-overlap", "--artifact", firmware["artifact_id"],
        "--devices", "ro-flags-1", "--stage", "100%",
    )  # fmt: skip
    assert overlap.code == 1 and "ro-flags" in overlap.stderr
    ok(s.root, "rollouts", "abort", "ro-flags")


def test_bad_definitions_are_usage_errors(fast_stack: Stack, tmp_path: Path) -> None:
    s = fast_stack
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("id: x\nstages: [100%\n")
    broken = otactl(s.root, "rollouts", "create", "--file", str(bad_yaml))
    assert broken.code == 2 and "line" in broken.stderr
    bad_field = tmp_path / "field.yaml"
    bad_field.write_text("id: x\nartifact: a\ndevices: [d]\nstages: [{size: 100%, wait: 1}]\n")
    unknown_key = otactl(s.root, "rollouts", "create", "--file", str(bad_field))
    assert unknown_key.code == 2 and "unknown key(s) wait" in unknown_key.stderr
    mixed = otactl(s.root, "rollouts", "create", "--file", str(bad_field), "--id", "y")
    assert mixed.code == 2 and "--file takes no other" in mixed.stderr
    missing = otactl(s.root, "rollouts", "create", "--file", str(tmp_path / "none.yaml"))
    assert missing.code == 2 and "cannot read" in missing.stderr
    no_selector = otactl(
        s.root, "rollouts", "create", "--id", "x", "--artifact", "a", "--stage", "100%"
    )
    assert no_selector.code == 2 and "exactly one of --devices" in no_selector.stderr
    bad_size = otactl(
        s.root, "rollouts", "create", "--id", "x", "--artifact", "a", "--devices", "d",
        "--stage", "ten%",
    )  # fmt: skip
    assert bad_size.code == 2 and "--stage" in bad_size.stderr
    assert otactl(s.root, "rollouts", "list", "--status", "DONE").code == 2
    assert otactl(s.root, "rollouts", "watch", "x", "--interval", "0.01").code == 2


# ---- watch ---------------------------------------------------------------------------------


def test_a_rollout_nobody_answers_can_be_aborted_and_watch_exits_3(
    fast_stack: Stack, firmware: dict[str, Any]
) -> None:
    s = fast_stack
    register(s, "ro-quiet-1", "ro-quiet-2")
    ok(
        s.root, "rollouts", "create", "--id", "ro-quiet", "--artifact", firmware["artifact_id"],
        "--devices", "ro-quiet-1,ro-quiet-2", "--stage", "100%",
    )  # fmt: skip
    ok(s.root, "rollouts", "start", "ro-quiet")
    wait_for(
        "the devices notified",
        lambda: (
            desired_version(s, "ro-quiet-1") == firmware["version"]
            and desired_version(s, "ro-quiet-2") == firmware["version"]
        ),
    )
    aborted = ok(s.root, "rollouts", "abort", "ro-quiet", "--reason", "bad build", "--json")
    assert (aborted.json()["status"], aborted.json()["reason"]) == ("ABORTED", "bad build")

    watched = otactl(s.root, "rollouts", "watch", "ro-quiet", "--json", "--interval", "0.2")
    assert watched.code == 3, watched.stdout + watched.stderr
    updates = watch_lines(watched)
    assert updates and all(u["status"] == "ABORTED" for u in updates)
    last = updates[-1]["progress"]
    # Nothing had started on the devices: the abort canceled them and took the firmware back.
    assert last["by_status"]["CANCELED"] == 2
    assert last["by_status"]["QUEUED"] == last["by_status"]["IN_PROGRESS"] == 0
    wait_for(
        "the firmware withdrawn", lambda: desired_version(s, "ro-quiet-1") != firmware["version"]
    )
    # Aborting twice is refused.
    assert otactl(s.root, "rollouts", "abort", "ro-quiet").code == 1


def test_devices_reporting_success_complete_the_rollout_and_watch_exits_0(
    fast_stack: Stack, firmware: dict[str, Any]
) -> None:
    s = fast_stack
    devices = ("ro-ok-1", "ro-ok-2", "ro-ok-3")
    register(s, *devices, tags=("ring=ok",))
    ok(
        s.root, "rollouts", "create", "--id", "ro-ok", "--artifact", firmware["artifact_id"],
        "--tag", "ring=ok", "--stage", "1", "--stage", "100%",
    )  # fmt: skip
    ok(s.root, "rollouts", "start", "ro-ok")
    reported: set[str] = set()

    def everyone_reported() -> bool:
        # Each device "installs" what its desired state asks, as an agent would.
        for device_id in devices:
            if device_id not in reported and desired_version(s, device_id) == firmware["version"]:
                report(
                    s,
                    device_id,
                    {
                        "version": firmware["version"],
                        "url": firmware["download_url"],
                        "state": "succeeded",
                    },
                )
                reported.add(device_id)
        return len(reported) == len(devices)

    wait_for("every device notified and reporting", everyone_reported)
    watched = otactl(s.root, "rollouts", "watch", "ro-ok", "--json")
    assert watched.code == 0, watched.stdout + watched.stderr
    updates = watch_lines(watched)
    final = updates[-1]
    assert final["status"] == "COMPLETED"
    assert final["progress"]["by_status"]["SUCCEEDED"] == 3
    assert [st["by_status"]["SUCCEEDED"] for st in final["progress"]["stages"]] == [1, 2]
    # The live view ends the same way.
    live = otactl(s.root, "rollouts", "watch", "ro-ok")
    assert live.code == 0, live.stdout + live.stderr
    assert "COMPLETED" in live.stdout and "succeeded" in live.stdout
    watched_unknown = otactl(s.root, "rollouts", "watch", "no-such-rollout", "--json")
    assert watched_unknown.code == 1 and watched_unknown.stderr.startswith("error: not found:")
