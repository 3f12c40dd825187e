"""The rollout service's process wiring with authentication on both sides, over real gRPC:
`build_service` from settings (migrations, the shadow client sending OTA_SERVICE_TOKEN),
`create_server` behind the bearer-token interceptor, health open to load balancers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import Engine

from protos.rollout.v1 import rollout_pb2 as pb
from protos.rollout.v1 import rollout_pb2_grpc
from protos.shadow.v1 import shadow_pb2 as shadow_pb
from protos.shadow.v1 import shadow_pb2_grpc
from services.common.auth import BearerAuthInterceptor, Role, TokenTable, bearer_channel
from services.rollout.server import SERVICE_NAME, build_service, create_server
from services.rollout.settings import RolloutSettings
from services.shadow import server as shadow_server
from services.shadow.service import ShadowService
from services.shadow.settings import ShadowSettings
from tests.auth_helpers import code_of, token_table

TOKENS: dict[str, tuple[str, Role]] = {
    "read-secret": ("viewer", "read"),
    "admin-secret": ("operator", "admin"),
    "rollout-secret": ("rollout", "service"),
}


@pytest.fixture
def tokens(tmp_path: Path) -> TokenTable:
    return token_table(tmp_path / "tokens.json", TOKENS)


@pytest.fixture
def addresses(
    tmp_path: Path, shadow_service: ShadowService, tokens: TokenTable
) -> Iterator[tuple[str, str]]:
    auth = [BearerAuthInterceptor(tokens)]
    shadow, shadow_port = shadow_server.create_server(
        ShadowSettings(listen="127.0.0.1:0"), shadow_service, auth
    )
    shadow.start()
    settings = RolloutSettings.from_env(
        {
            "OTA_DATABASE_URL": f"sqlite:///{tmp_path / 'rollout.db'}",
            "OTA_ROLLOUT_LISTEN": "127.0.0.1:0",
            "OTA_SHADOW_ADDRESS": f"127.0.0.1:{shadow_port}",
            "OTA_SERVICE_TOKEN": "rollout-secret",
        }
    )
    rollout, port = create_server(settings, build_service(settings), auth)
    rollout.start()
    yield f"127.0.0.1:{shadow_port}", f"127.0.0.1:{port}"
    rollout.stop(None)
    shadow.stop(None)


def test_settings_default_to_the_documented_port() -> None:
    settings = RolloutSettings.from_env({})
    assert settings.listen == "127.0.0.1:50053"
    assert settings.service_token is None


def test_the_rollout_service_authenticates_both_ways(
    engine: Engine, addresses: tuple[str, str]
) -> None:
    del engine  # the shadow's database; the rollout service has its own SQLite file here
    shadow_address, address = addresses
    admin_shadow = shadow_pb2_grpc.ShadowServiceStub(bearer_channel(shadow_address, "admin-secret"))
    admin_shadow.RegisterDevice(shadow_pb.RegisterDeviceRequest(device_id="dev-1"))
    spec = pb.RolloutSpec(
        rollout_id="r1",
        artifact_id="fw",
        firmware=pb.Firmware(version="2.0", url="https://a.example/v1/artifacts/fw"),
        selector=pb.TargetSelector(device_ids=["dev-1"]),
        stages=[pb.Stage(percent=100)],
    )
    create = pb.CreateRolloutRequest(spec=spec)
    anonymous = rollout_pb2_grpc.RolloutServiceStub(grpc.insecure_channel(address))
    reader = rollout_pb2_grpc.RolloutServiceStub(bearer_channel(address, "read-secret"))
    admin = rollout_pb2_grpc.RolloutServiceStub(bearer_channel(address, "admin-secret"))
    assert code_of(anonymous.CreateRollout, create) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(reader.CreateRollout, create) == grpc.StatusCode.PERMISSION_DENIED
    # Creating resolves the targets through the shadow service with the service's own token.
    assert code_of(admin.CreateRollout, create) == grpc.StatusCode.OK
    get = pb.GetRolloutRequest(rollout_id="r1")
    assert code_of(reader.GetRollout, get) == grpc.StatusCode.OK
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
