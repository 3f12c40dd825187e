"""Operator authentication on every gRPC service: bearer tokens and roles, over real gRPC."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.shadow.v1 import shadow_pb2 as pb
from protos.shadow.v1 import shadow_pb2_grpc
from services.common.auth import (
    BearerAuthInterceptor,
    Role,
    TokenTable,
    bearer_channel,
    required_role,
)
from services.shadow.server import create_server
from services.shadow.service import ShadowService
from services.shadow.settings import ShadowSettings
from tests.auth_helpers import code_of, token_table

TOKENS: dict[str, tuple[str, Role]] = {
    "read-secret": ("viewer", "read"),
    "admin-secret": ("operator", "admin"),
    "service-secret": ("gateway", "service"),
}


@pytest.fixture
def tokens(tmp_path: Path) -> TokenTable:
    path = tmp_path / "tokens.json"
    table = token_table(path, TOKENS)
    assert "secret" not in path.read_text()  # only digests are stored
    return table


@pytest.fixture
def shadow_address(shadow_service: ShadowService, tokens: TokenTable) -> Iterator[str]:
    server, port = create_server(
        ShadowSettings(listen="127.0.0.1:0"), shadow_service, [BearerAuthInterceptor(tokens)]
    )
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def shadow_stub(address: str, token: str | None) -> shadow_pb2_grpc.ShadowServiceStub:
    return shadow_pb2_grpc.ShadowServiceStub(bearer_channel(address, token))


def test_methods_need_the_roles_their_names_say() -> None:
    assert required_role("/ota.shadow.v1.ShadowService/GetShadow") == "read"
    assert required_role("/ota.shadow.v1.ShadowService/QueryFleet") == "read"
    assert required_role("/ota.shadow.v1.ShadowService/BatchGetShadows") == "read"
    assert required_role("/ota.shadow.v1.ShadowService/RegisterDevice") == "admin"
    assert required_role("/ota.shadow.v1.ShadowService/BatchUpdateDesired") == "admin"
    assert required_role("/ota.shadow.v1.ShadowService/AuthenticateDevice") == "service"
    assert required_role("/ota.shadow.v1.ShadowService/ReadEvents") == "service"
    assert required_role("/ota.shadow.v1.ShadowService/AckEvents") == "service"
    assert required_role("/ota.shadow.v1.ShadowService/BatchUpdateShadow") == "service"
    assert required_role("/grpc.health.v1.Health/Check") is None


@pytest.mark.parametrize("token", [None, "", "wrong", "admin-secret-", "ADMIN-SECRET"])
def test_calls_without_a_valid_token_are_unauthenticated(
    shadow_address: str, token: str | None
) -> None:
    stub = shadow_stub(shadow_address, token)
    for call, request in [
        (stub.GetDevice, pb.GetDeviceRequest(device_id="dev-1")),
        (stub.RegisterDevice, pb.RegisterDeviceRequest(device_id="dev-1")),
        (stub.ReadEvents, pb.ReadEventsRequest()),
    ]:
        assert code_of(call, request) == grpc.StatusCode.UNAUTHENTICATED


def test_roles_grant_what_they_say(shadow_address: str, shadow_service: ShadowService) -> None:
    viewer = shadow_stub(shadow_address, "read-secret")
    operator = shadow_stub(shadow_address, "admin-secret")
    gateway = shadow_stub(shadow_address, "service-secret")
    register = pb.RegisterDeviceRequest(device_id="dev-1")

    assert code_of(viewer.RegisterDevice, register) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(operator.RegisterDevice, register) == grpc.StatusCode.OK
    assert code_of(viewer.GetDevice, pb.GetDeviceRequest(device_id="dev-1")) == grpc.StatusCode.OK
    assert code_of(viewer.QueryFleet, pb.QueryFleetRequest()) == grpc.StatusCode.OK
    batch_read = pb.BatchGetShadowsRequest(device_ids=["dev-1"])
    assert code_of(viewer.BatchGetShadows, batch_read) == grpc.StatusCode.OK
    authenticate = pb.AuthenticateDeviceRequest(device_id="dev-1", password="x")
    # Operators cannot use the services' own calls (no password guessing through the API).
    assert code_of(operator.AuthenticateDevice, authenticate) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(gateway.AuthenticateDevice, authenticate) == grpc.StatusCode.OK
    assert code_of(gateway.ReadEvents, pb.ReadEventsRequest()) == grpc.StatusCode.OK
    delete = pb.DeleteDeviceRequest(device_id="dev-1")
    assert code_of(viewer.DeleteDevice, delete) == grpc.StatusCode.PERMISSION_DENIED
    assert shadow_service.get_device("dev-1").device_id == "dev-1"  # the refusal changed nothing
    assert code_of(gateway.DeleteDevice, delete) == grpc.StatusCode.OK


def test_health_stays_open(shadow_address: str) -> None:
    with grpc.insecure_channel(shadow_address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
