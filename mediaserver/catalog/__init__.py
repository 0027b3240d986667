"""The catalog: sessions, recordings, command idempotency, the webhook outbox and the node
registry.

Two backends with one interface: `SqliteCatalog`, one file in WAL mode in `data_dir` (a
single node, the default), and `PostgresCatalog`, one PostgreSQL shared by the nodes of a
cluster. Reads are awaited; writes are made at once and applied in order (immediately in
SQLite; by one writer task in PostgreSQL, which waits out an outage while recording goes
on). Every state change is written before it is announced, so a server restarted after a
crash finds every recording it had and every webhook it still owed.
"""

from mediaserver.catalog.postgres import PostgresCatalog
from mediaserver.catalog.store import OutboxItem, SqliteCatalog

Catalog = SqliteCatalog | PostgresCatalog

__all__ = ["Catalog", "OutboxItem", "PostgresCatalog", "SqliteCatalog"]
