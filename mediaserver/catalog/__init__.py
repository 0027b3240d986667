"""The catalog: sessions, recordings, command idempotency and the webhook outbox in SQLite.

One file in WAL mode. Every state change is written before it is announced, so a server
restarted after a crash finds every recording it had and every webhook it still owed.
"""

from mediaserver.catalog.store import Catalog, OutboxItem

__all__ = ["Catalog", "OutboxItem"]
