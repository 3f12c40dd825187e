"""Builders the rollout unit tests share: the two firmwares a rollout moves devices between,
a valid definition to vary field by field, and a device's reported firmware block parsed.
Each test file keeps the builders only it uses."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from services.rollout.domain import (
    Firmware,
    FirmwareReport,
    RolloutDefinition,
    Stage,
    TargetSelector,
)

NEW = Firmware("2.0.0", "https://ota.example/v1/artifacts/fw-2")
OLD = Firmware("1.0.0", "https://ota.example/v1/artifacts/fw-1")


def definition(**changes: Any) -> RolloutDefinition:
    """Rollout r-1 of artifact fw-2 (NEW) to devices tagged model=x1: a 10% stage then 100%,
    10 minutes per device; `changes` replace any field (the result is validated again)."""
    base = RolloutDefinition(
        rollout_id="r-1",
        artifact_id="fw-2",
        firmware=NEW,
        selector=TargetSelector(tags=(("model", "x1"),)),
        stages=(Stage(percent=10), Stage(percent=100)),
        timeout_seconds=600.0,
    )
    return replace(base, **changes)


def report(firmware: dict[str, Any]) -> FirmwareReport:
    """A device's `reported.firmware` block, parsed as the rollout service parses it."""
    parsed = FirmwareReport.from_reported({"firmware": firmware})
    assert parsed is not None
    return parsed
