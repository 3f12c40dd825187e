"""The typed Python client for the OTA platform's gRPC APIs, and `otactl` (`ota_client.cli`).

Owns: connection settings, the operator token on every call, retries of UNAVAILABLE, the
mapping from gRPC status codes to `ota_client.errors`, and proto -> dataclass conversion.
It does not own any rule of the services: it asks them.
"""

from ota_client.client import ArtifactsClient, OtaClient, ShadowClient
from ota_client.errors import (
    ConfigError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    OtaError,
    PermissionDeniedError,
    ServerError,
    UnauthenticatedError,
    UnavailableError,
)
from ota_client.models import (
    Artifact,
    Credentials,
    Device,
    Page,
    RegisteredDevice,
    Shadow,
    ShadowUpdate,
    SigningKey,
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
    "InvalidRequestError",
    "NotFoundError",
    "OtaClient",
    "OtaError",
    "Page",
    "PermissionDeniedError",
    "RegisteredDevice",
    "RetryPolicy",
    "ServerError",
    "Shadow",
    "ShadowClient",
    "ShadowUpdate",
    "SigningKey",
    "UnauthenticatedError",
    "UnavailableError",
]
