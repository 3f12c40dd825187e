"""`make demo` as a user runs it: `python -m services.demo` as a process on the embedded
default (no server), checked by what it prints and its exit code: the canary rollout completes,
the bad build's rollout aborts in its canary stage and is rolled back, and it stops everything
it started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_make_demo_runs_both_rollouts_to_the_described_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTA_")}
    env.update({"PYTHONPATH": str(REPO), "COLUMNS": "150"})
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
    assert "rollout demo-1.1.0: COMPLETED" in out
    assert "50/50 SUCCEEDED" in out
    assert "rollout demo-1.2.0: ABORTED" in out
    assert "the fleet runs: 1.1.0 on 50" in out
    assert "the demo ended as expected" in out
    for process in ("worker", "rollout", "artifacts", "gateway", "shadow", "broker"):
        assert f"stopped {process} (pid" in out
    assert list(tmp_path.iterdir()) == []
