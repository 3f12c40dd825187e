"""End to end: `python -m services.artifacts` as a process, configured only by environment
variables, serving gRPC and the download plane on free ports next to the real shadow service,
stopping cleanly on SIGTERM; and its `resign` command."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from protos.artifacts.v1 import artifacts_pb2 as apb
from protos.artifacts.v1 import artifacts_pb2_grpc as apb_grpc
from protos.shadow.v1 import shadow_pb2 as spb
from tests.conftest import RunningShadow

REPO_ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(rb"artifact service listening on port (\d+), download plane on port (\d+)")


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    log: list[bytes]
    env: dict[str, str]


@pytest.fixture
def artifact_process(shadow_server: RunningShadow, tmp_path: Path) -> Iterator[Process]:
    env = {
        **os.environ,
        "OTA_DATABASE_URL": f"sqlite:///{tmp_path / 'artifacts.db'}",
        "OTA_ARTIFACTS_LISTEN": "127.0.0.1:0",
        "OTA_DOWNLOAD_LISTEN": "127.0.0.1:0",
        "OTA_SHADOW_ADDRESS": shadow_server.address,
        "OTA_ARTIFACTS_DIR": str(tmp_path / "blobs"),
        "OTA_SIGNING_KEY_PATH": str(tmp_path / "key.pem"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.artifacts"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    log: list[bytes] = []
    try:
        for line in proc.stderr:  # ends if the process dies before it is ready
            log.append(line)
            ready = READY.search(line)
            if ready:
                yield Process(proc, int(ready.group(1)), int(ready.group(2)), log, env)
                break
        else:
            pytest.fail(b"".join(log).decode(errors="replace"))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stderr.close()


def test_the_process_serves_both_planes_and_stops_on_sigterm(
    artifact_process: Process, shadow_server: RunningShadow, tmp_path: Path
) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{artifact_process.grpc_port}")
    stub = apb_grpc.ArtifactServiceStub(channel)
    data = b"process firmware" * 1000
    artifact = stub.UploadArtifact(
        iter(
            [
                apb.UploadArtifactRequest(
                    metadata=apb.ArtifactMetadata(
                        name="fw", version="3.0.0", compatible_hardware=["gw"]
                    )
                ),
                apb.UploadArtifactRequest(chunk=data),
                apb.UploadArtifactRequest(end=apb.UploadEnd()),
            ]
        )
    )
    assert artifact.download_url == (
        f"http://127.0.0.1:{artifact_process.http_port}/v1/artifacts/{artifact.artifact_id}"
    )
    assert (tmp_path / "key.pem").exists()
    channel.close()

    password = shadow_server.stub.RegisterDevice(
        spb.RegisterDeviceRequest(device_id="dev-1")
    ).credentials.password
    desired = {"firmware": {"version": "3.0.0", "url": artifact.download_url}}
    shadow_server.stub.UpdateShadow(
        spb.UpdateShadowRequest(
            device_id="dev-1", request_json=json.dumps({"state": {"desired": desired}})
        )
    )
    auth = ("dev-1", password)
    with httpx.Client(timeout=30) as http:
        token = http.post(f"{artifact.download_url}/token", auth=auth).json()["token"]
        url = http.post(
            f"http://127.0.0.1:{artifact_process.http_port}/v1/downloads",
            json={"token": token},
            auth=auth,
        ).json()["url"]
        assert http.get(url, auth=auth).content == data

    artifact_process.proc.send_signal(signal.SIGTERM)
    assert artifact_process.proc.wait(20) == 0
    assert artifact_process.proc.stderr is not None
    rest = artifact_process.log + artifact_process.proc.stderr.readlines()
    logged = b"".join(rest).decode(errors="replace")
    assert password not in logged and token not in logged and url not in logged
    assert "GET /v1/downloads/{url_id} 200" in logged

    # Key rotation, step 3: the same database, a new key.
    rotate = {**artifact_process.env, "OTA_SIGNING_KEY_PATH": str(tmp_path / "new-key.pem")}
    resigned = subprocess.run(
        [sys.executable, "-m", "services.artifacts", "resign"],
        cwd=REPO_ROOT,
        env=rotate,
        capture_output=True,
        timeout=60,
    )
    assert resigned.returncode == 0, resigned.stderr
    assert b"re-signed 1 manifests" in resigned.stderr
