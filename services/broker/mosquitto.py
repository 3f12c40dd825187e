"""Running Mosquitto with the project's configuration (deploy/mosquitto/), for the local stack
and the tests: fill in the config, write the dynamic-security file, start the process."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from services.broker.access import dynsec_config

DEPLOY_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "mosquitto.conf"
PLUGIN_PATHS = [
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
]


def find_plugin() -> str:
    for path in PLUGIN_PATHS:
        if os.path.exists(path):
            return path
    raise FileNotFoundError("mosquitto_dynamic_security.so not found (apt-get install mosquitto)")


def write_config(
    data_dir: Path,
    host: str,
    port: int,
    admin: tuple[str, str],
    services: Mapping[str, str],
    devices: Iterable[tuple[str, str]] = (),
    persistence: bool = True,
    keep_accounts: bool = False,
) -> Path:
    """Write mosquitto.conf and the dynamic-security JSON into `data_dir`; returns the conf.
    With `keep_accounts`, an existing dynamic-security file (device accounts) is kept."""
    data_dir.mkdir(parents=True, exist_ok=True)
    dynsec_file = data_dir / "dynamic-security.json"
    if not (keep_accounts and dynsec_file.exists()):
        dynsec_file.write_text(json.dumps(dynsec_config(admin, services, devices), indent=1))
        dynsec_file.chmod(0o600)
    conf = data_dir / "mosquitto.conf"
    conf.write_text(
        DEPLOY_CONFIG.read_text().format(
            host=host,
            port=port,
            dynsec_plugin=find_plugin(),
            dynsec_file=dynsec_file,
            persistence="true" if persistence else "false",
            data_dir=data_dir,
            user=getpass.getuser(),
        )
    )
    return conf


def start(conf: Path, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    log = open(log_path or conf.with_suffix(".out"), "ab")  # noqa: SIM115 - owned by the child
    return subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)


def wait_listening(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port}") from None
            time.sleep(0.05)
