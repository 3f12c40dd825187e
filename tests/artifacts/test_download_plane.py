"""The device download plane over real HTTP, with the real shadow service answering who a device
is and what its desired state names, on SQLite and PostgreSQL. The local backend here (the
plane serves the bytes); test_download_s3.py covers presigned S3 URLs.

Expiry is driven by the fake clock, the bandwidth cap by a virtual pacing clock: nothing here
waits for time to pass or asserts on how long anything took.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import socket
import threading
from typing import Any

import httpx
import pytest

from protos.artifacts.v1 import artifacts_pb2 as apb
from protos.shadow.v1 import shadow_pb2 as spb
from services.artifacts import signing
from services.artifacts.domain import DeviceCredentials
from services.artifacts.download_plane import AuthCache, PlaneLimits, start_download_plane
from services.artifacts.storage import LocalStorage
from tests.artifacts.conftest import MIB, ArtifactStack, Device, StackFactory

DATA = hashlib.sha256(b"firmware").digest() * (256 * 1024 // 32)  # 256 KiB


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    return body


def targeted(stack: ArtifactStack, data: bytes = DATA) -> tuple[apb.Artifact, Device]:
    artifact = stack.upload(data)
    device = stack.device()
    stack.target(device, artifact)
    return artifact, device


# --- the happy path -----------------------------------------------------------------------------


def test_token_exchange_and_download(local_stack: ArtifactStack) -> None:
    stack = local_stack
    artifact, device = targeted(stack)

    token_reply = stack.request_token(device, artifact.artifact_id)
    assert token_reply.status_code == 201
    assert token_reply.headers["cache-control"] == "no-store"
    token = token_reply.json()
    assert set(token) == {"token", "expires_in"} and token["expires_in"] == 120

    exchanged = stack.exchange(device, token["token"])
    assert exchanged.status_code == 200, exchanged.text
    grant = exchanged.json()
    assert grant["url"].startswith(f"{stack.base_url}/v1/downloads/")
    assert grant["expires_at"] == int(stack.clock.now + 600)
    assert (grant["size"], grant["sha256"]) == (len(DATA), hashlib.sha256(DATA).hexdigest())
    assert grant["manifest"] == artifact.manifest_json
    key = stack.stub.GetSigningKey(apb.GetSigningKeyRequest())
    signature = base64.b64decode(grant["signature"])
    assert signing.verify(key.public_key, grant["manifest"].encode(), signature)
    assert grant["key_id"] == key.key_id

    download = stack.get(grant["url"], device)
    assert download.status_code == 200
    assert download.content == DATA
    assert download.headers["etag"] == f'"{grant["sha256"]}"'
    assert download.headers["accept-ranges"] == "bytes"
    assert int(download.headers["content-length"]) == len(DATA)

    # Used up: the next download, whole or ranged, is refused.
    assert_error(stack.get(grant["url"], device), 410, "url_used")
    assert_error(stack.get(grant["url"], device, range="bytes=0-9"), 410, "url_used")


def test_a_download_resumes_with_range_requests(local_stack: ArtifactStack) -> None:
    stack = local_stack
    artifact, device = targeted(stack)
    url = stack.grant(device, artifact.artifact_id)["url"]

    first = stack.get(url, device, range="bytes=0-99999")
    assert first.status_code == 206
    assert first.headers["content-range"] == f"bytes 0-99999/{len(DATA)}"
    assert first.content == DATA[:100_000]
    # The same bytes again (a retry of a lost response) are fine before completion.
    assert stack.get(url, device, range="bytes=0-99999").content == DATA[:100_000]
    middle = stack.get(url, device, range="bytes=100000-199999", if_range=f'"{artifact.sha256}"')
    assert middle.status_code == 206 and middle.content == DATA[100_000:200_000]
    rest = stack.get(url, device, range="bytes=200000-")
    assert rest.status_code == 206
    assert rest.headers["content-range"] == f"bytes 200000-{len(DATA) - 1}/{len(DATA)}"
    assert first.content + middle.content + rest.content == DATA

    assert_error(stack.get(url, device), 410, "url_used")


def test_an_abandoned_download_does_not_use_the_url_up(
    local_stack: ArtifactStack, caplog: pytest.LogCaptureFixture
) -> None:
    stack = local_stack
    # More than the socket buffers on both ends can hold (tcp_rmem max 32 MiB + tcp_wmem 4 MiB).
    data = hashlib.sha256(b"big").digest() * (48 * MIB // 32)
    artifact, device = targeted(stack, data)
    url = stack.grant(device, artifact.artifact_id)["url"]
    with stack.http.stream("GET", url, auth=device.auth) as response:
        assert response.status_code == 200
        first = next(response.iter_bytes())
        assert data.startswith(first)
    # The device went away after a few bytes: the URL still serves it, in full.
    whole = stack.get(url, device)
    assert whole.status_code == 200 and whole.content == data
    assert_error(stack.get(url, device), 410, "url_used")
    assert not [r for r in caplog.records if r.getMessage().startswith("unexpected")]


def test_a_suffix_range_completes_the_download(local_stack: ArtifactStack) -> None:
    stack = local_stack
    artifact, device = targeted(stack)
    url = stack.grant(device, artifact.artifact_id)["url"]
    tail = stack.get(url, device, range="bytes=-10")
    assert tail.status_code == 206 and tail.content == DATA[-10:]
    assert_error(stack.get(url, device, range="bytes=0-9"), 410, "url_used")


def test_if_range_with_another_etag_sends_the_whole_artifact(local_stack: ArtifactStack) -> None:
    stack = local_stack
    artifact, device = targeted(stack)
    url = stack.grant(device, artifact.artifact_id)["url"]
    whole = stack.get(url, device, range="bytes=100-", if_range='"an-older-build"')
    assert whole.status_code == 200 and whole.content == DATA


@pytest.mark.parametrize(
    ("header", "status", "code"),
    [
        (f"bytes={len(DATA)}-", 416, "range_not_satisfiable"),
        ("bytes=-0", 416, "range_not_satisfiable"),
        ("bytes=10-5", 400, "bad_request"),
        ("bytes=0-1,5-9", 400, "bad_request"),
        ("items=0-9", 400, "bad_request"),
        ("bytes=abc", 400, "bad_request"),
        ("bytes=-", 400, "bad_request"),
    ],
)
def test_bad_ranges(local_stack: ArtifactStack, header: str, status: int, code: str) -> None:
    stack = local_stack
    artifact, device = targeted(stack)
    url = stack.grant(device, artifact.artifact_id)["url"]
    response = stack.get(url, device, range=header)
    assert_error(response, status, code)
    if status == 416:
        assert response.headers["content-range"] == f"bytes */{len(DATA)}"
    assert stack.get(url, device).content == DATA  # the URL was not used up


# --- who may get a token ------------------------------------------------------------------------


def test_credentials_are_required_and_checked(local_stack: ArtifactStack) -> None:
    stack = local_stack
    artifact, device = targeted(stack)
    path = f"/v1/artifacts/{artifact.artifact_id}/token"
    missing = stack.http.post(path)
    assert_error(missing, 401, "unauthenticated")
    assert missing.headers["www-authenticate"].startswith("Basic")
    for auth in [
        (device.device_id, "wrong-password"),
        ("no-such-device", device.password),
        ("a/b", device.password),
    ]:
        assert_error(stack.http.post(path, auth=auth), 401, "unauthenticated")
    assert_error(
        stack.http.post(path, headers={"authorization": "Bearer abc"}), 401, "unauthenticated"
    )
    assert_error(
        stack.http.post(path, headers={"authorization": "Basic %%%"}), 401, "unauthenticated"
    )


def test_only_a_device_whose_desired_state_names_the_artifact_gets_a_token(
    local_stack: ArtifactStack,
) -> None:
    stack = local_stack
    wanted = stack.upload(DATA, version="2.0.0")
    other = stack.upload(b"older build", version="1.0.0")
    device = stack.device()
    # No shadow at all yet.
    assert_error(stack.request_token(device, wanted.artifact_id), 403, "not_targeted")
    # Desired state names another artifact.
    stack.target(device, other)
    assert_error(stack.request_token(device, wanted.artifact_id), 403, "not_targeted")
    # A url that is not an artifact URL at all.
    stack.target(device, "https://example.invalid/firmware.bin")
    assert_error(stack.request_token(device, wanted.artifact_id), 403, "not_targeted")
    # The artifact is named under another host name: the path decides.
    stack.target(device, f"https://cdn.example.invalid/v1/artifacts/{wanted.artifact_id}")
    assert stack.request_token(device, wanted.artifact_id).status_code == 201


def test_unknown_artifacts(local_stack: ArtifactStack) -> None:
    stack = local_stack
    device = stack.device()
    stack.target(device, f"{stack.base_url}/v1/artifacts/{'0' * 32}")
    assert_error(stack.request_token(device, "0" * 32), 404, "artifact_not_found")
    assert_error(stack.request_token(device, "..%2F..%2Fetc"), 404, "artifact_not_found")


# --- tokens -------------------------------------------------------------------------------------


def test_another_devices_token_is_refused(local_stack: ArtifactStack) -> None:
    stack = local_stack
    artifact, device = targeted(stack)
    thief = stack.device()
    stack.target(thief, artifact)  # even a device targeted by the same artifact
    token = stack.token(device, artifact.artifact_id)
    assert_error(stack.exchange(thief, token), 403, "wrong_device")
    assert stack.exchange(device, token).status_code == 200  # the refusal did not use it up


def test_a_token_is_single_use(local_stack: ArtifactStack) -> None:
    stack = local_stack
    artifact, device = targeted(stack)
    token = stack.token(device, artifact.artifact_id)
    assert stack.exchange(device, token).status_code == 200
    assert_error(stack.exchange(device, token), 410, "token_used")


def test_a_token_sent_many_times_at_once_is_exchanged_once(local_stack: ArtifactStack) -> None:
    stack = local_stack
    artifact, device = targeted(stack)
    token = stack.token(device, artifact.artifact_id)
    start = threading.Barrier(8)
    statuses: list[int] = []

    def exchange() -> None:
        with httpx.Client(base_url=stack.base_url, timeout=30) as client:
            start.wait()
            reply = client.post("/v1/downloads", json={"token": token}, auth=device.auth)
            statuses.append(reply.status_code)

    threads = [threading.Thread(target=exchange) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == [200] + [410] * 7
    assert stack.store.count_rows()["download_urls"] == 1


def test_a_token_expires(local_stack: ArtifactStack) -> None:
    stack = local_stack
    artifact, device = targeted(stack)
    token = stack.token(device, artifact.artifact_id)
    stack.clock.advance(119.9)
    fresh = stack.token(device, artifact.artifact_id)
    assert stack.exchange(device, fresh).status_code == 200
    stack.clock.advance(0.1)
    assert_error(stack.exchange(device, token), 410, "token_expired")


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[]", b'{"token": 5}', b'{"token": ""}', b'{"tok": "x"}'],
)
def test_malformed_exchange_bodies(local_stack: ArtifactStack, body: bytes) -> None:
    stack = local_stack
    device = stack.device()
    response = stack.http.post("/v1/downloads", content=body, auth=device.auth)
    assert_error(response, 400, "bad_request")


def test_unknown_oversized_and_overlong_tokens(local_stack: ArtifactStack) -> None:
    stack = local_stack
    device = stack.device()
    assert_error(stack.exchange(device, "made-up-token"), 404, "token_not_found")
    assert_error(stack.exchange(device, "x" * 129), 400, "bad_request")
    huge = stack.http.post(
        "/v1/downloads", content=b'{"token": "' + b"x" * 20_000 + b'"}', auth=device.auth
    )
    assert_error(huge, 413, "too_large")


# --- one-time URLs ------------------------------------------------------------------------------


def test_a_url_works_for_its_device_only(local_stack: ArtifactStack) -> None:
    stack = local_stack
    artifact, device = targeted(stack)
    other = stack.device()
    url = stack.grant(device, artifact.artifact_id)["url"]
    assert_error(stack.get(url, None), 401, "unauthenticated")
    assert_error(stack.get(url, other), 403, "wrong_device")
    assert_error(stack.get(url, Device(device.device_id, "wrong")), 401, "unauthenticated")
    assert stack.get(url, device).content == DATA


def test_a_url_expires(local_stack: ArtifactStack) -> None:
    stack = local_stack
    artifact, device = targeted(stack)
    url = stack.grant(device, artifact.artifact_id)["url"]
    assert stack.get(url, device, range="bytes=0-9").status_code == 206
    stack.clock.advance(600)
    assert_error(stack.get(url, device, range="bytes=10-"), 410, "url_expired")


def test_unknown_and_malformed_urls(local_stack: ArtifactStack) -> None:
    stack = local_stack
    device = stack.device()
    assert_error(stack.get("/v1/downloads/made-up", device), 404, "url_not_found")
    assert_error(stack.get("/v1/downloads/" + "x" * 200, device), 400, "bad_request")
    assert_error(stack.get("/v1/nothing-here", device), 404, "not_found")
    assert_error(stack.http.delete("/v1/downloads"), 405, "method_not_allowed")


def test_a_url_of_a_deleted_artifact(local_stack: ArtifactStack) -> None:
    stack = local_stack
    artifact, device = targeted(stack)
    url = stack.grant(device, artifact.artifact_id)["url"]
    stack.stub.DeleteArtifact(apb.DeleteArtifactRequest(artifact_id=artifact.artifact_id))
    assert_error(stack.get(url, device), 404, "artifact_not_found")


def test_a_damaged_blob_is_refused_at_once_and_leaves_the_url_usable(
    local_stack: ArtifactStack,
) -> None:
    stack = local_stack
    artifact, device = targeted(stack)
    url = stack.grant(device, artifact.artifact_id)["url"]
    assert isinstance(stack.storage, LocalStorage)
    blob = stack.storage.blob_path(artifact.sha256)
    blob.write_bytes(DATA[: len(DATA) // 2])  # lost half of its bytes on disk
    # Not the recorded length with fewer bytes behind it (the device would wait out its read
    # timeout): a 503 the agent retries later, and the URL is not used up.
    assert_error(stack.get(url, device), 503, "storage_unavailable")
    assert_error(stack.get(url, device, range="bytes=0-9"), 503, "storage_unavailable")
    blob.write_bytes(DATA)  # restored
    download = stack.get(url, device)
    assert download.status_code == 200 and download.content == DATA


def test_the_store_keeps_no_secret(local_stack: ArtifactStack) -> None:
    stack = local_stack
    artifact, device = targeted(stack)
    token = stack.token(device, artifact.artifact_id)
    url = stack.exchange(device, token).json()["url"]
    secret = url.rsplit("/", 1)[1]
    with stack.store.engine.connect() as conn:
        rows = [
            str(tuple(row))
            for table in ("download_tokens", "download_urls")
            for row in conn.exec_driver_sql(f"SELECT * FROM {table}")
        ]
    assert len(rows) == 2
    assert not any(token in row or secret in row for row in rows)


# --- server-side limits -------------------------------------------------------------------------


class VirtualPace:
    """A pacing clock and sleep: sleeping advances the clock instantly and is recorded, and a
    test may hold sleepers at a gate to keep a download in flight."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []
        self.sleeping = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        self.sleeping.set()
        if not self.gate.is_set():
            await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 30)


def paced_stack(make_stack: StackFactory, storage: LocalStorage, **limits: int) -> Any:
    pace = VirtualPace()
    stack = make_stack(
        storage, limits=PlaneLimits(**limits), pace_clock=pace.clock, pace_sleep=pace.sleep
    )
    return stack, pace


def test_the_bandwidth_cap_paces_every_byte(
    make_stack: StackFactory, local_storage: LocalStorage
) -> None:
    rate = 256 * 1024
    stack, pace = paced_stack(make_stack, local_storage, max_bytes_per_second=rate)
    data = bytes(MIB)
    artifact, device = targeted(stack, data)
    url = stack.grant(device, artifact.artifact_id)["url"]
    assert stack.get(url, device).content == data
    # A 1 MiB download at 256 KiB/s with a 25.6 KiB burst must be held back ~3.9 s in all.
    burst = rate // 10
    assert sum(pace.slept) == pytest.approx((len(data) - burst) / rate)


def test_the_bandwidth_cap_is_shared_by_all_downloads(
    make_stack: StackFactory, local_storage: LocalStorage
) -> None:
    rate = 512 * 1024
    stack, pace = paced_stack(make_stack, local_storage, max_bytes_per_second=rate)
    data = bytes(MIB)
    artifact = stack.upload(data)
    devices = [stack.device(), stack.device()]
    urls = []
    for device in devices:
        stack.target(device, artifact)
        urls.append(stack.grant(device, artifact.artifact_id)["url"])
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda u=url, d=device: results.append(stack.get(u, d).content))
        for url, device in zip(urls, devices, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [data, data]
    # Both downloads drew on one bucket: the total, not each, is capped.
    assert sum(pace.slept) == pytest.approx((2 * len(data) - rate // 10) / rate)


def test_concurrent_downloads_beyond_the_limit_are_refused(
    make_stack: StackFactory, local_storage: LocalStorage
) -> None:
    stack, pace = paced_stack(
        make_stack, local_storage, max_bytes_per_second=64 * 1024, max_concurrent_downloads=1
    )
    artifact = stack.upload(DATA)
    first, second = stack.device(), stack.device()
    stack.target(first, artifact)
    stack.target(second, artifact)
    first_url = stack.grant(first, artifact.artifact_id)["url"]
    second_url = stack.grant(second, artifact.artifact_id)["url"]

    pace.gate.clear()  # the first download stops at its first pause and holds its slot
    result: list[bytes] = []
    in_flight = threading.Thread(target=lambda: result.append(stack.get(first_url, first).content))
    in_flight.start()
    assert pace.sleeping.wait(30)
    refused = stack.get(second_url, second)
    assert_error(refused, 429, "too_many_downloads")
    assert int(refused.headers["retry-after"]) > 0

    pace.gate.set()
    in_flight.join(60)
    assert result == [DATA]
    assert stack.get(second_url, second).content == DATA  # the refusal did not use it up


def test_without_the_shadow_service_devices_get_503(
    local_stack: ArtifactStack, local_storage: LocalStorage
) -> None:
    stack = local_stack
    artifact, device = targeted(stack)
    with socket.socket() as closed:  # a port where nothing listens
        closed.bind(("127.0.0.1", 0))
        dead_address = f"127.0.0.1:{closed.getsockname()[1]}"
    plane = stack.loop.run(
        start_download_plane(stack.downloads, dead_address, "127.0.0.1:0", PlaneLimits())
    )
    try:
        url = f"{plane.plane.base_url}/v1/artifacts/{artifact.artifact_id}/token"
        assert_error(httpx.post(url, auth=device.auth), 503, "upstream_unavailable")
    finally:
        stack.loop.run(plane.stop())


# --- the device check cache -------------------------------------------------------------------


def delete_device(stack: ArtifactStack, device: Device) -> None:
    stack.shadow.stub.DeleteDevice(spb.DeleteDeviceRequest(device_id=device.device_id))


def test_a_confirmed_device_is_remembered_for_a_short_while(
    make_stack: StackFactory, local_storage: LocalStorage
) -> None:
    pace = VirtualPace()
    stack = make_stack(local_storage, pace_clock=pace.clock, auth_cache_seconds=30)
    artifact, device = targeted(stack)
    url = stack.grant(device, artifact.artifact_id)["url"]
    # Another password never rides on the cached check.
    assert_error(stack.get(url, Device(device.device_id, "wrong")), 401, "unauthenticated")
    # The documented trade-off: a device deleted a moment ago finishes what it started...
    delete_device(stack, device)
    pace.now += 29.9
    assert stack.get(url, device, range="bytes=0-9").status_code == 206
    # ...for at most the cache's lifetime.
    pace.now += 0.1
    assert_error(stack.get(url, device, range="bytes=10-"), 401, "unauthenticated")


def test_without_the_cache_every_request_asks_the_shadow_service(
    make_stack: StackFactory, local_storage: LocalStorage
) -> None:
    stack = make_stack(local_storage, auth_cache_seconds=0)
    artifact, device = targeted(stack)
    url = stack.grant(device, artifact.artifact_id)["url"]
    delete_device(stack, device)
    assert_error(stack.get(url, device), 401, "unauthenticated")


def test_the_cache_is_bounded() -> None:
    now = [0.0]
    cache = AuthCache(ttl=30, clock=lambda: now[0], max_entries=2)
    first, second, third = (DeviceCredentials(f"dev-{i}", "pw") for i in range(3))
    for credentials in (first, second, third):
        cache.remember(credentials)
    assert not cache.confirmed(first)
    assert cache.confirmed(second) and cache.confirmed(third)
    assert not cache.confirmed(DeviceCredentials("dev-2", "other"))
    now[0] = 30.0
    assert not cache.confirmed(third)
    assert AuthCache(ttl=0, clock=lambda: 0.0).confirmed(first) is False


# --- logs ---------------------------------------------------------------------------------------


def test_no_secret_reaches_the_logs(
    local_stack: ArtifactStack, caplog: pytest.LogCaptureFixture
) -> None:
    stack = local_stack
    caplog.set_level(logging.DEBUG)
    artifact, device = targeted(stack)
    token = stack.token(device, artifact.artifact_id)
    grant = stack.exchange(device, token).json()
    stack.get(grant["url"], device)
    stack.get(grant["url"], device)  # 410
    stack.exchange(device, token)  # 410
    stack.get(grant["url"], stack.device())  # 403
    stack.http.post("/v1/downloads", json={"token": token}, auth=(device.device_id, "bad-pw"))
    secret = grant["url"].rsplit("/", 1)[1]
    # Every server-side record (the plane, aiohttp, grpc, the services); the test's own HTTP
    # client (httpx, httpcore) is the device's side and logs its URLs.
    server_side = [r for r in caplog.records if r.name.split(".")[0] not in ("httpx", "httpcore")]
    logged = "\n".join(
        record.getMessage() + repr(record.args) + str(record.exc_info) for record in server_side
    )
    assert any("/v1/downloads/{url_id}" in r.getMessage() for r in caplog.records)
    for forbidden in (token, secret, device.password, "bad-pw", grant["url"]):
        assert forbidden not in logged
    assert base64.b64encode(f"{device.device_id}:{device.password}".encode()).decode() not in (
        logged
    )
    assert json.dumps(token) not in logged
