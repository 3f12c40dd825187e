"""Bearer-token authentication for every gRPC API: operators, jobs and the services themselves.

A server that is given a token table (`OTA_AUTH_TOKENS_FILE`) refuses calls without a known
token (UNAUTHENTICATED) or with too small a role (PERMISSION_DENIED). Roles, weakest first:
`read` (Get*, List*, Query*, Watch*, BatchGetShadows), `admin` (every operator call), `service`
(also the calls only services make: device authentication, the outbox, device updates). Health
checking and reflection stay open, for load balancers and grpcurl. Tokens are stored as sha256
digests and compared in constant time. Devices never use these APIs.

Clients send `OTA_SERVICE_TOKEN` (services) or an operator token with `bearer_channel`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc

from services.common.config import ConfigError

Role = Literal["read", "admin", "service"]
RANK: dict[str, int] = {"read": 1, "admin": 2, "service": 3}
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
SERVICE_ONLY = frozenset({"AuthenticateDevice", "ReadEvents", "AckEvents", "BatchUpdateShadow"})
READ_PREFIXES = ("Get", "List", "Query", "Watch")
READ_ONLY = frozenset({"BatchGetShadows"})  # reads whose names do not start like one


def required_role(method: str) -> Role | None:
    """The role a full method name (`/pkg.Service/Method`) needs; None when it is open."""
    if method.startswith(OPEN_PREFIXES):
        return None
    name = method.rsplit("/", 1)[-1]
    if name in SERVICE_ONLY:
        return "service"
    if name in READ_ONLY or name.startswith(READ_PREFIXES):
        return "read"
    return "admin"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenEntry:
    name: str
    role: Role
    sha256: str


@dataclass(frozen=True)
class TokenTable:
    entries: tuple[TokenEntry, ...]

    def role_of(self, token: str | None) -> TokenEntry | None:
        """The entry whose digest matches, comparing every one in constant time."""
        if not token:
            return None
        presented = digest(token)
        found = None
        for entry in self.entries:
            if hmac.compare_digest(presented, entry.sha256):
                found = entry
        return found

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        """`{"tokens": [{"name": ..., "role": "read|admin|service", "sha256": hex}, ...]}`"""
        try:
            raw = json.loads(path.read_text())
            entries = tuple(
                TokenEntry(str(t["name"]), t["role"], str(t["sha256"]).lower())
                for t in raw["tokens"]
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read the token table {path}: {exc}") from None
        for entry in entries:
            if entry.role not in RANK or len(entry.sha256) != 64:
                raise ConfigError(f"token {entry.name!r}: bad role or sha256 in {path}")
        return cls(entries)

    @staticmethod
    def write(path: Path, tokens: Mapping[str, tuple[str, Role]]) -> None:
        """Write a table for `{token: (name, role)}` (only digests reach the file), 0600."""
        body = {
            "tokens": [
                {"name": name, "role": role, "sha256": digest(token)}
                for token, (name, role) in tokens.items()
            ]
        }
        path.write_text(json.dumps(body, indent=1))
        path.chmod(0o600)


def token_table_from_env(env: Mapping[str, str] | None = None) -> TokenTable | None:
    env = os.environ if env is None else env
    path = env.get("OTA_AUTH_TOKENS_FILE", "").strip()
    return TokenTable.load(Path(path)) if path else None


def _bearer(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return None


class BearerAuthInterceptor(grpc.ServerInterceptor):
    """Checks every call's token and role before the servicer sees the request."""

    def __init__(
        self, tokens: TokenTable, required: Callable[[str], Role | None] = required_role
    ) -> None:
        self.tokens = tokens
        self.required = required

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        needed = self.required(details.method)
        if needed is None:
            return continuation(details)
        entry = self.tokens.role_of(_bearer(details.invocation_metadata))
        if entry is None:
            return _refusal(
                continuation(details),
                grpc.StatusCode.UNAUTHENTICATED,
                "a valid bearer token is required (authorization: Bearer <token>)",
            )
        if RANK[entry.role] < RANK[needed]:
            return _refusal(
                continuation(details),
                grpc.StatusCode.PERMISSION_DENIED,
                f"token {entry.name!r} has role {entry.role!r}; this call needs {needed!r}",
            )
        return continuation(details)


def _refusal(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    """The same kind of handler as the method's, answering with `code` only."""
    if handler is None:
        return None

    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return handler._replace(
        unary_unary=deny if handler.unary_unary else None,
        unary_stream=deny if handler.unary_stream else None,
        stream_unary=deny if handler.stream_unary else None,
        stream_stream=deny if handler.stream_stream else None,
    )


def server_interceptors(env: Mapping[str, str] | None = None) -> list[grpc.ServerInterceptor]:
    """The interceptors a server process installs: auth when a token table is configured."""
    table = token_table_from_env(env)
    return [BearerAuthInterceptor(table)] if table is not None else []


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class _AddToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self.metadata = call_metadata(token)

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=(*(details.metadata or ()), *self.metadata))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def bearer_channel(address: str, token: str | None, **kwargs: Any) -> grpc.Channel:
    """A plaintext channel that sends `token` on every call (none when it is empty)."""
    channel = grpc.insecure_channel(address, **kwargs)
    return grpc.intercept_channel(channel, _AddToken(token)) if token else channel


class _AddTokenAio(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.metadata = call_metadata(token)

    def _details(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self.metadata)
        return details._replace(metadata=metadata)

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


def bearer_aio_channel(address: str, token: str | None, **kwargs: Any) -> grpc.aio.Channel:
    """An asyncio plaintext channel that sends `token` on every unary call."""
    interceptors = [_AddTokenAio(token)] if token else None
    return grpc.aio.insecure_channel(address, interceptors=interceptors, **kwargs)


def service_token(env: Mapping[str, str] | None = None) -> str | None:
    """The token this process sends to other services (`OTA_SERVICE_TOKEN`)."""
    env = os.environ if env is None else env
    return env.get("OTA_SERVICE_TOKEN", "").strip() or None
