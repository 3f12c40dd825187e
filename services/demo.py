"""`make demo`: the update flow on the embedded default (SQLite, no servers to install).

It starts the shadow service on a free loopback port, registers a small fleet, and walks the
seed pattern's shadow steps over real gRPC: an operator sets the desired firmware for the whole
fleet in one batch (step 3-4), each device reads its delta (5-6), "installs" and reports the
version it runs (8), and a fleet query shows who is still behind. Later issues extend it to the
MQTT gateway, artifacts and staged rollouts.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import grpc

from protos.shadow.v1 import shadow_pb2 as pb
from protos.shadow.v1 import shadow_pb2_grpc
from services.shadow.server import build_service, create_server
from services.shadow.settings import ShadowSettings

FLEET = [("berlin", 4), ("lisbon", 3), ("osaka", 3)]


def say(text: str) -> None:
    print(text, flush=True)


def run(database_url: str) -> int:
    settings = ShadowSettings(database_url=database_url, listen="127.0.0.1:0")
    server, port = create_server(settings, build_service(settings))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            return walk_the_flow(shadow_pb2_grpc.ShadowServiceStub(channel), port)
    finally:
        server.stop(None)


def behind(stub: shadow_pb2_grpc.ShadowServiceStub, version: str) -> int:
    query = f"reported.firmware.version != {json.dumps(version)}"
    return stub.QueryFleet(pb.QueryFleetRequest(filter=query, count=True)).total_count


def walk_the_flow(stub: shadow_pb2_grpc.ShadowServiceStub, port: int) -> int:
    say(f"shadow service on 127.0.0.1:{port} (gRPC, health and reflection enabled)\n")
    device_ids = []
    for site, count in FLEET:
        for i in range(count):
            device_id = f"{site}-{i:03d}"
            reply = stub.RegisterDevice(
                pb.RegisterDeviceRequest(device_id=device_id, tags={"site": site})
            )
            device_ids.append(device_id)
            old = json.dumps({"state": {"reported": {"firmware": {"version": "1.0.0"}}}})
            stub.UpdateShadow(pb.UpdateShadowRequest(device_id=device_id, request_json=old))
    say(f"1. registered {len(device_ids)} devices, each with its own MQTT credentials")
    say(f"   (e.g. user {reply.credentials.username!r}; only a hash of the password is stored)")
    say(f"   devices not on 2.0.0: {behind(stub, '2.0.0')}")

    firmware = {"firmware": {"version": "2.0.0", "url": "artifact://firmware/2.0.0"}}
    batch = stub.BatchUpdateDesired(
        pb.BatchUpdateDesiredRequest(
            items=[
                pb.DesiredPatch(device_id=d, desired_json=json.dumps(firmware)) for d in device_ids
            ]
        )
    )
    ok = sum(r.status == pb.BatchItemResult.OK for r in batch.results)
    say(f"2. operator set desired firmware 2.0.0 on {ok} devices in ONE BatchUpdateDesired call")

    sample = json.loads(stub.GetShadow(pb.GetShadowRequest(device_id=device_ids[0])).document_json)
    delta = json.dumps(sample["state"]["delta"])
    say(f"3. {device_ids[0]} sees the delta (its update command): {delta}")

    for device_id in device_ids[: len(device_ids) - 2]:
        report = json.dumps({"state": {"reported": {"firmware": firmware["firmware"]}}})
        stub.UpdateShadow(pb.UpdateShadowRequest(device_id=device_id, request_json=report))
    say(f"4. {len(device_ids) - 2} devices installed 2.0.0 and reported it; their delta is empty")

    remaining = stub.QueryFleet(
        pb.QueryFleetRequest(filter='reported.firmware.version != "2.0.0"', count=True)
    )
    say(
        f"5. fleet query 'reported.firmware.version != \"2.0.0\"': {remaining.total_count} "
        f"still to update: {', '.join(d.device_id for d in remaining.devices)}"
    )
    stale = json.dumps({"state": {"desired": {"led": "off"}}, "version": 1})
    try:
        stub.UpdateShadow(pb.UpdateShadowRequest(device_id=device_ids[0], request_json=stale))
    except grpc.RpcError as exc:
        say(f"6. an update naming a stale version is refused: {exc.code().name}: {exc.details()}")
    say("\ndemo finished: the shadow flow works end to end on the embedded default.")
    return 0 if remaining.total_count == 2 else 1


def main() -> None:
    url = os.environ.get("OTA_DATABASE_URL")
    if url:
        raise SystemExit(run(url))
    with tempfile.TemporaryDirectory(prefix="ota-demo-") as tmp:
        raise SystemExit(run(f"sqlite:///{Path(tmp) / 'demo.db'}"))


if __name__ == "__main__":
    main()
