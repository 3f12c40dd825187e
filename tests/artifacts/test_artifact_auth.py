"""Operator authentication on the artifact service: the same bearer tokens and roles."""

from __future__ import annotations

from pathlib import Path

import grpc

from protos.artifacts.v1 import artifacts_pb2 as apb
from protos.artifacts.v1 import artifacts_pb2_grpc as apb_grpc
from services.artifacts import signing
from services.artifacts.server import create_server as create_artifact_server
from services.artifacts.service import ArtifactService
from services.artifacts.settings import ArtifactSettings
from services.artifacts.storage import LocalStorage
from services.artifacts.store import ArtifactStore
from services.common.auth import BearerAuthInterceptor, TokenTable, bearer_channel
from tests.auth_helpers import code_of
from tests.service.test_auth import TOKENS


def test_the_artifact_service_checks_tokens_too(
    tmp_path: Path, artifact_store: ArtifactStore
) -> None:
    TokenTable.write(tmp_path / "tokens.json", TOKENS)
    tokens = TokenTable.load(tmp_path / "tokens.json")
    service = ArtifactService(
        artifact_store,
        LocalStorage(tmp_path / "blobs"),
        signing.load_or_create(tmp_path / "key.pem"),
        1024 * 1024,
    )
    server, port = create_artifact_server(
        ArtifactSettings(listen="127.0.0.1:0", workers=4),
        service,
        "http://127.0.0.1:1",
        [BearerAuthInterceptor(tokens)],
    )
    server.start()
    address = f"127.0.0.1:{port}"
    try:

        def upload(token: str | None) -> grpc.StatusCode:
            stub = apb_grpc.ArtifactServiceStub(bearer_channel(address, token))
            requests = iter(
                [
                    apb.UploadArtifactRequest(
                        metadata=apb.ArtifactMetadata(
                            name="fw", version="1.0.0", compatible_hardware=["hw-a"]
                        )
                    ),
                    apb.UploadArtifactRequest(chunk=b"firmware bytes"),
                    apb.UploadArtifactRequest(end=apb.UploadEnd()),
                ]
            )
            return code_of(stub.UploadArtifact, requests)

        assert upload(None) == grpc.StatusCode.UNAUTHENTICATED
        assert upload("read-secret") == grpc.StatusCode.PERMISSION_DENIED
        assert upload("admin-secret") == grpc.StatusCode.OK
        viewer = apb_grpc.ArtifactServiceStub(bearer_channel(address, "read-secret"))
        listed = viewer.ListArtifacts(apb.ListArtifactsRequest())
        assert [a.name for a in listed.artifacts] == ["fw"]
        anonymous = apb_grpc.ArtifactServiceStub(bearer_channel(address, None))
        assert code_of(anonymous.ListArtifacts, apb.ListArtifactsRequest()) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    finally:
        server.stop(None)
