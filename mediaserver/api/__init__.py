"""The HTTP side: the REST API, WebSocket and WHIP ingest, signed files, operations."""
