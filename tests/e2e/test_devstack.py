"""`make up` as a user runs it: real processes, then the README's MQTT walk-through, then down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest

from protos.shadow.v1 import shadow_pb2 as pb
from protos.shadow.v1 import shadow_pb2_grpc
from services.common.auth import bearer_channel
from services.common.mqtt import MqttEndpoint
from tests.integration.conftest import Device

REPO = Path(__file__).resolve().parents[2]


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


@pytest.fixture(params=["embedded", "mosquitto"])
def devstack(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Path, dict[str, str]]]:
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

    shell = run(root, "services.shadow.admin", "register", "dev-1", "site=berlin", "--shell")
    values = dict(line.split("=", 1) for line in shell.split())
    device = Device(
        MqttEndpoint(
            endpoints["mqtt"]["host"],
            endpoints["mqtt"]["port"],
            values["MQTT_USER"],
            values["MQTT_PASS"].strip("'"),
        ),
        client_id="dev-1",
    )
    try:
        assert device.wait_connected()
        device.subscribe("dev-1/state/update/delta", "dev-1/state/update/accepted")
        device.publish("dev-1/state/update", {"state": {"reported": {"firmware": {"v": "1"}}}})
        assert device.expect("dev-1/state/update/accepted")["version"] == 1
        run(root, "services.shadow.admin", "desired", "dev-1", '{"firmware": {"v": "2"}}')
        assert device.expect("dev-1/state/update/delta")["state"] == {"firmware": {"v": "2"}}
    finally:
        device.close()

    run(root, "services.devstack", "down", env=env)
    assert not any(alive(pid) for pid in pids)
    assert not (root / ".devstack" / "pids.json").exists()
