"""RTP ingest (RFC 3550): packets, RFC 4733 events, timestamp mapping, UDP endpoints."""
