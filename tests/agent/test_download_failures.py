"""Downloads that must fail for good, over the real stack (broker, gateway, shadow, artifact
service, download plane; the agent as a process): a deleted artifact (404
`artifact_not_found`), an artifact over the device's size cap, a grant whose size is not the
signed one. Each ends in `failed` with a plain error, the running slot untouched, and no
retry loop against the plane.

Attempts are counted from the plane's access log (`aiohttp.access`, one line per request,
naming the route pattern), not from timing.

Each test runs on Mosquitto + PostgreSQL and on amqtt + SQLite (the `stack` fixture).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from protos.artifacts.v1 import artifacts_pb2 as apb
from services.artifacts.download_plane import DOWNLOAD_ROUTE, EXCHANGE_ROUTE, TOKEN_ROUTE
from tests.agent.conftest import WAIT_SECONDS, AgentProcess, Fleet

IMAGE = os.urandom(300_000)


class AccessLog(logging.Handler):
    """The plane's access log lines ("POST /v1/downloads 200 ..."), as the plane writes them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def count(self, method: str, route: str, status: int | None = None) -> int:
        prefix = f"{method} {route} " + ("" if status is None else f"{status} ")
        return sum(line.startswith(prefix) for line in list(self.lines))

    def requests(self) -> int:
        return len(self.lines)


@pytest.fixture
def access_log() -> Iterator[AccessLog]:
    # aiohttp writes access lines only while its logger is enabled for INFO.
    logger = logging.getLogger("aiohttp.access")
    handler = AccessLog()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def wait_for(what: str, agent: AgentProcess, holds: Callable[[], bool]) -> None:
    """Until `holds()` (a liveness bound, not a timing assertion)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not holds():
        if time.monotonic() > deadline:
            raise AssertionError(f"never saw {what}\n--- log\n{agent.log_text()}")
        time.sleep(0.1)


def started(fleet: Fleet, device_id: str, **extra: Any) -> AgentProcess:
    agent = fleet.agent(device_id, **extra)
    agent.start()
    fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0")
    return agent


def failed_untouched(fleet: Fleet, agent: AgentProcess, artifact: apb.Artifact) -> str:
    """The `failed` report for this artifact's URL; the running slot is still a / 1.0.0, and
    nothing was left in the download directory."""
    firmware = fleet.wait_reported(
        agent,
        lambda fw: (
            fw.get("state") == "failed"
            and (fw.get("target") or {}).get("url") == artifact.download_url
        ),
    )
    assert firmware["version"] == "1.0.0", firmware
    slot = agent.booted_slot()
    assert (slot["slot"], slot["version"]) == ("a", "1.0.0")
    slots = agent.data_dir / "system" / "slots"
    assert not (slots / "b" / "image").exists()
    download = agent.data_dir / "download"
    assert not download.exists() or not any(download.iterdir())
    error: str = firmware["error"]
    return error


def ignored_afterwards(fleet: Fleet, agent: AgentProcess) -> None:
    """Make the agent handle the same target twice more after its failure, and wait until it
    has: a delta while it runs, then the resync after a restart. Requests the agent makes
    afterwards would be in the access log by then."""
    marker = "this target already failed"
    before = agent.log_text().count(marker)
    # Another desired key changes: the gateway sends a delta, which still names the target.
    fleet.stack.update_desired({agent.device_id: {"telemetry": {"interval": 5}}})
    wait_for("the delta ignored", agent, lambda: agent.log_text().count(marker) > before)
    agent.stop()
    agent.start()
    wait_for("the resync ignored", agent, lambda: agent.log_text().count(marker) > before + 1)


def test_an_artifact_deleted_after_targeting_fails_at_once_and_is_not_requested_again(
    fleet: Fleet, access_log: AccessLog
) -> None:
    agent = started(fleet, "dev-deleted")
    agent.stop()  # offline while it is targeted and while the artifact goes
    artifact = fleet.upload(IMAGE, "2.0.0")
    fleet.target("dev-deleted", "2.0.0", artifact.download_url)
    # No rollout uses it, so the artifact service lets it be deleted.
    fleet.artifacts.DeleteArtifact(apb.DeleteArtifactRequest(artifact_id=artifact.artifact_id))
    agent.start()

    error = failed_untouched(fleet, agent, artifact)
    assert error.startswith("token request: HTTP 404 artifact_not_found"), error
    # A permanent 404: one token request, no exchange or download, no retry.
    assert access_log.count("POST", TOKEN_ROUTE) == 1, access_log.lines
    assert access_log.count("POST", TOKEN_ROUTE, 404) == 1, access_log.lines
    assert access_log.count("POST", EXCHANGE_ROUTE) == 0
    assert access_log.count("GET", DOWNLOAD_ROUTE) == 0
    assert "retrying" not in agent.log_text()

    ignored_afterwards(fleet, agent)
    assert access_log.requests() == 1, access_log.lines  # no further requests
    assert fleet.reported("dev-deleted")["state"] == "failed"
    assert agent.booted_slot()["version"] == "1.0.0"


def test_an_artifact_over_the_devices_size_cap_fails_before_any_byte(
    fleet: Fleet, access_log: AccessLog
) -> None:
    agent = started(fleet, "dev-capped", max_download_bytes=100_000)
    artifact = fleet.upload(IMAGE, "2.0.0")
    fleet.target("dev-capped", "2.0.0", artifact.download_url)

    error = failed_untouched(fleet, agent, artifact)
    assert error == "the artifact is 300000 bytes, over this device's cap of 100000", error
    # The grant's size decides it: one token, one exchange, not a byte downloaded, no retry.
    assert access_log.count("POST", TOKEN_ROUTE, 201) == 1, access_log.lines
    assert access_log.count("POST", EXCHANGE_ROUTE, 200) == 1, access_log.lines
    assert access_log.count("GET", DOWNLOAD_ROUTE) == 0, access_log.lines
    assert "retrying" not in agent.log_text()

    ignored_afterwards(fleet, agent)
    assert access_log.requests() == 2, access_log.lines  # no further requests


def test_a_stored_size_that_is_not_the_signed_one_fails(
    fleet: Fleet, access_log: AccessLog
) -> None:
    agent = started(fleet, "dev-size")
    artifact = fleet.upload(IMAGE, "2.0.0")
    # Someone edits the artifact's record after signing: the plane now offers 1,000 bytes
    # more than the signed manifest names (the blob and the manifest are as uploaded).
    with sqlite3.connect(fleet.tmp / "artifacts.db") as database:
        changed = database.execute(
            "UPDATE artifacts SET size = size + 1000 WHERE artifact_id = ?",
            (artifact.artifact_id,),
        ).rowcount
    assert changed == 1
    fleet.target("dev-size", "2.0.0", artifact.download_url)

    error = failed_untouched(fleet, agent, artifact)
    assert error == "the grant's size or sha256 differs from the signed manifest", error
    assert access_log.count("POST", EXCHANGE_ROUTE, 200) == 1, access_log.lines
    assert access_log.count("GET", DOWNLOAD_ROUTE) == 0, access_log.lines
    assert "retrying" not in agent.log_text()
