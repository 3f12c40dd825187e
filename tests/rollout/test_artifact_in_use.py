"""The artifact service asks the rollout service before a delete: a live rollout keeps its
artifact, a finished one does not, and no answer means no delete."""

from __future__ import annotations

import pytest

from protos.rollout.v1 import rollout_pb2 as pb
from services.artifacts.errors import UpstreamUnavailableError
from services.artifacts.rollout_usage import RolloutUsage
from services.rollout.server import create_server
from services.rollout.settings import RolloutSettings
from tests.rollout.conftest import RunningRollout
from tests.rollout.test_rollout_service import create, register_fleet, spec, start


def test_a_live_rollout_keeps_its_artifact(rollout: RunningRollout) -> None:
    register_fleet(rollout, 4)
    server, port = create_server(RolloutSettings(listen="127.0.0.1:0"), rollout.service)
    server.start()
    usage = RolloutUsage(f"127.0.0.1:{port}", None)
    try:
        assert usage("fw-200") is False  # no rollout yet
        create(rollout, spec("r1", tags={"group": "a"}))
        assert usage("fw-200") is True  # created
        start(rollout, "r1")
        assert usage("fw-200") is True  # running
        assert usage("fw-other") is False
        rollout.stub.AbortRollout(pb.AbortRolloutRequest(rollout_id="r1", reason="test"))
        assert usage("fw-200") is False  # aborted: no longer sends devices to it
    finally:
        server.stop(None)
    with pytest.raises(UpstreamUnavailableError):
        usage("fw-200")  # the rollout service is gone: refuse rather than guess
    usage.close()
