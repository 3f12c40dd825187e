"""`otactl rollouts create`'s input -> `RolloutSpec`: the YAML file and the flags, one mapping.

Pure: text and values in, a `RolloutSpec` or a `SpecError` out; no I/O, no service call. The
flags are turned into the same mapping a file holds, so both go through one validation. The
firmware (version and url) is not part of the input: the CLI takes it from the artifact.

    id: fw-2-0-0                 # required
    artifact: 3f2a...            # required: the artifact id
    tags: {ring: beta}           # exactly one of devices (list or "a,b,c"), tags, filter
    stages:                      # required; cumulative sizes, the last one 100%
      - size: 1%                 # N% (percent of the targets) or N (a count of devices)
      - size: 100%               # per stage: failure_threshold, min_finished,
        approval: true           #   success_threshold, soak, approval
    failure_threshold: 20%       # these five also at the top: a default for every stage
    approval: true               #   (approval: every stage after the first, which `start` starts)
    min_finished: 5
    success_threshold: 95%
    soak: 600                    # seconds
    max_per_minute: 100
    timeout: 3600                # seconds per attempt
    retries_failed: 1
    retries_timed_out: 1
    retry_backoff: 60            # seconds
    rollback_on_abort: true
    stratify_by: site

The service checks the rules between fields (the last stage is 100%, sizes never shrink); this
module checks that each value has the right shape, so a typo fails before any call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from ota_client.errors import SpecError
from ota_client.models import FailureThreshold, RolloutSpec, RolloutStage

MAX_FILE_CHARS = 1_000_000
STAGE_KEYS = ("size", "failure_threshold", "min_finished", "success_threshold", "soak", "approval")
# Stage settings that may also be given once, at the top, for every stage.
STAGE_DEFAULTS = STAGE_KEYS[1:]
TOP_KEYS = (
    "id",
    "artifact",
    "devices",
    "tags",
    "filter",
    "stages",
    *STAGE_DEFAULTS,
    "max_per_minute",
    "timeout",
    "retries_failed",
    "retries_timed_out",
    "retry_backoff",
    "rollback_on_abort",
    "stratify_by",
)


def load_yaml(text: str, source: str = "the rollout file") -> dict[str, Any]:
    """The mapping a rollout file holds; a `SpecError` naming the line for bad YAML."""
    if len(text) > MAX_FILE_CHARS:
        raise SpecError(f"{source} is larger than {MAX_FILE_CHARS} characters")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise SpecError(f"{source}{where}: {problem}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source} must hold a mapping (id: ..., artifact: ..., stages: ...)")
    return data


def from_flags(
    *,
    rollout_id: str | None,
    artifact: str | None,
    devices: str | None = None,
    tags: Sequence[str] = (),
    fleet_filter: str | None = None,
    stages: Sequence[str] = (),
    failure_threshold: str | None = None,
    min_finished: int | None = None,
    success_threshold: str | None = None,
    soak: float | None = None,
    approval: bool = False,
    max_per_minute: int | None = None,
    timeout: float | None = None,
    retries_failed: int | None = None,
    retries_timed_out: int | None = None,
    rollback_on_abort: bool = False,
) -> RolloutSpec:
    """The spec `otactl rollouts create` flags describe (`--tag` is key=value, repeatable)."""
    pairs: dict[str, str] = {}
    for pair in tags:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpecError(f"--tag {pair!r} is not key=value")
        pairs[key] = value
    given: dict[str, Any] = {
        "id": rollout_id,
        "artifact": artifact,
        "devices": devices,
        "tags": pairs or None,
        "filter": fleet_filter,
        "stages": [{"size": s} for s in stages] or None,
        "failure_threshold": failure_threshold,
        "min_finished": min_finished,
        "success_threshold": success_threshold,
        "soak": soak,
        "approval": approval or None,
        "max_per_minute": max_per_minute,
        "timeout": timeout,
        "retries_failed": retries_failed,
        "retries_timed_out": retries_timed_out,
        "rollback_on_abort": rollback_on_abort or None,
    }
    flags = {key: f"--{key.replace('_', '-')}" for key in given}
    flags.update(id="--id", stages="--stage", tags="--tag", retry_backoff="--retry-backoff")
    return from_mapping({k: v for k, v in given.items() if v is not None}, names=flags)


def from_mapping(
    data: Mapping[str, Any],
    firmware_version: str = "",
    firmware_url: str = "",
    names: Mapping[str, str] | None = None,
) -> RolloutSpec:
    """The spec a file's mapping describes; `names` says how to call a key in errors."""

    def name(key: str) -> str:
        return (names or {}).get(key, key)

    unknown = sorted(str(k) for k in data if k not in TOP_KEYS)
    if unknown:
        raise SpecError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(TOP_KEYS)}")
    for required in ("id", "artifact", "stages"):
        if data.get(required) in (None, "", []):
            raise SpecError(f"{name(required)} is required")
    rollout_id = _text(data["id"], name("id"))
    artifact = _text(data["artifact"], name("artifact"))

    selectors = [k for k in ("devices", "tags", "filter") if data.get(k) not in (None, "", [], {})]
    if len(selectors) != 1:
        given = f" (given: {', '.join(name(k) for k in selectors)})" if selectors else ""
        raise SpecError(
            f"give exactly one of {name('devices')}, {name('tags')} or {name('filter')}{given}"
        )
    device_ids = _devices(data["devices"], name("devices")) if "devices" in selectors else []
    tags = _tags(data["tags"], name("tags")) if "tags" in selectors else {}
    fleet_filter = _text(data["filter"], name("filter")) if "filter" in selectors else None

    raw_stages = data["stages"]
    if not isinstance(raw_stages, list):
        raise SpecError(f"{name('stages')} must be a list of stages")
    defaults = {k: data[k] for k in STAGE_DEFAULTS if data.get(k) is not None}
    # The first stage starts with StartRollout: approval, given for every stage, gates the rest.
    if "approval" in defaults:
        _flag(defaults["approval"], name("approval"))
    first = {k: v for k, v in defaults.items() if k != "approval"}
    stages = [
        _stage(raw, defaults if i else first, f"{name('stages')}[{i}]", names or {})
        for i, raw in enumerate(raw_stages)
    ]
    return RolloutSpec(
        rollout_id=rollout_id,
        artifact_id=artifact,
        firmware_version=firmware_version,
        firmware_url=firmware_url,
        stages=stages,
        device_ids=device_ids,
        tags=tags,
        fleet_filter=fleet_filter,
        max_per_minute=_optional(data, "max_per_minute", name, lambda v, n: _count(v, n, 1)),
        timeout_seconds=_optional(data, "timeout", name, lambda v, n: _seconds(v, n, True)),
        retries_failed=_optional(data, "retries_failed", name, _count) or 0,
        retries_timed_out=_optional(data, "retries_timed_out", name, _count) or 0,
        retry_backoff_seconds=_optional(data, "retry_backoff", name, _seconds),
        rollback_on_abort=bool(_optional(data, "rollback_on_abort", name, _flag)),
        stratify_by=_optional(data, "stratify_by", name, _text) or "",
    )


# ---- values ----------------------------------------------------------------------------------


def _optional(data: Mapping[str, Any], key: str, name: Any, parse: Any) -> Any:
    value = data.get(key)
    return None if value is None else parse(value, name(key))


def _stage(
    raw: Any, defaults: Mapping[str, Any], where: str, names: Mapping[str, str]
) -> RolloutStage:
    if isinstance(raw, str | int | float) and not isinstance(raw, bool):
        raw = {"size": raw}  # a bare size: `- 10%`
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must be a mapping with a size (e.g. size: 10%)")
    unknown = sorted(str(k) for k in raw if k not in STAGE_KEYS)
    if unknown:
        raise SpecError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(STAGE_KEYS)}"
        )
    if raw.get("size") is None:
        raise SpecError(f"{where}.size is required (N% or a count)")
    stage = {**defaults, **{k: v for k, v in raw.items() if v is not None}}

    def at(key: str) -> str:
        # A default given once names its flag / top-level key; a stage's own value its path.
        return f"{where}.{key}" if key in raw else names.get(key, key)

    percent, count = _size(stage["size"], f"{where}.size")
    threshold = None
    if stage.get("failure_threshold") is not None:
        failures, failed_count = _size(stage["failure_threshold"], at("failure_threshold"))
        minimum = stage.get("min_finished")
        threshold = FailureThreshold(
            count=failed_count,
            percent=failures,
            min_finished=1 if minimum is None else _count(minimum, at("min_finished"), 1),
        )
    elif stage.get("min_finished") is not None:
        raise SpecError(f"{at('min_finished')} needs a failure threshold")
    success = stage.get("success_threshold")
    return RolloutStage(
        percent=percent,
        count=count,
        success_threshold_percent=(
            100.0 if success is None else _percent(success, at("success_threshold"))
        ),
        failure_threshold=threshold,
        soak_seconds=(0.0 if stage.get("soak") is None else _seconds(stage["soak"], at("soak"))),
        approval_required=bool(stage.get("approval") and _flag(stage["approval"], at("approval"))),
    )


def _size(value: Any, where: str) -> tuple[float | None, int | None]:
    """`N%` -> (percent, None); `N` -> (None, count)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        return _percent(value, where, above_zero=True), None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and not isinstance(value, bool):
        raise SpecError(f"{where}: {value!r} is not a count; write {value:g}% for a percent")
    return None, _count(value, where, 1)


def _percent(value: Any, where: str, above_zero: bool = False) -> float:
    text = str(value).strip().removesuffix("%").strip() if not isinstance(value, bool) else ""
    try:
        number = float(text)
    except ValueError:
        raise SpecError(f"{where}: {value!r} is not a percent (e.g. 10%)") from None
    in_range = (number > 0 if above_zero else number >= 0) and number <= 100
    if not (math.isfinite(number) and in_range):
        low = "above 0" if above_zero else "from 0"
        raise SpecError(f"{where}: a percent must be {low} up to 100, not {value!r}")
    return number


def _count(value: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}: {value!r} is not a whole number")
    if value < minimum or value > 1_000_000_000:
        raise SpecError(f"{where}: must be at least {minimum}, not {value}")
    return value


def _seconds(value: Any, where: str, positive: bool = False) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise SpecError(f"{where}: {value!r} is not a number of seconds") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(f"{where}: {value!r} is not a number of seconds")
    if value < 0 or (positive and value == 0):
        raise SpecError(f"{where}: must be {'above' if positive else 'at least'} 0 seconds")
    return float(value)


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{where}: must be true or false, not {value!r}")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{where}: must be a non-empty string, not {value!r}")
    return value.strip()


def _devices(value: Any, where: str) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise SpecError(f"{where}: must be a list of device ids or 'a,b,c'")
    ids = [_text(v, where) for v in items if not (isinstance(v, str) and not v.strip())]
    if not ids:
        raise SpecError(f"{where}: no device id given")
    return list(dict.fromkeys(ids))  # a repeated id once


def _tags(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise SpecError(f"{where}: must be a mapping of tag: value")
    tags: dict[str, str] = {}
    for key, tag in value.items():
        if not isinstance(key, str) or not key:
            raise SpecError(f"{where}: tag names must be non-empty strings, not {key!r}")
        if isinstance(tag, bool) or not isinstance(tag, str | int | float):
            raise SpecError(f"{where}.{key}: must be a string, not {tag!r}")
        tags[key] = str(tag)
    return tags
