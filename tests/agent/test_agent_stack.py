"""The agent over the real stack: broker, gateway, shadow, artifact service, download plane.

Each test runs on Mosquitto + PostgreSQL and on amqtt + SQLite (the `stack` fixture).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import secrets
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protos.artifacts.v1 import artifacts_pb2 as apb
from protos.shadow.v1 import shadow_pb2 as spb
from services.artifacts import signing
from tests.agent.conftest import Fleet

IMAGE = os.urandom(300_000)


# A device id may hold colons, HTTP Basic's separator (the plane splits at the last one).
@pytest.mark.parametrize("device_id", ["dev-e2e", "site-4:gw:7"])
def test_an_update_end_to_end(fleet: Fleet, device_id: str) -> None:
    agent = fleet.agent(device_id)
    agent.start()
    fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0")
    artifact = fleet.upload(IMAGE, "2.0.0")
    fleet.target(device_id, "2.0.0", artifact.download_url)
    firmware = fleet.wait_reported(agent, lambda fw: fw.get("state") == "succeeded")
    assert firmware["version"] == "2.0.0"
    assert firmware["url"] == artifact.download_url
    assert "error" not in firmware
    slot = agent.booted_slot()
    assert (slot["slot"], slot["version"]) == ("b", "2.0.0")
    assert (agent.data_dir / "system" / "slots" / "b" / "image").read_bytes() == IMAGE
    # The delta is gone: desired firmware is what runs.
    assert "delta" not in fleet.stack.document(device_id)["state"]


def _assert_failed_untouched(fleet: Fleet, device_id: str, words: str) -> None:
    agent = next(a for a in fleet.agents if a.device_id == device_id)
    firmware = fleet.wait_reported(agent, lambda fw: fw.get("state") == "failed")
    assert words in firmware["error"], firmware
    assert firmware["version"] == "1.0.0"
    slot = agent.booted_slot()
    assert (slot["slot"], slot["version"]) == ("a", "1.0.0")


def test_incompatible_hardware_fails_and_leaves_the_slot(fleet: Fleet) -> None:
    agent = fleet.agent("dev-hw")
    agent.start()
    fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0")
    artifact = fleet.upload(IMAGE, "2.0.0", compatible=("gw-200",))
    fleet.target("dev-hw", "2.0.0", artifact.download_url)
    _assert_failed_untouched(fleet, "dev-hw", "not compatible")


def test_a_lower_version_fails_and_leaves_the_slot(fleet: Fleet) -> None:
    agent = fleet.agent("dev-low", factory_version="3.0.0")
    agent.start()
    fleet.wait_reported(agent, lambda fw: fw.get("version") == "3.0.0")
    artifact = fleet.upload(IMAGE, "2.0.0")
    fleet.target("dev-low", "2.0.0", artifact.download_url)
    firmware = fleet.wait_reported(agent, lambda fw: fw.get("state") == "failed")
    assert "anti-rollback floor" in firmware["error"]
    assert agent.booted_slot()["version"] == "3.0.0"


def _update(fleet: Fleet, device_id: str, artifact: apb.Artifact) -> None:
    agent = next(a for a in fleet.agents if a.device_id == device_id)
    fleet.target(device_id, artifact.version, artifact.download_url)
    firmware = fleet.wait_reported(
        agent,
        lambda fw: (
            fw.get("state") in ("succeeded", "failed", "rolled_back")
            and (fw.get("target") or {}).get("url") == artifact.download_url
        ),
    )
    assert (firmware["state"], firmware["version"]) == ("succeeded", artifact.version), firmware


def test_a_fleet_rollback_below_a_committed_build_works_unless_the_build_declares_a_floor(
    fleet: Fleet,
) -> None:
    # What a rollout's rollback_on_abort does: desired goes back to the version run before.
    plain = fleet.agent("dev-plain")
    floored = fleet.agent("dev-floored")
    old = fleet.upload(IMAGE, "1.1.0")
    new = fleet.upload(IMAGE[::-1], "1.2.0")
    secure = fleet.upload(IMAGE[1:], "1.2.0", name="firmware-secure", rollback_floor="1.2.0")
    assert not new.HasField("rollback_floor") and secure.rollback_floor == "1.2.0"
    for agent in (plain, floored):
        agent.start()
        fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0")
        _update(fleet, agent.device_id, old)
    _update(fleet, "dev-plain", new)
    _update(fleet, "dev-floored", secure)

    # 1.2.0 declared no floor: the device goes back to 1.1.0.
    _update(fleet, "dev-plain", old)
    assert plain.booted_slot()["version"] == "1.1.0"

    # The secure 1.2.0 declared rollback_floor 1.2.0: 1.1.0 is refused, 1.2.0 keeps running.
    fleet.target("dev-floored", old.version, old.download_url)
    firmware = fleet.wait_reported(
        floored,
        lambda fw: (
            fw.get("state") == "failed" and (fw.get("target") or {}).get("url") == old.download_url
        ),
    )
    assert "version 1.1.0 is below the anti-rollback floor 1.2.0" in firmware["error"]
    assert firmware["version"] == "1.2.0"
    assert floored.booted_slot()["version"] == "1.2.0"


def test_a_signature_by_an_untrusted_key_fails(fleet: Fleet) -> None:
    other = Ed25519PrivateKey.generate().public_key()
    raw = other.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    keys = {signing.key_id_of(other): base64.b64encode(raw).decode()}
    agent = fleet.agent("dev-key", trusted_keys=keys)
    agent.start()
    fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0")
    artifact = fleet.upload(IMAGE, "2.0.0")
    fleet.target("dev-key", "2.0.0", artifact.download_url)
    _assert_failed_untouched(fleet, "dev-key", "not trusted")


def test_a_wrong_signature_under_the_trusted_key_id_fails(fleet: Fleet) -> None:
    # The right key id, the wrong key: the signature does not verify.
    other = Ed25519PrivateKey.generate().public_key()
    raw = other.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    agent = fleet.agent(
        "dev-sig", trusted_keys={fleet.signer.key_id: base64.b64encode(raw).decode()}
    )
    agent.start()
    fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0")
    artifact = fleet.upload(IMAGE, "2.0.0")
    fleet.target("dev-sig", "2.0.0", artifact.download_url)
    _assert_failed_untouched(fleet, "dev-sig", "signature does not verify")


def test_tampered_bytes_fail_and_leave_the_slot(fleet: Fleet) -> None:
    agent = fleet.agent("dev-tamper")
    agent.start()
    fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0")
    artifact = fleet.upload(IMAGE, "2.0.0")
    # Someone flips bytes in storage after signing (same size, other content).
    stored = [p for p in (fleet.tmp / "artifact-bytes").rglob("*") if p.is_file()]
    assert len(stored) == 1
    stored[0].write_bytes(bytes(b ^ 0xFF for b in IMAGE[:16]) + IMAGE[16:])
    fleet.target("dev-tamper", "2.0.0", artifact.download_url)
    _assert_failed_untouched(fleet, "dev-tamper", "sha256")


def test_a_url_to_another_host_and_a_malformed_block_fail(fleet: Fleet) -> None:
    agent = fleet.agent("dev-bad")
    agent.start()
    fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0")
    artifact = fleet.upload(IMAGE, "2.0.0")
    elsewhere = artifact.download_url.replace("127.0.0.1", "evil.example")
    fleet.target("dev-bad", "2.0.0", elsewhere)
    _assert_failed_untouched(fleet, "dev-bad", "not the download plane")
    fleet.stack.update_desired({"dev-bad": {"firmware": {"version": "banana", "url": None}}})
    firmware = fleet.wait_reported(agent, lambda fw: "semver" in (fw.get("error") or ""))
    assert firmware["state"] == "failed"


def test_a_failed_health_check_rolls_back(fleet: Fleet) -> None:
    agent = fleet.agent("dev-sick")
    agent.start()
    fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0")
    artifact = fleet.upload(b"UNHEALTHY" + IMAGE, "2.0.0")
    fleet.target("dev-sick", "2.0.0", artifact.download_url)
    firmware = fleet.wait_reported(agent, lambda fw: fw.get("state") == "rolled_back")
    assert firmware["version"] == "1.0.0"
    assert "health check exited with 1" in firmware["error"]
    slot = agent.booted_slot()
    assert (slot["slot"], slot["version"]) == ("a", "1.0.0")


def test_resync_after_being_offline_across_a_desired_change(fleet: Fleet) -> None:
    agent = fleet.agent("dev-away")
    agent.start()
    fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0")
    agent.stop()
    artifact = fleet.upload(IMAGE, "2.0.0")
    fleet.target("dev-away", "2.0.0", artifact.download_url)
    agent.start()
    firmware = fleet.wait_reported(agent, lambda fw: fw.get("state") == "succeeded")
    assert firmware["version"] == "2.0.0"


def test_a_partial_download_is_resumed(fleet: Fleet) -> None:
    agent = fleet.agent("dev-resume")
    artifact = fleet.upload(IMAGE, "2.0.0")
    # What a download cut short by a power loss leaves behind: the first part of the bytes.
    partial = agent.data_dir / "download" / f"{artifact.artifact_id}.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(IMAGE[:120_000])
    agent.start()
    fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0")
    fleet.target("dev-resume", "2.0.0", artifact.download_url)
    firmware = fleet.wait_reported(agent, lambda fw: fw.get("state") == "succeeded")
    assert firmware["version"] == "2.0.0"
    assert (agent.data_dir / "system" / "slots" / "b" / "image").read_bytes() == IMAGE
    assert "resuming from byte 120000 of 300000" in agent.log_text()


def test_a_report_the_platform_could_not_take_is_sent_again(fleet: Fleet) -> None:
    """The gateway answers `rejected` 503 when the shadow service is busy or down (429 when
    the device is over its rate): the agent sends its report again, so the shadow ends up with
    the truth (a lost final report would leave a rollout waiting)."""
    agent = fleet.agent("dev-resend")
    agent.start()
    fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0")
    before = shadow_version(fleet, "dev-resend")
    gateway = fleet.stack.connect(fleet.stack.gateway_endpoint)  # who answers devices
    assert gateway.wait_connected()
    gateway.publish("dev-resend/state/update/rejected", {"code": 503, "message": "busy"})
    deadline = time.monotonic() + 30
    while shadow_version(fleet, "dev-resend") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert shadow_version(fleet, "dev-resend") > before  # the report came again
    assert fleet.reported("dev-resend")["version"] == "1.0.0"


def test_a_report_nobody_answered_is_sent_again(fleet: Fleet) -> None:
    """A report the broker took but no gateway handled (it went to a gateway's session that
    never came back: here the gateway is replaced by one with a new client id, as a redeployed
    gateway has) gets no `accepted`: after `report_confirm_seconds` the agent sends it again,
    and the new gateway writes it (ADR 44)."""
    stack = fleet.stack
    agent = fleet.agent("dev-unanswered", report_confirm_seconds=1)
    agent.start()
    fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0")
    before = shadow_version(fleet, "dev-unanswered")
    watcher = stack.connect(stack.gateway_endpoint)
    assert watcher.wait_connected()
    watcher.subscribe("dev-unanswered/state/update")
    stack.stop_gateway()
    stack.gateway_settings = dataclasses.replace(
        stack.gateway_settings, client_id=f"ota-gateway-{secrets.token_hex(3)}"
    )
    # A report while no gateway serves: the agent re-sends one the "shadow" rejected as busy.
    watcher.publish("dev-unanswered/state/update/rejected", {"code": 503, "message": "busy"})
    lost = watcher.expect("dev-unanswered/state/update", timeout=30)
    assert lost["state"]["reported"]["firmware"]["version"] == "1.0.0"
    assert isinstance(lost["clientToken"], str)
    stack.start_gateway()
    deadline = time.monotonic() + 60
    while shadow_version(fleet, "dev-unanswered") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert shadow_version(fleet, "dev-unanswered") > before, agent.log_text()
    assert fleet.reported("dev-unanswered")["version"] == "1.0.0"
    assert "report unanswered" in agent.log_text()


def test_an_older_report_written_after_the_latest_is_corrected(fleet: Fleet) -> None:
    """With several gateways one device's reports can commit out of order: an older report
    (here one from a previous run of the agent, written over gRPC) lands after the latest, and
    its gateway publishes its `accepted`. The agent sees another firmware report written at a
    higher version than its own latest and sends what it runs again (ADR 44)."""
    stack = fleet.stack
    agent = fleet.agent("dev-late")
    agent.start()
    truth = fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0")
    late = {
        "state": {"reported": {"firmware": {"state": "downloading", "version": "0.9.0"}}},
        "clientToken": "0a1b2c-7",
    }
    written = stack.shadow.UpdateShadow(
        spb.UpdateShadowRequest(device_id="dev-late", request_json=json.dumps(late))
    )
    assert fleet.reported("dev-late")["version"] == "0.9.0"  # the shadow now tells a stale tale
    gateway = stack.connect(stack.gateway_endpoint)
    assert gateway.wait_connected()
    gateway.publish("dev-late/state/update/accepted", written.accepted_json.encode())
    firmware = fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0")
    assert firmware == truth
    assert shadow_version(fleet, "dev-late") > written.version
    assert "an older report was written after the latest" in agent.log_text()


def test_malformed_accepted_messages_are_ignored(fleet: Fleet) -> None:
    """`update/accepted` is outside input to the agent: payloads that are not JSON, not an
    object, or carry a token or version of the wrong type trigger no re-send and break nothing;
    the next real overwrite is still corrected."""
    stack = fleet.stack
    agent = fleet.agent("dev-junk")
    agent.start()
    truth = fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0")
    before = shadow_version(fleet, "dev-junk")
    gateway = stack.connect(stack.gateway_endpoint)
    assert gateway.wait_connected()
    junk: list[bytes | object] = [
        b"{not json",
        [1, 2],
        "text",
        {"state": "reported", "version": 10**6},
        {"state": {"reported": {"firmware": {}}}, "version": "99", "clientToken": "x-1"},
        {"state": {"reported": {"firmware": {}}}, "version": True, "clientToken": ["x"]},
        {"state": {"reported": []}, "version": 10**6},
    ]
    for payload in junk:
        gateway.publish("dev-junk/state/update/accepted", payload)
    # A message the agent answers, after the junk: when its answer is in, the junk was read.
    gateway.publish("dev-junk/state/update/rejected", {"code": 503, "message": "busy"})
    fleet.wait_reported(agent, lambda fw: shadow_version(fleet, "dev-junk") > before)
    assert agent.process is not None and agent.process.poll() is None
    assert "an older report was written after the latest" not in agent.log_text()
    assert "Traceback" not in agent.log_text()
    late = {"state": {"reported": {"firmware": {"state": "downloading", "version": "0.9.0"}}}}
    written = stack.shadow.UpdateShadow(
        spb.UpdateShadowRequest(device_id="dev-junk", request_json=json.dumps(late))
    )
    gateway.publish("dev-junk/state/update/accepted", written.accepted_json.encode())
    assert fleet.wait_reported(agent, lambda fw: fw.get("version") == "1.0.0") == truth


def shadow_version(fleet: Fleet, device_id: str) -> int:
    reply = fleet.stack.shadow.GetShadow(spb.GetShadowRequest(device_id=device_id))
    return int(reply.version)
