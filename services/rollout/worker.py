"""`python -m services.rollout.worker [--beat]`: a Celery worker of the rollout service.

Runs the tasks of services/rollout/tasks.py in `OTA_ROLLOUT_WORKER_CONCURRENCY` threads (the
work is waiting on gRPC and the database, so threads, and one process a SIGKILL ends whole).
`--beat` also runs Celery beat inside it (a thread), which queues the periodic tick: run exactly one
worker with `--beat` per deployment (more are harmless, only wasteful). The schema must exist
already: the rollout service process migrates it at start.
"""

from __future__ import annotations

import argparse
import socket
import threading

from services.common.observability import configure_logging, start_metrics_server
from services.rollout.settings import RolloutSettings


def argv(settings: RolloutSettings, name: str) -> list[str]:
    return [
        "worker",
        "--pool=threads",
        f"--concurrency={settings.worker_concurrency}",
        "--loglevel=INFO",
        f"--hostname={name}@{socket.gethostname()}",
        "--without-gossip",
        "--without-mingle",
        f"--queues={settings.celery_queue}",
    ]


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.rollout.worker")
    parser.add_argument("--beat", action="store_true", help="also run the periodic tick")
    parser.add_argument("--name", default="ota-rollout", help="worker name (before @host)")
    options = parser.parse_args(arguments)
    configure_logging("rollout-worker")
    start_metrics_server()
    settings = RolloutSettings.from_env()
    from celery.beat import EmbeddedService

    from services.rollout.tasks import app

    # Beat as a thread of this process, not Celery's `--beat` child process: a worker that is
    # SIGKILLed takes its beat with it instead of leaving an orphan that ticks on.
    # Celery's Service ignores `beat_scheduler` unless told: without it, the persistent
    # scheduler would write celerybeat-schedule files into the working directory.
    beat = (
        EmbeddedService(app, thread=True, scheduler_cls=app.conf.beat_scheduler)
        if options.beat
        else None
    )
    if beat is not None:
        assert isinstance(beat, threading.Thread)
        beat.start()
    try:
        app.worker_main(argv(settings, options.name))
    finally:
        if beat is not None:
            beat.stop()


if __name__ == "__main__":
    main()
