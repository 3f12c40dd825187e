"""A small operator command over the shadow API, until `otactl` (issue 7) replaces it.

    python -m services.shadow.admin register dev-1 site=berlin [--shell]
    python -m services.shadow.admin desired dev-1 '{"firmware": {"version": "2.0"}}'
    python -m services.shadow.admin get dev-1
    python -m services.shadow.admin delete dev-1

It finds the shadow service and an operator token in `.devstack/endpoints.json` (from
`make up`), or in OTA_SHADOW_ADDRESS and OTA_OPERATOR_TOKEN.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import grpc

from protos.shadow.v1 import shadow_pb2 as pb
from protos.shadow.v1 import shadow_pb2_grpc
from services.common.auth import bearer_channel

ENDPOINTS = Path(".devstack/endpoints.json")


def endpoints() -> dict[str, Any]:
    if ENDPOINTS.exists():
        found: dict[str, Any] = json.loads(ENDPOINTS.read_text())
        return found
    return {
        "shadow": os.environ.get("OTA_SHADOW_ADDRESS", "127.0.0.1:50051"),
        "operator_token": os.environ.get("OTA_OPERATOR_TOKEN", ""),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.shadow.admin")
    commands = parser.add_subparsers(dest="command", required=True)
    register = commands.add_parser("register", help="register a device, print its credentials")
    register.add_argument("device_id")
    register.add_argument("tags", nargs="*", help="key=value")
    register.add_argument("--shell", action="store_true", help="print shell variable assignments")
    desired = commands.add_parser(
        "desired", help="merge a JSON patch into a device's desired state"
    )
    desired.add_argument("device_id")
    desired.add_argument("patch")
    commands.add_parser("get", help="print a device's shadow").add_argument("device_id")
    commands.add_parser("delete", help="delete a device").add_argument("device_id")
    args = parser.parse_args(argv)

    where = endpoints()
    with bearer_channel(where["shadow"], where.get("operator_token") or None) as channel:
        stub = shadow_pb2_grpc.ShadowServiceStub(channel)
        try:
            return run(stub, args, where)
        except grpc.RpcError as exc:
            call: grpc.Call = exc  # type: ignore[assignment]
            print(f"error: {call.code().name}: {call.details()}", file=sys.stderr)
            return 1


def run(stub: shadow_pb2_grpc.ShadowServiceStub, args: argparse.Namespace, where: Any) -> int:
    if args.command == "register":
        tags = dict(tag.split("=", 1) for tag in args.tags)
        reply = stub.RegisterDevice(pb.RegisterDeviceRequest(device_id=args.device_id, tags=tags))
        mqtt = where.get("mqtt", {"host": "127.0.0.1", "port": 1883})
        values = {
            "DEVICE_ID": reply.device.device_id,
            "MQTT_HOST": mqtt["host"],
            "MQTT_PORT": str(mqtt["port"]),
            "MQTT_USER": reply.credentials.username,
            "MQTT_PASS": reply.credentials.password,
        }
        for key, value in values.items():
            print(f"{key}={shlex.quote(value)}" if args.shell else f"{key:<10} {value}")
    elif args.command == "desired":
        item = pb.DesiredPatch(device_id=args.device_id, desired_json=args.patch)
        batch = stub.BatchUpdateDesired(pb.BatchUpdateDesiredRequest(items=[item]))
        result = batch.results[0]
        if result.status != pb.BatchItemResult.OK:
            print(f"error: {pb.BatchItemResult.Status.Name(result.status)}: {result.message}")
            return 1
        print(f"desired state of {args.device_id} is now at version {result.version}")
    elif args.command == "get":
        shadow = stub.GetShadow(pb.GetShadowRequest(device_id=args.device_id))
        print(json.dumps(json.loads(shadow.document_json), indent=2))
    elif args.command == "delete":
        stub.DeleteDevice(pb.DeleteDeviceRequest(device_id=args.device_id))
        print(f"deleted {args.device_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
