"""Persistence of rollouts, executions, device claims and the dispatch outbox (SQLAlchemy Core,
PostgreSQL or SQLite).

The store knows rows and transactions, not rollout rules. Every write to a rollout or its
executions checks and bumps the rollout's `revision` in the same transaction (optimistic
concurrency): a reconcile pass, a batch of device reports and an operator command that raced
each other never silently overwrite one another; the loser gets `ConcurrentUpdateError` and
re-reads. Executions are written in bulk (one DELETE and one multi-row INSERT per chunk).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, and_, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from services.rollout.domain import (
    Execution,
    ExecutionStatus,
    ExponentialRamp,
    FailureThreshold,
    Firmware,
    Rate,
    RetryPolicy,
    Rollout,
    RolloutDefinition,
    RolloutState,
    RolloutStatus,
    Stage,
    TargetSelector,
)
from services.rollout.errors import (
    ConcurrentUpdateError,
    RolloutExistsError,
    RolloutNotFoundError,
    TargetConflictError,
)
from services.rollout.schema import (
    rollout_claims,
    rollout_dispatches,
    rollout_executions,
    rollouts,
)

T = TypeVar("T")
CHUNK = 1000  # rows per statement / ids per IN list (well under SQLite's parameter limit)


def _chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- codecs: domain dataclasses <-> JSON columns --------------------------------------------------


def definition_to_json(definition: RolloutDefinition) -> dict[str, Any]:
    return dataclasses.asdict(definition)


def _firmware(data: Mapping[str, Any] | None) -> Firmware | None:
    return None if data is None else Firmware(data["version"], data["url"])


def definition_from_json(data: Mapping[str, Any]) -> RolloutDefinition:
    selector = data["selector"]
    rate = data["rate"]
    ramp = rate.get("ramp")
    stages = []
    for stage in data["stages"]:
        threshold = stage.get("failure_threshold")
        stages.append(
            Stage(
                percent=stage["percent"],
                count=stage["count"],
                success_threshold_percent=stage["success_threshold_percent"],
                failure_threshold=FailureThreshold(**threshold) if threshold else None,
                soak_seconds=stage["soak_seconds"],
                approval_required=stage["approval_required"],
            )
        )
    firmware = _firmware(data["firmware"])
    assert firmware is not None
    return RolloutDefinition(
        rollout_id=data["rollout_id"],
        artifact_id=data["artifact_id"],
        firmware=firmware,
        selector=TargetSelector(
            device_ids=tuple(selector["device_ids"]),
            tags=tuple((k, v) for k, v in selector["tags"]),
            fleet_filter=selector["fleet_filter"],
        ),
        stages=tuple(stages),
        rate=Rate(
            max_per_minute=rate["max_per_minute"],
            ramp=ExponentialRamp(**ramp) if ramp else None,
        ),
        timeout_seconds=data["timeout_seconds"],
        retries=RetryPolicy(**data["retries"]),
        rollback_on_abort=data["rollback_on_abort"],
        stratify_by=data["stratify_by"],
    )


def state_to_json(state: RolloutState) -> dict[str, Any]:
    data = dataclasses.asdict(state)
    data["status"] = state.status.value
    return data


def state_from_json(data: Mapping[str, Any]) -> RolloutState:
    return RolloutState(**{**data, "status": RolloutStatus(data["status"])})


def _execution_row(rollout_id: str, e: Execution) -> dict[str, Any]:
    return {
        "rollout_id": rollout_id,
        "device_id": e.device_id,
        "stage": e.stage,
        "stratum": e.stratum,
        "previous": None if e.previous is None else dataclasses.asdict(e.previous),
        "status": e.status.value,
        "attempt": e.attempt,
        "notified_at": list(e.notified_at),
        "updated_at": e.updated_at,
        "step": e.step,
        "reason": e.reason,
        "rollback_requested_at": e.rollback_requested_at,
        "withdrawn": e.withdrawn,
    }


def _execution(row: Any) -> Execution:
    return Execution(
        device_id=row.device_id,
        stage=row.stage,
        stratum=row.stratum,
        previous=_firmware(row.previous),
        status=ExecutionStatus(row.status),
        attempt=row.attempt,
        notified_at=tuple(float(t) for t in row.notified_at),
        updated_at=row.updated_at,
        step=row.step,
        reason=row.reason,
        rollback_requested_at=row.rollback_requested_at,
        withdrawn=row.withdrawn,
    )


# --- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutRecord:
    rollout: Rollout
    revision: int
    target_count: int
    created_at_ms: int


@dataclass(frozen=True)
class Dispatch:
    """One desired-state write still to send."""

    device_id: str
    rollout_id: str
    desired_json: str


def _record(row: Any) -> RolloutRecord:
    rollout = Rollout(definition_from_json(row.definition), state_from_json(row.state))
    return RolloutRecord(rollout, row.revision, row.target_count, row.created_at_ms)


class RolloutStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- rollouts -----------------------------------------------------------------------------

    def create(self, rollout: Rollout, now_ms: int) -> RolloutRecord:
        definition = rollout.definition
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(rollouts),
                    {
                        "rollout_id": definition.rollout_id,
                        "definition": definition_to_json(definition),
                        "state": state_to_json(rollout.state),
                        "status": rollout.state.status.value,
                        "revision": 1,
                        "target_count": 0,
                        "created_at_ms": now_ms,
                    },
                )
        except IntegrityError:
            raise RolloutExistsError(f"rollout {definition.rollout_id!r} already exists") from None
        return RolloutRecord(rollout, 1, 0, now_ms)

    def get(self, rollout_id: str) -> RolloutRecord:
        with self.engine.connect() as conn:
            return self._get(conn, rollout_id)

    def _get(self, conn: Connection, rollout_id: str) -> RolloutRecord:
        row = conn.execute(select(rollouts).where(rollouts.c.rollout_id == rollout_id)).first()
        if row is None:
            raise RolloutNotFoundError(f"rollout {rollout_id!r} not found")
        return _record(row)

    def page(
        self, after: str, limit: int, status: RolloutStatus | None = None
    ) -> list[RolloutRecord]:
        query = select(rollouts).where(rollouts.c.rollout_id > after)
        if status is not None:
            query = query.where(rollouts.c.status == status.value)
        query = query.order_by(rollouts.c.rollout_id).limit(limit)
        with self.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def ids_with_status(self, statuses: Iterable[RolloutStatus]) -> list[str]:
        values = [s.value for s in statuses]
        query = select(rollouts.c.rollout_id).where(rollouts.c.status.in_(values))
        with self.engine.connect() as conn:
            return list(conn.execute(query.order_by(rollouts.c.rollout_id)).scalars())

    def executions(
        self, rollout_id: str, device_ids: Sequence[str] | None = None
    ) -> list[Execution]:
        """All of a rollout's executions, or those of `device_ids`."""
        with self.engine.connect() as conn:
            return self._executions(conn, rollout_id, device_ids)

    def _executions(
        self, conn: Connection, rollout_id: str, device_ids: Sequence[str] | None
    ) -> list[Execution]:
        base = select(rollout_executions).where(rollout_executions.c.rollout_id == rollout_id)
        if device_ids is None:
            return [_execution(r) for r in conn.execute(base)]
        found: list[Execution] = []
        for chunk in _chunks(list(device_ids)):
            query = base.where(rollout_executions.c.device_id.in_(chunk))
            found.extend(_execution(r) for r in conn.execute(query))
        return found

    def stage_counts(self, rollout_id: str) -> dict[int, dict[str, int]]:
        """Execution counts per stage and status, counted by the database."""
        e = rollout_executions
        query = (
            select(e.c.stage, e.c.status, func.count())
            .where(e.c.rollout_id == rollout_id)
            .group_by(e.c.stage, e.c.status)
        )
        counts: dict[int, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for stage, status, count in conn.execute(query):
                counts.setdefault(stage, {})[status] = count
        return counts

    def save(
        self,
        record: RolloutRecord,
        rollout: Rollout,
        changed: Sequence[Execution] = (),
        *,
        dispatches: Sequence[tuple[str, str]] = (),
        claim: Sequence[str] = (),
        release_claims: bool = False,
        target_count: int | None = None,
    ) -> RolloutRecord:
        """Write the rollout's new state, its changed executions, the desired writes to send
        (`dispatches`: (device id, desired json)) and device claims in one transaction, if the
        rollout is still at `record.revision`. A claimed device held by another rollout raises
        `TargetConflictError`."""
        rollout_id = rollout.definition.rollout_id
        revision = record.revision + 1
        count = record.target_count if target_count is None else target_count
        with self.engine.begin() as conn:
            result = conn.execute(
                update(rollouts)
                .where(
                    and_(
                        rollouts.c.rollout_id == rollout_id,
                        rollouts.c.revision == record.revision,
                    )
                )
                .values(
                    state=state_to_json(rollout.state),
                    status=rollout.state.status.value,
                    revision=revision,
                    target_count=count,
                )
            )
            if result.rowcount != 1:
                raise ConcurrentUpdateError(f"rollout {rollout_id!r} changed meanwhile")
            self._claim(conn, rollout_id, claim)
            if release_claims:
                conn.execute(
                    delete(rollout_claims).where(rollout_claims.c.rollout_id == rollout_id)
                )
            self._write_executions(conn, rollout_id, changed)
            self._write_dispatches(conn, rollout_id, dispatches)
        return RolloutRecord(rollout, revision, count, record.created_at_ms)

    def _claim(self, conn: Connection, rollout_id: str, device_ids: Sequence[str]) -> None:
        if not device_ids:
            return
        held = self._claims(conn, device_ids)
        others = sorted(d for d, r in held.items() if r != rollout_id)
        if others:
            raise TargetConflictError(
                f"{len(others)} target(s) already in another live rollout, e.g. "
                + ", ".join(f"{d} ({held[d]})" for d in others[:5])
            )
        new = [{"device_id": d, "rollout_id": rollout_id} for d in device_ids if d not in held]
        try:
            for chunk in _chunks(new):
                conn.execute(insert(rollout_claims), list(chunk))
        except IntegrityError:
            raise ConcurrentUpdateError(
                "a target was claimed by another rollout meanwhile"
            ) from None

    def _claims(self, conn: Connection, device_ids: Sequence[str]) -> dict[str, str]:
        held: dict[str, str] = {}
        for chunk in _chunks(list(device_ids)):
            query = select(rollout_claims).where(rollout_claims.c.device_id.in_(chunk))
            held.update((r.device_id, r.rollout_id) for r in conn.execute(query))
        return held

    def claims(self, device_ids: Sequence[str]) -> dict[str, str]:
        """device id -> the live rollout that holds it, for those of `device_ids` held."""
        with self.engine.connect() as conn:
            return self._claims(conn, device_ids)

    def claiming_rollout_ids(self) -> list[str]:
        """The rollouts that hold devices (live ones, and aborted ones still rolling back)."""
        query = select(rollout_claims.c.rollout_id).distinct()
        with self.engine.connect() as conn:
            return sorted(conn.execute(query).scalars())

    def claiming(self, rollout_id: str) -> bool:
        query = select(rollout_claims.c.device_id).where(rollout_claims.c.rollout_id == rollout_id)
        with self.engine.connect() as conn:
            return conn.execute(query.limit(1)).first() is not None

    def _write_executions(
        self, conn: Connection, rollout_id: str, changed: Sequence[Execution]
    ) -> None:
        e = rollout_executions
        for chunk in _chunks(list(changed)):
            ids = [x.device_id for x in chunk]
            conn.execute(
                delete(e).where(and_(e.c.rollout_id == rollout_id, e.c.device_id.in_(ids)))
            )
            conn.execute(insert(e), [_execution_row(rollout_id, x) for x in chunk])

    def _write_dispatches(
        self, conn: Connection, rollout_id: str, dispatches: Sequence[tuple[str, str]]
    ) -> None:
        d = rollout_dispatches
        # The newest desired write for a device replaces any older one still unsent: each
        # sets the whole firmware block, so only the last one matters.
        latest = dict(dispatches)
        for chunk in _chunks(sorted(latest)):
            conn.execute(delete(d).where(d.c.device_id.in_(chunk)))
            rows = [
                {"device_id": i, "rollout_id": rollout_id, "desired_json": latest[i]} for i in chunk
            ]
            conn.execute(insert(d), rows)

    def execution_counts(self, rollout_id: str) -> list[tuple[int, ExecutionStatus, bool, int]]:
        """(stage, status, rollback requested, count) of a rollout's executions: one GROUP BY,
        so reading a rollout's progress costs the same for 10 devices as for a million."""
        e = rollout_executions
        requested = e.c.rollback_requested_at.is_not(None)
        query = (
            select(e.c.stage, e.c.status, requested.label("requested"), func.count())
            .where(e.c.rollout_id == rollout_id)
            .group_by(e.c.stage, e.c.status, requested)
        )
        with self.engine.connect() as conn:
            return [
                (int(stage), ExecutionStatus(status), bool(flag), int(count))
                for stage, status, flag, count in conn.execute(query)
            ]

    # --- the dispatch outbox ------------------------------------------------------------------

    def pending_dispatches(self, rollout_id: str | None, limit: int) -> list[Dispatch]:
        d = rollout_dispatches
        query = select(d).order_by(d.c.device_id).limit(limit)
        if rollout_id is not None:
            query = query.where(d.c.rollout_id == rollout_id)
        with self.engine.connect() as conn:
            return [
                Dispatch(r.device_id, r.rollout_id, r.desired_json) for r in conn.execute(query)
            ]

    def lease_dispatches(self, limit: int, lease_seconds: float, now: float) -> list[str]:
        """Hand out up to `limit` unsent writes that nobody holds (never leased, or the lease
        ran out): mark them leased until `now + lease_seconds` and return their device ids,
        in order. Concurrent callers get disjoint sets (PostgreSQL: SKIP LOCKED)."""
        d = rollout_dispatches
        free = (d.c.leased_until.is_(None)) | (d.c.leased_until < now)
        # FOR NO KEY UPDATE: a row being deleted by a sender is skipped, a reader is not.
        query = (
            select(d.c.device_id)
            .where(free)
            .order_by(d.c.device_id)
            .limit(limit)
            .with_for_update(skip_locked=True, key_share=True)
        )
        with self.engine.begin() as conn:
            device_ids = list(conn.execute(query).scalars())
            for chunk in _chunks(device_ids):
                conn.execute(
                    update(d)
                    .where(d.c.device_id.in_(chunk))
                    .values(leased_until=now + lease_seconds)
                )
        return device_ids

    def dispatches_for(self, device_ids: Sequence[str]) -> list[Dispatch]:
        """The unsent writes of these devices as they are now (sent ones are gone)."""
        d = rollout_dispatches
        found: list[Dispatch] = []
        with self.engine.connect() as conn:
            for chunk in _chunks(sorted(set(device_ids))):
                query = select(d).where(d.c.device_id.in_(chunk)).order_by(d.c.device_id)
                found.extend(
                    Dispatch(r.device_id, r.rollout_id, r.desired_json) for r in conn.execute(query)
                )
        return found

    def count_dispatches(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(select(func.count()).select_from(rollout_dispatches)).scalar_one()
            )

    def delete_dispatches(self, sent: Sequence[Dispatch]) -> None:
        """Forget sent writes, unless a newer one replaced them meanwhile (same device, other
        desired document)."""
        if not sent:
            return
        d = rollout_dispatches
        statement = delete(d).where(
            and_(d.c.device_id == bindparam("did"), d.c.desired_json == bindparam("dj"))
        )
        with self.engine.begin() as conn:
            conn.execute(statement, [{"did": x.device_id, "dj": x.desired_json} for x in sent])
