"""The gateway's settings from the environment: the shadow-call timeout (ADR 42) is bounded,
and a bad value is refused with the variable's name instead of starting a misconfigured
gateway."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError
from services.gateway.settings import GatewaySettings


def test_the_shadow_call_timeout_defaults_to_ten_seconds() -> None:
    assert GatewaySettings.from_env({}).rpc_timeout_seconds == 10


def test_the_shadow_call_timeout_is_read() -> None:
    env = {"OTA_GATEWAY_RPC_TIMEOUT_SECONDS": "3"}
    assert GatewaySettings.from_env(env).rpc_timeout_seconds == 3


@pytest.mark.parametrize("value", ["0", "301", "-1", "1.5", "soon"])
def test_a_bad_shadow_call_timeout_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="OTA_GATEWAY_RPC_TIMEOUT_SECONDS"):
        GatewaySettings.from_env({"OTA_GATEWAY_RPC_TIMEOUT_SECONDS": value})
