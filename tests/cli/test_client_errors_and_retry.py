"""The client's error mapping and retry policy: pure rules, and the client over real gRPC
(a tiny server on port 0 that answers with the status code a test names)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ota_client import (
    ClientSettings,
    ConfigError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    OtaClient,
    OtaError,
    PermissionDeniedError,
    RetryPolicy,
    ServerError,
    UnauthenticatedError,
    UnavailableError,
)
from ota_client.retry import call_with_retries
from protos.shadow.v1 import shadow_pb2 as spb

EXPECTED: dict[grpc.StatusCode, type[OtaError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.DATA_LOSS: InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.FAILED_PRECONDITION: ConflictError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.INTERNAL: ServerError,
    grpc.StatusCode.UNKNOWN: ServerError,
}


@dataclass
class Scripted:
    """GetDevice answers with the next status in `script` (then OK); counts calls and tokens."""

    script: list[grpc.StatusCode] = field(default_factory=list)
    calls: int = 0
    tokens: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get_device(
        self, request: spb.GetDeviceRequest, context: grpc.ServicerContext
    ) -> spb.Device:
        with self.lock:
            self.calls += 1
            code = self.script.pop(0) if self.script else grpc.StatusCode.OK
        metadata = context.invocation_metadata() or ()
        self.tokens.extend(str(v) for k, v in metadata if k == "authorization")
        if code == grpc.StatusCode.ABORTED:
            context.set_trailing_metadata((("ota-current-version", "7"),))
        if code != grpc.StatusCode.OK:
            context.abort(code, f"scripted {code.name}")
        return spb.Device(device_id=request.device_id, tags={"k": "v"}, shadow_version=3)


@pytest.fixture
def scripted() -> Iterator[tuple[Scripted, str]]:
    behaviour = Scripted()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "ota.shadow.v1.ShadowService",
        {
            "GetDevice": grpc.unary_unary_rpc_method_handler(
                behaviour.get_device,
                request_deserializer=spb.GetDeviceRequest.FromString,
                response_serializer=spb.Device.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield behaviour, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def client_for(address: str, policy: RetryPolicy, sleeps: list[float]) -> OtaClient:
    settings = ClientSettings(
        shadow_address=address, artifacts_address=address, token="tok-1", retry=policy
    )
    return OtaClient(settings, sleep=sleeps.append, draw=lambda: 1.0)


@pytest.mark.parametrize("code", list(EXPECTED), ids=lambda c: c.name)
def test_each_status_becomes_its_documented_exception(
    scripted: tuple[Scripted, str], code: grpc.StatusCode
) -> None:
    behaviour, address = scripted
    behaviour.script = [code]
    client = client_for(address, RetryPolicy(max_attempts=1), [])
    with client, pytest.raises(OtaError) as raised:
        client.shadow.get_device("dev-1")
    assert type(raised.value) is EXPECTED[code]
    assert raised.value.code == code.name
    assert raised.value.details == f"scripted {code.name}"
    assert str(raised.value).startswith(f"{raised.value.kind}: ")
    assert raised.value.current_version == (7 if code == grpc.StatusCode.ABORTED else None)


def test_success_returns_a_dataclass_and_sends_the_token(scripted: tuple[Scripted, str]) -> None:
    behaviour, address = scripted
    with client_for(address, RetryPolicy(), []) as client:
        device = client.shadow.get_device("dev-9")
    assert device.to_dict() == {
        "device_id": "dev-9",
        "tags": {"k": "v"},
        "created_at_ms": 0,
        "shadow_version": 3,
    }
    assert behaviour.tokens == ["Bearer tok-1"]


def test_unavailable_is_retried_with_growing_capped_waits(scripted: tuple[Scripted, str]) -> None:
    behaviour, address = scripted
    behaviour.script = [grpc.StatusCode.UNAVAILABLE] * 3
    sleeps: list[float] = []
    policy = RetryPolicy(max_attempts=5, base_seconds=0.01, cap_seconds=0.03)
    with client_for(address, policy, sleeps) as client:
        assert client.shadow.get_device("dev-1").device_id == "dev-1"
    assert behaviour.calls == 4
    # draw() is 1.0, so each wait is its ceiling: doubling, then the cap.
    assert sleeps == pytest.approx([0.01, 0.02, 0.03])


def test_retries_are_bounded(scripted: tuple[Scripted, str]) -> None:
    behaviour, address = scripted
    behaviour.script = [grpc.StatusCode.UNAVAILABLE] * 10
    sleeps: list[float] = []
    with (
        client_for(address, RetryPolicy(max_attempts=4, base_seconds=0.0), sleeps) as client,
        pytest.raises(UnavailableError),
    ):
        client.shadow.get_device("dev-1")
    assert behaviour.calls == 4
    assert len(sleeps) == 3


@pytest.mark.parametrize(
    "code",
    [c for c in EXPECTED if c != grpc.StatusCode.UNAVAILABLE],
    ids=lambda c: c.name,
)
def test_nothing_but_unavailable_is_retried(
    scripted: tuple[Scripted, str], code: grpc.StatusCode
) -> None:
    behaviour, address = scripted
    behaviour.script = [code, code]
    sleeps: list[float] = []
    with (
        client_for(address, RetryPolicy(max_attempts=5), sleeps) as client,
        pytest.raises(OtaError),
    ):
        client.shadow.get_device("dev-1")
    assert behaviour.calls == 1
    assert sleeps == []


def test_an_unreachable_service_is_unavailable_after_the_retries() -> None:
    sleeps: list[float] = []
    with (
        client_for("127.0.0.1:1", RetryPolicy(max_attempts=3, base_seconds=0), sleeps) as client,
        pytest.raises(UnavailableError),
    ):
        client.shadow.get_device("dev-1")
    assert len(sleeps) == 2


@given(
    base=st.floats(0, 10),
    cap=st.floats(0, 60),
    retry=st.integers(0, 500),
    draw=st.floats(0, 1, exclude_max=True),
)
def test_every_wait_is_within_the_jitter_window(
    base: float, cap: float, retry: int, draw: float
) -> None:
    policy = RetryPolicy(max_attempts=5, base_seconds=base, cap_seconds=cap)
    delay = policy.delay(retry, draw)
    assert 0 <= delay <= min(cap, base * 2.0 ** min(retry, 60))


def test_call_with_retries_raises_other_errors_at_once() -> None:
    calls: list[int] = []

    def failing() -> int:
        calls.append(1)
        raise NotFoundError("no")

    with pytest.raises(NotFoundError):
        call_with_retries(failing, RetryPolicy(), sleep=lambda _s: None)
    assert calls == [1]


@pytest.mark.parametrize(
    "kwargs", [{"max_attempts": 0}, {"base_seconds": -1.0}, {"cap_seconds": -0.5}]
)
def test_a_nonsense_policy_is_a_config_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_settings_environment_over_file_over_defaults(tmp_path: Path) -> None:
    (tmp_path / ".devstack").mkdir()
    (tmp_path / ".devstack" / "endpoints.json").write_text(
        '{"shadow": "10.0.0.1:1", "artifacts": "10.0.0.1:2", "operator_token": "file-token",'
        ' "downloads": "http://10.0.0.1:3", "mqtt": {"host": "10.0.0.1", "port": 4}}'
    )
    from_file = ClientSettings.load(env={}, cwd=tmp_path)
    assert (from_file.shadow_address, from_file.artifacts_address) == ("10.0.0.1:1", "10.0.0.1:2")
    assert from_file.token == "file-token"
    assert (from_file.mqtt_host, from_file.mqtt_port) == ("10.0.0.1", 4)
    assert from_file.download_base_url == "http://10.0.0.1:3"
    overridden = ClientSettings.load(
        env={"OTA_SHADOW_ADDRESS": "h:9", "OTA_OPERATOR_TOKEN": "env-token"}, cwd=tmp_path
    )
    assert (overridden.shadow_address, overridden.token) == ("h:9", "env-token")
    assert overridden.artifacts_address == "10.0.0.1:2"
    defaults = ClientSettings.load(env={}, cwd=tmp_path / "empty")
    assert defaults == ClientSettings()
    assert "file-token" not in repr(from_file)


@pytest.mark.parametrize(
    "env",
    [
        {"OTA_ENDPOINTS": "/nonexistent/endpoints.json"},
        {"OTA_SHADOW_ADDRESS": "no-port"},
        {"OTA_ARTIFACTS_ADDRESS": "h:99999"},
        {"OTA_DOWNLOAD_BASE_URL": "ftp://x"},
        {"OTA_DEVICE_MQTT_ADDRESS": "x"},
    ],
)
def test_bad_settings_are_config_errors(env: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        ClientSettings.load(env=env, cwd=tmp_path)
