"""Database engines for PostgreSQL (production, CI) and SQLite (the embedded default).

SQLite runs in WAL mode and starts every transaction with BEGIN IMMEDIATE, so a
read-modify-write takes the write lock up front and concurrent updates queue instead of
failing; on PostgreSQL the stores lock rows with SELECT ... FOR UPDATE.
"""

from __future__ import annotations

import json
import select
from pathlib import Path
from typing import Any

import orjson
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError

from services.common.jsontext import may_hold_big_integer


def make_engine(url: str, pool_size: int = 10) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    engine = create_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=pool_size,
        json_deserializer=load_stored_json,
    )
    event.listen(engine, "checkout", _refuse_connection_closed_by_server)
    return engine


def _refuse_connection_closed_by_server(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A pooled connection that the server has closed (a restart, an idle timeout,
    pg_terminate_backend) is replaced before it is used.

    An idle connection has nothing to read unless the server wrote an error and hung up, so
    one non-blocking poll of its socket tells; SQLAlchemy's pre-ping instead spends a round
    trip and about 0.15 ms of CPU on every checkout, a fifth of a unary shadow update
    (docs/performance.md). A silently dropped peer is not seen here; its first statement fails.
    """
    if dbapi_connection.closed or dbapi_connection.broken:
        raise DisconnectionError("the connection is closed")
    readable, _, _ = select.select([dbapi_connection.fileno()], [], [], 0)
    if readable:
        raise DisconnectionError("the server closed the connection")


def load_stored_json(text: str | bytes | memoryview) -> Any:
    """Decode a JSON document read from the database: orjson (several times faster than the
    standard library, docs/adr/0008), except where the text may hold an integer beyond 64
    bits (a run of 19 digits), which orjson would turn into a float; the standard library
    keeps it exact."""
    data = text.encode() if isinstance(text, str) else text
    if may_hold_big_integer(data):
        return json.loads(bytes(data))
    return orjson.loads(data)


def _sqlite_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30},
        pool_size=5,
        json_deserializer=load_stored_json,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin (the documented recipe).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def run_migrations(engine: Engine, migrations_dir: Path, version_table: str) -> None:
    """Bring the schema to the newest revision; each service keeps its own version table."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir))
    config.attributes["version_table"] = version_table
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def run_migration_environment() -> None:
    """The whole of every service's Alembic `env.py`: migrate on the connection and with the
    version table that `run_migrations` passes in."""
    from alembic import context

    config = context.config
    context.configure(
        connection=config.attributes["connection"],
        target_metadata=None,
        version_table=config.attributes["version_table"],
    )
    with context.begin_transaction():
        context.run_migrations()
