"""The upload journal: what a multipart upload has sent, kept on local disk.

One JSON file per upload under `data_dir/journal/`, rewritten after every part by
write-to-temp, fsync, rename, so a crash leaves either the old or the new record, never
half of one. A restarted server reads it to finish the upload instead of starting over,
and to tell its own unfinished uploads from orphans left in the bucket.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

VERSION = 1


@dataclass(frozen=True, slots=True)
class PartRecord:
    """One part as sent: where it lies in the spool and what its bytes were."""

    number: int
    offset: int
    size: int
    md5: str  # hex digest of the bytes sent, to notice a later patch of the spool
    etag: str


@dataclass(slots=True)
class UploadRecord:
    """A multipart upload in progress and its parts, keyed by part number."""

    key: str
    upload_id: str
    spool: str
    content_type: str
    part_size: int
    parts: dict[int, PartRecord] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["parts"] = [asdict(part) for _, part in sorted(self.parts.items())]
        return json.dumps({"version": VERSION, **data}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "UploadRecord":
        data = json.loads(text)
        if data.pop("version", None) != VERSION:
            raise ValueError("unknown journal version")
        parts = {part["number"]: PartRecord(**part) for part in data.pop("parts")}
        return cls(**data, parts=parts)


class Journal:
    """The directory of upload records; every method is blocking file I/O (call it off the loop)."""

    def __init__(self, root: Path, prefix: str = "s3-") -> None:
        self.root = root
        self._prefix = prefix

    def path(self, key: str) -> Path:
        # Keys hold slashes and may be long: name the file by a digest; the key is inside.
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.root / f"{self._prefix}{digest}.json"

    def load(self, key: str) -> UploadRecord | None:
        """The record for `key`, or None when there is none (or it cannot be read)."""
        record = self._read(self.path(key))
        return record if record is not None and record.key == key else None

    def save(self, record: UploadRecord) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(record.key)
        tmp = target.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            fh.write(record.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(self.root)

    def remove(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def records(self) -> list[UploadRecord]:
        """Every readable record in the directory."""
        if not self.root.is_dir():
            return []
        found = (self._read(path) for path in sorted(self.root.glob(f"{self._prefix}*.json")))
        return [record for record in found if record is not None]

    def _read(self, path: Path) -> UploadRecord | None:
        try:
            return UploadRecord.from_json(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            # An unreadable record only costs re-sending the spool; it must not stop the server.
            log.warning("ignoring unreadable upload journal %s: %s", path, exc)
            return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
