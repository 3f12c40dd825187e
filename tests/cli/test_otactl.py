"""`otactl` over the real stack: every command, `--json` output, exit codes, the agent config."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import stat
from pathlib import Path

from device_agent.config import load_config
from services.common.mqtt import MqttEndpoint
from tests.cli.conftest import Stack, ok, otactl
from tests.integration.conftest import Device


def test_register_prints_credentials_and_writes_a_working_agent_config(stack: Stack) -> None:
    reply = ok(
        stack.root,
        "devices", "register", "cli-dev-1", "--tag", "site=berlin", "--hardware", "rpi4",
        "--json",
    ).json()  # fmt: skip
    assert reply["device"]["device_id"] == "cli-dev-1"
    assert reply["device"]["tags"] == {"site": "berlin"}
    password = reply["credentials"]["password"]
    assert password and reply["credentials"]["username"] == "cli-dev-1"

    path = stack.root / "cli-dev-1.agent.json"
    assert reply["agent_config_path"] == "cli-dev-1.agent.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    written = json.loads(path.read_text())
    assert written == reply["agent_config"]
    assert written["password"] == password
    assert written["hardware"] == "rpi4"
    assert written["data_dir"] == "data"
    assert written["download_base_url"] == stack.endpoints["downloads"]
    assert (written["mqtt_host"], written["mqtt_port"]) == (
        stack.endpoints["mqtt"]["host"],
        stack.endpoints["mqtt"]["port"],
    )
    # The device agent's own parser accepts it: a raw 32-byte Ed25519 key, the plane, the dir.
    config = load_config(path)
    assert config.device_id == "cli-dev-1"
    assert config.data_dir == stack.root / "data"
    (key_id,) = config.trusted_keys
    assert len(config.trusted_keys[key_id]) == 32

    # The credentials are real: the broker lets the device in with them.
    device = Device(
        MqttEndpoint(written["mqtt_host"], written["mqtt_port"], "cli-dev-1", password),
        client_id="cli-dev-1",
    )
    try:
        assert device.wait_connected()
    finally:
        device.close()

    # Human output shows the credentials and the file too; an existing file is not overwritten.
    again = otactl(stack.root, "devices", "register", "cli-dev-2", "--agent-config", str(path))
    assert again.code == 1
    assert "exists" in again.stderr
    assert json.loads(path.read_text())["device_id"] == "cli-dev-1"
    human = ok(stack.root, "devices", "register", "cli-dev-2", "--agent-config", "cfg/two.json")
    assert "mqtt password" in human.stdout
    assert '"device_id": "cli-dev-2"' in human.stdout
    assert json.loads((stack.root / "cfg" / "two.json").read_text())["hardware"] == "generic"


def test_devices_list_show_delete(stack: Stack) -> None:
    ok(stack.root, "devices", "register", "cli-lsd-1", "--tag", "site=paris", "--tag", "ring=0")
    ok(stack.root, "devices", "register", "cli-lsd-2", "--tag", "site=paris")

    listed = ok(stack.root, "devices", "list", "--json").json()
    ids = {d["device_id"] for d in listed}
    assert {"cli-lsd-1", "cli-lsd-2"} <= ids
    paris = ok(stack.root, "devices", "list", "--tag", "ring=0", "--tag", "site=paris", "--json")
    assert [d["device_id"] for d in paris.json()] == ["cli-lsd-1"]
    assert "cli-lsd-2" in ok(stack.root, "devices", "list").stdout

    shown = ok(stack.root, "devices", "show", "cli-lsd-1", "--json").json()
    assert shown["tags"] == {"site": "paris", "ring": "0"}
    assert shown["shadow_version"] == 0
    assert "cli-lsd-1" in ok(stack.root, "devices", "show", "cli-lsd-1").stdout

    assert "deleted" in ok(stack.root, "devices", "delete", "cli-lsd-1").stdout
    gone = otactl(stack.root, "devices", "show", "cli-lsd-1", "--json")
    assert gone.code == 1
    assert gone.stdout == ""
    assert gone.stderr.startswith("error: not found:")
    assert otactl(stack.root, "devices", "delete", "cli-lsd-1").code == 1


def test_shadow_get_and_update(stack: Stack) -> None:
    ok(stack.root, "devices", "register", "cli-shadow-1")
    first = ok(
        stack.root, "shadow", "update", "cli-shadow-1",
        "--desired", '{"firmware": {"version": "2.0.0"}}', "--json",
    ).json()  # fmt: skip
    assert first["version"] == 1
    assert first["delta"] == {"firmware": {"version": "2.0.0"}}
    second = ok(
        stack.root, "shadow", "update", "cli-shadow-1",
        "--reported", '{"firmware": {"version": "1.0.0"}, "uptime": 5}',
        "--version", "1", "--client-token", "tok-1", "--json",
    ).json()  # fmt: skip
    assert second["version"] == 2
    assert second["accepted"]["clientToken"] == "tok-1"

    document = ok(stack.root, "shadow", "get", "cli-shadow-1", "--json").json()
    assert document["version"] == 2
    assert document["state"]["desired"] == {"firmware": {"version": "2.0.0"}}
    assert document["state"]["reported"] == {"firmware": {"version": "1.0.0"}, "uptime": 5}
    assert document["state"]["delta"] == {"firmware": {"version": "2.0.0"}}
    human = ok(stack.root, "shadow", "get", "cli-shadow-1").stdout
    assert "shadow version 2" in human and "uptime" in human

    stale = otactl(
        stack.root, "shadow", "update", "cli-shadow-1", "--desired", '{"a": 1}', "--version", "1"
    )
    assert stale.code == 1
    assert "conflict" in stale.stderr and "at version 2" in stale.stderr
    assert ok(stack.root, "shadow", "get", "cli-shadow-1", "--json").json()["version"] == 2
    cleared = ok(stack.root, "shadow", "update", "cli-shadow-1", "--desired", "null", "--json")
    assert cleared.json()["delta"] == {}
    assert (
        "desired" not in ok(stack.root, "shadow", "get", "cli-shadow-1", "--json").json()["state"]
    )

    missing = otactl(stack.root, "shadow", "get", "no-such-device", "--json")
    assert (missing.code, missing.stdout) == (1, "")
    assert "not found" in missing.stderr
    too_deep = otactl(
        stack.root, "shadow", "update", "cli-shadow-1", "--desired", '{"a":' * 10 + "1" + "}" * 10
    )
    assert too_deep.code == 1 and "invalid request" in too_deep.stderr


def test_artifact_upload_list_show_delete(stack: Stack, tmp_path: Path) -> None:
    build = tmp_path / "app-2.0.0.img"
    payload = secrets.token_bytes(700_000)
    build.write_bytes(payload)
    uploaded = ok(
        stack.root, "artifacts", "upload", str(build),
        "--name", "cli-app", "--version", "2.0.0", "--hardware", "rpi4", "--hardware", "rpi5",
        "--json",
    ).json()  # fmt: skip
    artifact_id = uploaded["artifact_id"]
    assert uploaded["sha256"] == hashlib.sha256(payload).hexdigest()
    assert uploaded["size"] == len(payload)
    assert uploaded["compatible_hardware"] == ["rpi4", "rpi5"]
    assert uploaded["download_url"].startswith(stack.endpoints["downloads"])
    assert json.loads(uploaded["manifest_json"])["artifact_id"] == artifact_id

    listed = ok(stack.root, "artifacts", "list", "--name", "cli-app", "--json").json()
    assert [a["artifact_id"] for a in listed] == [artifact_id]

    # The human table never cuts an id, even at 80 columns.
    table = ok(stack.root, "artifacts", "list", "--name", "cli-app", COLUMNS="80").stdout
    assert artifact_id in table
    shown = ok(stack.root, "artifacts", "show", artifact_id, "--json").json()
    assert shown == uploaded
    progress = ok(
        stack.root, "artifacts", "upload", str(build),
        "--name", "cli-app", "--version", "2.0.1", "--hardware", "rpi4",
    )  # fmt: skip
    assert "uploading app-2.0.0.img" in progress.stderr and "700.0/700.0 kB" in progress.stderr
    assert "uploaded and signed" in progress.stdout
    newer = ok(stack.root, "artifacts", "list", "--name", "cli-app", "--json").json()
    assert [a["version"] for a in newer] == ["2.0.1", "2.0.0"]  # newest first
    human = ok(stack.root, "artifacts", "show", artifact_id).stdout
    assert uploaded["sha256"] in human and "manifest" in human
    assert uploaded["rollback_floor"] is None and "rollback_floor" not in uploaded["manifest_json"]
    floored = ok(
        stack.root, "artifacts", "upload", str(build), "--name", "cli-secure",
        "--version", "2.1.0", "--hardware", "rpi4", "--rollback-floor", "2.1.0", "--json",
    ).json()  # fmt: skip
    assert floored["rollback_floor"] == "2.1.0"
    assert json.loads(floored["manifest_json"])["rollback_floor"] == "2.1.0"
    assert (
        "rollback floor 2.1.0" in ok(stack.root, "artifacts", "show", floored["artifact_id"]).stdout
    )
    above = otactl(
        stack.root, "artifacts", "upload", str(build), "--name", "cli-secure",
        "--version", "2.2.0", "--hardware", "rpi4", "--rollback-floor", "2.3.0",
    )  # fmt: skip
    assert above.code == 1 and "above the version" in above.stderr
    assert "deleted" in ok(stack.root, "artifacts", "delete", floored["artifact_id"]).stdout

    duplicate = otactl(
        stack.root, "artifacts", "upload", str(build),
        "--name", "cli-app", "--version", "2.0.0", "--hardware", "rpi4",
    )  # fmt: skip
    assert duplicate.code == 1 and "conflict" in duplicate.stderr
    bad_version = otactl(
        stack.root, "artifacts", "upload", str(build),
        "--name", "cli-app", "--version", "two", "--hardware", "rpi4",
    )  # fmt: skip
    assert bad_version.code == 1 and "invalid request" in bad_version.stderr

    assert "deleted" in ok(stack.root, "artifacts", "delete", artifact_id).stdout
    left = ok(stack.root, "artifacts", "list", "--name", "cli-app", "--json").json()
    assert [a["version"] for a in left] == ["2.0.1"]
    assert "deleted" in ok(stack.root, "artifacts", "delete", left[0]["artifact_id"]).stdout
    assert ok(stack.root, "artifacts", "list", "--name", "cli-app", "--json").json() == []
    gone = otactl(stack.root, "artifacts", "show", artifact_id)
    assert gone.code == 1 and "not found" in gone.stderr


def test_tokens_decide_what_an_operator_may_do(stack: Stack) -> None:
    wrong = otactl(stack.root, "devices", "list", "--json", OTA_OPERATOR_TOKEN="not-a-token")
    assert wrong.code == 1
    assert wrong.stderr.startswith("error: unauthenticated:")
    assert wrong.stdout == ""
    viewer = stack.endpoints["viewer_token"]
    assert otactl(stack.root, "devices", "list", "--json", OTA_OPERATOR_TOKEN=viewer).code == 0
    refused = otactl(stack.root, "devices", "register", "cli-v-1", OTA_OPERATOR_TOKEN=viewer)
    assert refused.code == 1 and "permission denied" in refused.stderr
    assert otactl(stack.root, "devices", "show", "cli-v-1").code == 1


def test_bad_usage_exits_2(stack: Stack, tmp_path: Path) -> None:
    for args in (
        ("devices", "frobnicate"),
        ("devices", "show"),
        ("devices", "list", "--no-such-option"),
        ("devices", "register", "x", "--tag", "no-equals-sign"),
        ("shadow", "update", "dev-1", "--desired", "{not json"),
        ("shadow", "update", "dev-1", "--desired", "[1, 2]"),
        ("shadow", "update", "dev-1"),
        ("shadow", "update", "dev-1", "--desired", "{}", "--version", "one"),
        ("artifacts", "upload", str(tmp_path / "missing.img"), "--name", "a", "--version", "1.0.0",
         "--hardware", "x"),
        ("artifacts", "upload", __file__, "--name", "a"),
    ):  # fmt: skip
        result = otactl(stack.root, *args)
        assert result.code == 2, (args, result)
        assert result.stdout == "", args
    assert not (stack.root / "x.agent.json").exists()


def test_endpoints_flag_environment_and_unreachable_services(stack: Stack, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    endpoints = str(stack.root / ".devstack" / "endpoints.json")
    assert otactl(elsewhere, "--endpoints", endpoints, "devices", "list", "--json").code == 0
    assert otactl(elsewhere, "devices", "list", "--json", OTA_ENDPOINTS=endpoints).code == 0
    token = stack.endpoints["operator_token"]
    by_env = otactl(
        elsewhere,
        "devices", "list", "--json",
        OTA_SHADOW_ADDRESS=stack.endpoints["shadow"], OTA_OPERATOR_TOKEN=token,
    )  # fmt: skip
    assert by_env.code == 0, by_env.stderr

    missing = otactl(elsewhere, "--endpoints", str(tmp_path / "nope.json"), "devices", "list")
    assert missing.code == 1 and missing.stderr.startswith("error: configuration:")
    bad = otactl(elsewhere, "devices", "list", OTA_SHADOW_ADDRESS="no-port")
    assert bad.code == 1 and "host:port" in bad.stderr

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    down = otactl(elsewhere, "devices", "list", OTA_SHADOW_ADDRESS=closed, OTA_OPERATOR_TOKEN=token)
    assert down.code == 1 and down.stderr.startswith("error: unavailable:")
    # Registration asks the artifact service for the key first: down, nothing is registered.
    no_key = otactl(stack.root, "devices", "register", "cli-nokey-1", OTA_ARTIFACTS_ADDRESS=closed)
    assert no_key.code == 1 and "unavailable" in no_key.stderr
    assert otactl(stack.root, "devices", "show", "cli-nokey-1").code == 1
    assert not os.path.exists(stack.root / "cli-nokey-1.agent.json")
