"""Observability every process shares: structured log lines and Prometheus metrics.

This module owns the log format, the metrics HTTP endpoint, every `ota_*` metric object (each
defined once, here) and the gRPC server interceptor that times calls. It does not own what a
process records or when: each service increments these objects on its own paths.

A process's `main()` does, before anything else:

    configure_logging("shadow")   # OTA_LOG_FORMAT json|text, OTA_LOG_LEVEL
    start_metrics_server()        # OTA_METRICS_LISTEN host:port; unset: no endpoint

and a gRPC server is created with `[server_metrics_interceptor(), *server_interceptors()]`
(outermost first, so refused calls are timed with their UNAUTHENTICATED code too).

Log calls about one device, rollout or artifact name it in `extra`, which both formats print:

    log.info("rollout %s paused", rid, extra={"rollout_id": rid, "stage": 2})

Metrics are recorded per batch (`COUNTER.labels(...).inc(n)`), never once per item in a loop.
Labels take values from small fixed sets; a device id is never a label. The rollout service
records: `ROLLOUT_EXECUTIONS.labels(rollout_id, status).set(n)` after each pass (and
`ROLLOUT_EXECUTIONS.remove(rollout_id, status)` for the statuses of a finished rollout, so
the series do not pile up), `ROLLOUT_NOTIFIED.inc(n)`, `ROLLOUT_PASS_SECONDS.observe(s)` (or
`with ROLLOUT_PASS_SECONDS.time():`) and `ROLLOUT_FANOUT_CHUNKS.labels(outcome).inc()`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import grpc
import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

from services.common.config import ConfigError

# --- logging -------------------------------------------------------------------------------------

# The `extra=` keys a log line carries when given (and only these: they are what operators
# filter on).
CONTEXT_FIELDS = ("device_id", "rollout_id", "artifact_id", "stage")
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _context(record: logging.LogRecord) -> dict[str, Any]:
    fields = {}
    for name in CONTEXT_FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            fields[name] = value
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, process, logger, message, the context fields given,
    and `exc_info` / `stack_info` as text."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "process": self.process,
            "logger": record.name,
            "message": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal, with the context fields appended as key=value."""

    def __init__(self, process: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {process} %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        context = _context(record)
        if context:
            text += " " + " ".join(f"{key}={value}" for key, value in context.items())
        return text


def configure_logging(
    process: str, env: Mapping[str, str] | None = None, default_level: str = "INFO"
) -> None:
    """Send the root logger to stderr in the format OTA_LOG_FORMAT names (`json`, the default,
    or `text`) at the level OTA_LOG_LEVEL names (default `default_level`). `process` names the
    process on every line. Raises ConfigError for a value it does not know."""
    env = os.environ if env is None else env
    kind = env.get("OTA_LOG_FORMAT", "").strip().lower() or "json"
    if kind not in LOG_FORMATS:
        raise ConfigError(f"OTA_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {kind!r}")
    level = env.get("OTA_LOG_LEVEL", "").strip().upper() or default_level
    if level not in LOG_LEVELS:
        raise ConfigError(f"OTA_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process) if kind == "json" else TextFormatter(process))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


# --- the metrics endpoint ------------------------------------------------------------------------


def parse_listen(value: str, name: str = "OTA_METRICS_LISTEN") -> tuple[str, int]:
    """`host:port` (an IPv6 host in brackets) -> (host, port); port 0 asks for a free one."""
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"{name} must be host:port (port 0-65535), got {value!r}")
    return host, int(port_text)


def start_metrics_server(env: Mapping[str, str] | None = None) -> int | None:
    """Serve the default registry's metrics at `http://OTA_METRICS_LISTEN/metrics` from a
    daemon thread; returns the bound port, or None when OTA_METRICS_LISTEN is unset/empty."""
    env = os.environ if env is None else env
    value = env.get("OTA_METRICS_LISTEN", "").strip()
    if not value:
        return None
    host, port = parse_listen(value)
    try:
        server, _thread = prometheus_client.start_http_server(port, addr=host)
    except OSError as exc:
        raise ConfigError(f"OTA_METRICS_LISTEN: cannot listen on {value}: {exc}") from None
    bound = int(server.server_port)
    logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", host, bound)
    return bound


# --- the metrics ---------------------------------------------------------------------------------

# Call latency from a few ms (a read) to a long-poll (ReadEvents waits up to 5 s).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

GRPC_REQUEST_SECONDS = Histogram(
    "ota_grpc_request_seconds",
    "gRPC calls served, by full service name, method and status code.",
    ["service", "method", "code"],
    buckets=LATENCY_BUCKETS,
)

# shadow service
SHADOW_UPDATES = Counter(
    "ota_shadow_updates_total",
    "Shadow updates applied or refused, by RPC and outcome (ok, not_found, version_conflict, "
    "invalid, too_large, rate_limited, deadline_exceeded, error).",
    ["rpc", "outcome"],
)
SHADOW_BATCH_ITEMS = Counter(
    "ota_shadow_batch_items_total", "Items received in batch shadow RPCs.", ["rpc"]
)

# gateway
GATEWAY_MESSAGES = Counter(
    "ota_gateway_messages_total",
    "Device messages: direction in (kind update, get) and out (kind accepted, rejected, delta, "
    "documents).",
    ["direction", "kind"],
)
GATEWAY_PUBLISHES = Counter(
    "ota_gateway_publishes_total", "MQTT publishes the broker acknowledged (QoS 1)."
)
GATEWAY_BATCH_SECONDS = Histogram(
    "ota_gateway_batch_seconds",
    "Time to answer one batch of device messages: the shadow call and the replies' publishes.",
    buckets=LATENCY_BUCKETS,
)

# artifact service and its download plane
DOWNLOADS = Counter(
    "ota_downloads_total",
    "Artifact downloads over the download plane, by outcome (complete, partial, disconnected, "
    "or the error code of a refusal).",
    ["outcome"],
)
DOWNLOAD_BYTES = Counter("ota_download_bytes_total", "Artifact bytes sent to devices.")
TOKEN_EXCHANGES = Counter(
    "ota_token_exchanges_total",
    "Download token exchanges for one-time URLs, by outcome (ok or the error code).",
    ["outcome"],
)
ARTIFACT_UPLOADS = Counter(
    "ota_artifact_uploads_total",
    "Artifact uploads, by outcome (ok or the error code).",
    ["outcome"],
)

# rollout service
ROLLOUT_EXECUTIONS = Gauge(
    "ota_rollout_executions",
    "Device executions of each live rollout, by status.",
    ["rollout_id", "status"],
)
ROLLOUT_NOTIFIED = Counter(
    "ota_rollout_notified_total", "Devices whose desired state a rollout set."
)
ROLLOUT_PASS_SECONDS = Histogram(
    "ota_rollout_pass_seconds", "Duration of one periodic rollout pass.", buckets=LATENCY_BUCKETS
)
ROLLOUT_FANOUT_CHUNKS = Counter(
    "ota_rollout_fanout_chunks_total",
    "BatchUpdateDesired chunks a rollout sent, by outcome.",
    ["outcome"],
)


# --- the gRPC interceptor ------------------------------------------------------------------------

Behavior = Callable[[Any, grpc.ServicerContext], Any]


def _code(context: grpc.ServicerContext, default: str) -> str:
    code = context.code()  # type: ignore[attr-defined]  # grpc has it; the stubs do not
    return code.name if isinstance(code, grpc.StatusCode) else default


class MetricsInterceptor(grpc.ServerInterceptor):
    """Times every call of a known method into `ota_grpc_request_seconds`; a streamed response
    counts until its last message. Unknown methods are not recorded (their names come from
    clients: an unbounded label)."""

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        service, _, method = str(details.method).lstrip("/").rpartition("/")
        if handler.unary_unary:
            return handler._replace(unary_unary=_timed(handler.unary_unary, service, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=_timed(handler.stream_unary, service, method))
        if handler.unary_stream:
            return handler._replace(
                unary_stream=_timed_stream(handler.unary_stream, service, method)
            )
        if handler.stream_stream:
            return handler._replace(
                stream_stream=_timed_stream(handler.stream_stream, service, method)
            )
        return handler


def _timed(behavior: Behavior, service: str, method: str) -> Behavior:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        code = "UNKNOWN"
        try:
            response = behavior(request, context)
            code = _code(context, "OK")
            return response
        except BaseException:
            code = _code(context, "UNKNOWN")  # an abort set it; anything else is UNKNOWN
            raise
        finally:
            GRPC_REQUEST_SECONDS.labels(service, method, code).observe(time.perf_counter() - start)

    return call


def _timed_stream(behavior: Behavior, service: str, method: str) -> Behavior:
    def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        start = time.perf_counter()
        code = "UNKNOWN"
        try:
            yield from behavior(request, context)
            code = _code(context, "OK")
        except GeneratorExit:  # the client went away
            code = "CANCELLED"
            raise
        except BaseException:
            code = _code(context, "UNKNOWN")
            raise
        finally:
            GRPC_REQUEST_SECONDS.labels(service, method, code).observe(time.perf_counter() - start)

    return call


def server_metrics_interceptor() -> grpc.ServerInterceptor:
    """The interceptor every gRPC server installs first (outermost)."""
    return MetricsInterceptor()
