"""A real S3 server for tests: SeaweedFS `weed mini` on free loopback ports.

    with S3Server(tmp_path) as s3:          # fresh data dir, identities file, ready to sign
        bucket = s3.create_bucket()
        storage = S3Storage(s3.config(bucket, data_dir=tmp_path).s3())
        s3.stop(); ...; s3.start()          # an outage: same ports, same data
        s3.kill(); ...; s3.start()          # a crash: SIGKILL, then the same again

`tests/conftest.py` offers it as fixtures: `s3_server` (one per test session, shared),
`s3_bucket` (a fresh bucket on it per test) and `s3_own_server` (one per test, for tests
that stop it).
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from mediaserver.config import Config
from mediaserver.tools.seaweedfs import REGION, Credentials, WeedMini, free_ports, write_identities


class S3Server:
    """One SeaweedFS S3 endpoint with its own data directory and credentials.

    `credentials` may do anything; `readonly` may only read and list (to provoke AccessDenied).
    """

    def __init__(self, root: Path, *, access_key: str = "AKTESTMEDIASERVER",
                 secret_key: str = "test-secret-key") -> None:
        self.credentials = Credentials(access_key, secret_key)
        self.readonly = Credentials("AKTESTREADONLY", "test-readonly-key")
        self.region = REGION
        self._weed = WeedMini(root / "seaweedfs", self.credentials, free_ports())
        write_identities(self._weed.identities, self.credentials, self.readonly)

    @property
    def endpoint(self) -> str:
        return self._weed.endpoint

    @property
    def running(self) -> bool:
        return self._weed.running

    def start(self, timeout: float = 30.0) -> None:
        """Start (or start again, on the same ports and data) and wait for a signed ListBuckets."""
        self._weed.start(timeout)

    def stop(self, timeout: float = 6.0) -> None:
        """SIGTERM; SIGKILL after `timeout` seconds. The data stays for the next start()."""
        self._weed.stop(timeout)

    def kill(self) -> None:
        """SIGKILL (an outage with no goodbye); the data stays for the next start()."""
        self._weed.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self._weed.create_bucket(name)
        return name

    def client(self, **config: Any) -> Any:
        """A synchronous botocore client for assertions; close() it after use."""
        return self._weed.client(**config)

    def config(self, bucket: str, **overrides: Any) -> Config:
        """A server configuration that stores recordings in `bucket` here (`storage = s3`)."""
        settings = {"storage": "s3", "s3_endpoint": self.endpoint, "s3_bucket": bucket, "s3_region": self.region,
                    "s3_access_key": self.credentials.access_key, "s3_secret_key": self.credentials.secret_key}
        return Config(**{**settings, **overrides})

    def log_tail(self, lines: int = 30) -> str:
        return self._weed.log_tail(lines)

    def part_chunks(self, bucket: str, upload_id: str) -> dict[int, frozenset[str]]:
        """Part number -> the file ids of the stored chunks of each part of an open
        multipart upload, as SeaweedFS's filer holds them. A part uploaded again gets new
        chunks; a completed object is made of its parts' chunks, not of copies."""
        listing = self._filer(f"/buckets/{bucket}/.uploads/{upload_id}/")
        parts: dict[int, frozenset[str]] = {}
        for entry in listing.get("Entries") or []:
            name = entry["FullPath"].rsplit("/", 1)[1]  # 0001_<uuid>.part
            number = int(name.split("_", 1)[0])
            assert number not in parts, f"part {number} is stored twice: {sorted(parts)}"
            parts[number] = frozenset(chunk["file_id"] for chunk in entry.get("chunks") or [])
        return parts

    def object_chunks(self, bucket: str, key: str) -> frozenset[str]:
        """The file ids of the chunks a stored object is made of."""
        entry = self._filer(f"/buckets/{bucket}/{key}?metadata=true")
        return frozenset(chunk["file_id"] for chunk in entry.get("chunks") or [])

    def _filer(self, path: str) -> dict[str, Any]:
        request = urllib.request.Request(f"http://127.0.0.1:{self._weed.ports['filer']}{path}",
                                         headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def __enter__(self) -> "S3Server":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
