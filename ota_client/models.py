"""What the client returns: plain frozen dataclasses and parsed JSON, never protos.

Protos are converted here, at the edge, by named constructors (`from_proto`); `to_dict` gives
the JSON form the CLI prints with `--json`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from protos.artifacts.v1 import artifacts_pb2 as apb
from protos.shadow.v1 import shadow_pb2 as spb

T = TypeVar("T")


def _json(text: str) -> Any:
    return json.loads(text) if text else {}


class _Plain:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    # Empty when there are no more pages.
    next_page_token: str


@dataclass(frozen=True)
class Device(_Plain):
    device_id: str
    tags: dict[str, str]
    created_at_ms: int
    shadow_version: int

    @classmethod
    def from_proto(cls, device: spb.Device) -> Device:
        return cls(device.device_id, dict(device.tags), device.created_at_ms, device.shadow_version)


@dataclass(frozen=True)
class Credentials(_Plain):
    username: str
    # Returned once, at registration; the service keeps only a hash.
    password: str = dataclasses.field(repr=False)


@dataclass(frozen=True)
class RegisteredDevice(_Plain):
    device: Device
    credentials: Credentials


@dataclass(frozen=True)
class Shadow(_Plain):
    device_id: str
    version: int
    # The AWS-style document: {"state": {"desired", "reported", "delta"}, "metadata", ...}.
    document: dict[str, Any]

    @classmethod
    def from_proto(cls, shadow: spb.Shadow) -> Shadow:
        return cls(shadow.device_id, shadow.version, _json(shadow.document_json))


@dataclass(frozen=True)
class ShadowUpdate(_Plain):
    version: int
    accepted: dict[str, Any]
    document: dict[str, Any]
    delta: dict[str, Any]

    @classmethod
    def from_proto(cls, reply: spb.UpdateShadowResponse) -> ShadowUpdate:
        return cls(
            reply.version,
            _json(reply.accepted_json),
            _json(reply.document_json),
            _json(reply.delta_json),
        )


@dataclass(frozen=True)
class Artifact(_Plain):
    artifact_id: str
    name: str
    version: str
    compatible_hardware: list[str]
    size: int
    sha256: str
    # The exact signed text: verify the signature over these bytes, not a re-serialization.
    manifest_json: str
    # Base64 of the Ed25519 signature.
    signature: str
    key_id: str
    created_at_ms: int
    download_url: str

    @property
    def manifest(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.manifest_json)
        return parsed

    @classmethod
    def from_proto(cls, artifact: apb.Artifact) -> Artifact:
        return cls(
            artifact.artifact_id,
            artifact.name,
            artifact.version,
            list(artifact.compatible_hardware),
            artifact.size,
            artifact.sha256,
            artifact.manifest_json,
            base64.b64encode(artifact.signature).decode(),
            artifact.key_id,
            artifact.created_at_ms,
            artifact.download_url,
        )


@dataclass(frozen=True)
class SigningKey(_Plain):
    key_id: str
    algorithm: str
    public_key_pem: str
    # Base64 of the raw 32-byte key: what an agent config's `trusted_keys` holds.
    public_key: str

    @classmethod
    def from_proto(cls, key: apb.SigningKey) -> SigningKey:
        return cls(
            key.key_id,
            key.algorithm,
            key.public_key_pem,
            base64.b64encode(key.public_key).decode(),
        )
