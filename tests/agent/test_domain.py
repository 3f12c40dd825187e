"""The agent's pure rules: deciding from deltas, verification, floor, retries, reports."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from device_agent import domain
from device_agent.domain import (
    Decision,
    Firmware,
    Grant,
    HttpAction,
    Memory,
    Phase,
    RetryPolicy,
    Target,
    Verdict,
)
from device_agent.errors import BadCommandError, DownloadError, VerificationError
from services.artifacts import domain as server_domain

AID = "0123456789abcdef0123456789abcdef"
BASE = "http://plane.example:8080"
URL = f"{BASE}/v1/artifacts/{AID}"
RUNNING = Firmware("1.0.0", None)


def delta(version: int, firmware: Any) -> dict[str, Any]:
    return {"version": version, "state": {"firmware": firmware}}


def decide(message: Any, memory: Memory | None = None, resync: bool = False) -> Decision:
    return domain.decide(message, memory or Memory(), RUNNING, BASE, resync=resync)


# --- deciding -----------------------------------------------------------------------------------


def test_a_new_firmware_is_an_update_command() -> None:
    decision = decide(delta(3, {"version": "2.0.0", "url": URL}))
    assert decision.verdict is Verdict.START
    assert decision.target == Target("2.0.0", URL, AID)
    assert decision.shadow_version == 3


def test_stale_and_duplicate_deltas_are_ignored() -> None:
    memory = Memory(shadow_version=5)
    assert decide(delta(5, {"version": "2.0.0", "url": URL}), memory).verdict is Verdict.IGNORE
    assert decide(delta(4, {"version": "2.0.0", "url": URL}), memory).verdict is Verdict.IGNORE
    assert decide(delta(6, {"version": "2.0.0", "url": URL}), memory).verdict is Verdict.START


def test_a_resync_may_repeat_the_newest_version() -> None:
    doc = {"version": 5, "state": {"desired": {"firmware": {"version": "2.0.0", "url": URL}}}}
    assert decide(doc, Memory(shadow_version=5), resync=True).verdict is Verdict.START
    assert decide(doc, Memory(shadow_version=6), resync=True).verdict is Verdict.IGNORE


def test_a_delta_carries_only_differing_leaves_the_rest_is_what_runs() -> None:
    running = Firmware("1.0.0", URL)
    decision = domain.decide(delta(2, {"version": "1.1.0"}), Memory(), running, BASE)
    assert decision.target == Target("1.1.0", URL, AID)


def test_what_runs_what_is_in_hand_and_what_failed_are_not_restarted() -> None:
    target = Target("2.0.0", URL, AID)
    message = delta(9, {"version": "2.0.0", "url": URL})
    assert decide(message, Memory(busy=target)).verdict is Verdict.IGNORE
    assert decide(message, Memory(failed=target)).verdict is Verdict.IGNORE
    same = domain.decide(message, Memory(), Firmware("2.0.0", URL), BASE)
    assert same.verdict is Verdict.IGNORE
    assert same.shadow_version == 9


@pytest.mark.parametrize(
    ("block", "words"),
    [
        ("2.0.0", "must be an object"),
        ({"version": 2, "url": URL}, "version must be a string"),
        ({"version": "two", "url": URL}, "semver"),
        ({"version": "2.0.0"}, "url must be"),
        ({"version": "2.0.0", "url": "ftp://plane.example/v1/artifacts/" + AID}, "http(s)"),
        ({"version": "2.0.0", "url": f"http://evil.example:8080/v1/artifacts/{AID}"}, "trusts"),
        ({"version": "2.0.0", "url": f"{BASE}/v1/artifacts/nothex"}, "32 hex"),
        ({"version": "2.0.0", "url": URL, "extra": 1}, "unknown fields"),
        ({"version": "2.0.0", "url": "http://[::1"}, "not a URL"),
    ],
)
def test_a_malformed_firmware_block_is_rejected_clearly(block: Any, words: str) -> None:
    decision = decide(delta(2, block))
    assert decision.verdict is Verdict.REJECT
    assert words in decision.reason
    with pytest.raises(BadCommandError):
        domain.parse_target(block, Firmware("1.0.0", None), BASE)


def test_a_malformed_block_is_reported_once() -> None:
    block = {"version": "nope", "url": URL}
    key = domain.canonical_json({"block": block}).decode()
    assert decide(delta(3, block), Memory(failed_block=key)).verdict is Verdict.IGNORE


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(), st.lists, max_leaves=5))
def test_decide_never_raises_on_any_json(value: Any) -> None:
    for message in (value, {"version": 1, "state": value}, delta(1, value)):
        assert decide(message).verdict in set(Verdict)


# --- versions and the floor ---------------------------------------------------------------------


def test_semver_precedence() -> None:
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta.2", "1.0.0-beta.11"]
    ordered += ["1.0.0-rc.1", "1.0.0", "1.0.1", "1.10.0", "2.0.0"]
    keys = [domain.version_key(v) for v in ordered]
    assert keys == sorted(keys)
    assert domain.version_key("1.0.0+build.5") == domain.version_key("1.0.0")


versions = st.tuples(*[st.integers(0, 30)] * 3).map(lambda t: f"{t[0]}.{t[1]}.{t[2]}")


@given(st.lists(st.tuples(versions, st.none() | versions), min_size=1, max_size=20), versions)
def test_the_floor_rises_only_to_declared_floors_and_nothing_below_it_passes(
    commits: list[tuple[str, str | None]], factory: str
) -> None:
    # (version committed, the rollback_floor its manifest declares or None)
    floor = factory
    for _version, declared in commits:
        before = floor
        raised = domain.raise_floor(floor, declared)
        assert raised is not None
        floor = raised
        assert domain.version_key(floor) >= domain.version_key(before)
        if declared is None:
            assert floor == before  # a build declaring nothing leaves the floor as it is
        else:
            assert domain.version_key(floor) == max(
                domain.version_key(before), domain.version_key(declared)
            )
    top = max([factory, *(d for _, d in commits if d is not None)], key=domain.version_key)
    assert domain.version_key(floor) == domain.version_key(top)
    assert all(
        domain.is_below(v, floor) == (domain.version_key(v) < domain.version_key(top))
        for v, _ in commits
    )


def test_committing_a_build_without_a_declared_floor_allows_going_back() -> None:
    floor = domain.raise_floor("1.0.0", None)  # committed 1.2.0, which declares nothing
    assert floor == "1.0.0" and not domain.is_below("1.1.0", floor)
    floor = domain.raise_floor(floor, "1.2.0")  # committed a build declaring 1.2.0
    assert floor == "1.2.0" and domain.is_below("1.1.0", floor)
    assert domain.raise_floor(floor, "1.1.0") == "1.2.0"  # it never goes down
    assert domain.raise_floor(None, None) is None


# --- canonical JSON agrees with the artifact service --------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(st.dictionaries(st.text(), json_values, max_size=6))
def test_canonical_json_is_the_artifact_services(value: dict[str, Any]) -> None:
    assert domain.canonical_json(value) == server_domain.canonical_json(value)


# --- verification -------------------------------------------------------------------------------


def signed_grant(
    key: Ed25519PrivateKey,
    data: bytes = b"firmware bytes",
    version: str = "2.0.0",
    compatible: tuple[str, ...] = ("gw-100",),
    artifact_id: str = AID,
    rollback_floor: str | None = None,
    manifest_json: dict[str, Any] | None = None,
) -> tuple[Grant, dict[str, bytes]]:
    """A grant whose manifest the artifact service built (or `manifest_json`, signed as is)."""
    manifest = server_domain.Manifest(
        artifact_id,
        "fw",
        version,
        len(data),
        hashlib.sha256(data).hexdigest(),
        compatible,
        rollback_floor,
    ).canonical()
    if manifest_json is not None:
        manifest = server_domain.canonical_json({**json.loads(manifest), **manifest_json})
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key_id = hashlib.sha256(raw).hexdigest()[:16]
    body = {
        "url": f"{BASE}/v1/downloads/secret",
        "expires_at": 1,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "manifest": manifest.decode(),
        "signature": base64.b64encode(key.sign(manifest)).decode(),
        "key_id": key_id,
    }
    return domain.parse_grant(body, 1 << 20), {key_id: raw}


TARGET = Target("2.0.0", URL, AID)


def test_a_good_artifact_verifies() -> None:
    grant, keys = signed_grant(Ed25519PrivateKey.generate())
    manifest = domain.verify_manifest(grant, keys, TARGET, "gw-100", "1.0.0")
    domain.verify_content(manifest, grant.size, grant.sha256)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"hardware": "gw-200"}, "not compatible"),
        ({"floor": "3.0.0"}, "below the anti-rollback floor"),
        ({"version": "2.0.1"}, "desired is 2.0.0"),
        ({"artifact_id": "f" * 32}, "not " + AID),
        ({"untrusted": True}, "not trusted"),
        ({"tamper": True}, "signature does not verify"),
    ],
)
def test_each_verification_failure_is_named(change: dict[str, Any], words: str) -> None:
    key = Ed25519PrivateKey.generate()
    grant, keys = signed_grant(
        key,
        version=change.get("version", "2.0.0"),
        artifact_id=change.get("artifact_id", AID),
    )
    if change.get("untrusted"):
        keys = {"0" * 16: next(iter(keys.values()))}
    if change.get("tamper"):
        grant = Grant(**{**grant.__dict__, "manifest": grant.manifest.replace("fw", "fx")})
    with pytest.raises(VerificationError, match=words):
        domain.verify_manifest(
            grant, keys, TARGET, change.get("hardware", "gw-100"), change.get("floor", "1.0.0")
        )


def test_a_declared_rollback_floor_is_read_from_the_signed_manifest() -> None:
    grant, keys = signed_grant(Ed25519PrivateKey.generate(), rollback_floor="1.5.0")
    assert '"rollback_floor":"1.5.0"' in grant.manifest
    manifest = domain.verify_manifest(grant, keys, TARGET, "gw-100", "1.0.0")
    assert manifest.rollback_floor == "1.5.0"
    plain, plain_keys = signed_grant(Ed25519PrivateKey.generate())
    assert domain.verify_manifest(plain, plain_keys, TARGET, "gw-100", None).rollback_floor is None


def test_a_tampered_rollback_floor_fails_the_signature() -> None:
    grant, keys = signed_grant(Ed25519PrivateKey.generate(), rollback_floor="2.0.0")
    for forged in (
        grant.manifest.replace('"rollback_floor":"2.0.0"', '"rollback_floor":"0.0.1"'),
        grant.manifest.replace('"rollback_floor":"2.0.0",', ""),  # the floor removed
    ):
        assert forged != grant.manifest
        tampered = Grant(**{**grant.__dict__, "manifest": forged})
        with pytest.raises(VerificationError, match="signature does not verify"):
            domain.verify_manifest(tampered, keys, TARGET, "gw-100", None)
    # Added to a manifest signed without one, too.
    plain, plain_keys = signed_grant(Ed25519PrivateKey.generate())
    added = plain.manifest.replace('"name"', '"rollback_floor":"2.0.0","name"')
    with pytest.raises(VerificationError, match="signature does not verify"):
        domain.verify_manifest(
            Grant(**{**plain.__dict__, "manifest": added}), plain_keys, TARGET, "gw-100", None
        )


@pytest.mark.parametrize("floor", ["2.0.1", "two", 2, None, "1.0"])
def test_a_signed_but_malformed_rollback_floor_is_refused(floor: Any) -> None:
    # Only a faulty signer produces these (the service refuses them at upload): still refused.
    grant, keys = signed_grant(
        Ed25519PrivateKey.generate(), manifest_json={"rollback_floor": floor}
    )
    with pytest.raises(VerificationError, match="malformed"):
        domain.verify_manifest(grant, keys, TARGET, "gw-100", None)


def test_content_must_match_the_manifest() -> None:
    grant, keys = signed_grant(Ed25519PrivateKey.generate())
    manifest = domain.verify_manifest(grant, keys, TARGET, "gw-100", None)
    with pytest.raises(VerificationError, match="bytes"):
        domain.verify_content(manifest, grant.size + 1, grant.sha256)
    with pytest.raises(VerificationError, match="sha256"):
        domain.verify_content(manifest, grant.size, "0" * 64)


@pytest.mark.parametrize("field", ["url", "size", "sha256", "manifest", "signature", "key_id"])
def test_a_malformed_grant_is_a_download_error(field: str) -> None:
    grant, _ = signed_grant(Ed25519PrivateKey.generate())
    body = {**grant.__dict__, "signature": base64.b64encode(grant.signature).decode()}
    body[field] = 12 if field != "size" else "big"
    with pytest.raises(DownloadError, match="malformed"):
        domain.parse_grant(body, 1 << 20)


def test_a_grant_over_the_size_cap_is_refused() -> None:
    grant, _ = signed_grant(Ed25519PrivateKey.generate(), data=b"x" * 100)
    body = {**grant.__dict__, "signature": base64.b64encode(grant.signature).decode()}
    with pytest.raises(DownloadError, match="cap"):
        domain.parse_grant(body, 99)


# --- retries ------------------------------------------------------------------------------------


@given(st.integers(0, 200), st.floats(0, 1, exclude_max=True), st.floats(0, 100))
def test_backoff_is_bounded_jittered_and_respects_retry_after(
    attempt: int, rand: float, retry_after: float
) -> None:
    policy = RetryPolicy(base_seconds=0.5, cap_seconds=30)
    delay = domain.backoff_delay(attempt, policy, rand, retry_after)
    assert 0 <= delay <= max(30, retry_after * 1.5)
    assert delay >= retry_after
    assert domain.backoff_delay(attempt, policy, rand) <= min(30, 0.5 * 2**attempt)


@pytest.mark.parametrize(
    ("status", "code", "action"),
    [
        (429, "too_many_downloads", HttpAction.RETRY),
        (503, "storage_unavailable", HttpAction.RETRY),
        (410, "url_expired", HttpAction.NEW_GRANT),
        (410, "token_used", HttpAction.NEW_GRANT),
        (404, "url_not_found", HttpAction.NEW_GRANT),
        (416, "range_not_satisfiable", HttpAction.FROM_ZERO),
        (404, "artifact_not_found", HttpAction.FAIL),
        (410, "url_used", HttpAction.FAIL),
        (403, "not_targeted", HttpAction.FAIL),
        (401, "unauthenticated", HttpAction.FAIL),
        (400, "bad_request", HttpAction.FAIL),
    ],
)
def test_each_http_answer_has_one_action(status: int, code: str, action: HttpAction) -> None:
    assert domain.classify_http(status, code) is action


# --- reports ------------------------------------------------------------------------------------


def test_reports_tell_what_runs_and_clear_stale_fields() -> None:
    report = domain.firmware_report(Phase.DOWNLOADING, RUNNING, TARGET, percent=50)
    assert report == {
        "firmware": {
            "version": "1.0.0",
            "url": None,
            "state": "downloading",
            "percent": 50,
            "error": None,
            "target": {"version": "2.0.0", "url": URL},
        }
    }
    failed = domain.firmware_report(Phase.FAILED, RUNNING, TARGET, percent=50, error="x" * 999)
    assert failed["firmware"]["percent"] is None
    assert len(failed["firmware"]["error"]) <= domain.MAX_ERROR_CHARS
    json.dumps(failed)
    # A device that never updated clears every field of an update too (a stale report that
    # landed late must not leave its `state` behind once the truth is sent again).
    idle = domain.firmware_report(None, RUNNING, TARGET, percent=50, error="x")
    assert idle == {
        "firmware": {
            "version": "1.0.0",
            "url": None,
            "state": None,
            "percent": None,
            "error": None,
            "target": None,
        }
    }


@given(st.lists(st.integers(0, 100), min_size=1).map(sorted))
def test_progress_is_reported_at_most_five_times(percents: list[int]) -> None:
    last: int | None = None
    sent = 0
    for percent in percents:
        if domain.should_report_progress(last, percent):
            last = percent
            sent += 1
    assert sent <= 5
