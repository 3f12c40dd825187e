"""Where the services are and which token to send: one `ClientSettings`, built once, passed in.

Sources, strongest first: the environment (`OTA_SHADOW_ADDRESS`, `OTA_ARTIFACTS_ADDRESS`,
`OTA_ROLLOUT_ADDRESS`, `OTA_OPERATOR_TOKEN`, `OTA_DOWNLOAD_BASE_URL`,
`OTA_DEVICE_MQTT_ADDRESS`), then the endpoints file (`--endpoints PATH` or `OTA_ENDPOINTS`,
which must exist; else `.devstack/endpoints.json` when it exists, as `make up` writes it), then
the local defaults.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ota_client.errors import ConfigError
from ota_client.retry import RetryPolicy

DEFAULT_ENDPOINTS = Path(".devstack/endpoints.json")


def _address(value: str, name: str) -> str:
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name} must be host:port, not {value!r}")
    return value.strip()


@dataclass(frozen=True)
class ClientSettings:
    shadow_address: str = "127.0.0.1:50051"
    artifacts_address: str = "127.0.0.1:50052"
    rollouts_address: str = "127.0.0.1:50053"
    token: str | None = field(default=None, repr=False)
    # What a registered device is told (its agent config file): where its broker and the
    # download plane are, as the device reaches them.
    download_base_url: str = "http://127.0.0.1:8080"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    timeout_seconds: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        _address(self.shadow_address, "the shadow address")
        _address(self.artifacts_address, "the artifacts address")
        _address(self.rollouts_address, "the rollout address")
        if not self.download_base_url.startswith(("http://", "https://")):
            raise ConfigError("the download base URL must start with http:// or https://")
        if self.timeout_seconds <= 0:
            raise ConfigError("the timeout must be positive")

    @classmethod
    def load(
        cls,
        endpoints: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ClientSettings:
        """Settings from an endpoints file and the environment (see the module docstring)."""
        env = os.environ if env is None else env
        named = endpoints or (Path(env["OTA_ENDPOINTS"]) if env.get("OTA_ENDPOINTS") else None)
        if named is not None:
            found = read_endpoints(named)
        else:
            implicit = (cwd or Path.cwd()) / DEFAULT_ENDPOINTS
            found = read_endpoints(implicit) if implicit.exists() else {}
        mqtt_found = found.get("mqtt")
        mqtt: dict[str, Any] = mqtt_found if isinstance(mqtt_found, dict) else {}
        mqtt_address = env.get("OTA_DEVICE_MQTT_ADDRESS", "").strip() or (
            f"{mqtt.get('host', '127.0.0.1')}:{mqtt.get('port', 1883)}"
        )
        mqtt_host, _, mqtt_port = _address(mqtt_address, "the device MQTT address").rpartition(":")

        def pick(variable: str, key: str, default: str) -> str:
            value = env.get(variable, "").strip() or found.get(key) or default
            if not isinstance(value, str):
                raise ConfigError(f"{key!r} in the endpoints file must be a string")
            return value

        return cls(
            shadow_address=pick("OTA_SHADOW_ADDRESS", "shadow", cls.shadow_address),
            artifacts_address=pick("OTA_ARTIFACTS_ADDRESS", "artifacts", cls.artifacts_address),
            rollouts_address=pick("OTA_ROLLOUT_ADDRESS", "rollout", cls.rollouts_address),
            token=pick("OTA_OPERATOR_TOKEN", "operator_token", "") or None,
            download_base_url=pick("OTA_DOWNLOAD_BASE_URL", "downloads", cls.download_base_url),
            mqtt_host=mqtt_host,
            mqtt_port=int(mqtt_port),
        )


def read_endpoints(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the endpoints file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"the endpoints file {path} must hold a JSON object")
    return data
