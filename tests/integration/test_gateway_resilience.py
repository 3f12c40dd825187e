"""The gateway under stress: a crash and restart loses nothing, a shadow call that times out
applies nothing, hostile payloads break nothing.

Every test runs on both `stack` brokers. The restart test runs the gateway as users do
(`python -m services.gateway`, a subprocess killed with SIGKILL); the fuzz test runs it in
process with the rate limit out of the way.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import random
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY
from sqlalchemy import select

from services.shadow.schema import devices
from tests.integration.conftest import TIMEOUT, Device, Stack, gateway_subprocess

# --- helpers ----------------------------------------------------------------------------------


def next_message(device: Device, topics: set[str], timeout: float) -> tuple[str, bytes] | None:
    """The oldest message not yet taken on any of `topics` (raw), or None after `timeout`."""
    for i, (topic, payload) in enumerate(device.backlog):
        if topic in topics:
            del device.backlog[i]
            return topic, payload
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            topic, payload = device.received.get(timeout=remaining)
        except queue.Empty:
            return None
        if topic in topics:
            return topic, payload
        device.backlog.append((topic, payload))
    return None


def wait_gateway_serving(device: Device, device_id: str, process: subprocess.Popen[bytes]) -> None:
    """Ask `<id>/state/get` until the gateway answers (accepted or rejected: it serves)."""
    answers = {f"{device_id}/state/get/accepted", f"{device_id}/state/get/rejected"}
    deadline = time.monotonic() + 30.0
    attempt = 0
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the gateway exited with {process.returncode}"
        device.publish(f"{device_id}/state/get", {"clientToken": f"ready-{attempt}"})
        if next_message(device, answers, timeout=1.0) is not None:
            return
        attempt += 1
    raise AssertionError("the gateway subprocess never answered")


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.kill()
        process.wait(TIMEOUT)


# --- restart ----------------------------------------------------------------------------------


def test_a_killed_gateway_loses_nothing_across_a_restart(stack: Stack, tmp_path: Path) -> None:
    ids = [f"dev-{i}" for i in range(5)]
    devices = {device_id: stack.device(device_id) for device_id in ids}
    log = tmp_path / "gw.log"
    first = gateway_subprocess(stack, log)
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_gateway_serving(devices["dev-0"], "dev-0", first)
        first.kill()  # SIGKILL: no clean disconnect, no chance to finish anything
        first.wait(TIMEOUT)

        # While no gateway runs: operators change desired state (the outbox keeps the deltas),
        # and a device reports (the gateway's persistent session on the broker keeps it).
        stack.update_desired(
            {
                device_id: {"firmware": {"version": "7.0", "url": f"u/{device_id}"}}
                for device_id in ids
            }
        )
        reporter = devices["dev-1"]
        reporter.publish(
            "dev-1/state/update",
            {"state": {"reported": {"firmware": {"version": "6.0"}}}, "clientToken": "while-down"},
        )

        second = gateway_subprocess(stack, log)  # the same client id, so the same session
        for device_id, device in devices.items():
            delta = device.expect(f"{device_id}/state/update/delta", timeout=30.0)
            assert delta["state"] == {"firmware": {"version": "7.0", "url": f"u/{device_id}"}}
            assert delta["version"] == 1
        accepted = reporter.expect("dev-1/state/update/accepted", timeout=30.0)
        assert accepted["clientToken"] == "while-down"
        assert accepted["version"] == 2
        document = stack.document("dev-1")
        assert document["version"] == 2
        assert document["state"]["reported"] == {"firmware": {"version": "6.0"}}
        assert document["state"]["delta"] == {"firmware": {"version": "7.0", "url": "u/dev-1"}}
        # And the new gateway serves new requests as well.
        reporter.publish(
            "dev-1/state/update", {"state": {"reported": {"up": 1}}, "clientToken": "a"}
        )
        assert reporter.expect("dev-1/state/update/accepted")["clientToken"] == "a"
    finally:
        stop_process(first)
        stop_process(second)
        print(log.read_text(errors="replace") if log.exists() else "(no gateway log)")


# --- a shadow call that times out -------------------------------------------------------------


def finished_batches(code: str | None = None) -> float:
    """BatchUpdateShadow calls the in-process shadow server has finished (with `code`)."""
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name != "ota_grpc_request_seconds":
            continue
        for sample in metric.samples:
            labels = sample.labels
            if (
                sample.name.endswith("_count")
                and labels.get("method") == "BatchUpdateShadow"
                and code in (None, labels.get("code"))
            ):
                total += sample.value
    return total


def test_an_update_the_gateway_gave_up_on_is_never_applied(stack: Stack) -> None:
    """The gateway answers 503 when the shadow service does not answer in time. The service
    must not commit that update later, behind the device's next report (ADR 42): a stale
    report landing last once left a device that had finished its update `downloading`."""
    stack.gateway_settings = dataclasses.replace(stack.gateway_settings, rpc_timeout_seconds=1.0)
    stack.start_gateway()
    device_id = "slow-1"
    device = stack.device(device_id)
    topic = f"{device_id}/state/update"
    device.publish(topic, {"state": {"reported": {"step": "first"}}})
    assert device.expect(f"{topic}/accepted")["version"] == 1

    finished = finished_batches()
    gave_up = finished_batches("DEADLINE_EXCEEDED")
    # Another writer holds the device's row (PostgreSQL) or the database (SQLite) until the
    # gateway has given up on the next report.
    with stack.service.store.engine.begin() as conn:
        conn.execute(
            select(devices.c.version).where(devices.c.device_id == device_id).with_for_update()
        )
        device.publish(topic, {"state": {"reported": {"step": "stale"}}, "clientToken": "s"})
        rejected = device.expect(f"{topic}/rejected")
    assert (rejected["code"], rejected["clientToken"]) == (503, "s")

    device.publish(topic, {"state": {"reported": {"step": "latest"}}, "clientToken": "l"})
    assert device.expect(f"{topic}/accepted")["version"] == 2
    deadline = time.monotonic() + TIMEOUT
    while finished_batches() < finished + 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # until the server has finished the stale call too, whatever it did
    assert finished_batches() == finished + 2
    assert finished_batches("DEADLINE_EXCEEDED") == gave_up + 1  # refused, not committed
    document = stack.document(device_id)
    assert (document["version"], document["state"]["reported"]) == (2, {"step": "latest"})


# --- fuzz -------------------------------------------------------------------------------------

SEED = 20240611
# Few keys, so accepted updates cannot grow the document towards its 8 KiB limit.
KEY_POOL = ["a", "", "ключ", "k.e.y", "$x", "🔑"]
NESTED_KEYS = ["p", "ü", ""]
UNSTORABLE_KEYS = ["\x00", "\ud800", "p\x00"]
SAFE_CHARS = "abcXYZ019 _-./\\\"'{}[]:,é€中🙂\t\n\x01\x1f\x7f"
MAX_PAYLOAD = 16384  # the gateway's default max_payload_bytes
UPDATES = 250
GETS = 50


@dataclasses.dataclass
class Case:
    kind: str  # what the generator made, for failure messages
    payload: bytes
    expect: str  # "accept", "reject", "reject-413" or "either"
    token: str | None = None  # the clientToken the answer must echo, if any


def safe_string(rng: random.Random, longest: int = 8) -> str:
    return "".join(rng.choice(SAFE_CHARS) for _ in range(rng.randint(0, longest)))


def any_string(rng: random.Random) -> str:
    """Any code points; now and then a NUL or a lone surrogate, which no store keeps."""
    return "".join(
        chr(rng.choices([0, 0xD800, rng.randint(1, 0x10FFFF)], [1, 1, 20])[0])
        for _ in range(rng.randint(0, 6))
    )


def scalar(rng: random.Random, safe: bool) -> Any:
    choices: list[Any] = [
        None,
        True,
        False,
        rng.randint(-(2**70), 2**70),
        rng.randint(-10, 10),
        rng.uniform(-1e300, 1e300),
        rng.choice([0.0, -0.0, 5e-324, 1.7976931348623157e308, 0.1, -1.5]),
        safe_string(rng),
    ]
    if not safe:
        choices.append(any_string(rng))
    return rng.choice(choices)


def value(rng: random.Random, depth: int, safe: bool) -> Any:
    """A random JSON value nested at most `depth` levels (objects and arrays count)."""
    roll = rng.random()
    if depth <= 0 or roll < 0.5:
        return scalar(rng, safe)
    if roll < 0.75:
        return [value(rng, depth - 1, safe) for _ in range(rng.randint(0, 3))]
    names = NESTED_KEYS if safe else NESTED_KEYS + UNSTORABLE_KEYS
    return {rng.choice(names): value(rng, depth - 1, safe) for _ in range(rng.randint(0, 3))}


def section(rng: random.Random, safe: bool) -> dict[str, Any]:
    """A small patch over a few pool keys, nested at most 3 levels: the document stays small."""
    while True:
        patch = {rng.choice(KEY_POOL): value(rng, 2, safe) for _ in range(rng.randint(1, 3))}
        if len(encode(patch)) < 400:
            return patch


def encode(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False).encode(errors="surrogatepass")


def nested(levels: int, leaf: Any = 1) -> Any:
    for i in range(levels):
        leaf = {f"n{i}": leaf} if i % 2 else [leaf]
    return leaf


def update_case(rng: random.Random, n: int) -> Case:
    token = f"u-{n}"
    generators = [
        "valid",
        "valid",
        "valid",
        "maybe",
        "maybe",
        "bytes",
        "scalar",
        "top-keys",
        "bad-state",
        "bad-token",
        "bad-version",
        "unstorable",
        "bad-numbers",
        "deep",
        "huge",
        "bom",
    ]
    kind = rng.choice(generators)
    state: dict[str, Any]
    if kind == "valid":
        state = {
            name: section(rng, True)
            for name in rng.sample(["desired", "reported"], k=rng.randint(1, 2))
        }
        return Case(kind, encode({"state": state, "clientToken": token}), "accept", token)
    if kind == "maybe":
        state = {}
        for name in rng.sample(["desired", "reported"], k=rng.randint(1, 2)):
            state[name] = None if rng.random() < 0.1 else section(rng, False)
        document: dict[str, Any] = {"state": state, "clientToken": token}
        if rng.random() < 0.3:
            document["version"] = rng.randint(0, 400)
        return Case(kind, encode(document), "either", token)
    if kind == "bytes":
        return Case(kind, rng.randbytes(rng.randint(0, 200)), "reject")
    if kind == "scalar":
        top = rng.choice([scalar(rng, False), value(rng, 4, False), [{"state": {}}]])
        if isinstance(top, dict):  # only non-objects here
            top = [top]
        return Case(kind, encode(top), "reject")
    if kind == "top-keys":
        document = {any_string(rng): value(rng, 3, False) for _ in range(rng.randint(1, 4))}
        document[f"x-{n}"] = value(rng, 2, False)  # at least one unknown top-level key
        if rng.random() < 0.5:
            document["state"] = {"reported": section(rng, True)}
        document["clientToken"] = token
        return Case(kind, encode(document), "reject", token)
    if kind == "bad-state":
        bad = rng.choice(
            [
                value(rng, 0, False),
                [],
                {},
                {"desired": 5},
                {"reported": [1]},
                {"other": {}},
                {"desired": {}, "metadata": {}},
                {"delta": {"a": 1}},
            ]
        )
        return Case(kind, encode({"state": bad, "clientToken": token}), "reject", token)
    if kind == "bad-token":
        bad_token = rng.choice([5, True, ["t"], {"t": 1}, "t" * 65])
        document = {"state": {"reported": section(rng, True)}, "clientToken": bad_token}
        return Case(kind, encode(document), "reject")
    if kind == "bad-version":
        version = rng.choice([-1, "1", True, 1.5, None, [1]])  # None: no version, valid
        document = {"state": {"reported": section(rng, True)}, "clientToken": token}
        if version is not None:
            document["version"] = version
            return Case(kind, encode(document), "reject", token)
        return Case(kind, encode(document), "accept", token)
    if kind == "unstorable":
        bad = rng.choice(["a\x00b", "\ud800", "x\udfff", "\x00"])
        where = rng.choice(["value", "key", "deep"])
        patch: Any = (
            {"a": bad} if where == "value" else {bad: 1} if where == "key" else {"a": [{"b": bad}]}
        )
        text = json.dumps({"state": {"reported": patch}, "clientToken": token})  # ASCII escapes
        return Case(kind, text.encode(), "reject", token)
    if kind == "bad-numbers":
        literal = rng.choice(["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "9" * 5000])
        text = f'{{"state": {{"reported": {{"a": {literal}}}}}, "clientToken": "{token}"}}'
        # A 5000-digit integer is beyond what Python's json parses by default: no token echo.
        echo = token if not literal.startswith("9") else None
        return Case(kind, text.encode(), "reject", echo)
    if kind == "deep":
        levels = rng.choice([7, 8, 20, 200, 5000, 100_000])
        document = {"state": {"reported": {"a": nested(levels - 1)}}, "clientToken": token}
        text = (
            json.dumps(document)
            if levels < 500
            else '{"state": {"reported": {"a": '
            + "[" * levels
            + "]" * levels
            + '}}, "clientToken": "'
            + token
            + '"}'
        )
        data = text.encode()
        # Too long (413) or too deep for a JSON parser's recursion: no token can be read back.
        if len(data) > MAX_PAYLOAD:
            return Case(f"{kind}-{levels}", data, "reject-413")
        return Case(f"{kind}-{levels}", data, "reject", token if levels < 500 else None)
    if kind == "huge":
        size = rng.choice([MAX_PAYLOAD + 1, MAX_PAYLOAD + 100, 40_000, 200_000])
        if rng.random() < 0.5:
            data = rng.randbytes(size)
        else:
            filler = "x" * size
            data = encode({"state": {"reported": {"a": filler}}, "clientToken": token})
        return Case(f"{kind}-{size}", data, "reject-413")
    # "bom": a byte order mark before an otherwise valid document (either answer is fine).
    data = b"\xef\xbb\xbf" + encode({"state": {"reported": {"a": 1}}, "clientToken": token})
    return Case(kind, data, "either", token)


def get_case(rng: random.Random, n: int) -> Case:
    token = f"g-{n}"
    kind = rng.choice(["empty", "token", "bytes", "value", "huge"])
    if kind == "empty":
        return Case(kind, b"", "accept")
    if kind == "token":
        return Case(kind, encode({"clientToken": token, "x": value(rng, 3, True)}), "accept", token)
    if kind == "bytes":
        return Case(kind, rng.randbytes(rng.randint(1, 100)), "accept")
    if kind == "value":
        return Case(kind, encode([value(rng, 3, False)]), "accept")
    return Case(kind, rng.randbytes(MAX_PAYLOAD + rng.randint(1, 5000)), "reject-413")


REJECTED_CODES = {400, 409, 413}


def check_answer(case: Case, outcome: str, body: dict[str, Any]) -> None:
    where = f"{case.kind} {case.payload[:60]!r}: {outcome} {body}"
    if case.expect == "accept":
        assert outcome == "accepted", where
    elif case.expect == "reject":
        assert outcome == "rejected" and body["code"] in {400, 413}, where
    elif case.expect == "reject-413":
        assert outcome == "rejected" and body["code"] == 413, where
    else:
        assert outcome == "accepted" or body["code"] in REJECTED_CODES, where
    if outcome == "rejected":
        assert isinstance(body["message"], str) and body["message"], where
        assert isinstance(body["timestamp"], int), where


def test_fuzzed_payloads_get_exactly_one_answer_each(stack: Stack) -> None:
    # The rate limit is tested elsewhere; here it would only turn answers into 429s.
    stack.gateway_settings = dataclasses.replace(
        stack.gateway_settings, rate_per_second=100_000.0, rate_burst=100_000.0
    )
    gateway = stack.start_gateway()
    device_id = "fuzz-1"
    device = stack.connect(stack.register(device_id), client_id=device_id)
    assert device.wait_connected()
    answer_topics = {
        f"{device_id}/state/{action}/{outcome}"
        for action in ("update", "get")
        for outcome in ("accepted", "rejected")
    }
    device.subscribe(*answer_topics)
    device.publish(f"{device_id}/state/update", {"state": {"reported": {"seed": SEED}}})
    assert device.expect(f"{device_id}/state/update/accepted")["version"] == 1

    rng = random.Random(SEED)
    cases = [("update", update_case(rng, n)) for n in range(UPDATES)]
    cases += [("get", get_case(rng, n)) for n in range(GETS)]
    rng.shuffle(cases)
    for action, case in cases:
        device.publish(f"{device_id}/state/{action}", case.payload)

    answers: list[tuple[str, str, dict[str, Any]]] = []  # action, outcome, body
    deadline = time.monotonic() + 30.0
    while len(answers) < len(cases) and time.monotonic() < deadline:
        got = next_message(device, answer_topics, timeout=1.0)
        if got is not None:
            _, _, action, outcome = got[0].split("/")
            answers.append((action, outcome, json.loads(got[1])))
    while (extra := next_message(device, answer_topics, timeout=1.0)) is not None:
        answers.append(("extra", extra[0], json.loads(extra[1])))  # duplicates would land here
    assert len(answers) == len(cases), (len(answers), len(cases), gateway.handled)

    for action in ("update", "get"):
        sent = [case for a, case in cases if a == action]
        got_back = [(outcome, body) for a, outcome, body in answers if a == action]
        assert len(got_back) == len(sent), action
        # Answers carrying a clientToken match their request one to one...
        by_token = {case.token: case for case in sent if case.token is not None}
        tokens = Counter(body.get("clientToken") for _, body in got_back)
        del tokens[None]
        assert tokens == Counter(list(by_token)), action
        for outcome, body in got_back:
            if "clientToken" in body:
                check_answer(by_token[body["clientToken"]], outcome, body)
        # ...and the rest answer the requests without one, in some order.
        tokenless = [case for case in sent if case.token is None]
        rest = [(outcome, body) for outcome, body in got_back if "clientToken" not in body]
        assert len(rest) == len(tokenless), action
        expected_413 = sum(case.expect == "reject-413" for case in tokenless)
        assert sum(o == "rejected" and b["code"] == 413 for o, b in rest) == expected_413
        accepts = sum(case.expect == "accept" for case in tokenless)
        assert sum(o == "accepted" for o, _ in rest) == accepts, action
        for outcome, body in rest:
            if outcome == "rejected":
                assert body["code"] in REJECTED_CODES, body

    # The gateway still serves the device, and the shadow counts exactly the accepted updates.
    accepted = sum(a == "update" and o == "accepted" for a, o, _ in answers)
    device.publish(
        f"{device_id}/state/update", {"state": {"reported": {"after": True}}, "clientToken": "end"}
    )
    last = device.expect(f"{device_id}/state/update/accepted")
    assert last["clientToken"] == "end"
    assert last["version"] == 1 + accepted + 1
    document = stack.document(device_id)
    assert document["version"] == 1 + accepted + 1
    assert document["state"]["reported"]["after"] is True
    assert sum(case.expect == "accept" for a, case in cases if a == "update") > 0
