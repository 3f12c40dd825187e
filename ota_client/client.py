"""The typed client: one object per service, and `OtaClient`, the facade that holds them.

Every call sends the operator token, retries UNAVAILABLE with backoff (`retry.py`), and turns
any other failure into an `OtaError` (`errors.py`). Methods take and return plain Python values
(`models.py`). The client owns its channels: use it as a context manager, or call `close()`.

    from ota_client import OtaClient

    with OtaClient.from_environment() as ota:
        ota.shadow.register_device("dev-1", tags={"site": "berlin"})
        ota.shadow.update_shadow("dev-1", desired={"firmware": {"version": "2.0.0"}})
        for rollout in ota.rollouts.watch("r1"):
            print(rollout.status, rollout.progress.by_status)
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc

from ota_client.errors import InvalidRequestError, OtaError, from_rpc_error
from ota_client.models import (
    ROLLOUT_STATUSES,
    Artifact,
    Credentials,
    Device,
    Page,
    RegisteredDevice,
    Rollout,
    RolloutSpec,
    Shadow,
    ShadowUpdate,
    SigningKey,
)
from ota_client.retry import RetryPolicy, call_with_retries
from ota_client.settings import ClientSettings
from protos.artifacts.v1 import artifacts_pb2 as apb
from protos.artifacts.v1 import artifacts_pb2_grpc
from protos.rollout.v1 import rollout_pb2 as rpb
from protos.rollout.v1 import rollout_pb2_grpc
from protos.shadow.v1 import shadow_pb2 as spb
from protos.shadow.v1 import shadow_pb2_grpc
from services.common.auth import bearer_channel

T = TypeVar("T")
CHUNK_BYTES = 256 * 1024


class _Calls:
    """Runs one RPC: errors converted, UNAVAILABLE retried."""

    def __init__(
        self,
        policy: RetryPolicy,
        timeout: float,
        sleep: Callable[[float], None] = time.sleep,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self.timeout = timeout
        self.sleep = sleep
        self.draw = draw

    def __call__(self, fn: Callable[[], T]) -> T:
        def attempt() -> T:
            try:
                return fn()
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None

        return call_with_retries(attempt, self.policy, sleep=self.sleep, draw=self.draw)


class ShadowClient:
    """Devices, their credentials and shadows (`ota.shadow.v1.ShadowService`)."""

    def __init__(self, channel: grpc.Channel, calls: _Calls) -> None:
        self._stub = shadow_pb2_grpc.ShadowServiceStub(channel)
        self._calls = calls

    def register_device(
        self, device_id: str, tags: Mapping[str, str] | None = None
    ) -> RegisteredDevice:
        """Registers a device; its password is in the answer and nowhere else, ever."""
        request = spb.RegisterDeviceRequest(device_id=device_id, tags=dict(tags or {}))
        reply = self._calls(lambda: self._stub.RegisterDevice(request, timeout=self._calls.timeout))
        return RegisteredDevice(
            Device.from_proto(reply.device),
            Credentials(reply.credentials.username, reply.credentials.password),
        )

    def get_device(self, device_id: str) -> Device:
        request = spb.GetDeviceRequest(device_id=device_id)
        reply = self._calls(lambda: self._stub.GetDevice(request, timeout=self._calls.timeout))
        return Device.from_proto(reply)

    def list_devices(
        self, tags: Mapping[str, str] | None = None, page_size: int = 0, page_token: str = ""
    ) -> Page[Device]:
        request = spb.ListDevicesRequest(
            page_size=page_size, page_token=page_token, tags=dict(tags or {})
        )
        reply = self._calls(lambda: self._stub.ListDevices(request, timeout=self._calls.timeout))
        return Page([Device.from_proto(d) for d in reply.devices], reply.next_page_token)

    def iter_devices(
        self, tags: Mapping[str, str] | None = None, page_size: int = 0
    ) -> Iterator[Device]:
        """Every device (with these tags), page by page."""
        token = ""
        while True:
            page = self.list_devices(tags, page_size, token)
            yield from page.items
            if not page.next_page_token:
                return
            token = page.next_page_token

    def delete_device(self, device_id: str) -> None:
        request = spb.DeleteDeviceRequest(device_id=device_id)
        self._calls(lambda: self._stub.DeleteDevice(request, timeout=self._calls.timeout))

    def get_shadow(self, device_id: str) -> Shadow:
        request = spb.GetShadowRequest(device_id=device_id)
        reply = self._calls(lambda: self._stub.GetShadow(request, timeout=self._calls.timeout))
        return Shadow.from_proto(reply)

    def update_shadow(
        self,
        device_id: str,
        desired: Mapping[str, Any] | None = None,
        reported: Mapping[str, Any] | None = None,
        version: int | None = None,
        client_token: str | None = None,
        clear_desired: bool = False,
    ) -> ShadowUpdate:
        """Merges desired and / or reported state (a `None` leaf deletes it). With `version`,
        a shadow at another version is left alone (`ConflictError`, with `current_version`)."""
        state: dict[str, Any] = {}
        if clear_desired:
            state["desired"] = None
        elif desired is not None:
            state["desired"] = dict(desired)
        if reported is not None:
            state["reported"] = dict(reported)
        if not state:
            raise InvalidRequestError("an update needs desired or reported state")
        document: dict[str, Any] = {"state": state}
        if version is not None:
            document["version"] = version
        if client_token:
            document["clientToken"] = client_token
        request = spb.UpdateShadowRequest(device_id=device_id, request_json=json.dumps(document))
        reply = self._calls(lambda: self._stub.UpdateShadow(request, timeout=self._calls.timeout))
        return ShadowUpdate.from_proto(reply)

    def query_fleet(
        self, filter: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[Page[Device], int]:
        """Devices matching a fleet filter, and how many match in all."""
        request = spb.QueryFleetRequest(
            filter=filter, page_size=page_size, page_token=page_token, count=True
        )
        reply = self._calls(lambda: self._stub.QueryFleet(request, timeout=self._calls.timeout))
        page = Page([Device.from_proto(d) for d in reply.devices], reply.next_page_token)
        return page, reply.total_count


class ArtifactsClient:
    """Artifacts and the signing key (`ota.artifacts.v1.ArtifactService`)."""

    def __init__(self, channel: grpc.Channel, calls: _Calls) -> None:
        self._stub = artifacts_pb2_grpc.ArtifactServiceStub(channel)
        self._calls = calls

    def upload(
        self,
        path: Path,
        name: str,
        version: str,
        hardware: list[str],
        on_progress: Callable[[int, int], None] | None = None,
        rollback_floor: str | None = None,
    ) -> Artifact:
        """Uploads a file. Its size and sha256 are computed first and declared, so the service
        refuses bytes that changed on the way (`InvalidRequestError`) and stores nothing.
        `on_progress(sent, total)` is called per chunk; a retried upload starts again at 0.
        `rollback_floor` (a version not above `version`): devices that commit this build refuse
        every version below it from then on; leave it None unless the build fixes something the
        older builds must never run again, or the fleet cannot be rolled back past it."""
        size, sha256 = _measure(path)
        metadata = apb.ArtifactMetadata(
            name=name,
            version=version,
            compatible_hardware=hardware,
            sha256=sha256,
            size=size,
            rollback_floor=rollback_floor,
        )

        def requests() -> Iterator[apb.UploadArtifactRequest]:
            yield apb.UploadArtifactRequest(metadata=metadata)
            sent = 0
            if on_progress:
                on_progress(0, size)
            with path.open("rb") as stream:
                while chunk := stream.read(CHUNK_BYTES):
                    yield apb.UploadArtifactRequest(chunk=chunk)
                    sent += len(chunk)
                    if on_progress:
                        on_progress(sent, size)
            yield apb.UploadArtifactRequest(end=apb.UploadEnd())

        # No deadline: a large upload on a slow link takes as long as it takes.
        reply = self._calls(lambda: self._stub.UploadArtifact(requests()))
        return Artifact.from_proto(reply)

    def get(self, artifact_id: str) -> Artifact:
        request = apb.GetArtifactRequest(artifact_id=artifact_id)
        reply = self._calls(lambda: self._stub.GetArtifact(request, timeout=self._calls.timeout))
        return Artifact.from_proto(reply)

    def list(self, name: str = "", page_size: int = 0, page_token: str = "") -> Page[Artifact]:
        request = apb.ListArtifactsRequest(page_size=page_size, page_token=page_token, name=name)
        reply = self._calls(lambda: self._stub.ListArtifacts(request, timeout=self._calls.timeout))
        return Page([Artifact.from_proto(a) for a in reply.artifacts], reply.next_page_token)

    def iter(self, name: str = "", page_size: int = 0) -> Iterator[Artifact]:
        """Every artifact (of this name), newest first, page by page."""
        token = ""
        while True:
            page = self.list(name, page_size, token)
            yield from page.items
            if not page.next_page_token:
                return
            token = page.next_page_token

    def delete(self, artifact_id: str) -> None:
        request = apb.DeleteArtifactRequest(artifact_id=artifact_id)
        self._calls(lambda: self._stub.DeleteArtifact(request, timeout=self._calls.timeout))

    def signing_key(self) -> SigningKey:
        request = apb.GetSigningKeyRequest()
        reply = self._calls(lambda: self._stub.GetSigningKey(request, timeout=self._calls.timeout))
        return SigningKey.from_proto(reply)


class RolloutsClient:
    """Staged rollouts (`ota.rollout.v1.RolloutService`). Every command returns the rollout as
    it is after the command; the reconcile passes that act on it run in the service."""

    def __init__(self, channel: grpc.Channel, calls: _Calls) -> None:
        self._stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        self._calls = calls

    def _unary(self, method: Callable[..., rpb.Rollout], request: Any) -> Rollout:
        reply = self._calls(lambda: method(request, timeout=self._calls.timeout))
        return Rollout.from_proto(reply)

    def create(self, spec: RolloutSpec) -> Rollout:
        """Defines a rollout (CREATED); nothing is sent to a device before `start`."""
        return self._unary(self._stub.CreateRollout, rpb.CreateRolloutRequest(spec=spec.to_proto()))

    def start(self, rollout_id: str) -> Rollout:
        return self._unary(self._stub.StartRollout, rpb.StartRolloutRequest(rollout_id=rollout_id))

    def pause(self, rollout_id: str, reason: str = "") -> Rollout:
        request = rpb.PauseRolloutRequest(rollout_id=rollout_id, reason=reason)
        return self._unary(self._stub.PauseRollout, request)

    def resume(self, rollout_id: str) -> Rollout:
        request = rpb.ResumeRolloutRequest(rollout_id=rollout_id)
        return self._unary(self._stub.ResumeRollout, request)

    def approve(self, rollout_id: str, stage_index: int) -> Rollout:
        request = rpb.ApproveStageRequest(rollout_id=rollout_id, stage_index=stage_index)
        return self._unary(self._stub.ApproveStage, request)

    def abort(self, rollout_id: str, reason: str = "") -> Rollout:
        request = rpb.AbortRolloutRequest(rollout_id=rollout_id, reason=reason)
        return self._unary(self._stub.AbortRollout, request)

    def get(self, rollout_id: str) -> Rollout:
        return self._unary(self._stub.GetRollout, rpb.GetRolloutRequest(rollout_id=rollout_id))

    def list(
        self, status: str | None = None, page_size: int = 0, page_token: str = ""
    ) -> Page[Rollout]:
        """One page of rollouts, by id; `status` (e.g. "RUNNING") keeps only those."""
        request = rpb.ListRolloutsRequest(
            page_size=page_size, page_token=page_token, status=_rollout_status(status)
        )
        reply = self._calls(lambda: self._stub.ListRollouts(request, timeout=self._calls.timeout))
        return Page([Rollout.from_proto(r) for r in reply.rollouts], reply.next_page_token)

    def iter(self, status: str | None = None, page_size: int = 0) -> Iterator[Rollout]:
        """Every rollout (with this status), page by page."""
        token = ""
        while True:
            page = self.list(status, page_size, token)
            yield from page.items
            if not page.next_page_token:
                return
            token = page.next_page_token

    def watch(self, rollout_id: str, interval_seconds: float | None = None) -> Iterator[Rollout]:
        """The rollout now, then each time it changes, until it is final (COMPLETED, or ABORTED
        with nothing left in flight). Opening the stream is retried on UNAVAILABLE like any
        call; once updates flow, a broken stream raises (the caller decides whether to watch
        again). No deadline: a rollout takes as long as it takes. Closing the iterator early
        cancels the stream."""
        request = rpb.WatchRolloutRequest(rollout_id=rollout_id)
        if interval_seconds is not None:
            request.interval_seconds = interval_seconds

        def open_stream() -> tuple[Any, rpb.Rollout | None]:
            call = self._stub.WatchRollout(request)
            try:
                return call, next(call)
            except StopIteration:
                return call, None

        call, first = self._calls(open_stream)
        try:
            if first is None:
                return
            yield Rollout.from_proto(first)
            for update in call:
                yield Rollout.from_proto(update)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()


def _rollout_status(name: str | None) -> rpb.RolloutStatus.ValueType:
    if not name:
        return rpb.ROLLOUT_STATUS_UNSPECIFIED
    if name.upper() not in ROLLOUT_STATUSES:
        raise InvalidRequestError(
            f"unknown rollout status {name!r}; one of {', '.join(ROLLOUT_STATUSES)}"
        )
    return rpb.RolloutStatus.Value(name.upper())


def _measure(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise InvalidRequestError(f"cannot read {path}: {exc.strerror or exc}") from None
    return size, digest.hexdigest()


class OtaClient:
    """The facade: `.shadow`, `.artifacts` and `.rollouts`, over one channel per service."""

    def __init__(
        self,
        settings: ClientSettings,
        *,
        sleep: Callable[[float], None] = time.sleep,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        calls = _Calls(settings.retry, settings.timeout_seconds, sleep, draw)
        self._channels: list[grpc.Channel] = []
        self.shadow = ShadowClient(self._channel(settings.shadow_address), calls)
        self.artifacts = ArtifactsClient(self._channel(settings.artifacts_address), calls)
        self.rollouts = RolloutsClient(self._channel(settings.rollouts_address), calls)

    @classmethod
    def from_environment(cls, endpoints: Path | None = None) -> OtaClient:
        """A client for the settings in the environment / the endpoints file."""
        return cls(ClientSettings.load(endpoints))

    def _channel(self, address: str) -> grpc.Channel:
        channel = bearer_channel(address, self.settings.token)
        self._channels.append(channel)
        return channel

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> OtaClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["ArtifactsClient", "OtaClient", "OtaError", "RolloutsClient", "ShadowClient"]
