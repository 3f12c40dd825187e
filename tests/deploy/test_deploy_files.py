"""The deployment examples stay true to the code: deploy/compose/ and deploy/systemd/.

Nothing here starts Docker or systemd (neither runs in CI). It checks what can drift: every
OTA_ variable the examples set is one the code reads, and one the process it is given to reads
(its package or services/common); metrics and log settings go only to processes that wire
them; every command is an importable module; secrets come from `.env` and the example holds
placeholders only; the units keep their sections and hardening; the bootstrap script renders
a Mosquitto configuration with no placeholder left.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose" / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "deploy" / "compose" / ".env.example"
SYSTEMD = ROOT / "deploy" / "systemd"
OTA_NAME = re.compile(r"\bOTA_[A-Z0-9_]+\b")
CODE_DIRS = ("services", "device_agent", "ota_client")


def _names_in(paths: list[Path]) -> set[str]:
    return {name for path in paths for name in OTA_NAME.findall(path.read_text())}


def _sources(*parts: str) -> list[Path]:
    return sorted((ROOT.joinpath(*parts)).rglob("*.py"))


READ_BY_CODE = _names_in([p for d in CODE_DIRS for p in _sources(d)])


def _package_of(module: str) -> str:
    """services.rollout.worker -> services/rollout; services.shadow -> services/shadow."""
    parts = module.split(".")
    return "/".join(parts[:2])


def _read_by_process(module: str) -> set[str]:
    package = _package_of(module)
    return _names_in(_sources(package) + _sources("services", "common"))


def _wires(module: str, function: str) -> bool:
    return any(function + "(" in p.read_text() for p in _sources(_package_of(module)))


def _module_of(argv: list[str]) -> str | None:
    """The `-m` module of a python command line, or None."""
    if "-m" in argv:
        return argv[argv.index("-m") + 1]
    return None


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# --- compose ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # resolves anchors and <<
    return loaded


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _ota_services(compose: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Services running one of our modules: name -> (module, service)."""
    found = {}
    for name, service in compose["services"].items():
        command = service.get("command")
        if isinstance(command, list) and command[:1] == ["python"]:
            module = _module_of([str(c) for c in command])
            if module is not None:
                found[name] = (module, service)
    return found


def test_compose_runs_every_process(compose: dict[str, Any]) -> None:
    modules = {module for module, _ in _ota_services(compose).values()}
    assert modules == {
        "services.shadow",
        "services.gateway",
        "services.artifacts",
        "services.rollout",
        "services.rollout.worker",
    }
    assert {"postgres", "redis", "mosquitto", "minio", "minio-init", "bootstrap"} <= set(
        compose["services"]
    )


def test_compose_commands_are_importable_modules(compose: dict[str, Any]) -> None:
    for name, (module, _) in _ota_services(compose).items():
        assert _importable(module), f"{name}: python -m {module} is not importable"


def test_compose_sets_only_variables_the_process_reads(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for variable in _environment(service):
            if variable.startswith("OTA_"):
                assert variable in READ_BY_CODE, f"{name}: no code reads {variable}"
    for name, (module, service) in _ota_services(compose).items():
        env = _environment(service)
        unread = {v for v in env if v.startswith("OTA_")} - _read_by_process(module)
        assert not unread, f"{name} ({module}) is given {sorted(unread)}, which it never reads"
        if "OTA_METRICS_LISTEN" in env:
            assert _wires(module, "start_metrics_server"), f"{name}: metrics are not wired"
        if {"OTA_LOG_FORMAT", "OTA_LOG_LEVEL"} & set(env):
            assert _wires(module, "configure_logging"), f"{name}: log settings are not wired"
        if "OTA_AUTH_TOKENS_FILE" in env:
            assert _wires(module, "server_interceptors"), f"{name}: serves no gRPC"


def test_compose_gateways_partition_the_outbox(compose: dict[str, Any]) -> None:
    gateways = [
        _environment(service)
        for module, service in _ota_services(compose).values()
        if module == "services.gateway"
    ]
    assert len(gateways) >= 2
    partitions = {int(env["OTA_GATEWAY_PARTITIONS"]) for env in gateways}
    assert partitions == {len(gateways)}, "OTA_GATEWAY_PARTITIONS must equal the gateways"
    assert sorted(int(env["OTA_GATEWAY_PARTITION"]) for env in gateways) == list(
        range(len(gateways))
    )
    assert all(env["OTA_GATEWAY_SHARED_GROUP"] for env in gateways)


def test_compose_runs_exactly_one_beat(compose: dict[str, Any]) -> None:
    workers = [
        service
        for module, service in _ota_services(compose).values()
        if module == "services.rollout.worker"
    ]
    beats = [s for s in workers if "--beat" in s["command"]]
    assert len(beats) == 1
    assert beats[0].get("deploy", {}).get("replicas", 1) == 1
    assert any("--beat" not in s["command"] for s in workers)


def test_compose_long_running_services_have_healthchecks(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if service.get("restart") == "no":  # one-shots
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_compose_secrets_come_from_the_env_file(compose: dict[str, Any]) -> None:
    lines = [line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#")]
    referenced = set(re.findall(r"\$\{([A-Z0-9_]+)", "\n".join(lines)))
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert referenced <= set(example), f"missing in .env.example: {referenced - set(example)}"
    for key in ("PASSWORD", "TOKEN"):
        for name, value in example.items():
            if key in name:
                assert "change-me" in value, f".env.example {name} must be a placeholder"
    # No secret is written into the file itself: every password / token is interpolated.
    for name, service in compose["services"].items():
        for variable, value in _environment(service).items():
            if re.search(r"(PASSWORD|_TOKEN|SECRET_ACCESS_KEY|AUTH)$", variable):
                assert value.startswith("${"), f"{name}: {variable} is not from .env"
            credentials = re.match(r"\w+://[^/@:]*:([^@]*)@", value)
            if credentials:
                assert credentials.group(1).startswith("${"), f"{name}: {variable} password"


def test_dockerfile_builds_the_project_as_non_root() -> None:
    text = (ROOT / "deploy" / "compose" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert "pip install ." in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and not users[-1].startswith(("root", "0"))


# --- systemd ---------------------------------------------------------------------------------


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections -> (key, value) pairs in order (keys may repeat, unlike configparser's)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not key=value"
        current.append((key.strip(), value.strip()))
    return sections


UNITS = sorted(SYSTEMD.glob("*.service"))


def test_systemd_has_every_unit() -> None:
    assert {p.name for p in UNITS} == {
        "ota-shadow.service",
        "ota-gateway@.service",
        "ota-artifacts.service",
        "ota-rollout.service",
        "ota-rollout-worker@.service",
        "ota-rollout-beat.service",
    }
    assert (SYSTEMD / "README.md").exists()


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_systemd_unit_is_complete_and_hardened(path: Path) -> None:
    unit = _unit(path)
    assert {"Unit", "Service", "Install"} <= set(unit)
    service = dict(unit["Service"])  # last value of each key
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"] == "/etc/ota/ota.env"
    assert service.get("User") or service.get("DynamicUser") == "yes"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert dict(unit["Install"])["WantedBy"]
    argv = shlex.split(service["ExecStart"])
    if argv[0] == "/bin/sh":  # sh -c 'exec env ... python -m module'
        argv = shlex.split(argv[-1])
    module = _module_of(argv)
    assert module is not None and _importable(module), f"{path.name}: {argv}"
    env = [v.split("=", 1)[0] for k, v in unit["Service"] if k == "Environment"]
    env += OTA_NAME.findall(service["ExecStart"])
    for variable in env:
        assert variable in _read_by_process(module), f"{path.name}: {module} ignores {variable}"
    if "OTA_METRICS_LISTEN" in env:
        assert _wires(module, "start_metrics_server")


def test_systemd_artifacts_unit_may_write_its_directories() -> None:
    service = _unit(SYSTEMD / "ota-artifacts.service")["Service"]
    writable = " ".join(v for k, v in service if k == "ReadWritePaths").split()
    env = dict(
        line.split("=", 1)
        for line in (SYSTEMD / "ota.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for setting in (env["OTA_ARTIFACTS_DIR"], str(Path(env["OTA_SIGNING_KEY_PATH"]).parent)):
        assert any(setting == w or setting.startswith(w + "/") for w in writable), setting


def test_systemd_runs_exactly_one_beat() -> None:
    beats = [p.name for p in UNITS if "--beat" in dict(_unit(p)["Service"])["ExecStart"]]
    assert beats == ["ota-rollout-beat.service"]
    assert "@" not in beats[0]  # not a template: one instance


def test_systemd_gateway_instance_is_its_partition() -> None:
    service = _unit(SYSTEMD / "ota-gateway@.service")["Service"]
    assert ("Environment", "OTA_GATEWAY_PARTITION=%i") in service


def test_systemd_env_example_names_only_real_settings() -> None:
    text = (SYSTEMD / "ota.env.example").read_text()
    for variable in re.findall(r"^#?(OTA_[A-Z0-9_]+)=", text, re.M):
        assert variable in READ_BY_CODE, f"ota.env.example: no code reads {variable}"


# --- the bootstrap script --------------------------------------------------------------------


def _bootstrap() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "ota_compose_bootstrap", ROOT / "deploy" / "compose" / "bootstrap.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bootstrap_writes_tokens_and_mosquitto_files(tmp_path: Path) -> None:
    bootstrap = _bootstrap()
    env = {
        "SERVICE_TOKEN": "s3rvice",
        "API_TOKENS": "operator:admin:op,viewer:read:vi",
        "MQTT_ADMIN_PASSWORD": "a",
        "MQTT_GATEWAY_PASSWORD": "g",
        "MQTT_APP_PASSWORD": "p",
    }
    from services.common.auth import TokenTable

    bootstrap.write_tokens(tmp_path / "api-tokens.json", env, None)
    table = TokenTable.load(tmp_path / "api-tokens.json")
    assert {(e.name, e.role) for e in table.entries} == {
        ("services", "service"),
        ("operator", "admin"),
        ("viewer", "read"),
    }
    role = table.role_of("op")
    assert role is not None and role.role == "admin"

    template = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
    assert bootstrap.write_mosquitto(tmp_path / "mq", template, env) is True
    conf = (tmp_path / "mq" / "mosquitto.conf").read_text()
    assert "{" not in conf and "plugin_opt_config_file /mosquitto/data/" in conf
    dynsec = json.loads((tmp_path / "mq" / "dynamic-security.json").read_text())
    assert [c["username"] for c in dynsec["clients"]] == ["ota-admin", "ota-gateway", "ota-app"]
    # Kept once it exists: it holds the device accounts from then on.
    assert bootstrap.write_mosquitto(tmp_path / "mq", template, env) is False


def test_bootstrap_refuses_a_bad_token_entry() -> None:
    with pytest.raises(SystemExit):
        _bootstrap().parse_tokens("operator:root:x", "s")
