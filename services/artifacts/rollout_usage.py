"""Whether a live rollout uses an artifact: asked of the rollout service before a delete.

A rollout that is created, running, paused or waiting for approval may still send devices to
its artifact; completed and aborted ones do not. If the rollout service cannot answer, the
delete is refused (UNAVAILABLE) rather than risk pulling an artifact from under a rollout.
"""

from __future__ import annotations

import grpc

from protos.rollout.v1 import rollout_pb2 as rpb
from protos.rollout.v1 import rollout_pb2_grpc as rpb_grpc
from services.artifacts.errors import UpstreamUnavailableError
from services.common.auth import bearer_channel

LIVE = (rpb.CREATED, rpb.RUNNING, rpb.PAUSED, rpb.WAITING_APPROVAL)
TIMEOUT_SECONDS = 10.0


class RolloutUsage:
    """An `InUseCheck` backed by the rollout service's `ListRollouts`."""

    def __init__(self, address: str, token: str | None) -> None:
        self._channel = bearer_channel(address, token)
        self._stub = rpb_grpc.RolloutServiceStub(self._channel)

    def __call__(self, artifact_id: str) -> bool:
        try:
            for status in LIVE:
                token = ""
                while True:
                    page = self._stub.ListRollouts(
                        rpb.ListRolloutsRequest(page_size=1000, page_token=token, status=status),
                        timeout=TIMEOUT_SECONDS,
                    )
                    if any(r.spec.artifact_id == artifact_id for r in page.rollouts):
                        return True
                    token = page.next_page_token
                    if not token:
                        break
        except grpc.RpcError as exc:
            code = exc.code().name if isinstance(exc, grpc.Call) else "error"
            raise UpstreamUnavailableError(
                f"the rollout service cannot say whether a rollout uses the artifact ({code})"
            ) from None
        return False

    def close(self) -> None:
        self._channel.close()
