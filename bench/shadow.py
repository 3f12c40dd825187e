"""Benchmark of the shadow service over real gRPC on PostgreSQL, against baselines of the same run.

(a) `BatchUpdateDesired` devices/s next to the fastest raw write of the same rows (COPY into a
    staging table, then one `INSERT ... ON CONFLICT DO UPDATE`) and a plain SQLAlchemy
    multi-row upsert, each writing to its own copy of the `devices` table;
(b) unary `UpdateShadow` calls/s and p50/p99 latency next to `grpc.health.v1.Health/Check` on
    the same server, at 1 and 32 concurrent callers (threads, each with its own stub).

The server runs as a subprocess (`python -m services.shadow` with its deployed defaults, so
client and server do not share a GIL); `--server inprocess|both` adds the same wiring in this
process, for comparison. Batch paths run interleaved, round after round, and each figure is
the median of the timed rounds: this machine is shared, so drift falls on every path alike.
Everything runs in a throwaway database `ota_bench_<random>`, dropped at the end. Figures are
printed, never asserted (CONVENTIONS.md point 8).

Run from the repository root: `.venv/bin/python bench/shadow.py [--quick]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import Engine, MetaData, Table
from sqlalchemy.dialects.postgresql import insert as pg_insert

from protos.shadow.v1 import shadow_pb2 as pb
from protos.shadow.v1 import shadow_pb2_grpc as pb_grpc
from services.common import db
from services.shadow import credentials
from services.shadow.schema import devices
from services.shadow.server import MIGRATIONS, SERVICE_NAME, build_service, create_server
from services.shadow.settings import ShadowSettings

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
REPO_ROOT = Path(__file__).resolve().parent.parent
RAW_TABLE = "devices_raw"
SQLA_TABLE = "devices_sqla"
RAW_EVENTS_TABLE = "shadow_events_raw"
REGISTERED_BY_RPC = 50  # the rest are inserted directly, as the same rows RegisterDevice writes
TAGS = {"site": "berlin", "model": "gw-100"}
CHANNEL_OPTIONS = [
    # Separate channels get separate connections, not one shared subchannel.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.max_send_message_length", 32 * 1024 * 1024),
]
CALLERS_PER_CHANNEL = 8
SHADOW_COLUMNS = ("desired", "reported", "shadow_metadata", "version", "has_shadow")


@dataclass(frozen=True)
class Config:
    devices: int
    batch: int
    unary_seconds: float
    postgres: str
    rounds: int
    servers: tuple[str, ...]
    callers: tuple[int, ...] = (1, 32)


def parse_args(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=20_000, help="devices (default 20000)")
    parser.add_argument("--batch", type=int, default=1000, help="items per batch (default 1000)")
    parser.add_argument(
        "--unary-seconds", type=float, default=5.0, help="seconds per unary measurement"
    )
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="admin DSN (any database)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per batch path")
    parser.add_argument(
        "--server",
        choices=["subprocess", "inprocess", "both"],
        default="subprocess",
        help="where the shadow server runs: a subprocess, as deployed (default), in this"
        " process (client and server share one GIL), or both",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.batch, args.unary_seconds, args.rounds = 300, 100, 0.5, 1
    if args.devices < 1 or args.rounds < 1 or args.unary_seconds <= 0:
        parser.error("--devices, --rounds and --unary-seconds must be positive")
    if not 1 <= args.batch <= ShadowSettings.max_batch_items:
        parser.error(f"--batch must be between 1 and {ShadowSettings.max_batch_items}")
    servers = ("subprocess", "inprocess") if args.server == "both" else (args.server,)
    return Config(args.devices, args.batch, args.unary_seconds, args.postgres, args.rounds, servers)


# --- database and servers -----------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(admin_dsn: str) -> Iterator[str]:
    """A new database for this run only; dropped at the end, whatever happens."""
    name = f"ota_bench_{secrets.token_hex(6)}"
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin_dsn.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_serving(target: str, timeout: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        while True:
            try:
                if stub.Check(request, timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if not alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the shadow server at {target} did not become SERVING")
            time.sleep(0.1)


@dataclass
class Server:
    """A running shadow server: where to reach it and how to read its CPU time."""

    label: str
    target: str
    cpu_seconds: Callable[[], float]


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, summed over its cores."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks[:8]) - idle) / hz, sum(ticks[:8]) / hz


def _proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@contextlib.contextmanager
def subprocess_server(database_url: str) -> Iterator[Server]:
    """`python -m services.shadow` with its deployed defaults, on a fixed free port."""
    port = free_port()
    env = {
        **os.environ,
        "OTA_DATABASE_URL": database_url,
        "OTA_SHADOW_LISTEN": f"127.0.0.1:{port}",
    }
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.shadow"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_serving(f"127.0.0.1:{port}", 60, lambda: process.poll() is None)
            yield Server("subprocess", f"127.0.0.1:{port}", lambda: _proc_cpu_seconds(process.pid))
        except Exception:
            log.seek(0)
            sys.stderr.write("shadow server output:\n" + log.read()[-4000:])
            raise
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def inprocess_server(database_url: str) -> Iterator[Server]:
    """The same wiring in this process: client and server threads share one GIL."""
    settings = ShadowSettings(database_url=database_url, listen="127.0.0.1:0")
    service = build_service(settings, migrate=False)
    server, port = create_server(settings, service)
    server.start()
    try:
        wait_serving(f"127.0.0.1:{port}", 30, lambda: True)
        yield Server("in-process", f"127.0.0.1:{port}", time.process_time)
    finally:
        server.stop(1).wait()
        service.store.engine.dispose()


def maintain(conn: psycopg.Connection[Any], table: str) -> None:
    """The same starting point for every timed run: no dead rows to step over (autovacuum
    would clean up at a random moment otherwise) and, for the service, an empty outbox, as if
    its publisher kept up. No CHECKPOINT: it would hit every other database of the cluster."""
    conn.execute(f"VACUUM (ANALYZE) {table}")
    if table == "devices":
        row = conn.execute("SELECT to_regclass('shadow_events') IS NOT NULL").fetchone()
        if row and row[0]:
            conn.execute("TRUNCATE shadow_events")


# --- setup ------------------------------------------------------------------------------------


def device_ids(count: int) -> list[str]:
    return [f"bench-{i:06d}" for i in range(count)]


def register_devices(database_url: str, target: str, ids: Sequence[str]) -> None:
    """The first devices through RegisterDevice, the rest as the same rows written directly
    (ShadowStore.register_device: a `$7$` hash, the tags, an empty shadow at version 0)."""
    by_rpc = ids[:REGISTERED_BY_RPC]
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ShadowServiceStub(channel)
        for device_id in by_rpc:
            stub.RegisterDevice(pb.RegisterDeviceRequest(device_id=device_id, tags=TAGS))
    now_ms = int(time.time() * 1000)
    tags = json.dumps(TAGS)
    with psycopg.connect(database_url) as conn, conn.cursor() as cursor:
        with cursor.copy(
            "COPY devices (device_id, credential_hash, tags, created_at_ms, desired, reported,"
            " shadow_metadata, version, has_shadow) FROM STDIN"
        ) as copy:
            for device_id in ids[REGISTERED_BY_RPC:]:
                password_hash = credentials.hash_password(credentials.new_password())
                copy.write_row((device_id, password_hash, tags, now_ms, "{}", "{}", "{}", 0, False))
        # Every row must look like one RegisterDevice wrote, whichever way it came in.
        cursor.execute(
            "SELECT count(*) FROM devices WHERE credential_hash LIKE '$7$101$%%'"
            " AND tags = %s::jsonb AND desired = '{}' AND reported = '{}'"
            " AND shadow_metadata = '{}' AND version = 0 AND NOT has_shadow",
            (tags,),
        )
        row = cursor.fetchone()
        if row is None or row[0] != len(ids):
            raise RuntimeError(f"setup: {row} of {len(ids)} rows look like RegisterDevice's")


def create_baseline_tables(conn: psycopg.Connection[Any]) -> None:
    """Two copies of `devices` (columns, key, indexes) holding the same registered rows."""
    for table in (RAW_TABLE, SQLA_TABLE):
        conn.execute(f"CREATE TABLE {table} (LIKE devices INCLUDING ALL)")
        conn.execute(f"INSERT INTO {table} SELECT * FROM devices")
    conn.execute(f"CREATE TABLE {RAW_EVENTS_TABLE} (LIKE shadow_events INCLUDING ALL)")
    conn.execute(
        "CREATE TEMP TABLE raw_staging (device_id text, desired jsonb, reported jsonb,"
        " shadow_metadata jsonb, version bigint, has_shadow boolean) ON COMMIT DELETE ROWS"
    )


# --- (a) the batch fan-out and its baselines --------------------------------------------------


def desired_patch(device_id: str, round_no: int) -> dict[str, Any]:
    return {
        "firmware": {
            "version": f"2.0.{round_no}",
            "url": f"https://artifacts.example/fw/{device_id}/2.0.{round_no}.bin",
        }
    }


def stored_row(device_id: str, round_no: int, timestamp: int) -> tuple[Any, ...]:
    """What the service stores after that patch: the shadow columns, as JSON text."""
    patch = desired_patch(device_id, round_no)
    metadata = {
        "desired": {"firmware": {key: {"timestamp": timestamp} for key in patch["firmware"]}}
    }
    return (device_id, compact(patch), "{}", compact(metadata), round_no, True)


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def chunks(ids: Sequence[str], size: int) -> list[Sequence[str]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


RAW_UPSERT = (
    f"INSERT INTO {RAW_TABLE} (device_id, credential_hash, tags, created_at_ms, desired,"
    " reported, shadow_metadata, version, has_shadow)"
    # Every row conflicts, so the placeholders of the other NOT NULL columns are never stored.
    " SELECT device_id, '', '{}', 0, desired, reported, shadow_metadata, version, has_shadow"
    " FROM raw_staging"
    " ON CONFLICT (device_id) DO UPDATE SET desired = EXCLUDED.desired,"
    " reported = EXCLUDED.reported, shadow_metadata = EXCLUDED.shadow_metadata,"
    " version = EXCLUDED.version, has_shadow = EXCLUDED.has_shadow"
)


def raw_copy_round(
    conn: psycopg.Connection[Any], batches: Sequence[Sequence[str]], round_no: int
) -> float:
    """COPY each batch into a staging table, then one INSERT ... ON CONFLICT; one transaction
    per batch. Serialising the rows counts: the service has to do it as well."""
    timestamp = int(time.time())
    start = time.perf_counter()
    with conn.cursor() as cursor:
        for batch in batches:
            with conn.transaction():
                with cursor.copy("COPY raw_staging FROM STDIN") as copy:
                    for device_id in batch:
                        copy.write_row(stored_row(device_id, round_no, timestamp))
                cursor.execute(RAW_UPSERT)
    return time.perf_counter() - start


def sqlalchemy_round(
    engine: Engine, table: Table, batches: Sequence[Sequence[str]], round_no: int
) -> float:
    """`insert(...).values([...]).on_conflict_do_update(...)`, one statement per batch."""
    timestamp = int(time.time())
    start = time.perf_counter()
    for batch in batches:
        rows = []
        for device_id in batch:
            patch = desired_patch(device_id, round_no)
            stamps = {key: {"timestamp": timestamp} for key in patch["firmware"]}
            rows.append(
                {
                    "device_id": device_id,
                    "credential_hash": "",
                    "tags": {},
                    "created_at_ms": 0,
                    "desired": patch,
                    "reported": {},
                    "shadow_metadata": {"desired": {"firmware": stamps}},
                    "version": round_no,
                    "has_shadow": True,
                }
            )
        statement = pg_insert(table).values(rows)
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.device_id],
            set_={name: statement.excluded[name] for name in SHADOW_COLUMNS},
        )
        with engine.begin() as conn:
            conn.execute(statement)
    return time.perf_counter() - start


def run_threads(count: int, work: Callable[[int, float], None]) -> float:
    """Run `work(i, start)` on `count` threads released together at `start`; returns the
    seconds from `start` until the last thread ends."""
    started: list[float] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(count, action=lambda: started.append(time.perf_counter()))

    def body(index: int) -> None:
        try:
            barrier.wait()
            work(index, started[0])
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started[0]


def grpc_batch_round(
    target: str, batches: Sequence[Sequence[str]], round_no: int, callers: int
) -> float:
    """BatchUpdateDesired end to end: JSON and protobuf encoding, the call, every result OK."""
    channels = [grpc.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(callers)]
    stubs = [pb_grpc.ShadowServiceStub(channel) for channel in channels]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=10)  # connect before the clock starts

    def work(caller: int, _start: float) -> None:
        for batch in batches[caller::callers]:
            request = pb.BatchUpdateDesiredRequest(
                items=[
                    pb.DesiredPatch(
                        device_id=device_id,
                        desired_json=compact(desired_patch(device_id, round_no)),
                    )
                    for device_id in batch
                ]
            )
            reply = stubs[caller].BatchUpdateDesired(request, timeout=120)
            failed = [r for r in reply.results if r.status != pb.BatchItemResult.OK]
            if failed or len(reply.results) != len(batch):
                raise RuntimeError(f"BatchUpdateDesired: {len(failed)} items failed: {failed[:3]}")

    try:
        return run_threads(callers, work)
    finally:
        for channel in channels:
            channel.close()


@dataclass
class Samples:
    label: str
    seconds: list[float] = field(default_factory=list)


def measure_batch(config: Config, database_url: str, servers: Sequence[Server]) -> list[Samples]:
    ids = device_ids(config.devices)
    batches = chunks(ids, config.batch)
    engine = db.make_engine(database_url, pool_size=2)
    sqla_table = devices.to_metadata(MetaData(), name=SQLA_TABLE)
    batch_size = f"{config.batch:,} rows"
    paths: list[tuple[Samples, str, Callable[[int], float]]] = []
    with (
        psycopg.connect(database_url) as conn,
        psycopg.connect(database_url, autocommit=True) as admin,
    ):
        create_baseline_tables(conn)
        conn.commit()
        paths.append(
            (
                Samples(f"raw COPY + INSERT ... ON CONFLICT, 1 transaction per {batch_size}"),
                RAW_TABLE,
                lambda r: raw_copy_round(conn, batches, r),
            )
        )
        paths.append(
            (
                Samples(f"raw COPY + INSERT ... ON CONFLICT, all {len(ids):,} rows at once"),
                RAW_TABLE,
                lambda r: raw_copy_round(conn, [ids], r),
            )
        )
        for server in servers:
            for callers in (1, 2):

                def grpc_path(r: int, target: str = server.target, n: int = callers) -> float:
                    return grpc_batch_round(target, batches, r, n)

                label = f"BatchUpdateDesired, {server.label} server, {callers} caller"
                paths.append((Samples(label + ("s" if callers > 1 else "")), "devices", grpc_path))
        paths.append(
            (
                Samples(f"SQLAlchemy insert().values().on_conflict_do_update(), {batch_size}"),
                SQLA_TABLE,
                lambda r: sqlalchemy_round(engine, sqla_table, batches, r),
            )
        )
        # Round 0 warms every path up; the timed rounds interleave the paths so drifts in the
        # machine's state (cache, WAL, other load) fall on all of them alike.
        round_no = 0
        for timed_round in range(config.rounds + 1):
            for samples, table, run in paths:
                round_no += 1
                maintain(admin, table)
                elapsed = run(round_no)
                if timed_round:
                    samples.seconds.append(elapsed)
            print(f"  batch round {timed_round}/{config.rounds} done", file=sys.stderr)
    engine.dispose()
    return [samples for samples, _, _ in paths]


# --- (b) unary calls --------------------------------------------------------------------------


@dataclass(frozen=True)
class UnaryResult:
    calls: int
    seconds: float
    latencies_ms: list[float]  # sorted
    client_cpu: float  # cores busy in this process
    server_cpu: float  # cores busy in the server process
    machine_cpu: float  # cores busy on the whole machine: PostgreSQL, other work, us

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    def percentile(self, fraction: float) -> float:
        # Nearest rank: the smallest latency that at least `fraction` of the calls did not exceed.
        rank = math.ceil(fraction * len(self.latencies_ms))
        return self.latencies_ms[min(max(rank, 1), len(self.latencies_ms)) - 1]


Call = Callable[[int], object]
CallFactory = Callable[[grpc.Channel, int], Call]


def update_shadow_calls(ids: Sequence[str], callers: int) -> CallFactory:
    """Reported-state updates, each thread on its own devices so no two wait on one row lock."""

    def factory(channel: grpc.Channel, caller: int) -> Call:
        stub = pb_grpc.ShadowServiceStub(channel)
        mine = ids[caller::callers] or ids[caller % len(ids) :][:1]

        def call(n: int) -> object:
            request = {
                "state": {"reported": {"firmware": {"version": "2.0.1"}, "uptime_s": n}},
                "clientToken": f"bench-{caller}-{n}",
            }
            return stub.UpdateShadow(
                pb.UpdateShadowRequest(
                    device_id=mine[n % len(mine)], request_json=compact(request)
                ),
                timeout=30,
            )

        return call

    return factory


def health_calls(channel: grpc.Channel, caller: int) -> Call:
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)

    def call(n: int) -> object:
        return stub.Check(request, timeout=30)

    return call


def run_unary(server: Server, factory: CallFactory, callers: int, seconds: float) -> UnaryResult:
    """`callers` threads, each with its own stub, calling in a loop for `seconds`."""
    channels = [
        grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS)
        for _ in range(max(1, callers // CALLERS_PER_CHANNEL))
    ]
    calls = [factory(channels[i % len(channels)], i) for i in range(callers)]
    latencies: list[list[float]] = [[] for _ in range(callers)]

    def work(caller: int, start: float) -> None:
        call, mine, end = calls[caller], latencies[caller], start + seconds
        n = 0
        while True:
            before = time.perf_counter()
            if before >= end:
                return
            call(n)
            mine.append((time.perf_counter() - before) * 1000)
            n += 1

    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=10)  # connect before the clock
        client_before, server_before = time.process_time(), server.cpu_seconds()
        machine_before = machine_busy_seconds()[0]
        elapsed = run_threads(callers, work)
        client_cpu = time.process_time() - client_before
        server_cpu = server.cpu_seconds() - server_before
        machine_cpu = machine_busy_seconds()[0] - machine_before
    finally:
        for channel in channels:
            channel.close()
    flat = sorted(value for per_caller in latencies for value in per_caller)
    return UnaryResult(
        len(flat),
        elapsed,
        flat,
        client_cpu / elapsed,
        server_cpu / elapsed,
        machine_cpu / elapsed,
    )


def raw_update_calls(
    database_url: str, ids: Sequence[str], callers: int, connections: list[psycopg.Connection[Any]]
) -> CallFactory:
    """The database's share of an `UpdateShadow`, without gRPC or Python rules: the same three
    statements the store sends (lock the row, write it with its outbox row, commit), straight
    on psycopg with a connection per caller (added to `connections`), into `devices_raw` and a
    copy of the outbox."""

    def factory(channel: grpc.Channel, caller: int) -> Call:
        conn = psycopg.connect(database_url)
        connections.append(conn)
        mine = ids[caller::callers] or ids[caller % len(ids) :][:1]

        def call(n: int) -> object:
            device_id = mine[n % len(mine)]
            reported = compact({"firmware": {"version": "2.0.1"}, "uptime_s": n})
            with conn.cursor() as cursor:
                cursor.execute(RAW_LOCK, (device_id,), prepare=True)
                row = cursor.fetchone()
                assert row is not None
                cursor.execute(
                    RAW_WRITE_WITH_EVENT,
                    (reported, row[0] + 1, device_id, device_id, row[0] + 1, reported),
                    prepare=True,
                )
            conn.commit()
            return row

        return call

    return factory


RAW_LOCK = f"SELECT version FROM {RAW_TABLE} WHERE device_id = %s FOR UPDATE"
RAW_WRITE_WITH_EVENT = (
    f"WITH written AS (UPDATE {RAW_TABLE} SET reported = %s::jsonb, version = %s,"
    " has_shadow = true WHERE device_id = %s)"
    f" INSERT INTO {RAW_EVENTS_TABLE} (bucket, device_id, version, delta_json, documents_json)"
    " VALUES (0, %s, %s, NULL, %s)"
)


@dataclass(frozen=True)
class UnaryRow:
    callers: int
    update: UnaryResult
    health: UnaryResult
    database: UnaryResult


def measure_unary(config: Config, server: Server, database_url: str) -> list[UnaryRow]:
    ids = device_ids(config.devices)
    rows = []
    warm_up = min(1.0, config.unary_seconds / 5)
    for callers in config.callers:
        update = update_shadow_calls(ids, callers)
        connections: list[psycopg.Connection[Any]] = []
        database = raw_update_calls(database_url, ids, callers, connections)
        try:
            run_unary(server, health_calls, callers, warm_up)
            run_unary(server, update, callers, warm_up)
            health_result = run_unary(server, health_calls, callers, config.unary_seconds)
            update_result = run_unary(server, update, callers, config.unary_seconds)
            database_result = run_unary(server, database, callers, config.unary_seconds)
        finally:
            for conn in connections:
                conn.close()
        rows.append(UnaryRow(callers, update_result, health_result, database_result))
        print(f"  unary {server.label}, {callers} callers done", file=sys.stderr)
    return rows


# --- report -----------------------------------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def batch_report(config: Config, results: Sequence[Samples]) -> tuple[str, dict[str, float]]:
    def rate(seconds: float) -> float:
        return config.devices / seconds

    medians = {s.label: rate(statistics.median(s.seconds)) for s in results}
    reference = medians[results[0].label]
    rows = [
        [
            s.label,
            f"{medians[s.label]:,.0f}",
            f"{rate(max(s.seconds)):,.0f}-{rate(min(s.seconds)):,.0f}",
            f"{medians[s.label] / reference:.2f}",
        ]
        for s in results
    ]
    header = ["path", "devices/s (median)", f"range of {config.rounds}", "ratio to raw COPY"]
    return table(header, rows), medians


def unary_report(server: Server, rows: Sequence[UnaryRow]) -> str:
    def ms(value: float) -> str:
        return f"{value:.2f}"

    body = []
    for row in rows:
        u, h, d = row.update, row.health, row.database
        body.append(
            [
                str(row.callers),
                f"{u.rate:,.0f}",
                ms(u.percentile(0.5)),
                ms(u.percentile(0.99)),
                f"{h.rate:,.0f}",
                ms(h.percentile(0.5)),
                ms(h.percentile(0.99)),
                f"{u.rate / h.rate:.2f}",
                f"{d.rate:,.0f}",
                ms(d.percentile(0.5)),
                f"{u.client_cpu:.2f} / {u.server_cpu:.2f} / {u.machine_cpu:.2f}",
            ]
        )
    header = [
        "callers",
        "UpdateShadow calls/s",
        "p50 ms",
        "p99 ms",
        "Health/Check calls/s",
        "p50 ms",
        "p99 ms",
        "ratio",
        "raw SQL calls/s",
        "p50 ms",
        "CPU client / server / machine",
    ]
    cpu_note = (
        "(raw SQL: the update's three statements straight on psycopg, no gRPC: the database's"
        f" share; CPU: cores busy during the UpdateShadow run, of {os.cpu_count()}"
    )
    if server.label == "in-process":
        cpu_note += "; client and server are one process, so their figures are the same"
    return table(header, body) + "\n" + cpu_note + ")"


def git_revision() -> str:
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "?"
    return done.stdout.strip() or "?"


def postgres_version(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    # A terminated run still stops its server and drops its database (the `finally` blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(
        f"# shadow benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores,"
        f" Python {platform.python_version()}, PostgreSQL {postgres_version(config.postgres)},"
        f" revision {git_revision()}"
    )
    print(
        f"# {config.devices:,} devices, batches of {config.batch:,}, {config.rounds} timed rounds"
        f" after a warm-up, unary {config.unary_seconds:g} s per figure,"
        f" servers: {', '.join(config.servers)}; load average {os.getloadavg()[0]:.1f}"
    )
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_database(config.postgres))
        engine = db.make_engine(url, pool_size=1)
        db.run_migrations(engine, MIGRATIONS, "alembic_version_shadow")
        engine.dispose()
        starters = {"subprocess": subprocess_server, "inprocess": inprocess_server}
        servers = [stack.enter_context(starters[name](url)) for name in config.servers]
        register_devices(url, servers[0].target, device_ids(config.devices))

        print("\n## (a) batch desired update vs raw writes of the same rows\n")
        batch_table, medians = batch_report(config, measure_batch(config, url, servers))
        print(batch_table)
        reference = next(iter(medians.values()))
        sqla = list(medians.values())[-1]
        for server in servers:
            label = f"BatchUpdateDesired, {server.label} server, 1 caller"
            ratio = medians[label] / reference
            print(
                f"target batch >= 0.30 x raw COPY ({server.label}, 1 caller):"
                f" {ratio:.2f} -> {'met' if ratio >= 0.3 else 'MISSED'};"
                f" {medians[label] / sqla:.1f}x the SQLAlchemy upsert"
            )

        for server in servers:
            print(f"\n## (b) unary UpdateShadow vs Health/Check, {server.label} server\n")
            rows = measure_unary(config, server, url)
            print(unary_report(server, rows))
            for row in rows:
                ratio = row.update.rate / row.health.rate
                print(
                    f"target unary >= 0.5 x Health/Check ({row.callers} callers):"
                    f" {ratio:.2f} -> {'met' if ratio >= 0.5 else 'MISSED'}"
                )
    print(f"\n# load average at the end {os.getloadavg()[0]:.1f} (other work on this machine)")


if __name__ == "__main__":
    main()
