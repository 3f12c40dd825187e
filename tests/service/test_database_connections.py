"""The database layer against the real PostgreSQL: pooled connections the server closed are
replaced before use (no pre-ping round trip), stored JSON is read back exactly, and the
pipelined unary write commits everything or nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import Engine, text

from services.common import db
from services.shadow.domain import ShadowState
from services.shadow.errors import DeviceNotFoundError
from services.shadow.server import MIGRATIONS
from services.shadow.service import DesiredItem, ShadowService
from services.shadow.store import OutboxEvent, ShadowStore, ShadowWrite
from tests.conftest import POSTGRES_ADMIN_DSN


@pytest.fixture
def small_engine(postgres_url: str) -> Iterator[Engine]:
    """An engine of one pooled connection, so every use gets the same one back."""
    engine = db.make_engine(postgres_url, pool_size=1)
    db.run_migrations(engine, MIGRATIONS, "alembic_version_shadow")
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE devices, shadow_events"))
    yield engine
    engine.dispose()


def backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def terminate(pid: int) -> None:
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        # Wait until the backend is gone, so its goodbye has reached the socket.
        for _ in range(200):
            gone = admin.execute(
                "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            if gone == (True,):
                return
            admin.execute("SELECT pg_sleep(0.01)")
    raise AssertionError(f"backend {pid} did not end")


def test_a_connection_the_server_closed_is_replaced_before_it_is_used(
    small_engine: Engine,
) -> None:
    service = ShadowService(ShadowStore(small_engine))
    service.register_device("dev-1", {})
    first = backend_pid(small_engine)
    terminate(first)

    # The pool hands out a new connection: the very next statement works, unary and batch.
    result = service.update_shadow("dev-1", '{"state": {"reported": {"a": 1}}}')
    assert result.current.version == 1
    assert backend_pid(small_engine) != first

    terminate(backend_pid(small_engine))
    assert service.get_shadow("dev-1")[0].reported == {"a": 1}


def test_stored_json_reads_back_exactly_including_integers_beyond_64_bits(
    shadow_service: ShadowService,
) -> None:
    shadow_service.register_device("dev-1", {})
    big = 2**80 + 1
    document = {
        "reported": {"big": big, "negative": -(2**70), "float": 0.1, "text": "é\u2028", "n": 7}
    }
    shadow_service.update_shadow("dev-1", json.dumps({"state": document}))
    state, _ = shadow_service.get_shadow("dev-1")
    assert state.reported == document["reported"]
    assert type(state.reported["big"]) is int and state.reported["big"] == big


def test_load_stored_json_picks_the_exact_decoder() -> None:
    assert db.load_stored_json(b'{"a": 123456789012345678901234567890}') == {
        "a": 123456789012345678901234567890
    }
    assert db.load_stored_json('{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    assert db.load_stored_json(memoryview(b'{"a": 9223372036854775807}')) == {
        "a": 9223372036854775807
    }


def test_a_failing_change_in_the_unary_path_rolls_back_and_frees_the_connection(
    small_engine: Engine,
) -> None:
    store = ShadowStore(small_engine)
    service = ShadowService(store)
    service.register_device("dev-1", {})
    service.update_shadow("dev-1", '{"state": {"desired": {"a": 1}}}')

    def boom(state: ShadowState) -> tuple[ShadowWrite, None]:
        raise RuntimeError("rule failed")

    with pytest.raises(RuntimeError, match="rule failed"):
        store.modify_shadow("dev-1", boom)
    with pytest.raises(DeviceNotFoundError):
        store.modify_shadow("nobody", boom)

    # The one pooled connection is usable again (not left inside a transaction), and the
    # stored shadow and outbox are as they were.
    state = store.get_shadow("dev-1")
    assert (state.desired, state.version) == ({"a": 1}, 1)
    with small_engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM shadow_events")).scalar_one() == 1


def test_the_unary_path_writes_the_shadow_and_every_event_in_one_transaction(
    small_engine: Engine,
) -> None:
    store = ShadowStore(small_engine)
    ShadowService(store).register_device("dev-1", {})

    def two_events(state: ShadowState) -> tuple[ShadowWrite, str]:
        new = ShadowState({"x": 1}, {}, {"desired": {"x": {"timestamp": 5}}}, 1, True)
        events = [OutboxEvent("dev-1", 1, None, '{"n":1}'), OutboxEvent("dev-1", 1, "{}", "{}")]
        return ShadowWrite(new, events), "done"

    assert store.modify_shadow("dev-1", two_events) == "done"
    state = store.get_shadow("dev-1")
    assert (state.desired, state.metadata, state.version, state.exists) == (
        {"x": 1},
        {"desired": {"x": {"timestamp": 5}}},
        1,
        True,
    )
    events = store.read_events(0, 0, 1, 10)
    assert [(e.delta_json, e.documents_json) for e in events] == [(None, '{"n":1}'), ("{}", "{}")]


@pytest.mark.parametrize("failing", ["prepare", "change", "announce"])
def test_a_batch_whose_callback_fails_while_a_statement_is_in_flight_writes_nothing(
    small_engine: Engine, failing: str
) -> None:
    # prepare runs while the lock query is in flight, announce while the UPDATE is (pipeline
    # mode, ADR 41): a failure there must still roll everything back and leave the one pooled
    # connection usable.
    store = ShadowStore(small_engine)
    service = ShadowService(store)
    for device_id in ("dev-1", "dev-2", "dev-3"):
        service.register_device(device_id, {})
    service.batch_update_desired(
        [DesiredItem(d, '{"fw": "1"}') for d in ("dev-1", "dev-2", "dev-3")]
    )

    failures = {failing}

    def step(name: str) -> None:
        if name in failures:
            raise RuntimeError(f"{name} failed")

    def change(device_id: str, state: ShadowState) -> ShadowState:
        step("change")
        return ShadowState({"fw": "2"}, {}, {}, state.version + 1, True)

    def announce() -> list[OutboxEvent]:
        step("announce")
        return [OutboxEvent(d, 2, None, "{}") for d in ("dev-1", "dev-2", "dev-3")]

    with pytest.raises(RuntimeError, match=f"{failing} failed"):
        store.modify_shadows(["dev-3", "dev-1", "dev-2"], change, announce, lambda: step("prepare"))

    states = store.get_shadows(["dev-1", "dev-2", "dev-3"])
    assert {d: (s.desired, s.version) for d, s in states.items()} == {
        d: ({"fw": "1"}, 1) for d in ("dev-1", "dev-2", "dev-3")
    }
    with small_engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM shadow_events")).scalar_one() == 3
    # The connection is back in the pool in a clean state: the same batch now goes through.
    failures.clear()
    assert store.modify_shadows(["dev-1", "dev-2", "dev-3"], change, announce) == {
        "dev-1",
        "dev-2",
        "dev-3",
    }
    assert {s.version for s in store.get_shadows(["dev-1", "dev-2", "dev-3"]).values()} == {2}
