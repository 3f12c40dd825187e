"""The agent's config file: defaults, and a clear error naming the field for each bad value."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from device_agent.config import load_config, parse_config
from device_agent.errors import ConfigError

KEY = base64.b64encode(bytes(range(32))).decode()


def minimal(**fields: Any) -> dict[str, Any]:
    return {
        "device_id": "dev-1",
        "password": "secret",
        "download_base_url": "http://127.0.0.1:8080",
        "trusted_keys": {"k1": KEY},
        "hardware": "gw-100",
        "data_dir": "data",
        **fields,
    }


def test_a_minimal_config_takes_the_documented_defaults(tmp_path: Path) -> None:
    config = parse_config(minimal(), base=tmp_path)
    assert config.data_dir == tmp_path / "data"
    assert (config.mqtt_host, config.mqtt_port) == ("127.0.0.1", 1883)
    assert config.trusted_keys == {"k1": bytes(range(32))}
    assert config.factory_version == "0.0.0"
    assert config.max_download_bytes == 1 << 30
    assert config.installer == "filesystem"
    assert config.keepalive == 30
    assert config.report_confirm_seconds == 30.0
    assert "secret" not in repr(config)


def test_report_confirm_seconds_is_read(tmp_path: Path) -> None:
    assert parse_config(minimal(report_confirm_seconds=1), tmp_path).report_confirm_seconds == 1.0
    config = parse_config(minimal(report_confirm_seconds=2.5), tmp_path)
    assert config.report_confirm_seconds == 2.5


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"device_id": 7}, "'device_id' must be a str"),
        ({"password": None}, "'password' must be a str"),
        ({"trusted_keys": {}}, "at least one trusted key"),
        ({"trusted_keys": {"k1": "not base64!"}}, "'k1' is not base64"),
        ({"trusted_keys": {"k1": base64.b64encode(b"short").decode()}}, "raw 32-byte"),
        ({"trusted_keys": []}, "'trusted_keys' must be a dict"),
        ({"factory_version": "one"}, "factory_version"),
        ({"installer": "rauc"}, "installer must be"),
        ({"retry": {"base_seconds": "fast"}}, "retry"),
        ({"max_download_bytes": 0}, "max_download_bytes must be positive"),
        ({"health_command": "true"}, "'health_command' must be a non-empty list"),
        ({"report_confirm_seconds": 0.5}, "report_confirm_seconds"),
        ({"report_confirm_seconds": 3601}, "report_confirm_seconds"),
        ({"report_confirm_seconds": "30"}, "report_confirm_seconds"),
        ({"report_confirm_seconds": True}, "report_confirm_seconds"),
    ],
)
def test_a_bad_value_is_refused_with_its_field(fields: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_config(minimal(**fields))


def test_a_file_that_is_not_a_json_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    path.write_text("[]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.json")


def test_a_config_file_is_read_relative_to_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(minimal(report_confirm_seconds=5)))
    config = load_config(path)
    assert config.data_dir == tmp_path / "data"
    assert config.report_confirm_seconds == 5.0
