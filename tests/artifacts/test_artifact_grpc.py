"""The artifact service over real gRPC on loopback: every RPC and every bad upload, on both
storage backends (a directory, S3 on moto's server) and both databases (SQLite, PostgreSQL).
A rejected upload must leave nothing: no row, no blob, no temp file, no multipart upload."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.artifacts.v1 import artifacts_pb2 as apb
from services.artifacts import signing
from services.artifacts.service import ArtifactService
from services.artifacts.storage import LocalStorage, S3Storage, Storage
from tests.artifacts.conftest import MIB, ArtifactStack, StackFactory, upload_requests

DATA = bytes(range(256)) * 4096  # 1 MiB


def rpc_error(call: Any, *args: Any) -> grpc.Call:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return cast(grpc.Call, info.value)


def upload_error(stack: ArtifactStack, data: bytes, **kwargs: Any) -> grpc.Call:
    return rpc_error(lambda: stack.upload(data, **kwargs))


def stored_bytes(storage: Storage, sha256: str) -> bytes:
    if isinstance(storage, LocalStorage):
        return storage.blob_path(sha256).read_bytes()
    assert isinstance(storage, S3Storage)
    body = storage.client.get_object(Bucket=storage.config.bucket, Key=storage.blob_key(sha256))
    return body["Body"].read()


def assert_nothing_stored(stack: ArtifactStack) -> None:
    assert stack.storage.addresses() == []
    assert stack.storage.leftovers() == []
    assert stack.store.count_rows()["artifacts"] == 0


# --- upload -------------------------------------------------------------------------------------


def test_upload_computes_hash_and_size_and_signs_the_manifest(stack: ArtifactStack) -> None:
    artifact = stack.upload(
        DATA, name="gw-firmware", version="2.1.0-rc.1+b7", compatible=("gw-100", "gw-200")
    )
    sha256 = hashlib.sha256(DATA).hexdigest()
    assert (artifact.name, artifact.version) == ("gw-firmware", "2.1.0-rc.1+b7")
    assert list(artifact.compatible_hardware) == ["gw-100", "gw-200"]
    assert (artifact.size, artifact.sha256) == (len(DATA), sha256)
    assert artifact.download_url == f"{stack.base_url}/v1/artifacts/{artifact.artifact_id}"
    manifest = json.loads(artifact.manifest_json)
    assert manifest == {
        "artifact_id": artifact.artifact_id,
        "name": "gw-firmware",
        "version": "2.1.0-rc.1+b7",
        "size": len(DATA),
        "sha256": sha256,
        "compatible": ["gw-100", "gw-200"],
    }
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert artifact.manifest_json.encode() == canonical

    key = stack.stub.GetSigningKey(apb.GetSigningKeyRequest())
    assert key.algorithm == "Ed25519" and artifact.key_id == key.key_id
    assert signing.verify(key.public_key, canonical, artifact.signature)
    assert not signing.verify(
        key.public_key, canonical.replace(b"2.1.0", b"9.1.0"), artifact.signature
    )

    assert stack.storage.addresses() == [sha256]
    assert stack.storage.leftovers() == []
    assert stored_bytes(stack.storage, sha256) == DATA
    again = stack.stub.GetArtifact(apb.GetArtifactRequest(artifact_id=artifact.artifact_id))
    assert again == artifact


def test_a_declared_rollback_floor_is_stored_and_signed(stack: ArtifactStack) -> None:
    artifact = stack.upload(DATA, version="1.2.0", rollback_floor="1.2.0")
    assert artifact.HasField("rollback_floor") and artifact.rollback_floor == "1.2.0"
    assert json.loads(artifact.manifest_json)["rollback_floor"] == "1.2.0"
    key = stack.stub.GetSigningKey(apb.GetSigningKeyRequest())
    assert signing.verify(key.public_key, artifact.manifest_json.encode(), artifact.signature)
    assert not signing.verify(
        key.public_key,
        artifact.manifest_json.replace(
            '"rollback_floor":"1.2.0"', '"rollback_floor":"0.0.1"'
        ).encode(),
        artifact.signature,
    )
    again = stack.stub.GetArtifact(apb.GetArtifactRequest(artifact_id=artifact.artifact_id))
    assert again == artifact

    plain = stack.upload(DATA, version="1.3.0")
    assert not plain.HasField("rollback_floor")
    assert "rollback_floor" not in json.loads(plain.manifest_json)


def test_a_large_upload_goes_up_in_parts(stack: ArtifactStack) -> None:
    # 12 MiB: with 5 MiB parts, S3 sees a three-part multipart upload; locally, one temp file.
    data = hashlib.sha256(b"seed").digest() * (12 * MIB // 32)
    parts_sent: list[tuple[int, int]] = []  # (part number, bytes) of each UploadPart call
    part_etags: list[str] = []  # the server's answer to each UploadPart
    # (key, parts listed) of each CompleteMultipartUpload call, and the ETag of each the server
    # completed: the upload's, then the managed copy's to the final key (a multipart copy too).
    completing: list[tuple[str, int]] = []
    assembled: list[str] = []
    events = None
    hooks: list[tuple[str, Any, str]] = []
    if isinstance(stack.storage, S3Storage):
        # Hooks on the storage's own botocore client: the calls the service really made, and
        # the S3 server's answers (an object assembled from N parts gets the ETag "<md5>-N").
        events = stack.storage.client.meta.events

        def sent(params: dict[str, Any], **_: Any) -> None:
            parts_sent.append((params["PartNumber"], len(params["Body"])))

        def stored(http_response: Any, parsed: dict[str, Any], **_: Any) -> None:
            if http_response.status_code == 200:
                part_etags.append(parsed["ETag"])

        def complete(params: dict[str, Any], **_: Any) -> None:
            completing.append((params["Key"], len(params["MultipartUpload"]["Parts"])))

        def completed(http_response: Any, parsed: dict[str, Any], **_: Any) -> None:
            if http_response.status_code == 200:
                assembled.append(parsed["ETag"])

        hooks = [
            ("provide-client-params.s3.UploadPart", sent, "t-sent"),
            ("after-call.s3.UploadPart", stored, "t-stored"),
            ("provide-client-params.s3.CompleteMultipartUpload", complete, "t-complete"),
            ("after-call.s3.CompleteMultipartUpload", completed, "t-completed"),
        ]
        for event, handler, name in hooks:
            events.register(event, handler, unique_id=name)
    try:
        artifact = stack.upload(
            data, chunk_bytes=3 * MIB + 17, size=len(data), sha256=hashlib.sha256(data).hexdigest()
        )
    finally:
        if events is not None:
            for event, _, name in hooks:
                events.unregister(event, unique_id=name)
    assert artifact.size == len(data)
    assert stored_bytes(stack.storage, artifact.sha256) == data
    assert stack.storage.leftovers() == []
    if isinstance(stack.storage, S3Storage):
        assert stack.storage.config.part_bytes == 5 * MIB
        assert parts_sent == [(1, 5 * MIB), (2, 5 * MIB), (3, 2 * MIB)]
        assert len(part_etags) == 3
        assert len(completing) == len(assembled) >= 1
        (key, listed), etag = completing[0], assembled[0]
        assert "staging/" in key and listed == 3, completing
        assert etag.strip('"').endswith("-3"), etag


def test_a_declared_sha256_in_upper_case_is_accepted(stack: ArtifactStack) -> None:
    artifact = stack.upload(DATA, sha256=hashlib.sha256(DATA).hexdigest().upper())
    assert artifact.sha256 == hashlib.sha256(DATA).hexdigest()


def test_hash_mismatch_is_data_loss_and_stores_nothing(stack: ArtifactStack) -> None:
    error = upload_error(stack, DATA, sha256=hashlib.sha256(b"other").hexdigest())
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert "sha256" in (error.details() or "")
    assert_nothing_stored(stack)


@pytest.mark.parametrize("declared", [len(DATA) + 1, 6 * MIB])
def test_truncated_upload_is_data_loss_and_stores_nothing(
    stack: ArtifactStack, declared: int
) -> None:
    error = upload_error(stack, DATA, size=declared)
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert "ended after" in (error.details() or "")
    assert_nothing_stored(stack)


def test_more_bytes_than_declared_is_data_loss(stack: ArtifactStack) -> None:
    error = upload_error(stack, DATA, size=len(DATA) - 1)
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert_nothing_stored(stack)


def test_oversized_upload_is_resource_exhausted_and_stores_nothing(
    make_stack: StackFactory, storage: Storage
) -> None:
    stack = make_stack(storage, max_bytes=6 * MIB)
    data = b"x" * (6 * MIB + 1)  # past one S3 part, so a multipart upload must be aborted
    error = upload_error(stack, data, chunk_bytes=MIB)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_nothing_stored(stack)
    declared = upload_error(stack, b"x", size=6 * MIB + 1)
    assert declared.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "declared size" in (declared.details() or "")
    assert stack.upload(b"x" * 6 * MIB).size == 6 * MIB  # exactly the limit is fine


@pytest.mark.parametrize(
    "metadata",
    [
        {"name": "../etc/passwd"},
        {"name": "a/b"},
        {"name": "..\\boot"},
        {"name": ".."},
        {"name": "fw..bin"},
        {"name": ".hidden"},
        {"name": ""},
        {"name": "x" * 129},
        {"name": "firmware\x00.bin"},
        {"name": "fírmware"},
        {"version": ""},
        {"version": "1.0"},
        {"version": "v1.0.0"},
        {"version": "01.0.0"},
        {"version": "1.0.0-"},
        {"version": "1.0.0+"},
        {"version": "1.0.0/../2"},
        {"compatible": ()},
        {"compatible": ("gw/100",)},
        {"compatible": ("gw-100", "gw-100")},
        {"compatible": tuple(f"hw-{i}" for i in range(65))},
        {"sha256": "abc"},
        {"sha256": "g" * 64},
        {"size": 0},
        {"size": -5},
        {"rollback_floor": "1.0"},
        {"rollback_floor": "1.0.1"},  # above the version 1.0.0
    ],
)
def test_bad_metadata_is_invalid_argument_and_stores_nothing(
    stack: ArtifactStack, metadata: dict[str, Any]
) -> None:
    error = upload_error(stack, DATA, **metadata)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert_nothing_stored(stack)


def raw_upload(stack: ArtifactStack, requests: list[apb.UploadArtifactRequest]) -> grpc.Call:
    return rpc_error(stack.stub.UploadArtifact, iter(requests))


def test_message_order_is_enforced(stack: ArtifactStack) -> None:
    metadata = apb.UploadArtifactRequest(
        metadata=apb.ArtifactMetadata(name="fw", version="1.0.0", compatible_hardware=["gw"])
    )
    chunk = apb.UploadArtifactRequest(chunk=b"bytes")
    end = apb.UploadArtifactRequest(end=apb.UploadEnd())
    for requests in (
        [],
        [chunk, metadata],
        [metadata],
        [metadata, end],
        [metadata, chunk, metadata, chunk, end],
        [metadata, chunk],  # no end: a stream cut short is not a whole upload
        [metadata, chunk, end, chunk],
        [metadata, end, chunk, end],
    ):
        error = raw_upload(stack, requests)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, requests
    assert_nothing_stored(stack)


def test_a_cancelled_upload_stores_nothing(stack: ArtifactStack) -> None:
    sent = threading.Event()
    release = threading.Event()

    def requests() -> Iterator[apb.UploadArtifactRequest]:
        # Every byte, but not the end message: the client cancels before it.
        for request in upload_requests(b"y" * 6 * MIB, "fw", "1.0.0", ("gw",), MIB):
            if request.WhichOneof("part") != "end":
                yield request
        sent.set()
        release.wait(30)

    call = stack.stub.UploadArtifact.future(requests())
    assert sent.wait(30)
    wait_for(lambda: stack.storage.leftovers() != [])  # the upload is in storage, unfinished
    call.cancel()
    release.set()
    wait_for(lambda: stack.storage.leftovers() == [])
    assert_nothing_stored(stack)


def wait_for(condition: Any, attempts: int = 400) -> None:
    """Wait for a state the server reaches on its own (not a timing assertion)."""
    for _ in range(attempts):
        if condition():
            return
        threading.Event().wait(0.025)
    raise AssertionError("condition not reached")


def test_name_and_version_are_unique(stack: ArtifactStack) -> None:
    first = stack.upload(DATA, version="1.0.0")
    error = upload_error(stack, b"other bytes", version="1.0.0")
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert stack.storage.addresses() == [first.sha256]
    assert stack.storage.leftovers() == []
    assert stack.upload(b"other bytes", version="1.0.1").version == "1.0.1"


def test_identical_bytes_share_one_blob_until_the_last_artifact_goes(stack: ArtifactStack) -> None:
    first = stack.upload(DATA, name="fw-a")
    second = stack.upload(DATA, name="fw-b")
    assert first.sha256 == second.sha256 and first.artifact_id != second.artifact_id
    assert stack.storage.addresses() == [first.sha256]
    stack.stub.DeleteArtifact(apb.DeleteArtifactRequest(artifact_id=first.artifact_id))
    assert stack.storage.addresses() == [first.sha256]
    stack.stub.DeleteArtifact(apb.DeleteArtifactRequest(artifact_id=second.artifact_id))
    assert stack.storage.addresses() == []


# --- get, list, delete --------------------------------------------------------------------------


def test_get_unknown_or_malformed_id(stack: ArtifactStack) -> None:
    missing = rpc_error(stack.stub.GetArtifact, apb.GetArtifactRequest(artifact_id="0" * 32))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    for bad in ["", "../x", "A" * 32, "0" * 33]:
        error = rpc_error(stack.stub.GetArtifact, apb.GetArtifactRequest(artifact_id=bad))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_pages_newest_first_with_a_cursor(stack: ArtifactStack) -> None:
    uploaded = []
    for i in range(5):
        stack.clock.advance(1)
        uploaded.append(stack.upload(f"build {i}".encode(), name="fw", version=f"1.0.{i}"))
    stack.upload(b"other", name="bootloader", version="1.0.0")  # same instant as the last

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = stack.stub.ListArtifacts(
            apb.ListArtifactsRequest(page_size=2, page_token=token, name="fw")
        )
        seen.extend(a.version for a in page.artifacts)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == ["1.0.4", "1.0.3", "1.0.2", "1.0.1", "1.0.0"]
    assert pages == 3
    everything = stack.stub.ListArtifacts(apb.ListArtifactsRequest())
    assert len(everything.artifacts) == 6 and everything.next_page_token == ""
    assert {a.artifact_id for a in uploaded} < {a.artifact_id for a in everything.artifacts}


@pytest.mark.parametrize(
    "request_fields",
    [{"page_token": "garbage"}, {"page_token": "MTox"}, {"page_size": -1}, {"name": "../x"}],
)
def test_list_rejects_bad_requests(stack: ArtifactStack, request_fields: dict[str, Any]) -> None:
    error = rpc_error(stack.stub.ListArtifacts, apb.ListArtifactsRequest(**request_fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_delete_is_refused_while_in_use(make_stack: StackFactory, storage: Storage) -> None:
    in_use: set[str] = set()
    stack = make_stack(storage, is_in_use=lambda artifact_id: artifact_id in in_use)
    artifact = stack.upload(DATA)
    in_use.add(artifact.artifact_id)
    request = apb.DeleteArtifactRequest(artifact_id=artifact.artifact_id)
    error = rpc_error(stack.stub.DeleteArtifact, request)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stack.stub.GetArtifact(apb.GetArtifactRequest(artifact_id=artifact.artifact_id))
    assert stack.storage.addresses() == [artifact.sha256]

    in_use.clear()
    stack.stub.DeleteArtifact(request)
    get = apb.GetArtifactRequest(artifact_id=artifact.artifact_id)
    gone = rpc_error(stack.stub.GetArtifact, get)
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    assert stack.storage.addresses() == []
    again = rpc_error(stack.stub.DeleteArtifact, request)
    assert again.code() == grpc.StatusCode.NOT_FOUND


def test_signing_key_and_health(stack: ArtifactStack) -> None:
    key = stack.stub.GetSigningKey(apb.GetSigningKeyRequest())
    assert len(key.public_key) == 32 and len(key.key_id) == 16
    assert key.key_id == hashlib.sha256(key.public_key).hexdigest()[:16]
    assert key.public_key_pem.startswith("-----BEGIN PUBLIC KEY-----")
    health = health_pb2_grpc.HealthStub(stack.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="ota.artifacts.v1.ArtifactService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_resign_moves_every_manifest_to_the_new_key(stack: ArtifactStack, tmp_path: Path) -> None:
    old = [stack.upload(DATA, version=f"1.0.{i}") for i in range(3)]
    new_signer = signing.load_or_create(tmp_path / "rotated.pem")
    rotated = ArtifactService(stack.store, stack.storage, new_signer, MIB)
    assert rotated.resign() == 3
    assert rotated.resign() == 0  # already done
    for before in old:
        after = stack.stub.GetArtifact(apb.GetArtifactRequest(artifact_id=before.artifact_id))
        assert after.manifest_json == before.manifest_json
        assert after.key_id == new_signer.key_id != before.key_id
        assert signing.verify(
            new_signer.public_key_raw, after.manifest_json.encode(), after.signature
        )
