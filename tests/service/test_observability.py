"""Structured logs and Prometheus metrics (services/common/observability.py), over real
loggers, a real HTTP endpoint, real gRPC servers and a real `python -m services.shadow`."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import httpx
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from protos.shadow.v1 import shadow_pb2 as pb
from protos.shadow.v1 import shadow_pb2_grpc
from services.common import db
from services.common.auth import BearerAuthInterceptor, TokenTable, call_metadata
from services.common.config import ConfigError
from services.common.observability import (
    JsonFormatter,
    TextFormatter,
    configure_logging,
    server_metrics_interceptor,
    start_metrics_server,
)
from services.shadow.server import MIGRATIONS, create_server
from services.shadow.service import ShadowService
from services.shadow.settings import ShadowSettings
from services.shadow.store import ShadowStore

SHADOW_SERVICE = "ota.shadow.v1.ShadowService"
REPO = Path(__file__).resolve().parents[2]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def log_line(formatter: logging.Formatter, **extra: Any) -> str:
    record = logging.getLogger("ota.test").makeRecord(
        "ota.test", logging.WARNING, __file__, 1, "device %s: %d retries", ("d-1", 3), None
    )
    record.__dict__.update(extra)
    return formatter.format(record)


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Put the root logger back as pytest had it after a test that configures it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


# --- log formats ---------------------------------------------------------------------------------


def test_json_lines_carry_the_context_given() -> None:
    line = json.loads(log_line(JsonFormatter("shadow"), device_id="d-1", rollout_id="r-9", stage=2))
    assert line["level"] == "WARNING"
    assert line["process"] == "shadow"
    assert line["logger"] == "ota.test"
    assert line["message"] == "device d-1: 3 retries"
    assert (line["device_id"], line["rollout_id"], line["stage"]) == ("d-1", "r-9", 2)
    assert "artifact_id" not in line
    assert line["ts"].endswith("Z") and "T" in line["ts"]


def test_json_lines_without_context_have_only_the_base_fields() -> None:
    line = json.loads(log_line(JsonFormatter("gateway")))
    assert set(line) == {"ts", "level", "process", "logger", "message"}


def test_json_lines_carry_the_exception_as_text() -> None:
    try:
        raise KeyError("missing")
    except KeyError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    line = json.loads(JsonFormatter("artifacts").format(record))
    assert "KeyError: 'missing'" in line["exc_info"]
    assert "\n" not in JsonFormatter("artifacts").format(record)  # still one line


def test_text_lines_append_the_context() -> None:
    line = log_line(TextFormatter("rollout"), device_id="d-1", rollout_id="r-9")
    assert "WARNING rollout ota.test device d-1: 3 retries" in line
    assert line.endswith(" device_id=d-1 rollout_id=r-9")
    assert "device_id=" not in log_line(TextFormatter("rollout"))


def test_configure_logging_writes_json_to_stderr(
    root_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    configure_logging("shadow", {"OTA_LOG_LEVEL": "warning"})
    logging.getLogger("ota.test").info("not shown")
    logging.getLogger("ota.test").warning("shown", extra={"device_id": "d-7"})
    lines = [json.loads(text) for text in stderr.getvalue().splitlines()]
    assert [(line["message"], line["device_id"]) for line in lines] == [("shown", "d-7")]


def test_configure_logging_text_format(root_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    configure_logging("gateway", {"OTA_LOG_FORMAT": "TEXT"})
    logging.getLogger("ota.test").info("hello", extra={"rollout_id": "r-1"})
    assert stderr.getvalue().rstrip().endswith("INFO gateway ota.test hello rollout_id=r-1")


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"OTA_LOG_FORMAT": "xml"}, "OTA_LOG_FORMAT"),
        ({"OTA_LOG_LEVEL": "loud"}, "OTA_LOG_LEVEL"),
    ],
)
def test_bad_log_settings_are_refused(root_logging: None, env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        configure_logging("shadow", env)


# --- the metrics endpoint ------------------------------------------------------------------------


def test_no_metrics_server_unless_asked() -> None:
    assert start_metrics_server({}) is None
    assert start_metrics_server({"OTA_METRICS_LISTEN": " "}) is None


@pytest.mark.parametrize("value", ["9100", "localhost:http", "127.0.0.1:70000", ":9100"])
def test_bad_metrics_address_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="OTA_METRICS_LISTEN"):
        start_metrics_server({"OTA_METRICS_LISTEN": value})


def test_metrics_address_in_use_is_refused() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="cannot listen"):
            start_metrics_server({"OTA_METRICS_LISTEN": f"127.0.0.1:{port}"})


def test_metrics_server_serves_the_registry_over_http() -> None:
    port = start_metrics_server({"OTA_METRICS_LISTEN": "127.0.0.1:0"})
    assert port is not None and port > 0
    reply = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert reply.status_code == 200
    for name in (
        "ota_grpc_request_seconds",
        "ota_shadow_updates_total",
        "ota_gateway_publishes_total",
        "ota_download_bytes_total",
        "ota_rollout_pass_seconds",
    ):
        assert f"# TYPE {name} " in reply.text


# --- the gRPC interceptor ------------------------------------------------------------------------


class Guarded(NamedTuple):
    channel: grpc.Channel
    stub: shadow_pb2_grpc.ShadowServiceStub
    token: str


@pytest.fixture
def guarded_shadow(tmp_path: Path) -> Iterator[Guarded]:
    """A shadow server on SQLite with the metrics interceptor outside operator auth, as every
    process installs them."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'ota.db'}")
    db.run_migrations(engine, MIGRATIONS, "alembic_version_shadow")
    TokenTable.write(tmp_path / "tokens.json", {"admin-token": ("ops", "admin")})
    interceptors = [
        server_metrics_interceptor(),
        BearerAuthInterceptor(TokenTable.load(tmp_path / "tokens.json")),
    ]
    server, port = create_server(
        ShadowSettings(listen="127.0.0.1:0"), ShadowService(ShadowStore(engine)), interceptors
    )
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Guarded(channel, shadow_pb2_grpc.ShadowServiceStub(channel), "admin-token")
    finally:
        channel.close()
        server.stop(None)
        engine.dispose()


def calls(method: str, code: str) -> float:
    return sample(
        "ota_grpc_request_seconds_count", service=SHADOW_SERVICE, method=method, code=code
    )


def test_interceptor_records_each_call_with_its_code(guarded_shadow: Guarded) -> None:
    _, stub, token = guarded_shadow
    auth = call_metadata(token)
    before = {
        key: calls(*key)
        for key in [
            ("RegisterDevice", "OK"),
            ("GetDevice", "NOT_FOUND"),
            ("GetDevice", "UNAUTHENTICATED"),
            ("RegisterDevice", "ALREADY_EXISTS"),
        ]
    }
    stub.RegisterDevice(pb.RegisterDeviceRequest(device_id="obs-1"), metadata=auth)
    with pytest.raises(grpc.RpcError) as exists:
        stub.RegisterDevice(pb.RegisterDeviceRequest(device_id="obs-1"), metadata=auth)
    with pytest.raises(grpc.RpcError) as missing:
        stub.GetDevice(pb.GetDeviceRequest(device_id="obs-2"), metadata=auth)
    with pytest.raises(grpc.RpcError) as refused:  # auth still runs, inside the interceptor
        stub.GetDevice(pb.GetDeviceRequest(device_id="obs-1"))
    assert exists.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert {key: calls(*key) - value for key, value in before.items()} == {
        ("RegisterDevice", "OK"): 1,
        ("GetDevice", "NOT_FOUND"): 1,
        ("GetDevice", "UNAUTHENTICATED"): 1,
        ("RegisterDevice", "ALREADY_EXISTS"): 1,
    }


def test_interceptor_times_streamed_responses(guarded_shadow: Guarded) -> None:
    """Server reflection is a stream-stream method: its call counts once, when it ends."""
    channel = guarded_shadow.channel
    service = "grpc.reflection.v1alpha.ServerReflection"
    name = "ota_grpc_request_seconds_count"
    before = sample(name, service=service, method="ServerReflectionInfo", code="OK")
    replies = list(
        reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    )
    assert len(replies) == 1
    assert sample(name, service=service, method="ServerReflectionInfo", code="OK") == before + 1


def test_shadow_batches_count_outcomes(guarded_shadow: Guarded) -> None:
    _, stub, token = guarded_shadow
    auth = call_metadata(token)
    rpc = "BatchUpdateDesired"
    stub.RegisterDevice(pb.RegisterDeviceRequest(device_id="obs-b1"), metadata=auth)
    before = {
        outcome: sample("ota_shadow_updates_total", rpc=rpc, outcome=outcome)
        for outcome in ("ok", "not_found", "invalid")
    }
    items_before = sample("ota_shadow_batch_items_total", rpc=rpc)
    stub.BatchUpdateDesired(
        pb.BatchUpdateDesiredRequest(
            items=[
                pb.DesiredPatch(device_id="obs-b1", desired_json='{"fw": "2"}'),
                pb.DesiredPatch(device_id="obs-nobody", desired_json='{"fw": "2"}'),
                pb.DesiredPatch(device_id="obs-b1", desired_json="not json"),
                pb.DesiredPatch(device_id="obs-b1", desired_json='{"fw": "3"}'),
            ]
        ),
        metadata=auth,
    )
    moved = {
        outcome: sample("ota_shadow_updates_total", rpc=rpc, outcome=outcome) - value
        for outcome, value in before.items()
    }
    assert moved == {"ok": 2, "not_found": 1, "invalid": 1}
    assert sample("ota_shadow_batch_items_total", rpc=rpc) - items_before == 4


# --- a whole process -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def scrape(port: int) -> str | None:
    try:
        reply = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    except httpx.TransportError:
        return None
    return reply.text if reply.status_code == 200 else None


def metric_value(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_shadow_process_serves_metrics_and_logs_json(tmp_path: Path) -> None:
    metrics_port, grpc_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTA_")}
    env.update(
        OTA_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
        OTA_SHADOW_LISTEN=f"127.0.0.1:{grpc_port}",
        OTA_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "services.shadow"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        try:
            grpc.channel_ready_future(channel).result(timeout=60)
            wait_for(lambda: scrape(metrics_port) is not None, 60, "the metrics endpoint")
            stub = shadow_pb2_grpc.ShadowServiceStub(channel)
            stub.RegisterDevice(pb.RegisterDeviceRequest(device_id="proc-1"), timeout=30)
            stub.UpdateShadow(
                pb.UpdateShadowRequest(
                    device_id="proc-1", request_json='{"state": {"reported": {"fw": "1"}}}'
                ),
                timeout=30,
            )
        finally:
            channel.close()
        text = scrape(metrics_port)
        assert text is not None
        assert metric_value(text, 'ota_shadow_updates_total{outcome="ok",rpc="UpdateShadow"}') == 1
        for method in ("RegisterDevice", "UpdateShadow"):
            count = (
                "ota_grpc_request_seconds_count"
                f'{{code="OK",method="{method}",service="{SHADOW_SERVICE}"}}'
            )
            assert metric_value(text, count) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
    lines = [json.loads(text) for text in stderr.splitlines() if text.strip()]
    assert lines, "the process logged nothing"
    assert {line["process"] for line in lines} == {"shadow"}
    assert any("listening on port" in line["message"] for line in lines)
