"""Downloads with the S3 backend: the token rules are the plane's as with the local backend, and
the exchange hands out a presigned GET URL on the bucket (moto's real HTTP server on loopback),
valid for the URL lifetime, which the device fetches with Range requests like any URL."""

from __future__ import annotations

import hashlib
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from services.artifacts.storage import S3Storage
from tests.artifacts.conftest import MIB, ArtifactStack, StackFactory, make_s3_storage


@pytest.fixture
def s3_stack(make_stack: StackFactory, moto_endpoint: str) -> ArtifactStack:
    return make_stack(make_s3_storage(moto_endpoint), url_ttl=300)


def test_the_exchange_hands_out_a_presigned_url(
    s3_stack: ArtifactStack, moto_endpoint: str
) -> None:
    stack = s3_stack
    data = hashlib.sha256(b"s3").digest() * (7 * MIB // 32)  # a multipart upload
    artifact = stack.upload(data, chunk_bytes=MIB)
    device = stack.device()
    stack.target(device, artifact)
    grant = stack.grant(device, artifact.artifact_id)
    assert grant["url"].startswith(moto_endpoint)
    assert (grant["size"], grant["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert grant["manifest"] == artifact.manifest_json
    query = parse_qs(urlsplit(grant["url"]).query)
    assert query["X-Amz-Expires"] == ["300"]  # the URL lifetime, not S3's default hour

    with httpx.Client(timeout=30) as device_http:  # straight to the bucket, no plane in between
        head = device_http.get(grant["url"], headers={"Range": "bytes=0-1048575"})
        assert head.status_code == 206 and head.content == data[:MIB]
        rest = device_http.get(grant["url"], headers={"Range": f"bytes={MIB}-"})
        assert rest.status_code == 206
    assert head.content + rest.content == data


def test_token_rules_hold_with_s3(s3_stack: ArtifactStack) -> None:
    stack = s3_stack
    artifact = stack.upload(b"s3 firmware")
    device, other = stack.device(), stack.device()
    stack.target(device, artifact)
    assert stack.request_token(other, artifact.artifact_id).status_code == 403
    token = stack.token(device, artifact.artifact_id)
    assert stack.exchange(other, token).status_code == 403
    assert stack.exchange(device, token).status_code == 200
    assert stack.exchange(device, token).status_code == 410
    assert isinstance(stack.storage, S3Storage)
    assert stack.store.count_rows()["download_urls"] == 0  # S3 itself serves; no URL row
