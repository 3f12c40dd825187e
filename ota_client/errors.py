"""Every exception the client raises, under one root, `OtaError`.

gRPC status codes become these in one place (`from_rpc_error`); nothing else in the client or
the CLI looks at status codes. Each error keeps the status name (`code`), the server's message
(`details`) and, for a version conflict, the shadow's current version when the server sent it.

- `ConfigError`: no endpoints file, a bad address or settings value (no call made).
- `SpecError`: a rollout definition (flags or YAML file) that does not parse (no call made).
- `InvalidRequestError`: INVALID_ARGUMENT, OUT_OF_RANGE, DATA_LOSS (bytes not matching the
  declared sha256 / size), RESOURCE_EXHAUSTED (too large).
- `NotFoundError`: NOT_FOUND (unknown device, shadow or artifact).
- `ConflictError`: ALREADY_EXISTS, ABORTED (stale shadow `version`), FAILED_PRECONDITION
  (an artifact a rollout uses).
- `UnauthenticatedError`: UNAUTHENTICATED (missing or unknown operator token).
- `PermissionDeniedError`: PERMISSION_DENIED (the token's role is too small).
- `UnavailableError`: UNAVAILABLE (down or unreachable; raised once the retries are spent).
- `ServerError`: any other status (INTERNAL, DEADLINE_EXCEEDED, UNKNOWN, ...).
"""

from __future__ import annotations

from typing import Any, ClassVar

import grpc


class OtaError(Exception):
    """The root of every error the client raises."""

    kind: ClassVar[str] = "error"

    def __init__(self, details: str, code: str = "", current_version: int | None = None) -> None:
        super().__init__(details)
        self.details = details
        self.code = code
        self.current_version = current_version

    def __str__(self) -> str:
        return f"{self.kind}: {self.details}"


class ConfigError(OtaError):
    kind = "configuration"


class SpecError(OtaError):
    kind = "invalid rollout definition"


class InvalidRequestError(OtaError):
    kind = "invalid request"


class NotFoundError(OtaError):
    kind = "not found"


class ConflictError(OtaError):
    kind = "conflict"


class UnauthenticatedError(OtaError):
    kind = "unauthenticated"


class PermissionDeniedError(OtaError):
    kind = "permission denied"


class UnavailableError(OtaError):
    kind = "unavailable"


class ServerError(OtaError):
    kind = "server error"


ERRORS: dict[grpc.StatusCode, type[OtaError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.DATA_LOSS: InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.FAILED_PRECONDITION: ConflictError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


def from_rpc_error(exc: grpc.RpcError) -> OtaError:
    """The client's exception for a failed call (an `RpcError` that is also a `grpc.Call`)."""
    call: Any = exc
    code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    details = (call.details() if hasattr(call, "details") else None) or str(code.name).lower()
    current: int | None = None
    trailers = call.trailing_metadata() if hasattr(call, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == "ota-current-version":
            try:
                current = int(value)
            except ValueError:
                current = None
    cls = ERRORS.get(code, ServerError)
    return cls(details, code=code.name, current_version=current)
