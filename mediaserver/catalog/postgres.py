"""PostgreSQL storage of the catalog, shared by the nodes of a cluster (`catalog = postgres`).

`PostgresCatalog` has the interface of the SQLite `Catalog`: the same methods, arguments
and rows. What differs is how it meets an engine on the other end of a network:

- Writes never block the caller. Each is put on an ordered in-memory queue and one writer
  task applies the queue in order on its own connection, consecutive writes batched into
  one transaction. If PostgreSQL goes away the writer logs one warning, keeps the queue and
  retries with backoff, so a recording goes on through an outage and nothing is lost.
- Exactly once: each batch also records, in the same transaction, the sequence number of
  its last write in `catalog_writers` under this catalog's writer id. After a failure the
  writer reads that number back and drops what already committed, so a batch whose COMMIT
  was in flight when the connection broke is not applied twice.
- Reads (pooled connections) first wait until every write queued before them has
  committed: a node reads its own writes. A read that gets no answer within
  `read_timeout_s` raises `Unavailable("catalog.unavailable")`.
- The webhook outbox is claimed, not just read: `due()` leases the due rows to this node
  (`FOR UPDATE SKIP LOCKED`), so two nodes never hold the same event, and the events of a
  node that died are claimed again once its lease has run out.
- `try_lead(name)` holds a session advisory lock on a connection of its own, so a
  once-per-cluster job runs on one node and moves to another when that one dies.
- The schema is versioned (`schema_version`) and migrated at `start()` inside one
  transaction under an advisory lock, so nodes starting together do not race.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg

from mediaserver.catalog.store import OutboxItem
from mediaserver.errors import ConfigError, Unavailable
from mediaserver.tasks import cancel_and_wait

log = logging.getLogger(__name__)

T = TypeVar("T")

BATCH_MAX = 200
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 2.0
READ_RETRY_MAX_S = 0.5
# A writer id's progress row is only read back by the process that wrote it; rows of
# processes long gone are swept at start.
WRITER_ROW_TTL_S = 7 * 86400.0

MIGRATIONS: tuple[str, ...] = (
    # 1: the tables of the SQLite catalog, plus the node registry, outbox claims and
    # the writers' progress.
    """
    CREATE TABLE sessions (
        uuid TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        source TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        ended_at DOUBLE PRECISION,
        meta TEXT NOT NULL DEFAULT '{}',
        node_id TEXT
    );
    CREATE INDEX sessions_app ON sessions (app_id, created_at);
    CREATE INDEX sessions_active ON sessions (node_id) WHERE state = 'active';
    CREATE TABLE legs (
        leg_id TEXT PRIMARY KEY,
        session_uuid TEXT NOT NULL,
        role TEXT NOT NULL,
        kind TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        ended_at DOUBLE PRECISION,
        stats TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX legs_session ON legs (session_uuid);
    CREATE TABLE recordings (
        id TEXT PRIMARY KEY,
        session_uuid TEXT NOT NULL,
        app_id TEXT NOT NULL,
        state TEXT NOT NULL,
        format TEXT NOT NULL,
        sample_rate INTEGER NOT NULL,
        channels INTEGER NOT NULL,
        bitrate INTEGER,
        options TEXT NOT NULL,
        content_type TEXT NOT NULL,
        storage_key TEXT NOT NULL,
        spool_path TEXT,
        duration DOUBLE PRECISION,
        file_size BIGINT,
        sha256 TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        stopped_at DOUBLE PRECISION,
        completed_at DOUBLE PRECISION,
        deleted_at DOUBLE PRECISION,
        expires_at DOUBLE PRECISION,
        termination_reason TEXT,
        finish_key TEXT,
        command_uid TEXT,
        legs TEXT NOT NULL DEFAULT '{}',
        error TEXT
    );
    CREATE INDEX recordings_app ON recordings (app_id, created_at);
    CREATE INDEX recordings_session ON recordings (session_uuid);
    CREATE INDEX recordings_state ON recordings (state);
    CREATE INDEX recordings_expiry ON recordings (expires_at) WHERE state = 'completed';
    CREATE TABLE commands (
        session_uuid TEXT NOT NULL,
        command_uid TEXT NOT NULL,
        command TEXT NOT NULL,
        status INTEGER NOT NULL,
        response TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (session_uuid, command_uid)
    );
    CREATE TABLE outbox (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        event_id TEXT NOT NULL UNIQUE,
        app_id TEXT NOT NULL,
        url TEXT NOT NULL,
        kind TEXT NOT NULL,
        body BYTEA NOT NULL,
        signed INTEGER NOT NULL DEFAULT 1,
        created_at DOUBLE PRECISION NOT NULL,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        delivered_at DOUBLE PRECISION,
        abandoned_at DOUBLE PRECISION,
        last_error TEXT,
        claimed_by TEXT,
        claimed_until DOUBLE PRECISION
    );
    CREATE INDEX outbox_due ON outbox (next_attempt_at, seq) WHERE delivered_at IS NULL AND abandoned_at IS NULL;
    CREATE INDEX outbox_app ON outbox (app_id, seq);
    CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY,
        node_url TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE catalog_writers (
        writer TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        applied BIGINT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    """,
)

COLUMNS: dict[str, frozenset[str]] = {
    "sessions": frozenset({"uuid", "app_id", "source", "state", "created_at", "ended_at", "meta", "node_id"}),
    "legs": frozenset({"leg_id", "session_uuid", "role", "kind", "created_at", "ended_at", "stats"}),
    "recordings": frozenset({
        "id", "session_uuid", "app_id", "state", "format", "sample_rate", "channels", "bitrate", "options",
        "content_type", "storage_key", "spool_path", "duration", "file_size", "sha256", "created_at",
        "started_at", "stopped_at", "completed_at", "deleted_at", "expires_at", "termination_reason",
        "finish_key", "command_uid", "legs", "error"}),
}
JSON_COLUMNS = frozenset({"meta", "options", "legs", "stats"})
# outbox_items() shows what the SQLite catalog shows; the claim columns are this backend's own.
OUTBOX_COLUMNS = ("seq, event_id, app_id, url, kind, body, signed, created_at, next_attempt_at, attempts, "
                  "delivered_at, abandoned_at, last_error")
DUE_COLUMNS = "seq, event_id, app_id, url, kind, body, signed, created_at, attempts, next_attempt_at"
OPEN = "delivered_at IS NULL AND abandoned_at IS NULL"

# Errors that say "PostgreSQL is not there right now" (connection lost or refused, server
# starting or shutting down, a failover's read-only standby, a deadlock): retried. Any
# other error is a fault of the statement itself and retrying it would never end.
TRANSIENT = (
    OSError,  # includes TimeoutError and refused or reset connections
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
)


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT)


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for `name` (the same on every node)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


SCHEMA_LOCK = lock_key("mediaserver.catalog.schema")


def host_port(dsn: str) -> str:
    """`host:port` of a DSN, for messages: never its user or password."""
    try:
        parts = urlsplit(dsn)
        host, port = parts.hostname or "localhost", parts.port or 5432
    except ValueError:
        return "an unparsable DSN"
    return f"{host}:{port}"


def _scrub(text: str, dsn: str) -> str:
    try:
        password = urlsplit(dsn).password
    except ValueError:
        return text
    return text.replace(password, "***") if password else text


@dataclass(frozen=True, slots=True)
class Write:
    """One queued statement; `seq` numbers the catalog's writes from 1, in call order."""

    seq: int
    sql: str
    args: tuple[Any, ...]


def _arg(value: Any) -> Any:
    # PostgreSQL text cannot hold NUL; SQLite could. Keep the rest of the string.
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def _encode(name: str, value: Any) -> Any:
    return json.dumps(value, separators=(",", ":")) if name in JSON_COLUMNS else value


def _decode(record: asyncpg.Record | None) -> dict[str, Any] | None:
    if record is None:
        return None
    row = dict(record)
    for name in JSON_COLUMNS & row.keys():
        row[name] = json.loads(row[name])
    return row


def _checked(table: str, names: Iterable[str]) -> list[str]:
    names = list(names)
    unknown = [name for name in names if name not in COLUMNS[table]]
    if unknown:
        raise ValueError(f"{table} has no column {', '.join(unknown)}")
    return names


class Filter:
    """A WHERE clause built from optional conditions, numbering the `$n` placeholders."""

    def __init__(self) -> None:
        self.clauses: list[str] = []
        self.args: list[Any] = []

    def add(self, template: str, value: Any) -> "Filter":
        """Add `template` (with `{}` for the placeholder) unless `value` is None."""
        if value is not None:
            self.args.append(value)
            self.clauses.append(template.format(f"${len(self.args)}"))
        return self

    def next(self, offset: int = 0) -> str:
        """The placeholder after the filter's own (for LIMIT and OFFSET)."""
        return f"${len(self.args) + 1 + offset}"

    def __str__(self) -> str:
        return " AND ".join(self.clauses) or "TRUE"


class PostgresCatalog:
    """The catalog in PostgreSQL, for one node (`node_id`) of a cluster."""

    def __init__(self, dsn: str, node_id: str, *, lease_s: float = 60.0, read_timeout_s: float = 5.0,
                 connect_timeout_s: float = 5.0, close_timeout_s: float = 5.0, pool_size: int = 4) -> None:
        self.dsn = dsn
        self.node_id = node_id
        self.lease_s = lease_s
        self.read_timeout_s = read_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.close_timeout_s = close_timeout_s
        self.pool_size = pool_size
        self.where = host_port(dsn)
        self._writer_id = f"{node_id}/{uuid.uuid4().hex}"
        self._queue: deque[Write] = deque()
        self._queued = 0  # seq of the newest write queued
        self._committed = 0  # seq of the newest write committed (or given up)
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._pool: asyncpg.Pool | None = None
        self._writer: asyncio.Task | None = None
        self._writer_conn: asyncpg.Connection | None = None
        self._lead_conn: asyncpg.Connection | None = None
        self._lead_lock = asyncio.Lock()
        self._leading: set[str] = set()
        self._started_at: dict[str, float] = {}
        self._closed = False
        self._stats = {"reads": 0, "writes": 0, "transactions": 0, "retries": 0}

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, create or migrate the schema, and start the writer.

        A PostgreSQL that cannot be reached (or refuses us) is a `ConfigError` naming its
        host and port.
        """
        if self._closed:
            raise RuntimeError("the catalog is closed")
        if self._pool is not None:
            return
        try:
            # min_size=0: a pool with a floor keeps reconnecting (and logging) through an outage.
            self._pool = await asyncpg.create_pool(self.dsn, min_size=0, max_size=self.pool_size,
                                                   timeout=self.connect_timeout_s)
            async with self._pool.acquire() as conn:
                await migrate(conn)
                await conn.execute("DELETE FROM catalog_writers WHERE updated_at < $1", time.time() - WRITER_ROW_TTL_S)
        except BaseException as exc:
            await self._close_pool()
            if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, ValueError)):
                reason = _scrub(f"{type(exc).__name__}: {exc}", self.dsn)
                raise ConfigError(f"postgres_dsn: cannot use the PostgreSQL catalog at {self.where}: {reason}") from None
            raise
        self._writer = asyncio.create_task(self._write_loop(), name=f"catalog-writer-{self.node_id}")

    async def close(self) -> None:
        """Apply what is queued (for up to `close_timeout_s`), then close every connection.

        Idempotent. Writes still queued after the timeout are lost, and said so in the log.
        """
        if self._closed:
            return
        self._closed = True
        if self._writer is not None and self.writes_pending:
            try:
                await self.flush(self.close_timeout_s)
            except TimeoutError:
                log.warning("catalog closed with %d writes not applied: PostgreSQL at %s did not take them",
                            self.writes_pending, self.where)
        await cancel_and_wait(self._writer)
        self._writer = None
        await _close_connection(self._writer_conn)
        await _close_connection(self._lead_conn)
        self._writer_conn = self._lead_conn = None
        self._leading.clear()
        await self._close_pool()

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5.0)
            except (TimeoutError, *TRANSIENT):
                pool.terminate()

    @property
    def stats(self) -> dict[str, int]:
        """Counters since start: `reads` (catalog reads, each one round trip or a few on a
        pooled connection, leadership checks included), `writes` (statements committed),
        `transactions` (the batches they were committed in) and `retries` (attempts that
        failed on a transient error and were tried again)."""
        return dict(self._stats)

    @property
    def writes_pending(self) -> int:
        """Writes queued and not yet committed."""
        return self._queued - self._committed

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every write queued so far has committed; TimeoutError after `timeout` s."""
        async with asyncio.timeout(timeout):
            await self._caught_up(self._queued)

    # -- the write queue --------------------------------------------------------------------

    def _write(self, sql: str, *args: Any) -> None:
        if self._closed:
            raise RuntimeError("the catalog is closed")
        self._queued += 1
        self._queue.append(Write(self._queued, sql, tuple(_arg(a) for a in args)))
        self._wake.set()

    def _insert(self, table: str, values: dict[str, Any]) -> None:
        names = _checked(table, values)
        marks = ", ".join(f"${i}" for i in range(1, len(names) + 1))
        # DO NOTHING: a batch retried after its first attempt committed must be harmless.
        self._write(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({marks}) ON CONFLICT DO NOTHING",
                    *(_encode(name, values[name]) for name in names))

    def _update(self, table: str, key: str, ident: str, values: dict[str, Any]) -> None:
        if not values:
            return
        names = _checked(table, values)
        sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(names, 1))
        self._write(f"UPDATE {table} SET {sets} WHERE {key} = ${len(names) + 1}",
                    *(_encode(name, values[name]) for name in names), ident)

    def _done_through(self, seq: int) -> None:
        """Writes up to `seq` are committed (or given up): forget them and wake the readers."""
        while self._queue and self._queue[0].seq <= seq:
            self._queue.popleft()
        self._committed = max(self._committed, seq)
        self._progress.set()
        self._progress = asyncio.Event()

    async def _caught_up(self, seq: int) -> None:
        while self._committed < seq:
            await self._progress.wait()

    async def _write_loop(self) -> None:
        """Apply the queue in order, forever; on an outage keep it and retry with backoff."""
        delay, outage_since = RETRY_FIRST_S, None
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._apply_next()
            except Exception as exc:  # the writer must outlive any failure: it holds the queue
                if outage_since is None:
                    outage_since = time.monotonic()
                    log.warning("catalog: cannot write to PostgreSQL at %s (%s: %s); keeping %d writes queued "
                                "and retrying", self.where, type(exc).__name__, exc, self.writes_pending,
                                exc_info=None if _transient(exc) else exc)
                await _close_connection(self._writer_conn)
                self._writer_conn = None
                self._stats["retries"] += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if outage_since is not None:
                log.info("catalog: PostgreSQL at %s is back after %.1f s; %d writes still queued",
                         self.where, time.monotonic() - outage_since, self.writes_pending)
            delay, outage_since = RETRY_FIRST_S, None

    async def _apply_next(self) -> None:
        conn = self._writer_conn
        if conn is None or conn.is_closed():
            conn = self._writer_conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout_s)
            # The last attempt may have committed before its connection broke.
            applied = await conn.fetchval("SELECT applied FROM catalog_writers WHERE writer = $1", self._writer_id)
            self._done_through(applied or 0)
        batch = [write for write, _ in zip(self._queue, range(BATCH_MAX))]
        if not batch:
            return
        try:
            await self._commit(conn, batch)
        except Exception as exc:
            if _transient(exc):
                raise
            await self._isolate(conn, batch, exc)
            return
        self._done_through(batch[-1].seq)

    async def _commit(self, conn: asyncpg.Connection, batch: list[Write]) -> None:
        async with conn.transaction():
            for write in batch:
                await conn.execute(write.sql, *write.args)
            await conn.execute(
                "INSERT INTO catalog_writers (writer, node_id, applied, updated_at) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (writer) DO UPDATE SET applied = EXCLUDED.applied, updated_at = EXCLUDED.updated_at",
                self._writer_id, self.node_id, batch[-1].seq, time.time())
        self._stats["transactions"] += 1
        self._stats["writes"] += len(batch)

    async def _isolate(self, conn: asyncpg.Connection, batch: list[Write], exc: Exception) -> None:
        """A batch failed on a statement's own fault: apply its writes one by one, dropping
        (and logging) only the ones PostgreSQL refuses, so one bad write cannot stall the
        queue forever."""
        if len(batch) == 1:
            log.error("catalog: a write was refused and dropped: %s: %s (%s)", type(exc).__name__, exc, batch[0].sql,
                      exc_info=None if isinstance(exc, asyncpg.PostgresError) else exc)
            await self._commit(conn, [Write(batch[0].seq, "SELECT 1", ())])
            self._done_through(batch[0].seq)
            return
        for write in batch:
            try:
                await self._commit(conn, [write])
            except Exception as single:
                if _transient(single):
                    raise
                await self._isolate(conn, [write], single)
                continue
            self._done_through(write.seq)

    # -- reads ------------------------------------------------------------------------------

    async def _read(self, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run `op` on a pooled connection once this node's earlier writes have committed;
        retried through connection failures until `read_timeout_s`, then `Unavailable`."""
        if self._pool is None:
            raise RuntimeError("the catalog is closed" if self._closed else "the catalog is not started")
        target = self._queued
        self._stats["reads"] += 1
        try:
            async with asyncio.timeout(self.read_timeout_s):
                await self._caught_up(target)
                return await self._query(op)
        except TimeoutError:
            raise Unavailable("catalog.unavailable",
                              f"the catalog (PostgreSQL at {self.where}) did not answer within {self.read_timeout_s:g} s",
                              retry_after_s=1) from None

    async def _query(self, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        delay = RETRY_FIRST_S
        while True:
            if self._pool is None:
                raise RuntimeError("the catalog is closed")
            try:
                async with self._pool.acquire() as conn:
                    return await op(conn)
            except Exception as exc:
                if not _transient(exc):
                    raise
            self._stats["retries"] += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, READ_RETRY_MAX_S)

    async def _one(self, sql: str, *args: Any) -> dict[str, Any] | None:
        return _decode(await self._read(lambda conn: conn.fetchrow(sql, *args)))

    async def _all(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [_decode(r) for r in await self._read(lambda conn: conn.fetch(sql, *args))]

    async def _value(self, sql: str, *args: Any) -> Any:
        return await self._read(lambda conn: conn.fetchval(sql, *args))

    async def _page(self, table: str, condition: Filter, order: str, limit: int,
                    offset: int) -> tuple[list[dict[str, Any]], int]:
        async def op(conn: asyncpg.Connection) -> tuple[list[asyncpg.Record], int]:
            total = await conn.fetchval(f"SELECT COUNT(*) FROM {table} WHERE {condition}", *condition.args)
            rows = await conn.fetch(f"SELECT * FROM {table} WHERE {condition} ORDER BY {order} "
                                    f"LIMIT {condition.next()} OFFSET {condition.next(1)}",
                                    *condition.args, limit, offset)
            return rows, total

        rows, total = await self._read(op)
        return [_decode(r) for r in rows], total

    # -- sessions and legs --------------------------------------------------------------

    def create_session(self, uuid: str, app_id: str, source: str, created_at: float,
                       meta: dict[str, Any] | None = None, node_id: str | None = None) -> None:
        self._insert("sessions", {"uuid": uuid, "app_id": app_id, "source": source, "state": "active",
                                  "created_at": created_at, "meta": meta or {}, "node_id": node_id})

    def update_session(self, uuid: str, **values: Any) -> None:
        self._update("sessions", "uuid", uuid, values)

    async def session(self, uuid: str) -> dict[str, Any] | None:
        return await self._one("SELECT * FROM sessions WHERE uuid = $1", uuid)

    async def sessions(self, app_id: str, state: str | None, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        condition = Filter().add("app_id = {}", app_id).add("state = {}", state or None)
        return await self._page("sessions", condition, 'created_at DESC, uuid COLLATE "C"', limit, offset)

    async def active_sessions(self, node_id: str | None = None) -> list[dict[str, Any]]:
        """Sessions not ended (of `node_id` only, when given)."""
        if node_id is None:
            return await self._all("SELECT * FROM sessions WHERE state = 'active'")
        return await self._all("SELECT * FROM sessions WHERE state = 'active' AND node_id = $1", node_id)

    async def claim_sessions(self, from_node: str, to_node: str) -> list[dict[str, Any]]:
        """Move the active sessions of `from_node` to `to_node` at once; answers those moved.

        One UPDATE: of two nodes claiming together, the second waits for the first's row
        locks, finds the rows moved, and gets none. If the answer is lost to a broken
        connection after the commit, the sessions are `to_node`'s without it knowing: they
        are settled when `to_node` restarts (or dies in turn).
        """
        return await self._all("UPDATE sessions SET node_id = $2 WHERE state = 'active' AND node_id = $1 RETURNING *",
                               from_node, to_node)

    def add_leg(self, leg_id: str, session_uuid: str, role: str, kind: str, created_at: float) -> None:
        self._insert("legs", {"leg_id": leg_id, "session_uuid": session_uuid, "role": role, "kind": kind,
                              "created_at": created_at})

    def update_leg(self, leg_id: str, **values: Any) -> None:
        self._update("legs", "leg_id", leg_id, values)

    async def legs(self, session_uuid: str) -> list[dict[str, Any]]:
        return await self._all('SELECT * FROM legs WHERE session_uuid = $1 ORDER BY created_at, leg_id COLLATE "C"',
                               session_uuid)

    # -- recordings ---------------------------------------------------------------------

    def create_recording(self, **values: Any) -> None:
        self._insert("recordings", values)

    def update_recording(self, recording_id: str, **values: Any) -> None:
        self._update("recordings", "id", recording_id, values)

    async def recording(self, recording_id: str) -> dict[str, Any] | None:
        return await self._one("SELECT * FROM recordings WHERE id = $1", recording_id)

    async def recordings(self, app_id: str, *, session_uuid: str | None = None, since: float | None = None,
                         until: float | None = None, state: str | None = None, limit: int = 50,
                         offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        condition = (Filter().add("app_id = {}", app_id).add("session_uuid = {}", session_uuid)
                     .add("created_at >= {}", since).add("created_at < {}", until).add("state = {}", state))
        return await self._page("recordings", condition, 'created_at DESC, id COLLATE "C"', limit, offset)

    async def recordings_in(self, states: Iterable[str], node_id: str | None = None) -> list[dict[str, Any]]:
        """Recordings in one of `states` (of the sessions `node_id` holds, when given)."""
        if node_id is None:
            return await self._all("SELECT * FROM recordings WHERE state = ANY($1::text[]) ORDER BY created_at",
                                   list(states))
        return await self._all("SELECT r.* FROM recordings r JOIN sessions s ON s.uuid = r.session_uuid "
                               "WHERE r.state = ANY($1::text[]) AND s.node_id = $2 ORDER BY r.created_at",
                               list(states), node_id)

    async def expired_recordings(self, now: float, limit: int = 100) -> list[dict[str, Any]]:
        return await self._all("SELECT * FROM recordings WHERE state = 'completed' AND expires_at IS NOT NULL "
                               "AND expires_at <= $1 LIMIT $2", now, limit)

    async def count_recordings_by_state(self) -> dict[str, int]:
        rows = await self._read(lambda conn: conn.fetch("SELECT state, COUNT(*) FROM recordings GROUP BY state"))
        return {row[0]: row[1] for row in rows}

    # -- command idempotency ------------------------------------------------------------

    async def command(self, session_uuid: str, command_uid: str) -> dict[str, Any] | None:
        row = await self._one("SELECT * FROM commands WHERE session_uuid = $1 AND command_uid = $2",
                              session_uuid, command_uid)
        if row is not None:
            row["response"] = json.loads(row["response"])
        return row

    def put_command(self, session_uuid: str, command_uid: str, command: str, status: int,
                    response: dict[str, Any], created_at: float) -> None:
        self._write("INSERT INTO commands (session_uuid, command_uid, command, status, response, created_at) "
                    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                    session_uuid, command_uid, command, status, json.dumps(response), created_at)

    # -- webhook outbox -----------------------------------------------------------------

    def enqueue(self, event_id: str, app_id: str, url: str, kind: str, body: bytes, created_at: float,
                signed: bool = True) -> None:
        self._write("INSERT INTO outbox (event_id, app_id, url, kind, body, signed, created_at, next_attempt_at) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $7) ON CONFLICT DO NOTHING",
                    event_id, app_id, url, kind, bytes(body), int(signed), created_at)

    async def due(self, now: float, limit: int = 50) -> list[OutboxItem]:
        """Claim up to `limit` due events for this node for `lease_s` and return them.

        Rows another node is claiming at this moment are skipped, not waited for; rows
        claimed by a node whose lease has run out (it died) are claimed again. A claim
        whose answer was lost to a broken connection holds until its lease ends.
        """
        rows = await self._read(lambda conn: conn.fetch(
            f"UPDATE outbox SET claimed_by = $1, claimed_until = $2::float8 + $3::float8 WHERE seq IN ("
            f"SELECT seq FROM outbox WHERE {OPEN} AND next_attempt_at <= $2 "
            "AND (claimed_until IS NULL OR claimed_until < $2) "
            f"ORDER BY next_attempt_at, seq LIMIT $4 FOR UPDATE SKIP LOCKED) RETURNING {DUE_COLUMNS}",
            self.node_id, now, self.lease_s, limit))
        rows = sorted(rows, key=lambda r: (r["next_attempt_at"], r["seq"]))
        return [OutboxItem(r["seq"], r["event_id"], r["app_id"], r["url"], r["kind"], bytes(r["body"]),
                           bool(r["signed"]), r["created_at"], r["attempts"]) for r in rows]

    async def next_due_at(self) -> float | None:
        """When the next open event can be claimed: its next attempt, or the end of another
        node's lease on it."""
        return await self._value(
            f"SELECT MIN(GREATEST(next_attempt_at, COALESCE(claimed_until, next_attempt_at))) FROM outbox WHERE {OPEN}")

    def delivered(self, seq: int, now: float) -> None:
        # Guarded: if a lease ran out and another node delivered too, count the delivery once.
        self._write("UPDATE outbox SET delivered_at = $1, attempts = attempts + 1, last_error = NULL, "
                    f"claimed_by = NULL, claimed_until = NULL WHERE seq = $2 AND {OPEN}", now, seq)

    def retry_later(self, seq: int, next_attempt_at: float, error: str) -> None:
        # Ignored if another node has claimed the event since: it is that node's to settle.
        self._write("UPDATE outbox SET next_attempt_at = $1, attempts = attempts + 1, last_error = $2, "
                    f"claimed_by = NULL, claimed_until = NULL WHERE seq = $3 AND {OPEN} "
                    "AND (claimed_by IS NULL OR claimed_by = $4)", next_attempt_at, error[:500], seq, self.node_id)

    def abandon(self, seq: int, now: float, error: str) -> None:
        self._write("UPDATE outbox SET abandoned_at = $1, attempts = attempts + 1, last_error = $2, "
                    f"claimed_by = NULL, claimed_until = NULL WHERE seq = $3 AND {OPEN}", now, error[:500], seq)

    async def outbox_backlog(self) -> int:
        return await self._value(f"SELECT COUNT(*) FROM outbox WHERE {OPEN}")

    async def outbox_items(self, app_id: str | None = None) -> list[dict[str, Any]]:
        rows = await self._all(f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE $1::text IS NULL OR app_id = $1 ORDER BY seq",
                               app_id)
        for row in rows:
            row["body"] = bytes(row["body"])
        return rows

    # -- the cluster ----------------------------------------------------------------------

    def heartbeat(self, node_id: str, node_url: str, now: float) -> None:
        """Record that `node_id` (reachable at `node_url`) is alive at `now`.

        `started_at` is the time of this catalog's first heartbeat for the node, so a node
        that restarts shows its new start.
        """
        started_at = self._started_at.setdefault(node_id, now)
        self._write("INSERT INTO nodes (node_id, node_url, started_at, heartbeat_at) VALUES ($1, $2, $3, $4) "
                    "ON CONFLICT (node_id) DO UPDATE SET node_url = EXCLUDED.node_url, "
                    "started_at = EXCLUDED.started_at, heartbeat_at = EXCLUDED.heartbeat_at",
                    node_id, node_url, started_at, now)

    async def nodes(self) -> list[dict[str, Any]]:
        return await self._all("SELECT node_id, node_url, started_at, heartbeat_at FROM nodes ORDER BY node_id")

    async def node(self, node_id: str) -> dict[str, Any] | None:
        return await self._one("SELECT node_id, node_url, started_at, heartbeat_at FROM nodes WHERE node_id = $1", node_id)

    async def try_lead(self, name: str) -> bool:
        """True if this node is (now) the one that does the once-per-cluster job `name`.

        The lock is a session advisory lock on a connection kept for the catalog's life:
        PostgreSQL releases it when this node dies or its connection breaks, and another
        node's next call takes it. False, not an error, while PostgreSQL cannot be reached.
        """
        if self._closed:
            return False
        async with self._lead_lock:
            for attempt in range(2):  # a connection found broken is replaced once
                self._stats["reads" if attempt == 0 else "retries"] += 1
                try:
                    async with asyncio.timeout(self.read_timeout_s):
                        return await self._lead(name)
                except Exception as exc:
                    if not _transient(exc):
                        raise
                    await _close_connection(self._lead_conn)
                    self._lead_conn = None
            return False

    async def _lead(self, name: str) -> bool:
        if self._lead_conn is None or self._lead_conn.is_closed():
            self._leading.clear()  # locks die with their session
            self._lead_conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout_s)
        if name in self._leading:
            await self._lead_conn.fetchval("SELECT 1")  # the session, and so the lock, is still there
            return True
        if await self._lead_conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key(f"mediaserver.lead:{name}")):
            self._leading.add(name)
            return True
        return False


async def migrate(conn: asyncpg.Connection) -> int:
    """Bring the schema up to date in one transaction; returns its version.

    The transaction-scoped advisory lock makes nodes that start together take turns: the
    second finds the schema current and does nothing.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version "
                           "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
        current = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        if current > len(MIGRATIONS):
            raise ConfigError(f"postgres_dsn: the catalog's schema is version {current}, newer than this "
                              f"server's {len(MIGRATIONS)}: upgrade the server")
        for version in range(current + 1, len(MIGRATIONS) + 1):
            await conn.execute(MIGRATIONS[version - 1])
            await conn.execute("INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)", version, time.time())
            log.info("catalog: schema migrated to version %d", version)
    return len(MIGRATIONS)


async def _close_connection(conn: asyncpg.Connection | None) -> None:
    """Close politely if PostgreSQL answers within a second, else drop the socket."""
    if conn is None or conn.is_closed():
        return
    try:
        await conn.close(timeout=1.0)
    except (*TRANSIENT, asyncpg.PostgresError):
        conn.terminate()
