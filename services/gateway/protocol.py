"""The device-facing MQTT protocol, pure: topics, inbound checks, rejected bodies, rate limits.

Topics per device `<id>` (DESIGN.md): devices publish `<id>/state/update` and `<id>/state/get`;
the gateway answers on `.../accepted` and `.../rejected`, and announces `<id>/state/update/delta`
and `<id>/state/update/documents`. Nothing here does I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from services.shadow.domain import DEVICE_ID_PATTERN

Action = Literal["update", "get"]

INBOUND_SUFFIXES: dict[str, Action] = {"state/update": "update", "state/get": "get"}
MAX_CLIENT_TOKEN_CHARS = 64


@dataclass(frozen=True)
class Inbound:
    """A device message the gateway serves: which device, which action, the raw payload."""

    device_id: str
    action: Action
    payload: bytes


def parse_topic(topic: str) -> tuple[str, Action] | None:
    """`<id>/state/update` -> (id, "update"); None for any topic the gateway does not serve."""
    device_id, _, suffix = topic.partition("/")
    action = INBOUND_SUFFIXES.get(suffix)
    if action is None or not DEVICE_ID_PATTERN.fullmatch(device_id):
        return None
    return device_id, action


def reply_topic(device_id: str, action: Action, outcome: Literal["accepted", "rejected"]) -> str:
    return f"{device_id}/state/{action}/{outcome}"


def delta_topic(device_id: str) -> str:
    return f"{device_id}/state/update/delta"


def documents_topic(device_id: str) -> str:
    return f"{device_id}/state/update/documents"


def subscriptions(shared_group: str) -> list[str]:
    """What a gateway subscribes to; with a group, as MQTT shared subscriptions."""
    prefix = f"$share/{shared_group}/" if shared_group else ""
    return [f"{prefix}+/{suffix}" for suffix in INBOUND_SUFFIXES]


def client_token_of(payload: bytes, max_bytes: int) -> str | None:
    """Best effort: the clientToken of a payload, to echo on `rejected` even for bad requests."""
    if len(payload) > max_bytes:
        return None
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    token = document.get("clientToken") if isinstance(document, dict) else None
    if isinstance(token, str) and len(token) <= MAX_CLIENT_TOKEN_CHARS:
        return token
    return None


def rejected_body(code: int, message: str, client_token: str | None, now: float) -> bytes:
    body: dict[str, Any] = {"code": code, "message": message, "timestamp": int(now)}
    if client_token is not None:
        body["clientToken"] = client_token
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass
class RateLimiter:
    """A token bucket per device: `rate` updates per second, bursts up to `burst`."""

    rate: float
    burst: float
    idle_seconds: float = 60.0
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # id -> tokens, time
    _last_sweep: float = 0.0

    def allow(self, device_id: str, now: float) -> bool:
        tokens, last = self._buckets.get(device_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[device_id] = (tokens - 1.0 if allowed else tokens, now)
        if now - self._last_sweep > self.idle_seconds:
            self._sweep(now)
        return allowed

    def _sweep(self, now: float) -> None:
        """Forget devices idle long enough to have a full bucket again (bounded memory)."""
        self._last_sweep = now
        full_after = self.burst / self.rate if self.rate > 0 else self.idle_seconds
        horizon = max(self.idle_seconds, full_after)
        self._buckets = {d: b for d, b in self._buckets.items() if now - b[1] < horizon}

    def __len__(self) -> int:
        return len(self._buckets)
