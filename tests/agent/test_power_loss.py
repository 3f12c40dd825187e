"""Power-loss safety: the agent SIGKILLs itself at each step of an update (the
`OTA_AGENT_CRASH_AT` hook), is started again, and must boot a verified slot and report the truth.
"""

from __future__ import annotations

import hashlib
import os
import signal

import pytest

from tests.agent.conftest import AgentProcess, Fleet

IMAGE = os.urandom(200_000)

# Steps of a healthy update, in order, and how the update ends after a kill there.
HEALTHY_STEPS = {
    "accepted": "succeeded",  # job persisted, nothing downloaded: retried after the restart
    "downloading": "succeeded",  # first chunk in the partial file: resumed with a Range
    "downloaded": "succeeded",  # the whole file kept: not fetched again, verified after restart
    "verified": "succeeded",
    "installing": "succeeded",  # staging half written, slot b absent: fetched, installed again
    "installed": "succeeded",  # slot b written, pointer still on a
    "marked": "succeeded",  # pending marker written, pointer still on a: marker dropped
    "switched": "succeeded",  # pointer on b: the boot step runs the health check
    "booted": "rolled_back",  # died during its trial boot: like a board that never came up
    "checked": "rolled_back",  # health check done but no verdict recorded: same
    "decided": "succeeded",  # commit recorded: the boot step finishes it
}
# A sick update (its health check fails) killed after the verdict.
SICK_STEPS = ["decided", "reverted"]


def assert_boots_verified_slot(agent: AgentProcess) -> dict[str, object]:
    slot = agent.booted_slot()
    if slot["sha256"] is None:
        assert (slot["slot"], slot["version"]) == ("a", "1.0.0")
    else:
        image = agent.data_dir / "system" / "slots" / str(slot["slot"]) / "image"
        assert hashlib.sha256(image.read_bytes()).hexdigest() == slot["sha256"]
    return slot


def kill(fleet: Fleet, agent: AgentProcess, step: str, image: bytes) -> None:
    agent.start(crash_at=step)
    fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0")
    artifact = fleet.upload(image, "2.0.0")
    fleet.target(agent.device_id, "2.0.0", artifact.download_url)
    assert agent.wait_killed() == -signal.SIGKILL, agent.log_text()
    assert_boots_verified_slot(agent)


def kill_and_restart(fleet: Fleet, agent: AgentProcess, step: str, image: bytes) -> None:
    kill(fleet, agent, step, image)
    agent.start()


def partial_sizes(agent: AgentProcess) -> list[int]:
    return [part.stat().st_size for part in (agent.data_dir / "download").glob("*.part")]


def check_killed_mid_step(agent: AgentProcess, step: str) -> str | None:
    """What a kill inside a step left on disk; returns a line the restart must log, if any."""
    slots = agent.data_dir / "system" / "slots"
    if step == "downloading":
        # Part of the image, not all of it: a resume has something to resume from.
        [have] = partial_sizes(agent)
        assert 0 < have < len(IMAGE)
        return f"download: the server resumed at byte {have}"
    if step == "installing":
        # The image moved into the staging directory, no slot.json yet, slot b not there.
        assert partial_sizes(agent) == []
        assert (slots / ".staging-b" / "image").exists()
        assert not (slots / ".staging-b" / "slot.json").exists()
        assert not (slots / "b").exists()
    return None


@pytest.mark.parametrize("step", list(HEALTHY_STEPS))
def test_a_kill_at_each_step_of_an_update(fleet: Fleet, step: str) -> None:
    agent = fleet.agent(f"dev-kill-{step}")
    kill(fleet, agent, step, IMAGE)
    must_log = check_killed_mid_step(agent, step)
    agent.start()
    expected = HEALTHY_STEPS[step]
    firmware = fleet.wait_reported(agent, lambda fw: fw.get("state") == expected)
    slot = assert_boots_verified_slot(agent)
    # What the shadow says runs is what boots.
    assert firmware["version"] == slot["version"]
    assert slot["version"] == ("2.0.0" if expected == "succeeded" else "1.0.0")
    if expected == "succeeded":
        assert slot["sha256"] == hashlib.sha256(IMAGE).hexdigest()
    if must_log is not None:
        # Resumed from the partial file, not silently fetched again from byte 0.
        assert must_log in agent.log_text()
        assert "the server sent the whole artifact" not in agent.log_text()


@pytest.mark.parametrize("step", SICK_STEPS)
def test_a_kill_while_rolling_back(fleet: Fleet, step: str) -> None:
    agent = fleet.agent(f"dev-sick-{step}")
    kill_and_restart(fleet, agent, step, b"UNHEALTHY" + IMAGE)
    firmware = fleet.wait_reported(agent, lambda fw: fw.get("state") == "rolled_back")
    slot = assert_boots_verified_slot(agent)
    assert firmware["version"] == slot["version"] == "1.0.0"
    assert "health check" in firmware["error"]
