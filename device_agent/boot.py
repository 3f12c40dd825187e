"""What survives a power cut: the agent's state file, the pending-commit marker, and the boot step.

Files in the data directory, each written temp + rename (`installer.write_json_atomic`):

- `agent.json`: the anti-rollback floor, the newest shadow version seen, the job in hand (target
  and phase), the last target that failed, and the last outcome to report;
- `pending.json`: present from just before the boot pointer switches to a new slot until that
  slot is committed or rolled back. Its `phase` moves `trial` -> `committing` | `rolling_back`,
  each a single atomic write, so a restart at any instant knows which way it was going. It also
  carries the `rollback_floor` the new build's verified manifest declares (null if none): the
  floor rises to it when, and only when, that build is committed.

`boot()` runs at every start, before anything else: it finishes or undoes whatever a restart
interrupted and returns the truth to report.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from device_agent.domain import Firmware, Memory, Phase, Target, raise_floor
from device_agent.installer import CrashPoint, Installer, no_crash, read_json, write_json_atomic


def _target_json(target: Target | None) -> dict[str, str] | None:
    if target is None:
        return None
    return {"version": target.version, "url": target.url, "artifact_id": target.artifact_id}


def _target_from(value: Any) -> Target | None:
    if not isinstance(value, dict):
        return None
    return Target(str(value["version"]), str(value["url"]), str(value["artifact_id"]))


@dataclass(frozen=True)
class Outcome:
    """The last thing to report about an update (None phase: nothing happened yet)."""

    phase: Phase | None = None
    target: Target | None = None
    error: str | None = None


@dataclass(frozen=True)
class AgentState:
    floor: str | None
    memory: Memory
    job_phase: Phase | None = None  # the phase of memory.busy, if any
    last: Outcome = Outcome()

    def to_json(self) -> dict[str, Any]:
        return {
            "floor": self.floor,
            "shadow_version": self.memory.shadow_version,
            "busy": _target_json(self.memory.busy),
            "failed": _target_json(self.memory.failed),
            "failed_block": self.memory.failed_block,
            "job_phase": self.job_phase.value if self.job_phase else None,
            "last": {
                "phase": self.last.phase.value if self.last.phase else None,
                "target": _target_json(self.last.target),
                "error": self.last.error,
            },
        }

    @classmethod
    def from_json(cls, data: Any, factory_floor: str) -> AgentState:
        if not isinstance(data, dict):
            return cls(floor=factory_floor, memory=Memory())
        last = data.get("last") or {}
        return cls(
            floor=data.get("floor"),
            memory=Memory(
                shadow_version=int(data.get("shadow_version", 0)),
                busy=_target_from(data.get("busy")),
                failed=_target_from(data.get("failed")),
                failed_block=data.get("failed_block"),
            ),
            job_phase=Phase(data["job_phase"]) if data.get("job_phase") else None,
            last=Outcome(
                Phase(last["phase"]) if last.get("phase") else None,
                _target_from(last.get("target")),
                last.get("error"),
            ),
        )


class StateFiles:
    def __init__(self, root: Path, factory_floor: str) -> None:
        self.root = root
        self.factory_floor = factory_floor
        root.mkdir(parents=True, exist_ok=True)
        self._state = root / "agent.json"
        self._pending = root / "pending.json"

    def load(self) -> AgentState:
        return AgentState.from_json(read_json(self._state), self.factory_floor)

    def save(self, state: AgentState) -> None:
        write_json_atomic(self._state, state.to_json())

    def pending(self) -> dict[str, Any] | None:
        data = read_json(self._pending)
        return data if isinstance(data, dict) else None

    def set_pending(self, pending: dict[str, Any]) -> None:
        write_json_atomic(self._pending, pending)

    def clear_pending(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._pending.unlink()


def mark_pending(
    files: StateFiles,
    slot: str,
    previous: str,
    target: Target,
    rollback_floor: str | None = None,
) -> None:
    """`rollback_floor`: what the target's verified manifest declares (None: nothing)."""
    files.set_pending(
        {
            "slot": slot,
            "previous": previous,
            "target": _target_json(target),
            "phase": "trial",
            "attempts": 0,
            "rollback_floor": rollback_floor,
        }
    )


def _pending_floor(pending: dict[str, Any]) -> str | None:
    """The declared floor in a marker; a marker written before it existed declares none."""
    floor = pending.get("rollback_floor")
    return floor if isinstance(floor, str) else None


def boot(installer: Installer, files: StateFiles, crash: CrashPoint = no_crash) -> AgentState:
    """The boot step: finish or undo an interrupted switch, then say what runs.

    A trial boot runs the health check once; a trial that was already attempted (the agent died
    during its health check, like a board that never came up) rolls back.
    """
    state = files.load()
    pending = files.pending()
    booted = installer.booted()
    if pending is not None:
        target = _target_from(pending.get("target"))
        phase = pending.get("phase")
        if phase == "trial" and pending.get("slot") != booted.name:
            # Died between writing the marker and switching: the new slot never booted.
            files.clear_pending()
            pending = None
        elif phase == "trial":
            reason: str | None
            if int(pending.get("attempts", 0)) >= 1:
                reason = "the new version did not finish its health check"
            else:
                files.set_pending({**pending, "attempts": 1})
                crash("booted")
                reason = installer.health_check(booted.name)
                crash("checked")
            if reason is None:
                pending = {**pending, "phase": "committing"}
            else:
                pending = {**pending, "phase": "rolling_back", "error": reason}
            files.set_pending(pending)
            crash("decided")
        if pending is not None and pending["phase"] == "committing":
            state = replace(
                state,
                floor=raise_floor(state.floor, _pending_floor(pending)),
                memory=replace(state.memory, busy=None, failed=None),
                job_phase=None,
                last=Outcome(Phase.SUCCEEDED, target),
            )
            files.save(state)
            files.clear_pending()
        elif pending is not None and pending["phase"] == "rolling_back":
            if installer.booted().name == pending["slot"]:
                installer.activate(str(pending["previous"]))
            crash("reverted")
            error = str(pending.get("error", "health check failed"))
            state = replace(
                state,
                memory=replace(state.memory, busy=None, failed=target),
                job_phase=None,
                last=Outcome(Phase.ROLLED_BACK, target, error),
            )
            files.save(state)
            files.clear_pending()
    if state.memory.busy is not None:
        # A job interrupted before its switch: the booted slot is untouched. Say so; the resync
        # that follows starts the job again if it is still desired.
        interrupted = state.memory.busy
        phase = state.job_phase.value if state.job_phase else "update"
        state = replace(
            state,
            memory=replace(state.memory, busy=None),
            job_phase=None,
            last=Outcome(
                Phase.FAILED, interrupted, f"interrupted by a restart while {phase}; retrying"
            ),
        )
        files.save(state)
    return state


def running(installer: Installer) -> Firmware:
    return installer.booted().firmware
