"""gRPC server wiring every service shares: thread pool, message limits, health, reflection."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import gc_tuning

MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # a 10,000-item batch is about 2 MiB


def new_server(workers: int, interceptors: Sequence[grpc.ServerInterceptor] = ()) -> grpc.Server:
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )


def add_health_and_reflection(server: grpc.Server, service_names: Iterable[str]) -> None:
    """Standard health checking (for load balancers) and reflection (for grpcurl)."""
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )


def bind(server: grpc.Server, address: str) -> int:
    """Bind an insecure port; returns the port (useful with port 0 in tests)."""
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


def run_until_signalled(server: grpc.Server, grace_seconds: float = 5.0) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully."""
    gc_tuning.tune_for_service()
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    server.start()
    stopping.wait()
    server.stop(grace_seconds).wait()
