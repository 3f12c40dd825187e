"""Persistence of devices, shadows and the outbox (SQLAlchemy Core, PostgreSQL or SQLite).

The store knows rows and transactions, not shadow rules: a read-modify-write takes a callback
(a pure rule from `domain`) and runs it under a row lock, so concurrent updates never lose one,
and writes the callback's outbox events in the same transaction, so no accepted update goes
unannounced. Many devices are read with one SELECT and written with one statement each for
shadows and events: on PostgreSQL COPY (into a temporary table, then one UPDATE ... FROM, for
shadows), elsewhere one executemany.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from sqlalchemy import (
    Boolean,
    ColumnElement,
    Connection,
    Engine,
    and_,
    any_,
    bindparam,
    cast,
    false,
    func,
    literal,
    not_,
    select,
    true,
    update,
)
from sqlalchemy import Text as SqlText
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.exc import IntegrityError

from services.shadow.domain import ShadowState, dumps
from services.shadow.errors import DeviceExistsError, DeviceNotFoundError
from services.shadow.fleet_filter import Comparison, FleetFilter
from services.shadow.schema import devices, shadow_events

T = TypeVar("T")

_SHADOW_COLUMNS = (
    devices.c.device_id,
    devices.c.desired,
    devices.c.reported,
    devices.c.shadow_metadata,
    devices.c.version,
    devices.c.has_shadow,
)
_DEVICE_COLUMNS = (
    devices.c.device_id,
    devices.c.tags,
    devices.c.created_at_ms,
    devices.c.version,
)


BUCKETS = 1024


def bucket_of(device_id: str) -> int:
    """The outbox bucket of a device: stable, so one publisher sees a device's events in order."""
    return zlib.crc32(device_id.encode()) % BUCKETS


@dataclass(frozen=True)
class OutboxEvent:
    """Messages to publish for one accepted update (JSON text, ready for MQTT)."""

    device_id: str
    version: int
    delta_json: str | None
    documents_json: str


@dataclass(frozen=True)
class StoredEvent(OutboxEvent):
    event_id: int


@dataclass(frozen=True)
class ShadowWrite:
    """What a read-modify-write produces: the next state and the events announcing it."""

    state: ShadowState
    events: Sequence[OutboxEvent]


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    tags: dict[str, str]
    created_at_ms: int
    shadow_version: int


# The unary read-modify-write on PostgreSQL, prepared by psycopg (columns in ShadowState's order).
_PG_LOCK_SHADOW = (
    "SELECT desired, reported, shadow_metadata, version, has_shadow FROM devices"
    " WHERE device_id = %s FOR UPDATE"
)
_PG_LOCK_SHADOWS = (
    "SELECT device_id, desired, reported, shadow_metadata, version, has_shadow FROM devices"
    " WHERE device_id = ANY(%s) ORDER BY device_id FOR UPDATE"
)
_PG_WRITE_SHADOW = (
    "UPDATE devices SET desired = %s::jsonb, reported = %s::jsonb,"
    " shadow_metadata = %s::jsonb, version = %s, has_shadow = %s WHERE device_id = %s"
)
_PG_INSERT_EVENT = (
    "INSERT INTO shadow_events (bucket, device_id, version, delta_json, documents_json)"
    " VALUES (%s, %s, %s, %s, %s)"
)
_PG_WRITE_SHADOW_AND_EVENT = f"WITH written AS ({_PG_WRITE_SHADOW}) {_PG_INSERT_EVENT}"


def _event_row(event: OutboxEvent) -> tuple[int, str, int, str | None, str]:
    return (
        bucket_of(event.device_id),
        event.device_id,
        event.version,
        event.delta_json,
        event.documents_json,
    )


def _state(row: Any) -> ShadowState:
    return ShadowState(
        desired=row.desired,
        reported=row.reported,
        metadata=row.shadow_metadata,
        version=row.version,
        exists=row.has_shadow,
    )


def _record(row: Any) -> DeviceRecord:
    return DeviceRecord(row.device_id, dict(row.tags), row.created_at_ms, row.version)


def _psycopg(conn: Connection) -> psycopg.Connection[Any]:
    raw = conn.connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    return raw


def _pipeline(raw: psycopg.Connection[Any]) -> AbstractContextManager[object]:
    """Pipeline mode where libpq has it: a statement executed inside is sent at once and
    runs while Python goes on; its results are waited for at the first fetch or at the end
    of the block. Without it, plain (the statement waits for its result)."""
    return raw.pipeline() if psycopg.Pipeline.is_supported() else nullcontext()


class ShadowStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._postgres = engine.dialect.name == "postgresql"

    # --- devices ------------------------------------------------------------------------------

    def register_device(
        self,
        device_id: str,
        tags: Mapping[str, str],
        credential_hash: str,
        now_ms: int,
        before_commit: Callable[[], None] = lambda: None,
    ) -> DeviceRecord:
        """Insert a device; `before_commit` (e.g. creating its broker account) runs inside the
        transaction, so if it fails the device is not registered."""
        row = {
            "device_id": device_id,
            "credential_hash": credential_hash,
            "tags": dict(tags),
            "created_at_ms": now_ms,
            "desired": {},
            "reported": {},
            "shadow_metadata": {},
            "version": 0,
            "has_shadow": False,
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(devices.insert(), row)
                before_commit()
        except IntegrityError:
            raise DeviceExistsError(f"device {device_id!r} is already registered") from None
        return DeviceRecord(device_id, dict(tags), now_ms, 0)

    def get_device(self, device_id: str) -> DeviceRecord:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(*_DEVICE_COLUMNS).where(devices.c.device_id == device_id)
            ).first()
        if row is None:
            raise DeviceNotFoundError(f"no device {device_id!r}")
        return _record(row)

    def credential_hash(self, device_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(devices.c.credential_hash).where(devices.c.device_id == device_id)
            ).scalar()

    def delete_device(
        self, device_id: str, before_commit: Callable[[], None] = lambda: None
    ) -> None:
        """Delete a device; `before_commit` (revoking its broker account) runs inside the
        transaction, so if it fails the device stays."""
        with self.engine.begin() as conn:
            deleted = conn.execute(devices.delete().where(devices.c.device_id == device_id))
            if deleted.rowcount == 0:
                raise DeviceNotFoundError(f"no device {device_id!r}")
            before_commit()

    def query_devices(
        self, fleet_filter: FleetFilter, after: str, limit: int
    ) -> list[DeviceRecord]:
        """Devices matching the filter with ids after `after`, in id order, at most `limit`."""
        query = (
            select(*_DEVICE_COLUMNS)
            .where(devices.c.device_id > after, *self._conditions(fleet_filter))
            .order_by(devices.c.device_id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def count_devices(self, fleet_filter: FleetFilter) -> int:
        query = select(func.count()).select_from(devices).where(*self._conditions(fleet_filter))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    # --- shadows ------------------------------------------------------------------------------

    def get_shadow(self, device_id: str) -> ShadowState:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(*_SHADOW_COLUMNS).where(devices.c.device_id == device_id)
            ).first()
        if row is None:
            raise DeviceNotFoundError(f"no device {device_id!r}")
        return _state(row)

    def get_shadows(self, device_ids: Sequence[str]) -> dict[str, ShadowState]:
        """The stored shadows of many devices, read with one query; unknown ids are absent."""
        if not device_ids:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(select(*_SHADOW_COLUMNS).where(self._id_in(device_ids))).all()
        return {row.device_id: _state(row) for row in rows}

    def _id_in(self, device_ids: Sequence[str]) -> ColumnElement[bool]:
        """`device_id` is one of `device_ids`: on PostgreSQL one array parameter instead of a
        thousand, elsewhere an IN list."""
        if self._postgres:
            return devices.c.device_id == any_(literal(list(device_ids), type_=ARRAY(SqlText())))
        return devices.c.device_id.in_(device_ids)

    def modify_shadow(
        self, device_id: str, change: Callable[[ShadowState], tuple[ShadowWrite, T]]
    ) -> T:
        """Lock one shadow, compute its next state with `change`, write it and its events,
        return the change's result. An exception from `change` rolls back and leaves the
        stored shadow as it was.
        """
        if self._postgres:
            return self._modify_shadow_prepared(device_id, change)
        with self.engine.begin() as conn:
            row = conn.execute(
                select(*_SHADOW_COLUMNS).where(devices.c.device_id == device_id).with_for_update()
            ).first()
            if row is None:
                raise DeviceNotFoundError(f"no device {device_id!r}")
            write, result = change(_state(row))
            self._write_states(conn, [(device_id, write.state)], lambda: None)
            self._write_events(conn, write.events)
        return result

    def _modify_shadow_prepared(
        self, device_id: str, change: Callable[[ShadowState], tuple[ShadowWrite, T]]
    ) -> T:
        """`modify_shadow` on PostgreSQL as three prepared statements straight on psycopg: the
        locking SELECT, the UPDATE together with its outbox row, COMMIT. SQLAlchemy's
        statement handling was most of a unary update's CPU (docs/performance.md)."""
        pooled = self.engine.raw_connection()
        try:
            raw = pooled.driver_connection
            assert raw is not None
            try:
                with raw.cursor() as cursor:
                    cursor.execute(_PG_LOCK_SHADOW, (device_id,), prepare=True)
                    row = cursor.fetchone()
                    if row is None:
                        raise DeviceNotFoundError(f"no device {device_id!r}")
                    write, result = change(ShadowState(*row))
                    state = write.state
                    columns = (
                        dumps(state.desired),
                        dumps(state.reported),
                        dumps(state.metadata),
                        state.version,
                        state.exists,
                        device_id,
                    )
                    if len(write.events) == 1:
                        event = _event_row(write.events[0])
                        cursor.execute(_PG_WRITE_SHADOW_AND_EVENT, columns + event, prepare=True)
                    else:
                        cursor.execute(_PG_WRITE_SHADOW, columns, prepare=True)
                        for event in map(_event_row, write.events):
                            cursor.execute(_PG_INSERT_EVENT, event, prepare=True)
                raw.commit()
            except BaseException:
                if not raw.closed:
                    raw.rollback()
                raise
        finally:
            pooled.close()
        return result

    def modify_shadows(
        self,
        device_ids: Iterable[str],
        change: Callable[[str, ShadowState], ShadowState | None],
        announce: Callable[[], Sequence[OutboxEvent]],
        prepare: Callable[[], None] = lambda: None,
    ) -> set[str]:
        """Lock many shadows with one query, apply `change` to each (None leaves a shadow as it
        is), write the changed ones and the events `announce` returns for them in bulk, all in
        one transaction. Returns the ids that exist.

        The two callbacks without arguments are work to do while PostgreSQL is busy (ADR 41):
        `prepare` runs while the rows are being locked (the caller parses its input there, so
        `change` must not need anything of it before), `announce` once every `change` has run,
        while the shadows are being written."""
        ids = sorted(set(device_ids))  # lock in id order so concurrent batches cannot deadlock
        if not ids:
            prepare()
            announce()
            return set()
        with self.engine.begin() as conn:
            states = self._lock_shadows(conn, ids, prepare)
            changed = []
            for device_id, state in states:
                new_state = change(device_id, state)
                if new_state is not None:
                    changed.append((device_id, new_state))
            events = self._write_states(conn, changed, announce)
            self._write_events(conn, events)
        return {device_id for device_id, _ in states}

    def _lock_shadows(
        self, conn: Connection, sorted_ids: list[str], meanwhile: Callable[[], None]
    ) -> list[tuple[str, ShadowState]]:
        """SELECT ... FOR UPDATE of many shadows, in id order, running `meanwhile` while the
        database works. On PostgreSQL straight on psycopg with one array parameter
        (SQLAlchemy's row handling cost ~10 % of a batch), sent in pipeline mode so the query
        runs while `meanwhile` does."""
        if not self._postgres:
            meanwhile()
            rows = conn.execute(
                select(*_SHADOW_COLUMNS)
                .where(self._id_in(sorted_ids))
                .order_by(devices.c.device_id)
                .with_for_update()
            ).all()
            return [(row.device_id, _state(row)) for row in rows]
        raw = _psycopg(conn)
        with raw.cursor() as cursor, _pipeline(raw):
            cursor.execute(_PG_LOCK_SHADOWS, (sorted_ids,))
            meanwhile()
            return [(row[0], ShadowState(*row[1:])) for row in cursor.fetchall()]

    # --- the outbox ---------------------------------------------------------------------------

    def _write_events(self, conn: Connection, events: Sequence[OutboxEvent]) -> None:
        if not events:
            return
        if self._postgres and len(events) > 1:
            raw = _psycopg(conn)
            with (
                raw.cursor() as cursor,
                cursor.copy(
                    "COPY shadow_events (bucket, device_id, version, delta_json, documents_json)"
                    " FROM STDIN"
                ) as copy,
            ):
                for event in events:
                    copy.write_row(_event_row(event))
            return
        columns = ("bucket", "device_id", "version", "delta_json", "documents_json")
        conn.execute(
            shadow_events.insert(), [dict(zip(columns, _event_row(e), strict=True)) for e in events]
        )

    def read_events(
        self, after_id: int, partition: int, partitions: int, limit: int
    ) -> list[StoredEvent]:
        """Events of one partition (bucket mod partitions) after `after_id`, oldest first."""
        query = (
            select(shadow_events)
            .where(shadow_events.c.event_id > after_id)
            .order_by(shadow_events.c.event_id)
            .limit(limit)
        )
        if partitions > 1:
            query = query.where(shadow_events.c.bucket % partitions == partition)
        with self.engine.connect() as conn:
            return [
                StoredEvent(
                    event_id=row.event_id,
                    device_id=row.device_id,
                    version=row.version,
                    delta_json=row.delta_json,
                    documents_json=row.documents_json,
                )
                for row in conn.execute(query)
            ]

    def delete_events(self, event_ids: Sequence[int]) -> int:
        """Forget events once they are published."""
        if not event_ids:
            return 0
        with self.engine.begin() as conn:
            statement = shadow_events.delete().where(shadow_events.c.event_id.in_(event_ids))
            return conn.execute(statement).rowcount

    def _write_states(
        self,
        conn: Connection,
        states: Sequence[tuple[str, ShadowState]],
        meanwhile: Callable[[], T],
    ) -> T:
        """Write the shadows; returns what `meanwhile` returns, run while the database writes
        (on PostgreSQL while its UPDATE runs; elsewhere after the writes)."""
        if not states:
            return meanwhile()
        if self._postgres and len(states) > 1:
            return self._copy_states(conn, states, meanwhile)
        conn.execute(
            update(devices)
            .where(devices.c.device_id == bindparam("b_device_id"))
            .values(
                desired=bindparam("b_desired"),
                reported=bindparam("b_reported"),
                shadow_metadata=bindparam("b_metadata"),
                version=bindparam("b_version"),
                has_shadow=bindparam("b_exists"),
            ),
            [
                {
                    "b_device_id": device_id,
                    "b_desired": state.desired,
                    "b_reported": state.reported,
                    "b_metadata": state.metadata,
                    "b_version": state.version,
                    "b_exists": state.exists,
                }
                for device_id, state in states
            ],
        )
        return meanwhile()

    @staticmethod
    def _copy_states(
        conn: Connection, states: Sequence[tuple[str, ShadowState]], meanwhile: Callable[[], T]
    ) -> T:
        """Write many shadows in two statements: COPY to a temp table, then UPDATE ... FROM,
        sent in pipeline mode so that `meanwhile` runs while the UPDATE does."""
        raw = _psycopg(conn)
        with raw.cursor() as cursor:
            cursor.execute(
                "CREATE TEMP TABLE IF NOT EXISTS shadow_writes ("
                " device_id text PRIMARY KEY, desired jsonb, reported jsonb,"
                " shadow_metadata jsonb, version bigint, has_shadow boolean"
                ") ON COMMIT DELETE ROWS"
            )
            with cursor.copy(
                "COPY shadow_writes (device_id, desired, reported, shadow_metadata, version,"
                " has_shadow) FROM STDIN"
            ) as copy:
                for device_id, state in states:
                    copy.write_row(
                        (
                            device_id,
                            dumps(state.desired),
                            dumps(state.reported),
                            dumps(state.metadata),
                            state.version,
                            state.exists,
                        )
                    )
            with _pipeline(raw):
                cursor.execute(
                    "UPDATE devices AS d SET desired = w.desired, reported = w.reported,"
                    " shadow_metadata = w.shadow_metadata, version = w.version,"
                    " has_shadow = w.has_shadow FROM shadow_writes AS w"
                    " WHERE d.device_id = w.device_id"
                )
                return meanwhile()

    # --- fleet filters compiled to SQL ---------------------------------------------------------

    def _conditions(self, fleet_filter: FleetFilter) -> list[ColumnElement[bool]]:
        compile_one = self._pg_condition if self._postgres else self._sqlite_condition
        return [compile_one(c) for c in fleet_filter.comparisons]

    @staticmethod
    def _pg_condition(c: Comparison) -> ColumnElement[bool]:
        column = devices.c[c.root]
        if c.root == "tags" and c.value is not None:
            # Tag values are strings, so containment is equality, and it uses the GIN index.
            equal: ColumnElement[bool] = column.op("@>", return_type=Boolean)(
                cast(literal(json.dumps({c.path[0]: c.value})), JSONB)
            )
            return equal if c.op == "==" else not_(equal)

        def at(path: Sequence[str]) -> ColumnElement[Any]:
            return column.op("#>", return_type=JSONB)(literal(list(path), type_=ARRAY(SqlText())))

        # `#>` reads a numeric segment as an array index; a filter path names object keys only.
        found: ColumnElement[bool] = at(c.path).is_not(None)
        for i, key in enumerate(c.path):
            if key.lstrip("-").isdigit():
                found = and_(found, func.jsonb_typeof(at(c.path[:i])) == "object")
        if c.value is None:
            return not_(found) if c.op == "==" else found
        equal = and_(found, at(c.path) == cast(literal(json.dumps(c.value)), JSONB))
        return equal if c.op == "==" else not_(equal)

    @staticmethod
    def _sqlite_condition(c: Comparison) -> ColumnElement[bool]:
        column = devices.c[c.root]
        path = "$" + "".join("." + json.dumps(key) for key in c.path)
        json_type = func.json_type(column, path)
        if c.value is None:
            return json_type.is_(None) if c.op == "==" else json_type.is_not(None)
        if isinstance(c.value, bool):
            equal = json_type == ("true" if c.value else "false")
        else:
            # The JSON type must match too: json_extract gives the same SQL value for the
            # number 1 and true, or for an array and a string spelling it.
            types = ["text"] if isinstance(c.value, str) else ["integer", "real"]
            equal = and_(
                json_type.in_(types),
                func.json_extract(column, path) == literal(c.value),
            )
        if c.op == "==":
            return func.coalesce(equal, false()) == true()
        return func.coalesce(equal, false()) == false()
