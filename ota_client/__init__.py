"""The typed Python client for the OTA platform's gRPC APIs, and `otactl` (`ota_client.cli`).

Owns: connection settings, the operator token on every call, retries of UNAVAILABLE, the
mapping from gRPC status codes to `ota_client.errors`, and proto -> dataclass conversion.
It does not own any rule of the services: it asks them.
"""

from ota_client.client import ArtifactsClient, OtaClient, RolloutsClient, ShadowClient
from ota_client.errors import (
    ConfigError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    OtaError,
    PermissionDeniedError,
    ServerError,
    SpecError,
    UnauthenticatedError,
    UnavailableError,
)
from ota_client.models import (
    Artifact,
    Credentials,
    Device,
    FailureThreshold,
    Page,
    RegisteredDevice,
    Rollout,
    RolloutProgress,
    RolloutSpec,
    RolloutStage,
    Shadow,
    ShadowUpdate,
    SigningKey,
    StageProgress,
)
from ota_client.retry import RetryPolicy
from ota_client.settings import ClientSettings

__all__ = [
    "Artifact",
    "ArtifactsClient",
    "ClientSettings",
    "ConfigError",
    "ConflictError",
    "Credentials",
    "Device",
    "FailureThreshold",
    "InvalidRequestError",
    "NotFoundError",
    "OtaClient",
    "OtaError",
    "Page",
    "PermissionDeniedError",
    "RegisteredDevice",
    "RetryPolicy",
    "Rollout",
    "RolloutProgress",
    "RolloutSpec",
    "RolloutStage",
    "RolloutsClient",
    "ServerError",
    "Shadow",
    "ShadowClient",
    "ShadowUpdate",
    "SigningKey",
    "SpecError",
    "StageProgress",
    "UnauthenticatedError",
    "UnavailableError",
]
