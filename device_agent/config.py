"""The agent's settings: one JSON file, read once, validated, passed in (docs/device-agent.md).

The one thing read from the environment is the test hook `OTA_AGENT_CRASH_AT` (a step name at
which the agent SIGKILLs itself), used by the power-loss tests; `__main__` reads it.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.domain import RetryPolicy, version_key
from device_agent.errors import ConfigError


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    password: str = field(repr=False)
    mqtt_host: str
    mqtt_port: int
    download_base_url: str  # the plane this device trusts; desired URLs elsewhere are refused
    trusted_keys: dict[str, bytes]  # key_id -> raw Ed25519 public key
    hardware: str
    data_dir: Path
    factory_version: str = "0.0.0"
    max_download_bytes: int = 1 << 30
    installer: str = "filesystem"  # or "hook"
    health_command: list[str] | None = None
    install_command: list[str] | None = None
    activate_command: list[str] | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    keepalive: int = 30
    report_confirm_seconds: float = 30.0  # a report unanswered this long is sent again


def _require(data: dict[str, Any], name: str, kind: type) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"config field {name!r} must be a {kind.__name__}")
    return value


def _command(data: dict[str, Any], name: str) -> list[str] | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"config field {name!r} must be a non-empty list of strings (argv)")
    return value


def parse_config(data: Any, base: Path = Path(".")) -> AgentConfig:
    if not isinstance(data, dict):
        raise ConfigError("the config file must hold a JSON object")
    keys = _require(data, "trusted_keys", dict)
    trusted: dict[str, bytes] = {}
    for key_id, encoded in keys.items():
        try:
            raw = base64.b64decode(str(encoded), validate=True)
        except binascii.Error:
            raise ConfigError(f"trusted key {key_id!r} is not base64") from None
        if len(raw) != 32:
            raise ConfigError(f"trusted key {key_id!r} is not a raw 32-byte Ed25519 key")
        trusted[str(key_id)] = raw
    if not trusted:
        raise ConfigError("config needs at least one trusted key")
    factory = str(data.get("factory_version", "0.0.0"))
    try:
        version_key(factory)
    except ValueError as exc:
        raise ConfigError(f"factory_version: {exc}") from None
    installer = str(data.get("installer", "filesystem"))
    if installer not in ("filesystem", "hook"):
        raise ConfigError("installer must be 'filesystem' or 'hook'")
    retry = data.get("retry", {})
    try:
        policy = RetryPolicy(
            float(retry.get("base_seconds", 1.0)),
            float(retry.get("cap_seconds", 60.0)),
            int(retry.get("max_attempts", 6)),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"retry: {exc}") from None
    max_bytes = int(data.get("max_download_bytes", 1 << 30))
    if max_bytes <= 0:
        raise ConfigError("max_download_bytes must be positive")
    confirm = data.get("report_confirm_seconds", 30.0)
    if (
        not isinstance(confirm, int | float)
        or isinstance(confirm, bool)
        or not 1 <= confirm <= 3600
    ):
        raise ConfigError("report_confirm_seconds must be a number of seconds from 1 to 3600")
    return AgentConfig(
        device_id=_require(data, "device_id", str),
        password=_require(data, "password", str),
        mqtt_host=str(data.get("mqtt_host", "127.0.0.1")),
        mqtt_port=int(data.get("mqtt_port", 1883)),
        download_base_url=_require(data, "download_base_url", str),
        trusted_keys=trusted,
        hardware=_require(data, "hardware", str),
        data_dir=base / _require(data, "data_dir", str),
        factory_version=factory,
        max_download_bytes=max_bytes,
        installer=installer,
        health_command=_command(data, "health_command"),
        install_command=_command(data, "install_command"),
        activate_command=_command(data, "activate_command"),
        retry=policy,
        keepalive=int(data.get("keepalive", 30)),
        report_confirm_seconds=float(confirm),
    )


def load_config(path: Path) -> AgentConfig:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    return parse_config(data, path.parent)
