"""SQLite storage of the catalog (see the package docstring)."""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    uuid TEXT PRIMARY KEY,
    app_id TEXT NOT NULL,
    source TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    ended_at REAL,
    meta TEXT NOT NULL DEFAULT '{}',
    node_id TEXT
);
CREATE INDEX IF NOT EXISTS sessions_app ON sessions (app_id, created_at);
CREATE TABLE IF NOT EXISTS legs (
    leg_id TEXT PRIMARY KEY,
    session_uuid TEXT NOT NULL,
    role TEXT NOT NULL,
    kind TEXT NOT NULL,
    created_at REAL NOT NULL,
    ended_at REAL,
    stats TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS legs_session ON legs (session_uuid);
CREATE TABLE IF NOT EXISTS recordings (
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
    duration REAL,
    file_size INTEGER,
    sha256 TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    stopped_at REAL,
    completed_at REAL,
    deleted_at REAL,
    expires_at REAL,
    termination_reason TEXT,
    finish_key TEXT,
    command_uid TEXT,
    legs TEXT NOT NULL DEFAULT '{}',
    error TEXT
);
CREATE INDEX IF NOT EXISTS recordings_app ON recordings (app_id, created_at);
CREATE INDEX IF NOT EXISTS recordings_session ON recordings (session_uuid);
CREATE INDEX IF NOT EXISTS recordings_state ON recordings (state);
CREATE TABLE IF NOT EXISTS commands (
    session_uuid TEXT NOT NULL,
    command_uid TEXT NOT NULL,
    command TEXT NOT NULL,
    status INTEGER NOT NULL,
    response TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (session_uuid, command_uid)
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    app_id TEXT NOT NULL,
    url TEXT NOT NULL,
    kind TEXT NOT NULL,
    body BLOB NOT NULL,
    signed INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    delivered_at REAL,
    abandoned_at REAL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (delivered_at, abandoned_at, next_attempt_at);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    node_url TEXT NOT NULL,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);
"""
# Changes to a catalog written by an earlier version, by the `PRAGMA user_version` they lead to.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, "ALTER TABLE sessions ADD COLUMN node_id TEXT"),
)

_JSON_COLUMNS = {"meta", "options", "legs", "stats"}
RECORDING_COLUMNS = (
    "id", "session_uuid", "app_id", "state", "format", "sample_rate", "channels", "bitrate", "options",
    "content_type", "storage_key", "spool_path", "duration", "file_size", "sha256", "created_at",
    "started_at", "stopped_at", "completed_at", "deleted_at", "expires_at", "termination_reason",
    "finish_key", "command_uid", "legs", "error",
)


@dataclass(frozen=True, slots=True)
class OutboxItem:
    seq: int
    event_id: str
    app_id: str
    url: str
    kind: str
    body: bytes
    signed: bool
    created_at: float
    attempts: int


def _decode(row: sqlite3.Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    data = dict(row)
    for name in _JSON_COLUMNS & data.keys():
        data[name] = json.loads(data[name])
    return data


def _encode(value: Any, name: str) -> Any:
    return json.dumps(value, separators=(",", ":")) if name in _JSON_COLUMNS else value


class SqliteCatalog:
    """A thread-safe handle on the catalog database."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def _migrate(self) -> None:
        """Create the schema, or bring a catalog of an earlier version up to this one."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        fresh = self._db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'sessions'").fetchone()[0] == 0
        if fresh:
            self._db.executescript(SCHEMA)
        else:
            for target, sql in MIGRATIONS:
                if version < target:
                    self._db.execute(sql)
            self._db.executescript(SCHEMA)  # tables added since, if any
        self._db.execute(f"PRAGMA user_version = {MIGRATIONS[-1][0]}")

    # -- lifecycle: the same calls as the PostgreSQL catalog's -------------------------

    async def start(self) -> None:
        """Nothing to connect to: the file was opened and migrated by the constructor."""

    async def flush(self, timeout: float | None = None) -> None:
        """Writes are applied as they are made."""

    @property
    def writes_pending(self) -> int:
        return 0

    async def try_lead(self, name: str) -> bool:
        """A single node leads every once-per-cluster job."""
        return True

    async def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, tuple(params))

    def _one(self, sql: str, params: Iterable[Any] = ()) -> dict[str, Any] | None:
        with self._lock:
            return _decode(self._db.execute(sql, tuple(params)).fetchone())

    def _all(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [_decode(row) for row in self._db.execute(sql, tuple(params)).fetchall()]

    def _insert(self, table: str, values: dict[str, Any]) -> None:
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        self._run(f"INSERT INTO {table} ({names}) VALUES ({marks})", (_encode(v, k) for k, v in values.items()))

    def _update(self, table: str, key: str, ident: str, values: dict[str, Any]) -> None:
        if values:
            sets = ", ".join(f"{name} = ?" for name in values)
            params = [_encode(v, k) for k, v in values.items()] + [ident]
            self._run(f"UPDATE {table} SET {sets} WHERE {key} = ?", params)

    # -- sessions and legs --------------------------------------------------------------

    def create_session(self, uuid: str, app_id: str, source: str, created_at: float, meta: dict[str, Any] | None = None,
                       node_id: str | None = None) -> None:
        self._insert("sessions", {"uuid": uuid, "app_id": app_id, "source": source, "state": "active", "created_at": created_at,
                                  "meta": meta or {}, "node_id": node_id})

    def update_session(self, uuid: str, **values: Any) -> None:
        self._update("sessions", "uuid", uuid, values)

    async def session(self, uuid: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM sessions WHERE uuid = ?", (uuid,))

    async def sessions(self, app_id: str, state: str | None, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        where, params = "app_id = ?", [app_id]
        if state:
            where, params = where + " AND state = ?", params + [state]
        total = self._run(f"SELECT COUNT(*) FROM sessions WHERE {where}", params).fetchone()[0]
        rows = self._all(f"SELECT * FROM sessions WHERE {where} ORDER BY created_at DESC, uuid LIMIT ? OFFSET ?", params + [limit, offset])
        return rows, total

    async def active_sessions(self, node_id: str | None = None) -> list[dict[str, Any]]:
        """Sessions not ended (of `node_id` only, when given)."""
        if node_id is None:
            return self._all("SELECT * FROM sessions WHERE state = 'active'")
        return self._all("SELECT * FROM sessions WHERE state = 'active' AND node_id = ?", (node_id,))

    async def claim_sessions(self, from_node: str, to_node: str) -> list[dict[str, Any]]:
        """Move the active sessions of `from_node` to `to_node` at once; answers those moved
        (none when another node took them first)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = [_decode(r) for r in self._db.execute(
                    "SELECT * FROM sessions WHERE state = 'active' AND node_id = ?", (from_node,)).fetchall()]
                self._db.execute("UPDATE sessions SET node_id = ? WHERE state = 'active' AND node_id = ?", (to_node, from_node))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        for row in rows:
            row["node_id"] = to_node
        return rows

    def add_leg(self, leg_id: str, session_uuid: str, role: str, kind: str, created_at: float) -> None:
        self._insert("legs", {"leg_id": leg_id, "session_uuid": session_uuid, "role": role, "kind": kind, "created_at": created_at})

    def update_leg(self, leg_id: str, **values: Any) -> None:
        self._update("legs", "leg_id", leg_id, values)

    async def legs(self, session_uuid: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM legs WHERE session_uuid = ? ORDER BY created_at, leg_id", (session_uuid,))

    # -- recordings ---------------------------------------------------------------------

    def create_recording(self, **values: Any) -> None:
        self._insert("recordings", values)

    def update_recording(self, recording_id: str, **values: Any) -> None:
        self._update("recordings", "id", recording_id, values)

    async def recording(self, recording_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM recordings WHERE id = ?", (recording_id,))

    async def recordings(self, app_id: str, *, session_uuid: str | None = None, since: float | None = None,
                   until: float | None = None, state: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        where, params = ["app_id = ?"], [app_id]
        for clause, value in (("session_uuid = ?", session_uuid), ("created_at >= ?", since), ("created_at < ?", until), ("state = ?", state)):
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = " AND ".join(where)
        total = self._run(f"SELECT COUNT(*) FROM recordings WHERE {sql}", params).fetchone()[0]
        rows = self._all(f"SELECT * FROM recordings WHERE {sql} ORDER BY created_at DESC, id LIMIT ? OFFSET ?", params + [limit, offset])
        return rows, total

    async def recordings_in(self, states: Iterable[str], node_id: str | None = None) -> list[dict[str, Any]]:
        """Recordings in one of `states` (of the sessions `node_id` holds, when given)."""
        states = tuple(states)
        marks = ", ".join("?" for _ in states)
        if node_id is None:
            return self._all(f"SELECT * FROM recordings WHERE state IN ({marks}) ORDER BY created_at", states)
        return self._all(f"SELECT r.* FROM recordings r JOIN sessions s ON s.uuid = r.session_uuid "
                         f"WHERE r.state IN ({marks}) AND s.node_id = ? ORDER BY r.created_at", states + (node_id,))

    async def expired_recordings(self, now: float, limit: int = 100) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM recordings WHERE state = 'completed' AND expires_at IS NOT NULL AND expires_at <= ? LIMIT ?", (now, limit))

    async def count_recordings_by_state(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT state, COUNT(*) FROM recordings GROUP BY state").fetchall())

    # -- command idempotency ------------------------------------------------------------

    async def command(self, session_uuid: str, command_uid: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM commands WHERE session_uuid = ? AND command_uid = ?", (session_uuid, command_uid))
        if row is not None:
            row["response"] = json.loads(row["response"])
        return row

    def put_command(self, session_uuid: str, command_uid: str, command: str, status: int, response: dict[str, Any], created_at: float) -> None:
        self._insert("commands", {"session_uuid": session_uuid, "command_uid": command_uid, "command": command,
                                  "status": status, "response": json.dumps(response), "created_at": created_at})

    # -- webhook outbox -----------------------------------------------------------------

    def enqueue(self, event_id: str, app_id: str, url: str, kind: str, body: bytes, created_at: float, signed: bool = True) -> None:
        self._insert("outbox", {"event_id": event_id, "app_id": app_id, "url": url, "kind": kind, "body": body,
                                "signed": int(signed), "created_at": created_at, "next_attempt_at": created_at})

    async def due(self, now: float, limit: int = 50) -> list[OutboxItem]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, event_id, app_id, url, kind, body, signed, created_at, attempts FROM outbox "
                "WHERE delivered_at IS NULL AND abandoned_at IS NULL AND next_attempt_at <= ? "
                "ORDER BY next_attempt_at, seq LIMIT ?", (now, limit)).fetchall()
        return [OutboxItem(r[0], r[1], r[2], r[3], r[4], bytes(r[5]), bool(r[6]), r[7], r[8]) for r in rows]

    async def next_due_at(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(next_attempt_at) FROM outbox WHERE delivered_at IS NULL AND abandoned_at IS NULL").fetchone()
        return row[0]

    def delivered(self, seq: int, now: float) -> None:
        self._run("UPDATE outbox SET delivered_at = ?, attempts = attempts + 1, last_error = NULL WHERE seq = ?", (now, seq))

    def retry_later(self, seq: int, next_attempt_at: float, error: str) -> None:
        self._run("UPDATE outbox SET next_attempt_at = ?, attempts = attempts + 1, last_error = ? WHERE seq = ?", (next_attempt_at, error[:500], seq))

    def abandon(self, seq: int, now: float, error: str) -> None:
        self._run("UPDATE outbox SET abandoned_at = ?, attempts = attempts + 1, last_error = ? WHERE seq = ?", (now, error[:500], seq))

    async def outbox_backlog(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL AND abandoned_at IS NULL").fetchone()[0]

    async def outbox_items(self, app_id: str | None = None) -> list[dict[str, Any]]:
        if app_id is None:
            return self._all("SELECT * FROM outbox ORDER BY seq")
        return self._all("SELECT * FROM outbox WHERE app_id = ? ORDER BY seq", (app_id,))

    # -- node registry ------------------------------------------------------------------

    def heartbeat(self, node_id: str, node_url: str, now: float) -> None:
        self._run("INSERT INTO nodes (node_id, node_url, started_at, heartbeat_at) VALUES (?, ?, ?, ?) "
                  "ON CONFLICT (node_id) DO UPDATE SET node_url = excluded.node_url, heartbeat_at = excluded.heartbeat_at",
                  (node_id, node_url, now, now))

    async def nodes(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM nodes ORDER BY node_id")

    async def node(self, node_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM nodes WHERE node_id = ?", (node_id,))
