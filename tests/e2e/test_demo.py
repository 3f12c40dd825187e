"""`make demo` as a user runs it: `python -m services.demo` as a process on the embedded
default (no server), checked by what it prints and its exit code: the canary rollout completes,
the bad build's rollout aborts in its canary stage and is rolled back, and it stops everything
it started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3

from tests.e2e.conftest import flush_redis_db, free_port, fresh_database

REDIS_URL = "redis://127.0.0.1:6379/8"
REPO = Path(__file__).resolve().parents[2]


def run_demo(tmp_path: Path, **settings: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTA_")}
    env.update({"PYTHONPATH": str(REPO), "COLUMNS": "150", **settings})
    done = subprocess.run(
        [sys.executable, "-m", "services.demo"],
        cwd=tmp_path,  # nothing of it may land in the caller's directory
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    return out


def assert_described_end(out: str, tmp_path: Path, broker: str) -> None:
    assert "rollout demo-1.1.0: COMPLETED" in out
    assert "50/50 SUCCEEDED" in out
    assert "rollout demo-1.2.0: ABORTED" in out
    assert "the fleet runs: 1.1.0 on 50" in out
    assert "the demo ended as expected" in out
    for process in ("worker", "rollout", "artifacts", "gateway", "shadow", broker):
        assert f"stopped {process} (pid" in out
    assert list(tmp_path.iterdir()) == []


def test_make_demo_runs_both_rollouts_to_the_described_end(tmp_path: Path) -> None:
    """On the embedded default: no server at all."""
    out = run_demo(tmp_path)
    assert "stack is up (embedded broker)" in out
    assert_described_end(out, tmp_path, "broker")


def test_make_demo_runs_on_the_real_services_when_the_environment_says_so(
    tmp_path: Path, moto_endpoint: str
) -> None:
    """The documented variables: PostgreSQL, Mosquitto, Celery on Redis, S3 (moto's server)."""
    flush_redis_db(REDIS_URL)
    try:
        with fresh_database() as database_url:
            out = run_demo(
                tmp_path,
                OTA_DATABASE_URL=database_url,
                OTA_MQTT_BROKER="mosquitto",
                OTA_MQTT_PORT=str(free_port()),
                OTA_CELERY_BROKER_URL=REDIS_URL,
                OTA_ARTIFACTS_STORAGE="s3",
                OTA_S3_BUCKET="ota-demo",
                OTA_S3_ENDPOINT_URL=moto_endpoint,
                OTA_S3_REGION="us-east-1",
                OTA_S3_CREATE_BUCKET="true",
                AWS_ACCESS_KEY_ID="demo",
                AWS_SECRET_ACCESS_KEY="demo",
            )
            assert "stack is up (mosquitto broker)" in out
            assert_described_end(out, tmp_path, "mosquitto")
            bucket = boto3.client(
                "s3",
                endpoint_url=moto_endpoint,
                region_name="us-east-1",
                aws_access_key_id="demo",
                aws_secret_access_key="demo",
            ).list_objects_v2(Bucket="ota-demo")
            assert bucket.get("KeyCount", 0) == 2  # the two builds' blobs are in S3
    finally:
        flush_redis_db(REDIS_URL)
