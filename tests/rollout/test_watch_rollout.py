"""WatchRollout over real gRPC: the first state at once, an update per change, the end of the
stream once the rollout is final. A reader thread drains the stream into a queue while the test
drives passes and device reports; waits are for conditions, with generous bounds, never timed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest

from protos.rollout.v1 import rollout_pb2 as pb
from tests.rollout.conftest import RunningRollout
from tests.rollout.test_rollout_service import (
    OLD,
    code_of,
    create,
    register_fleet,
    report,
    run_pass,
    spec,
    start,
    succeeded,
    targeted,
)

WAIT = 60.0  # seconds: a bound for a broken test, not a performance expectation
END = object()


class Watcher:
    """Reads one WatchRollout stream on a thread; `next_where` waits for a matching update."""

    def __init__(self, r: RunningRollout, rollout_id: str, interval: float = 0.2) -> None:
        request = pb.WatchRolloutRequest(rollout_id=rollout_id, interval_seconds=interval)
        self.call = r.stub.WatchRollout(request, timeout=5 * WAIT)
        self.items: queue.Queue[object] = queue.Queue()
        self.seen: list[pb.Rollout] = []
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        try:
            for rollout in self.call:
                self.items.put(rollout)
        except grpc.RpcError as exc:
            self.items.put(exc)
        finally:
            self.items.put(END)

    def next(self) -> object:
        item = self.items.get(timeout=WAIT)
        if isinstance(item, pb.Rollout):
            self.seen.append(item)
        return item

    def next_where(self, condition: Callable[[pb.Rollout], bool]) -> pb.Rollout:
        while True:
            item = self.next()
            assert isinstance(item, pb.Rollout), f"the stream ended first: {item!r}"
            if condition(item):
                return item

    def assert_ends(self) -> None:
        item = self.next()
        assert item is END, f"expected the end of the stream, got {item!r}"
        self.thread.join(WAIT)

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(WAIT)


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    opened: list[Watcher] = []
    yield opened
    for watcher in opened:
        watcher.close()


def in_flight(rollout: pb.Rollout) -> int:
    return rollout.progress.by_status["QUEUED"] + rollout.progress.by_status["IN_PROGRESS"]


def test_watch_sends_the_rollout_then_each_change_and_ends_once_completed(
    rollout: RunningRollout, watchers: list[Watcher]
) -> None:
    r = rollout
    ids = register_fleet(r, 4)
    create(r, spec("w1", device_ids=ids, stages=[pb.Stage(percent=50), pb.Stage(percent=100)]))
    start(r, "w1")
    watcher = Watcher(r, "w1")
    watchers.append(watcher)

    first = watcher.next_where(lambda _: True)
    assert first.spec.rollout_id == "w1"
    assert (first.status, first.stage_index) == (pb.RUNNING, 0)
    assert first.progress.not_started == 4 and in_flight(first) == 0

    run_pass(r, "w1")  # notifies the canary: two devices
    notified = watcher.next_where(lambda x: in_flight(x) > 0)
    assert in_flight(notified) == 2
    assert notified.progress.stages[0].by_status["QUEUED"] == 2

    canary = targeted(r, ids)
    for device_id in canary:
        succeeded(r, device_id)
    run_pass(r, "w1")  # reads the successes, moves to stage 1 and notifies the rest
    stage_1 = watcher.next_where(lambda x: x.stage_index == 1 and in_flight(x) == 2)
    assert stage_1.progress.by_status["SUCCEEDED"] == 2
    for device_id in ids:
        if device_id not in canary:
            succeeded(r, device_id)
    run_pass(r, "w1")

    done = watcher.next_where(lambda x: x.status == pb.COMPLETED)
    assert done.progress.by_status["SUCCEEDED"] == 4
    watcher.assert_ends()
    assert watcher.seen[-1] == done
    # An update is sent only when something the client sees changed.
    assert all(a != b for a, b in zip(watcher.seen, watcher.seen[1:], strict=False))


def test_an_aborted_rollout_is_watched_until_its_rollbacks_settle(
    rollout: RunningRollout, watchers: list[Watcher]
) -> None:
    r = rollout
    ids = register_fleet(r, 4)
    stages = [pb.Stage(percent=50), pb.Stage(percent=100)]
    create(r, spec("w2", device_ids=ids, stages=stages, rollback_on_abort=True))
    start(r, "w2")
    run_pass(r, "w2")
    canary = targeted(r, ids)
    for device_id in canary:
        succeeded(r, device_id)
    run_pass(r, "w2")  # the canary SUCCEEDED; the pass also notifies stage 1
    watcher = Watcher(r, "w2")
    watchers.append(watcher)
    watcher.next_where(lambda x: x.progress.by_status["SUCCEEDED"] == 2)

    r.stub.AbortRollout(pb.AbortRolloutRequest(rollout_id="w2", reason="bad build"))
    aborted = watcher.next_where(lambda x: x.status == pb.ABORTED)
    assert aborted.reason == "bad build"
    # ABORTED alone is not the end: the canary still runs the new firmware until rolled back.
    run_pass(r, "w2")
    pending = watcher.next_where(lambda x: x.progress.rollbacks_pending > 0)
    assert pending.progress.rollbacks_pending == 2
    for device_id in canary:
        report(r, device_id, {**OLD, "state": "succeeded", "target": OLD})
    run_pass(r, "w2")

    last = watcher.next_where(lambda x: x.progress.rollbacks_pending == 0)
    assert last.status == pb.ABORTED
    assert last.progress.by_status["ROLLED_BACK"] == 2
    watcher.assert_ends()


def test_a_rollout_already_final_is_sent_once(
    rollout: RunningRollout, watchers: list[Watcher]
) -> None:
    r = rollout
    ids = register_fleet(r, 2)
    create(r, spec("w3", device_ids=ids))
    r.stub.AbortRollout(pb.AbortRolloutRequest(rollout_id="w3"))  # before it started
    watcher = Watcher(r, "w3", interval=10.0)
    watchers.append(watcher)
    only = watcher.next_where(lambda _: True)
    assert only.status == pb.ABORTED
    watcher.assert_ends()


def test_unknown_rollouts_and_bad_intervals_are_refused(rollout: RunningRollout) -> None:
    r = rollout
    create(r, spec("w4", device_ids=register_fleet(r, 1)))

    def first(request: pb.WatchRolloutRequest) -> Callable[[], pb.Rollout]:
        return lambda: next(iter(r.stub.WatchRollout(request, timeout=WAIT)))

    unknown = pb.WatchRolloutRequest(rollout_id="nope")
    assert code_of(first(unknown)) == grpc.StatusCode.NOT_FOUND
    for interval in (0.0, 0.1, 10.5, float("nan"), float("inf")):
        bad = pb.WatchRolloutRequest(rollout_id="w4", interval_seconds=interval)
        assert code_of(first(bad)) == grpc.StatusCode.INVALID_ARGUMENT, interval
    # The bounds themselves are allowed.
    for interval in (0.2, 10.0):
        call = r.stub.WatchRollout(
            pb.WatchRolloutRequest(rollout_id="w4", interval_seconds=interval), timeout=WAIT
        )
        assert next(iter(call)).status == pb.CREATED
        call.cancel()
