"""Retries with capped exponential backoff and full jitter, for UNAVAILABLE only.

Only `UnavailableError` is retried: it means the call did not reach a serving process (the
service restarting, a connection refused), so sending it again is what the caller wants. Every
other error is an answer and is raised at once. Time and randomness are parameters, so the
policy is tested without sleeping.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ota_client.errors import ConfigError, UnavailableError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """At most `max_attempts` calls; before retry n (0-based) a wait drawn uniformly from
    `[0, min(cap_seconds, base_seconds * 2**n)]` ("full jitter")."""

    max_attempts: int = 5
    base_seconds: float = 0.2
    cap_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.max_attempts > 100:
            raise ConfigError("max_attempts must be between 1 and 100")
        if self.base_seconds < 0 or self.cap_seconds < 0:
            raise ConfigError("backoff seconds must not be negative")

    def delay(self, retry: int, draw: float) -> float:
        """The wait before retry `retry`, for a uniform `draw` in [0, 1)."""
        ceiling = min(self.cap_seconds, self.base_seconds * (2.0 ** min(retry, 60)))
        return max(0.0, min(draw, 1.0)) * ceiling


def call_with_retries(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None] = time.sleep,
    draw: Callable[[], float] = random.random,
) -> T:
    """`fn()`, called again after a backoff while it raises `UnavailableError`, at most
    `policy.max_attempts` times in all; the last `UnavailableError` is raised."""
    for retry in range(policy.max_attempts):
        try:
            return fn()
        except UnavailableError:
            if retry + 1 >= policy.max_attempts:
                raise
            sleep(policy.delay(retry, draw()))
    raise AssertionError("unreachable")  # pragma: no cover
