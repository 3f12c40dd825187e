"""gRPC adapter of the artifact service: proto messages in, `ArtifactService` calls, protos out.

`STATUS_CODES` is the one place where artifact errors become gRPC status codes.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from protos.artifacts.v1 import artifacts_pb2 as pb
from protos.artifacts.v1 import artifacts_pb2_grpc as pb_grpc
from services.artifacts.domain import ArtifactSpec, artifact_url
from services.artifacts.errors import (
    ArtifactError,
    ArtifactExistsError,
    ArtifactInUseError,
    ArtifactNotFoundError,
    ArtifactTooLargeError,
    ContentMismatchError,
    InvalidArtifactError,
    StorageError,
    UpstreamUnavailableError,
)
from services.artifacts.service import ArtifactService
from services.artifacts.store import ArtifactRecord
from services.common.grpc_errors import error_translator

STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    InvalidArtifactError: grpc.StatusCode.INVALID_ARGUMENT,
    # The bytes that arrived are not the bytes declared: corrupted or cut short in transit.
    ContentMismatchError: grpc.StatusCode.DATA_LOSS,
    ArtifactTooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ArtifactExistsError: grpc.StatusCode.ALREADY_EXISTS,
    ArtifactNotFoundError: grpc.StatusCode.NOT_FOUND,
    ArtifactInUseError: grpc.StatusCode.FAILED_PRECONDITION,
    StorageError: grpc.StatusCode.UNAVAILABLE,
    UpstreamUnavailableError: grpc.StatusCode.UNAVAILABLE,
}

translate_errors = error_translator(ArtifactError, STATUS_CODES)


def spec_from_proto(metadata: pb.ArtifactMetadata) -> ArtifactSpec:
    return ArtifactSpec(
        name=metadata.name,
        version=metadata.version,
        compatible=tuple(metadata.compatible_hardware),
        sha256=metadata.sha256 or None,
        size=metadata.size if metadata.HasField("size") else None,
        rollback_floor=(metadata.rollback_floor if metadata.HasField("rollback_floor") else None),
    )


def _chunks(requests: Iterator[pb.UploadArtifactRequest]) -> Iterator[bytes]:
    """The upload's bytes; raises unless the stream closes right after its `end` message.

    gRPC may report a client's cancel as a plain end of stream, so only `end` tells a whole
    upload from a broken one."""
    for request in requests:
        part = request.WhichOneof("part")
        if part == "end":
            if next(requests, None) is not None:
                raise InvalidArtifactError("nothing may follow the end of an upload")
            return
        if part != "chunk":
            raise InvalidArtifactError("only the first message of an upload carries metadata")
        yield request.chunk
    raise InvalidArtifactError("the upload stream stopped before its end message")


class ArtifactServicer(pb_grpc.ArtifactServiceServicer):
    def __init__(self, service: ArtifactService, download_base_url: str) -> None:
        self.service = service
        self.download_base_url = download_base_url

    def to_proto(self, record: ArtifactRecord) -> pb.Artifact:
        return pb.Artifact(
            artifact_id=record.artifact_id,
            name=record.name,
            version=record.version,
            compatible_hardware=list(record.compatible),
            size=record.size,
            sha256=record.sha256,
            manifest_json=record.manifest,
            signature=record.signature,
            key_id=record.key_id,
            created_at_ms=record.created_at_ms,
            download_url=artifact_url(self.download_base_url, record.artifact_id),
            rollback_floor=record.rollback_floor,
        )

    @translate_errors
    def UploadArtifact(
        self, request_iterator: Iterator[pb.UploadArtifactRequest], context: grpc.ServicerContext
    ) -> pb.Artifact:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "metadata":
            raise InvalidArtifactError("the first message of an upload must carry the metadata")
        spec = spec_from_proto(first.metadata)
        try:
            record = self.service.upload(spec, _chunks(request_iterator))
        except grpc.RpcError:
            # The client went away mid-stream; the upload was aborted, nothing is stored.
            context.abort(grpc.StatusCode.CANCELLED, "the upload stream was cancelled")
        return self.to_proto(record)

    @translate_errors
    def GetArtifact(
        self, request: pb.GetArtifactRequest, context: grpc.ServicerContext
    ) -> pb.Artifact:
        return self.to_proto(self.service.get(request.artifact_id))

    @translate_errors
    def ListArtifacts(
        self, request: pb.ListArtifactsRequest, context: grpc.ServicerContext
    ) -> pb.ListArtifactsResponse:
        page = self.service.list(request.name, request.page_size, request.page_token)
        return pb.ListArtifactsResponse(
            artifacts=[self.to_proto(r) for r in page.artifacts],
            next_page_token=page.next_page_token,
        )

    @translate_errors
    def DeleteArtifact(
        self, request: pb.DeleteArtifactRequest, context: grpc.ServicerContext
    ) -> pb.DeleteArtifactResponse:
        self.service.delete(request.artifact_id)
        return pb.DeleteArtifactResponse()

    @translate_errors
    def GetSigningKey(
        self, request: pb.GetSigningKeyRequest, context: grpc.ServicerContext
    ) -> pb.SigningKey:
        signer = self.service.signer
        return pb.SigningKey(
            key_id=signer.key_id,
            algorithm="Ed25519",
            public_key_pem=signer.public_key_pem,
            public_key=signer.public_key_raw,
        )
