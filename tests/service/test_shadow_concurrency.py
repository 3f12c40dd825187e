"""Concurrent shadow writes over real gRPC, on SQLite and on PostgreSQL: no update is lost,
optimistic locking serialises read-modify-write cycles, and overlapping batches neither
deadlock nor fail.

The store's row lock (SELECT ... FOR UPDATE; BEGIN IMMEDIATE on SQLite) is what these tests
exercise; they assert on final documents and versions, never on timing.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar, cast

import grpc

from protos.shadow.v1 import shadow_pb2 as pb
from protos.shadow.v1.shadow_pb2_grpc import ShadowServiceStub

T = TypeVar("T")
JsonObject = dict[str, Any]

# A hung or deadlocked worker fails the test instead of waiting for pytest's global timeout.
RPC_TIMEOUT = 60.0
RESULT_TIMEOUT = 120.0


class Server(Protocol):
    """What these tests use of conftest's `RunningShadow`."""

    @property
    def stub(self) -> ShadowServiceStub: ...


def status_of(exc: grpc.RpcError) -> grpc.StatusCode:
    return cast(grpc.Call, exc).code()


def run_threads(count: int, work: Callable[[int], T]) -> list[T]:
    """Run work(0) .. work(count - 1) at once on `count` threads; re-raise any failure."""
    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(work, index) for index in range(count)]
        return [future.result(timeout=RESULT_TIMEOUT) for future in futures]


def register(stub: ShadowServiceStub, device_id: str) -> None:
    stub.RegisterDevice(pb.RegisterDeviceRequest(device_id=device_id), timeout=RPC_TIMEOUT)


def update_shadow(stub: ShadowServiceStub, device_id: str, request: JsonObject) -> int:
    response = stub.UpdateShadow(
        pb.UpdateShadowRequest(device_id=device_id, request_json=json.dumps(request)),
        timeout=RPC_TIMEOUT,
    )
    return response.version


def get_shadow(stub: ShadowServiceStub, device_id: str) -> tuple[int, JsonObject]:
    shadow = stub.GetShadow(pb.GetShadowRequest(device_id=device_id), timeout=RPC_TIMEOUT)
    document = json.loads(shadow.document_json)
    assert document["version"] == shadow.version
    return shadow.version, document


# --- blind updates of one device --------------------------------------------------------------

THREADS = 8
UPDATES_PER_THREAD = 25


def test_concurrent_updates_of_one_device_lose_nothing(shadow_server: Server) -> None:
    stub = shadow_server.stub
    register(stub, "hot")

    def writer(thread: int) -> list[int]:
        return [
            update_shadow(
                stub, "hot", {"state": {"reported": {f"t{thread}_{i}": thread * 100 + i}}}
            )
            for i in range(UPDATES_PER_THREAD)
        ]

    versions = [v for per_thread in run_threads(THREADS, writer) for v in per_thread]
    total = THREADS * UPDATES_PER_THREAD
    # Every accepted update got its own version: none was applied on top of a stale read.
    assert sorted(versions) == list(range(1, total + 1))
    version, document = get_shadow(stub, "hot")
    assert version == total
    assert document["state"]["reported"] == {
        f"t{thread}_{i}": thread * 100 + i
        for thread in range(THREADS)
        for i in range(UPDATES_PER_THREAD)
    }
    assert "desired" not in document["state"]
    assert set(document["metadata"]["reported"]) == set(document["state"]["reported"])
    device = stub.GetDevice(pb.GetDeviceRequest(device_id="hot"), timeout=RPC_TIMEOUT)
    assert device.shadow_version == total


def test_concurrent_desired_and_reported_updates_of_one_device(shadow_server: Server) -> None:
    """Writers of desired and writers of reported interleave; the delta reflects all of them."""
    stub = shadow_server.stub
    register(stub, "both")
    rounds = 20

    def writer(thread: int) -> None:
        section = "desired" if thread % 2 == 0 else "reported"
        for i in range(rounds):
            # Even threads want k{n}_{i} = i; odd threads report k{n-1}_{i} = i only for even i.
            key = f"k{thread - thread % 2}_{i}"
            if section == "desired" or i % 2 == 0:
                update_shadow(stub, "both", {"state": {section: {key: i}}})
            else:
                update_shadow(stub, "both", {"state": {section: {f"odd{thread}_{i}": i}}})

    run_threads(4, writer)
    version, document = get_shadow(stub, "both")
    assert version == 4 * rounds
    desired = {f"k{t}_{i}": i for t in (0, 2) for i in range(rounds)}
    assert document["state"]["desired"] == desired
    assert document["state"]["delta"] == {
        f"k{t}_{i}": i for t in (0, 2) for i in range(rounds) if i % 2 == 1
    }


# --- optimistic locking -----------------------------------------------------------------------


def test_read_modify_write_with_versions_counts_every_increment(shadow_server: Server) -> None:
    stub = shadow_server.stub
    register(stub, "counter")
    assert update_shadow(stub, "counter", {"state": {"reported": {"count": 0}}, "version": 0}) == 1
    threads, increments = 6, 10

    def incrementer(thread: int) -> tuple[list[int], int]:
        committed: list[int] = []
        conflicts = 0
        while len(committed) < increments:
            version, document = get_shadow(stub, "counter")
            count = document["state"]["reported"]["count"]
            request = {
                "state": {"reported": {"count": count + 1, f"by{thread}": len(committed) + 1}},
                "version": version,
                "clientToken": f"t{thread}",
            }
            try:
                new_version = update_shadow(stub, "counter", request)
            except grpc.RpcError as exc:
                assert status_of(exc) == grpc.StatusCode.ABORTED, cast(grpc.Call, exc).details()
                metadata = dict(cast(grpc.Call, exc).trailing_metadata() or ())
                assert int(metadata["ota-current-version"]) > version
                conflicts += 1
                assert conflicts < 10_000, "no progress"
                continue
            assert new_version == version + 1
            committed.append(count + 1)
        return committed, conflicts

    results = run_threads(threads, incrementer)
    total = threads * increments
    # Each committed write saw the previous one: every value 1..total was written exactly once.
    written = sorted(value for committed, _ in results for value in committed)
    assert written == list(range(1, total + 1))
    version, document = get_shadow(stub, "counter")
    assert document["state"]["reported"] == {
        "count": total,
        **{f"by{thread}": increments for thread in range(threads)},
    }
    assert version == 1 + total


def test_a_stale_version_is_rejected_and_changes_nothing(shadow_server: Server) -> None:
    """The deterministic half of the test above: the conflict itself."""
    stub = shadow_server.stub
    register(stub, "stale")
    update_shadow(stub, "stale", {"state": {"reported": {"count": 1}}})
    update_shadow(stub, "stale", {"state": {"reported": {"count": 2}}})
    try:
        update_shadow(stub, "stale", {"state": {"reported": {"count": 99}}, "version": 1})
    except grpc.RpcError as exc:
        assert status_of(exc) == grpc.StatusCode.ABORTED
        metadata = dict(cast(grpc.Call, exc).trailing_metadata() or ())
        assert metadata["ota-current-version"] == "2"
    else:
        raise AssertionError("an update naming a stale version was accepted")
    version, document = get_shadow(stub, "stale")
    assert (version, document["state"]["reported"]) == (2, {"count": 2})


# --- overlapping batches ----------------------------------------------------------------------

DEVICES = [f"dev-{i:03d}" for i in range(200)]


def register_all(stub: ShadowServiceStub, device_ids: list[str]) -> None:
    def register_part(part: int) -> None:
        for device_id in device_ids[part::4]:
            register(stub, device_id)

    run_threads(4, register_part)


def batch_orders(seed: int) -> list[list[list[str]]]:
    """Per thread, a list of batches: overlapping device sets in clashing orders, one batch
    naming some devices twice."""
    rng = random.Random(seed)
    shuffled = DEVICES[:]
    rng.shuffle(shuffled)
    return [
        [DEVICES, DEVICES[::-1]],
        [DEVICES[::-1], shuffled],
        [rng.sample(DEVICES, 150), DEVICES[50:] + DEVICES[:50]],
        [DEVICES[::2] + DEVICES[1::2], [d for d in shuffled[:60] for _ in range(2)]],
    ]


def test_overlapping_batches_in_clashing_orders_all_apply(shadow_server: Server) -> None:
    stub = shadow_server.stub
    register_all(stub, DEVICES)
    plan = batch_orders(seed=11)

    def batcher(thread: int) -> list[list[pb.BatchItemResult]]:
        out = []
        for number, device_ids in enumerate(plan[thread]):
            items = [
                pb.DesiredPatch(
                    device_id=device_id,
                    desired_json=json.dumps({"firmware": {"version": f"{thread}.{number}"}}),
                    client_token=f"b{thread}.{number}",
                )
                for device_id in device_ids
            ]
            response = stub.BatchUpdateDesired(
                pb.BatchUpdateDesiredRequest(items=items), timeout=RPC_TIMEOUT
            )
            out.append(list(response.results))
        return out

    results = run_threads(len(plan), batcher)
    touches = Counter(d for batches in plan for device_ids in batches for d in device_ids)
    versions_seen: dict[str, dict[int, str]] = {}
    for thread, batches in enumerate(plan):
        for number, (device_ids, batch_results) in enumerate(
            zip(batches, results[thread], strict=True)
        ):
            # One result per item, in request order, all OK.
            assert [r.device_id for r in batch_results] == device_ids
            assert {r.status for r in batch_results} == {pb.BatchItemResult.OK}
            for r in batch_results:
                seen = versions_seen.setdefault(r.device_id, {})
                assert r.version not in seen, (r.device_id, r.version)
                seen[r.version] = f"{thread}.{number}"
    for device_id in DEVICES:
        # Each item of each batch bumped the version once, and no two saw the same version.
        assert sorted(versions_seen[device_id]) == list(range(1, touches[device_id] + 1)), device_id
    final = {
        d.device_id: d.shadow_version
        for d in stub.ListDevices(
            pb.ListDevicesRequest(page_size=1000), timeout=RPC_TIMEOUT
        ).devices
    }
    assert final == dict(touches)
    for device_id in DEVICES:
        # The document holds the patch of the batch that produced its last version.
        version, document = get_shadow(stub, device_id)
        last = versions_seen[device_id][version]
        assert document["state"]["desired"] == {"firmware": {"version": last}}, device_id


def test_batches_and_single_updates_interleave_on_the_same_devices(shadow_server: Server) -> None:
    """Batches of desired state race device reports of the same devices."""
    stub = shadow_server.stub
    devices = DEVICES[:60]
    register_all(stub, devices)
    batches = 3

    def work(thread: int) -> None:
        if thread < 2:  # two batch writers, opposite orders
            order = devices if thread == 0 else devices[::-1]
            for number in range(batches):
                patch = {"firmware": {"version": "2.0.0"}, f"w{thread}": number}
                response = stub.BatchUpdateDesired(
                    pb.BatchUpdateDesiredRequest(
                        items=[
                            pb.DesiredPatch(device_id=d, desired_json=json.dumps(patch))
                            for d in order
                        ]
                    ),
                    timeout=RPC_TIMEOUT,
                )
                assert {r.status for r in response.results} == {pb.BatchItemResult.OK}
        else:  # two reporters, each reporting every device once, in opposite orders
            order = devices if thread == 2 else devices[::-1]
            for device_id in order:
                update_shadow(
                    stub,
                    device_id,
                    {"state": {"reported": {"firmware": {"version": "2.0.0"}, f"r{thread}": 1}}},
                )

    run_threads(4, work)
    for device_id in devices:
        version, document = get_shadow(stub, device_id)
        assert version == 2 * batches + 2, device_id
        state = document["state"]
        assert state["desired"] == {
            "firmware": {"version": "2.0.0"},
            "w0": batches - 1,
            "w1": batches - 1,
        }
        assert state["reported"] == {"firmware": {"version": "2.0.0"}, "r2": 1, "r3": 1}
        assert state["delta"] == {"w0": batches - 1, "w1": batches - 1}
