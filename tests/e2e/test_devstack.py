"""`make up` as a user runs it: real processes, then the README's MQTT walk-through, then down.

The walk-through's commands are read from README.md and run as written, with the real Mosquitto
command-line clients, so the test fails when the README stops working.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from protos.shadow.v1 import shadow_pb2 as pb
from protos.shadow.v1 import shadow_pb2_grpc
from services.common.auth import bearer_channel
from tests.conftest import service_missing

REPO = Path(__file__).resolve().parents[2]
WALKTHROUGH_SECTION = "## The local stack"


def run(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def alive(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def readme_walkthrough() -> list[str]:
    """The shell commands of the first `sh` block in the README's local-stack section: lines
    joined at trailing backslashes, comment and blank lines dropped."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index(WALKTHROUGH_SECTION) :]
    block = section[section.index("```sh\n") + len("```sh\n") :]
    block = block[: block.index("```")]
    commands: list[str] = []
    pending = ""
    for line in block.splitlines():
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        command, pending = (pending + line).strip(), ""
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def payload(command: str) -> Any:
    """The JSON message (`-m`) a mosquitto_* command sends."""
    words = shlex.split(command)
    return json.loads(words[words.index("-m") + 1])


@pytest.fixture(params=["embedded", "mosquitto"])
def devstack(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Path, dict[str, str]]]:
    if request.param == "mosquitto" and not (
        shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()
    ):
        service_missing("Mosquitto", FileNotFoundError("no mosquitto binary"))
    env = {"OTA_MQTT_BROKER": request.param}
    run(tmp_path, "services.devstack", "up", env=env)
    try:
        yield tmp_path, env
    finally:
        run(tmp_path, "services.devstack", "down", env=env)


def test_make_up_serves_the_readme_walkthrough_and_make_down_stops_it(
    devstack: tuple[Path, dict[str, str]],
) -> None:
    root, env = devstack
    endpoints = json.loads((root / ".devstack" / "endpoints.json").read_text())
    assert endpoints["broker"] == env["OTA_MQTT_BROKER"]
    expected = {"shadow", "artifacts", "downloads", "rollout", "mqtt", "mqtt_app", "logs"}
    assert expected <= endpoints.keys()
    assert endpoints["celery_broker"].startswith("sqla+sqlite:///")  # no broker server
    started = json.loads((root / ".devstack" / "pids.json").read_text())
    assert {"shadow", "gateway", "artifacts", "rollout", "worker"} <= {e["name"] for e in started}
    pids = [entry["pid"] for entry in started]
    assert all(alive(pid) for pid in pids)

    # Every API needs a token: without one the shadow service refuses, the viewer may only read.
    anonymous = shadow_pb2_grpc.ShadowServiceStub(bearer_channel(endpoints["shadow"], None))
    with pytest.raises(grpc.RpcError) as refused:
        anonymous.QueryFleet(pb.QueryFleetRequest(), timeout=10)
    assert cast(grpc.Call, refused.value).code() == grpc.StatusCode.UNAUTHENTICATED
    viewer = shadow_pb2_grpc.ShadowServiceStub(
        bearer_channel(endpoints["shadow"], endpoints["viewer_token"])
    )
    assert viewer.QueryFleet(pb.QueryFleetRequest(count=True), timeout=10).total_count == 0
    with pytest.raises(grpc.RpcError) as denied:
        viewer.RegisterDevice(pb.RegisterDeviceRequest(device_id="dev-x"), timeout=10)
    assert cast(grpc.Call, denied.value).code() == grpc.StatusCode.PERMISSION_DENIED

    # The walk-through between `make up` (the fixture's `services.devstack up`, which is what
    # the Makefile runs) and `make down`, as one shell script in a directory laid out like the
    # repository: `.venv` there is the interpreter running this test.
    commands = readme_walkthrough()
    assert commands[0] == "make up" and commands[-1] == "make down", commands
    for tool in sorted({c.split()[0] for c in commands if c.startswith("mosquitto_")}):
        if shutil.which(tool) is None:
            service_missing(f"{tool} (apt-get install mosquitto-clients)", FileNotFoundError(tool))
    (root / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    walked = subprocess.run(
        ["bash", "-c", "\n".join(["set -euo pipefail", *commands[1:-1]])],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert walked.returncode == 0, walked.stdout + walked.stderr
    # The device's mosquitto_rr printed one delta: the application's desired firmware, which
    # differs from the firmware the device reported.
    (device,) = [c for c in commands if c.startswith("mosquitto_rr")]
    (application,) = [c for c in commands if c.startswith("mosquitto_pub")]
    assert "-i dev-1" in device and "-u ota-app" in application
    reported = payload(device)["state"]["reported"]
    desired = payload(application)["state"]["desired"]
    assert reported != desired
    printed = walked.stdout.splitlines()
    assert len(printed) == 1, walked.stdout + walked.stderr
    assert json.loads(printed[0])["state"] == desired, walked.stdout
    shadow = viewer.GetShadow(pb.GetShadowRequest(device_id="dev-1"), timeout=10)
    state = json.loads(shadow.document_json)["state"]
    assert (state["reported"], state["desired"]) == (reported, desired)

    run(root, "services.devstack", "down", env=env)
    assert not any(alive(pid) for pid in pids)
    assert not (root / ".devstack" / "pids.json").exists()
