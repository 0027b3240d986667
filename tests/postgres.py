"""A real PostgreSQL for tests (see mediaserver/tools/postgres.py), and fresh databases on it.

    from postgres import fresh_database

    async def test_x(postgres_server):
        catalog = PostgresCatalog(fresh_database(postgres_server), "node-a")

The fixtures (in conftest.py): `postgres_server` is one server per test module (give each
test its own database with `fresh_database`); `postgres_own_server` is one per test, for
tests that stop or restart it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from mediaserver.tools.postgres import LocalPostgres


def fresh_database(server: LocalPostgres) -> str:
    """CREATE a new, empty database on `server` and return its DSN."""
    return server.create_database(f"test_{uuid.uuid4().hex[:16]}")


def started() -> Iterator[LocalPostgres]:
    """A started PostgreSQL, stopped and removed when the generator is closed."""
    server = LocalPostgres()  # start() says what to install if PostgreSQL is missing
    try:
        server.start()
        yield server
    finally:
        server.close()
