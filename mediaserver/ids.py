"""Identifiers handed out by the server."""

from __future__ import annotations

import re
import uuid

COMMAND_UID = re.compile(r"^[a-zA-Z0-9._-]{1,128}$")


def session_uuid() -> str:
    return str(uuid.uuid4())


def recording_id() -> str:
    return "rec_" + uuid.uuid4().hex


def leg_id() -> str:
    return "leg_" + uuid.uuid4().hex[:16]


def is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False
