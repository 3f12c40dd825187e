"""The rollout service's Celery tasks: the periodic tick and the fan-out chunks (ADR 38).

- `ota.rollout.tick` (Celery beat, every `OTA_ROLLOUT_RECONCILE_SECONDS`): a reconcile pass over
  every rollout with work, then `enqueue_fan_out`.
- `ota.rollout.reconcile(rollout_id)`: the same for one rollout, asked for by an operator
  command so it takes effect at once.
- `ota.rollout.send(device_ids)`: one `BatchUpdateDesired` call with the leased desired writes
  of those devices.

Tasks take ids, never documents: a chunk task reads the writes as they are when it runs.
Every task is idempotent and `acks_late` (a task whose worker died is delivered again), and the
shadow service skips a desired write that changes nothing, so a chunk sent twice notifies
nobody twice. A chunk whose task is lost is leased again when its lease runs out.

The broker is `OTA_CELERY_BROKER_URL`: Redis in production, or a SQLite file through kombu's
SQLAlchemy transport on the embedded default (no server).
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import timedelta
from typing import Any

from celery import Celery

from services.rollout.errors import ConcurrentUpdateError, ShadowUnavailableError
from services.rollout.service import RolloutService
from services.rollout.settings import RolloutSettings

log = logging.getLogger(__name__)

TICK = "ota.rollout.tick"
RECONCILE = "ota.rollout.reconcile"
SEND = "ota.rollout.send"
EMBEDDED_BROKER = "sqla+sqlite:///.devstack/celery.db"


def celery_config(settings: RolloutSettings) -> dict[str, Any]:
    interval = float(settings.reconcile_seconds or 1)
    broker = settings.celery_broker_url or EMBEDDED_BROKER
    return {
        "broker_url": broker,
        "task_ignore_result": True,
        "task_acks_late": True,  # a task counts as done when it ran, not when it was received
        "task_reject_on_worker_lost": True,  # ... and a worker that died gives it back
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": (
            # kombu's SQLAlchemy transport hands its options to create_engine: none there.
            {}
            if broker.startswith("sqla+")
            # Redis: a task taken by a worker that died is delivered again after this long.
            else {"visibility_timeout": max(300, 4 * settings.dispatch_lease_seconds)}
        ),
        "task_default_queue": settings.celery_queue,
        "worker_hijack_root_logger": False,  # keep the process's structured log format
        "beat_scheduler": "celery.beat:Scheduler",  # in memory: no schedule file
        "beat_schedule": {
            "reconcile-every-rollout": {
                "task": TICK,
                "schedule": timedelta(seconds=interval),
                # A tick that waited longer than the next one is useless: drop it.
                "options": {"expires": interval * 2},
            }
        },
    }


app = Celery("ota_rollout", set_as_current=False)
app.conf.update(celery_config(RolloutSettings.from_env()))

_service: RolloutService | None = None
_settings: RolloutSettings | None = None
_service_pid = 0
_service_lock = threading.Lock()
_tick_running = threading.Lock()


def service() -> RolloutService:
    """This worker process's rollout service (built on first use; again after a fork)."""
    return _process_state()[0]


def _process_state() -> tuple[RolloutService, RolloutSettings]:
    """The service and the settings it was built with, read once per process."""
    global _service, _settings, _service_pid
    with _service_lock:
        if _service is None or _settings is None or _service_pid != os.getpid():
            from services.rollout.server import build_service

            _settings = RolloutSettings.from_env()
            _service = build_service(_settings, migrate=False, kick=kick)
            _service_pid = os.getpid()
        return _service, _settings


def kick(rollout_id: str) -> None:
    """Ask a worker for a pass over this rollout now (called after operator commands)."""
    app.send_task(RECONCILE, args=[rollout_id], expires=60)


def enqueue_fan_out(rollouts: RolloutService) -> int:
    """Lease the unsent desired writes and queue one `send` task per chunk; returns the number
    of chunk tasks queued."""
    settings = _process_state()[1]
    chunks = rollouts.lease_pending(float(settings.dispatch_lease_seconds))
    for device_ids in chunks:
        app.send_task(SEND, args=[device_ids])
    return len(chunks)


@app.task(name=TICK, acks_late=True)
def tick() -> None:
    # One tick at a time per worker process; ticks of several workers are safe together
    # (optimistic revisions, disjoint leases), only wasteful.
    if not _tick_running.acquire(blocking=False):
        return
    try:
        rollouts = service()
        try:
            rollouts.reconcile_all()
        except (ShadowUnavailableError, ConcurrentUpdateError) as exc:
            log.warning("reconcile pass failed, the next tick tries again: %s", exc)
        enqueue_fan_out(rollouts)
    finally:
        _tick_running.release()


@app.task(
    name=RECONCILE,
    acks_late=True,
    autoretry_for=(ShadowUnavailableError, ConcurrentUpdateError),
    retry_backoff=1,
    retry_backoff_max=30,
    retry_jitter=True,
    max_retries=5,
)
def reconcile(rollout_id: str) -> None:
    rollouts = service()
    rollouts.reconcile(rollout_id)
    enqueue_fan_out(rollouts)


@app.task(
    name=SEND,
    acks_late=True,
    autoretry_for=(ShadowUnavailableError,),
    retry_backoff=1,
    retry_backoff_max=30,
    retry_jitter=True,
    max_retries=8,
)
def send(device_ids: list[str]) -> int:
    if not isinstance(device_ids, list) or not all(isinstance(d, str) for d in device_ids):
        raise TypeError("send takes a list of device ids")
    return service().send_dispatches(device_ids)
