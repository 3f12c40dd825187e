"""Settings of a gateway process, read once from the environment (README's table)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common.config import env_int, env_str
from services.common.mqtt import MqttEndpoint


@dataclass(frozen=True)
class GatewaySettings:
    mqtt: MqttEndpoint = field(default_factory=MqttEndpoint)
    client_id: str = "ota-gateway-0"
    shadow_address: str = "127.0.0.1:50051"
    # Several gateways split device messages through this MQTT shared-subscription group;
    # empty for brokers without shared subscriptions (amqtt).
    shared_group: str = "ota-gateway"
    # Outbox partition of this gateway: it publishes events where bucket % partitions == index.
    partition: int = 0
    partitions: int = 1
    max_payload_bytes: int = 16384
    rate_per_second: float = 20.0
    rate_burst: float = 20.0
    max_inflight_messages: int = 1000
    events_per_read: int = 2000
    # How long a call to the shadow service may take; past it the batch's device messages are
    # rejected with 503 (and the service commits none of them: ADR 42).
    rpc_timeout_seconds: float = 10.0
    service_token: str | None = None  # sent to the shadow service (OTA_SERVICE_TOKEN)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        env = os.environ if env is None else env
        partitions = env_int(env, "OTA_GATEWAY_PARTITIONS", 1, 1, 1024)
        return cls(
            mqtt=MqttEndpoint.parse(
                env_str(env, "OTA_MQTT_URL", "mqtt://ota-gateway@127.0.0.1:1883")
            ),
            client_id=env_str(env, "OTA_GATEWAY_CLIENT_ID", "") or _default_client_id(env),
            shadow_address=env_str(env, "OTA_SHADOW_ADDRESS", cls.shadow_address),
            shared_group=env.get("OTA_GATEWAY_SHARED_GROUP", cls.shared_group).strip(),
            partition=env_int(env, "OTA_GATEWAY_PARTITION", 0, 0, partitions - 1),
            partitions=partitions,
            max_payload_bytes=env_int(env, "OTA_GATEWAY_MAX_PAYLOAD_BYTES", 16384, 256, 1 << 20),
            rate_per_second=env_int(env, "OTA_GATEWAY_RATE_PER_SECOND", 20, 1, 10_000),
            rate_burst=env_int(env, "OTA_GATEWAY_RATE_BURST", 20, 1, 10_000),
            rpc_timeout_seconds=env_int(env, "OTA_GATEWAY_RPC_TIMEOUT_SECONDS", 10, 1, 300),
            service_token=env_str(env, "OTA_SERVICE_TOKEN", "") or None,
        )


def _default_client_id(env: Mapping[str, str]) -> str:
    """A stable client id no one can guess without the gateway's credentials: whoever knows a
    persistent session's client id can knock it off the broker."""
    secret = env_str(env, "OTA_MQTT_URL", "") + env_str(env, "OTA_GATEWAY_PARTITION", "0")
    return "ota-gateway-" + hashlib.sha256(secret.encode()).hexdigest()[:16]
