"""`make up` / `make down`: the whole stack as separate background processes, in `.devstack/`.

`up` starts the MQTT broker, the shadow service, the gateway, the artifact service (with its
device download plane), the rollout service and its Celery worker (with beat), waits until
each is healthy
(the gateway by a real MQTT round trip), and writes `.devstack/endpoints.json` with every address
and the application's MQTT service account. Logs go to `.devstack/logs/`. `down` stops what `up`
started (the pids it recorded, checked against their command lines) and nothing else.

It runs on the embedded default unless the environment says otherwise:
`OTA_DATABASE_URL` (PostgreSQL), `OTA_MQTT_BROKER=mosquitto` (a Mosquitto started from
deploy/mosquitto/ with per-device accounts) or `OTA_MQTT_BROKER=external` with `OTA_MQTT_URL`
and `OTA_BROKER_ADMIN_URL` (a broker run elsewhere), `OTA_CELERY_BROKER_URL` (e.g. Redis; the
default is a SQLite file in `.devstack/`, no server).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import paho.mqtt.client as paho
from grpc_health.v1 import health_pb2, health_pb2_grpc
from paho.mqtt.enums import CallbackAPIVersion

from services.broker import mosquitto
from services.common.auth import Role, TokenTable
from services.common.config import ConfigError
from services.common.mqtt import MqttEndpoint
from services.shadow.credentials import hash_password

ROOT = Path(".devstack")
SERVICE_ACCOUNTS = ("ota-admin", "ota-gateway", "ota-app")
# gRPC bearer tokens: operators (admin, read-only) and the services themselves.
API_TOKENS: dict[str, Role] = {"operator": "admin", "viewer": "read", "services": "service"}
STARTUP_SECONDS = 60.0


@dataclass
class Process:
    name: str
    argv: list[str]
    env: dict[str, str]


def port_or_free(host: str, preferred: int) -> int:
    """The preferred port if nothing listens there, else one the kernel picks."""
    with socket.socket() as probe:
        try:
            probe.bind((host, preferred))
            return preferred
        except OSError:
            probe.bind((host, 0))
            return int(probe.getsockname()[1])


def _secrets(root: Path) -> dict[str, str]:
    """Service-account passwords and API tokens, made once and kept (0600) so restarts keep
    working; names added by a newer version are made on the next start."""
    path = root / "secrets.json"
    stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    missing = [name for name in (*SERVICE_ACCOUNTS, *API_TOKENS) if name not in stored]
    if missing or not path.exists():
        stored.update({name: secrets.token_urlsafe(24) for name in missing})
        path.write_text(json.dumps(stored, indent=1))
        path.chmod(0o600)
    return stored


def _alive(pid: int, marker: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return marker in cmdline


def _start(process: Process, logs: Path) -> int:
    log = (logs / f"{process.name}.log").open("ab")
    child = subprocess.Popen(
        process.argv,
        env=process.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # lives on after `make up` returns
    )
    return child.pid


def _wait(what: str, check: Any, deadline: float) -> None:
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not become healthy in time ({last})")


def _grpc_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=2
        )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _gateway_answers(app: MqttEndpoint) -> bool:
    """A real round trip: the app asks for a shadow that does not exist; the gateway says 404."""
    answered: list[bytes] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"ota-probe-{os.getpid()}")
    client.username_pw_set(app.username, app.password)
    client.on_message = lambda _c, _u, message: answered.append(bytes(message.payload))
    client.connect(app.host, app.port, keepalive=10)
    client.loop_start()
    try:
        client.subscribe("ota-probe/state/get/rejected", qos=1)
        time.sleep(0.2)
        client.publish("ota-probe/state/get", b"{}", qos=1)
        deadline = time.monotonic() + 3
        while not answered and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
    return bool(answered) and json.loads(answered[0]).get("code") == 404


def plan(root: Path, env: Mapping[str, str]) -> tuple[list[Process], dict[str, Any]]:
    """Which processes to start, with which settings, and the endpoints they will have."""
    host = "127.0.0.1"
    passwords = _secrets(root)
    hashes = {name: hash_password(pw) for name, pw in passwords.items()}
    database_url = env.get("OTA_DATABASE_URL") or f"sqlite:///{(root / 'ota.db').resolve()}"
    broker = env.get("OTA_MQTT_BROKER", "embedded")
    shadow_address = f"{host}:{port_or_free(host, 50051)}"
    python = sys.executable
    tokens_file = root / "api-tokens.json"
    TokenTable.write(
        tokens_file, {passwords[name]: (name, role) for name, role in API_TOKENS.items()}
    )
    base = {
        **env,
        "OTA_DATABASE_URL": database_url,
        "OTA_SHADOW_ADDRESS": shadow_address,
        "OTA_AUTH_TOKENS_FILE": str(tokens_file.resolve()),
        "OTA_SERVICE_TOKEN": passwords["services"],
    }
    processes: list[Process] = []
    admin_url = ""

    if broker == "external":
        if not env.get("OTA_MQTT_URL"):
            raise ConfigError("OTA_MQTT_BROKER=external needs OTA_MQTT_URL, OTA_BROKER_ADMIN_URL")
        external = MqttEndpoint.parse(env["OTA_MQTT_URL"])
        mqtt_host, mqtt_port = external.host, external.port
        admin_url = env.get("OTA_BROKER_ADMIN_URL", "")
    else:
        mqtt_host, mqtt_port = host, port_or_free(host, int(env.get("OTA_MQTT_PORT", "1883")))
    if broker == "mosquitto":
        data = root / "mosquitto"
        services = {k: v for k, v in hashes.items() if k != "ota-admin"}
        # Keep an existing dynamic-security file: it holds the device accounts.
        conf = mosquitto.write_config(
            data, host, mqtt_port, ("ota-admin", hashes["ota-admin"]), services, keep_accounts=True
        )
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        processes.append(Process("mosquitto", [binary, "-c", str(conf)], dict(base)))
        admin_url = MqttEndpoint(host, mqtt_port, "ota-admin", passwords["ota-admin"]).url()
    elif broker == "embedded":
        accounts = root / "broker-accounts.json"
        accounts.write_text(json.dumps({k: v for k, v in hashes.items() if k != "ota-admin"}))
        accounts.chmod(0o600)
        processes.append(
            Process(
                "broker",
                [python, "-m", "services.broker"],
                {
                    **base,
                    "OTA_EMBEDDED_MQTT_LISTEN": f"{host}:{mqtt_port}",
                    "OTA_BROKER_ACCOUNTS_FILE": str(accounts),
                },
            )
        )
    elif broker != "external":
        raise ConfigError(f"OTA_MQTT_BROKER is embedded, mosquitto or external, not {broker!r}")

    shadow_env = {**base, "OTA_SHADOW_LISTEN": shadow_address}
    if admin_url:
        shadow_env["OTA_BROKER_ADMIN_URL"] = admin_url
    processes.append(Process("shadow", [python, "-m", "services.shadow"], shadow_env))
    gateway = MqttEndpoint(mqtt_host, mqtt_port, "ota-gateway", passwords["ota-gateway"])
    processes.append(
        Process(
            "gateway",
            [python, "-m", "services.gateway"],
            {
                **base,
                "OTA_MQTT_URL": env.get("OTA_GATEWAY_MQTT_URL") or gateway.url(),
                # amqtt has no shared subscriptions; one gateway subscribes plainly.
                "OTA_GATEWAY_SHARED_GROUP": "" if broker == "embedded" else "ota-gateway",
            },
        )
    )
    artifacts_address = f"{host}:{port_or_free(host, 50052)}"
    download_address = f"{host}:{port_or_free(host, 8080)}"
    rollout_address = f"{host}:{port_or_free(host, 50053)}"
    processes.append(
        Process(
            "artifacts",
            [python, "-m", "services.artifacts"],
            {
                **base,
                "OTA_ARTIFACTS_LISTEN": artifacts_address,
                "OTA_DOWNLOAD_LISTEN": download_address,
                "OTA_ARTIFACTS_DIR": str((root / "artifacts").resolve()),
                "OTA_SIGNING_KEY_PATH": str((root / "artifact-signing-key.pem").resolve()),
                "OTA_ROLLOUT_ADDRESS": rollout_address,
            },
        )
    )
    # Celery: Redis (or any broker) when OTA_CELERY_BROKER_URL says so, else a SQLite file.
    celery_broker = env.get("OTA_CELERY_BROKER_URL") or (
        f"sqla+sqlite:///{(root / 'celery.db').resolve()}"
    )
    rollout_env = {**base, "OTA_CELERY_BROKER_URL": celery_broker}
    processes.append(
        Process(
            "rollout",
            [python, "-m", "services.rollout"],
            {**rollout_env, "OTA_ROLLOUT_LISTEN": rollout_address},
        )
    )
    processes.append(
        Process("worker", [python, "-m", "services.rollout.worker", "--beat"], rollout_env)
    )
    endpoints = {
        "broker": broker,
        "database_url": database_url,
        "shadow": shadow_address,
        "artifacts": artifacts_address,
        "rollout": rollout_address,
        "celery_broker": celery_broker,
        "downloads": f"http://{download_address}",
        "mqtt": {"host": mqtt_host, "port": mqtt_port},
        "mqtt_app": {"username": "ota-app", "password": passwords["ota-app"]},
        "operator_token": passwords["operator"],
        "viewer_token": passwords["viewer"],
        "logs": str((root / "logs").resolve()),
    }
    return processes, endpoints


def up(root: Path = ROOT, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    env = dict(os.environ if env is None else env)
    root.mkdir(exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    pids_file = root / "pids.json"
    if pids_file.exists() and all(
        _alive(p["pid"], p["marker"]) for p in json.loads(pids_file.read_text())
    ):
        print("the stack is already up:", (root / "endpoints.json").resolve())
        endpoints: dict[str, Any] = json.loads((root / "endpoints.json").read_text())
        return endpoints
    down(root, quiet=True)
    processes, endpoints = plan(root, env)
    started = []
    deadline = time.monotonic() + STARTUP_SECONDS
    try:
        log_sizes = {p.name: _size(root / "logs" / f"{p.name}.log") for p in processes}
        for process in processes:
            pid = _start(process, root / "logs")
            marker = " ".join(process.argv[1:])
            started.append({"name": process.name, "pid": pid, "marker": marker})
            pids_file.write_text(json.dumps(started, indent=1))
            if process.name in ("broker", "mosquitto"):
                mqtt = endpoints["mqtt"]
                _wait(process.name, lambda m=mqtt: _listening(m["host"], m["port"]), deadline)
            elif process.name == "shadow":
                _wait("shadow service", lambda: _grpc_serving(endpoints["shadow"]), deadline)
            elif process.name == "rollout":
                _wait("rollout service", lambda: _grpc_serving(endpoints["rollout"]), deadline)
            elif process.name == "worker":
                _wait(
                    "rollout worker",
                    lambda p=pid, at=log_sizes["worker"]: _worker_ready(root, p, at),
                    deadline,
                )
            elif process.name == "artifacts":
                _wait("artifact service", lambda: _artifacts_ready(endpoints), deadline)
        app = MqttEndpoint(
            endpoints["mqtt"]["host"],
            endpoints["mqtt"]["port"],
            "ota-app",
            endpoints["mqtt_app"]["password"],
        )
        _wait("gateway", lambda: _gateway_answers(app), deadline)
    except Exception:
        print(f"the stack did not come up; logs are in {root / 'logs'}", file=sys.stderr)
        down(root, quiet=True)
        raise
    path = root / "endpoints.json"
    path.write_text(json.dumps(endpoints, indent=1))
    path.chmod(0o600)
    for entry in started:
        print(f"  {entry['name']:<10} pid {entry['pid']}")
    print(f"stack is up ({endpoints['broker']} broker); endpoints: {path.resolve()}")
    return endpoints


def _artifacts_ready(endpoints: Mapping[str, Any]) -> bool:
    """The artifact gRPC service serves and its download plane listens."""
    host, _, port = endpoints["downloads"].removeprefix("http://").rpartition(":")
    return _grpc_serving(endpoints["artifacts"]) and _listening(host, int(port))


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _worker_ready(root: Path, pid: int, log_offset: int) -> bool:
    """Celery logs `<name>@<host> ready.` once the worker consumes its queue (looked for in
    what this start added to the log)."""
    with (root / "logs" / "worker.log").open("rb") as log:
        log.seek(log_offset)
        ready = b" ready." in log.read()
    return ready and _alive(pid, "services.rollout.worker")


def _listening(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=1):
        return True


def down(root: Path = ROOT, quiet: bool = False) -> None:
    pids_file = root / "pids.json"
    if not pids_file.exists():
        if not quiet:
            print("nothing to stop")
        return
    entries = json.loads(pids_file.read_text())
    for entry in reversed(entries):
        if _alive(entry["pid"], entry["marker"]):
            os.kill(entry["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 10
    for entry in reversed(entries):
        while _alive(entry["pid"], entry["marker"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(entry["pid"], entry["marker"]):
            os.kill(entry["pid"], signal.SIGKILL)
        if not quiet:
            print(f"  stopped {entry['name']} (pid {entry['pid']})")
    pids_file.unlink()
    (root / "endpoints.json").unlink(missing_ok=True)


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "up":
        up()
    elif command == "down":
        down()
    else:
        raise SystemExit("usage: python -m services.devstack up|down")


if __name__ == "__main__":
    main()
