"""`otactl` as a user runs it: the installed console script, as a subprocess, against the stack
`make up` starts (`python -m services.devstack up`, embedded broker, SQLite) in a temp dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
OTACTL = Path(sys.executable).parent / "otactl"


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any OTA_* setting, so only the test decides them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTA_")}
    env.update({"PYTHONPATH": str(REPO), "COLUMNS": "200", **extra})
    return env


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def otactl(cwd: Path, *args: str, **env: str) -> Result:
    assert OTACTL.exists(), f"{OTACTL} is missing: pip install -e . installs the otactl script"
    done = subprocess.run(
        [str(OTACTL), *args],
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def ok(cwd: Path, *args: str, **env: str) -> Result:
    result = otactl(cwd, *args, **env)
    assert result.code == 0, f"otactl {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


@dataclass
class Stack:
    root: Path
    endpoints: dict[str, Any]


def _devstack(cwd: Path, command: str, **env: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.devstack", command],
        cwd=cwd,
        env=clean_env(OTA_MQTT_BROKER="embedded", **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@contextmanager
def running_stack(root: Path, **env: str) -> Iterator[Stack]:
    """`devstack up` in `root` with `env` added to its settings; `devstack down` on the way out."""
    _devstack(root, "up", **env)
    try:
        endpoints = json.loads((root / ".devstack" / "endpoints.json").read_text())
        yield Stack(root, endpoints)
    finally:
        _devstack(root, "down", **env)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("otactl-stack")) as started:
        yield started


@pytest.fixture(scope="module")
def fast_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own whose rollout service reconciles every second instead of every five:
    the rollout tests wait on reconcile passes, and their rollouts stay out of `stack`."""
    with running_stack(
        tmp_path_factory.mktemp("otactl-rollouts"), OTA_ROLLOUT_RECONCILE_SECONDS="1"
    ) as started:
        yield started
