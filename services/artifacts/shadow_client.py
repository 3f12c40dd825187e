"""What the download plane asks the shadow service (over gRPC, asyncio): is this the device's
own password, and what does its desired state say. Proto types stay in this module.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from protos.shadow.v1 import shadow_pb2 as pb
from protos.shadow.v1 import shadow_pb2_grpc as pb_grpc
from services.artifacts.domain import DeviceCredentials
from services.artifacts.errors import UpstreamUnavailableError
from services.common.auth import bearer_aio_channel

DEFAULT_TIMEOUT_SECONDS = 5.0


class ShadowDirectory:
    """An asyncio gRPC client of the shadow service. Create it inside the running loop."""

    def __init__(
        self, address: str, timeout: float = DEFAULT_TIMEOUT_SECONDS, token: str | None = None
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = bearer_aio_channel(address, token)
        self._stub = pb_grpc.ShadowServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def authenticate(self, credentials: DeviceCredentials) -> bool:
        try:
            reply = await self._stub.AuthenticateDevice(
                pb.AuthenticateDeviceRequest(
                    device_id=credentials.device_id, password=credentials.password
                ),
                timeout=self.timeout,
            )
        except grpc.RpcError as exc:
            raise _unavailable(exc) from None
        return bool(reply.authenticated)

    async def desired_state(self, device_id: str) -> Any:
        """The device's desired state, or None when it has no shadow."""
        try:
            shadow = await self._stub.GetShadow(
                pb.GetShadowRequest(device_id=device_id), timeout=self.timeout
            )
        except grpc.RpcError as exc:
            if _code(exc) == grpc.StatusCode.NOT_FOUND:
                return None
            raise _unavailable(exc) from None
        document = json.loads(shadow.document_json)
        return document.get("state", {}).get("desired")


def _code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(exc, "code", None)
    return code() if callable(code) else None


def _unavailable(exc: grpc.RpcError) -> UpstreamUnavailableError:
    return UpstreamUnavailableError(f"the shadow service did not answer ({_code(exc)})")
