"""What the engine announces, and the payloads it announces it with (DESIGN.md's webhooks).

Every announcement goes into the durable outbox, which signs and delivers it; this module
only decides what each event says. A recording's `action_url` also gets the Record-verb
fields the platforms our users come from post there.
"""

from __future__ import annotations

from typing import Any

from mediaserver.webhooks import Outbox


class Announcer:
    """Session and recording events of every app, into `outbox`.

    `base_url` is where this server's API is reached; `recording_base_url`, when set, is
    where stored objects are served from instead of the download route.
    """

    def __init__(self, outbox: Outbox, base_url: str, recording_base_url: str = "") -> None:
        self.outbox = outbox
        self.base_url = base_url.rstrip("/")
        self.recording_base_url = recording_base_url.rstrip("/")

    def session_started(self, app_id: str, uuid: str, source: str) -> None:
        self.outbox.emit(app_id, "session.started", {"session_uuid": uuid, "source": source})

    def session_ended(self, app_id: str, uuid: str) -> None:
        self.outbox.emit(app_id, "session.ended", {"session_uuid": uuid})

    def recording(self, app_id: str, kind: str, recording_id: str, session_uuid: str, command_uid: str | None,
                  **extra: Any) -> None:
        """recording.started, paused, resumed or stopped (with its termination reason)."""
        payload = {"recording_id": recording_id, "session_uuid": session_uuid, "command_uid": command_uid, **extra}
        self.outbox.emit(app_id, kind, payload)

    def failed(self, row: dict[str, Any], reason: str) -> None:
        """The recording in `row` can never be stored."""
        self.outbox.emit(row["app_id"], "recording.failed", {"recording_id": row["id"], "session_uuid": row["session_uuid"],
                                                             "reason": reason, "command_uid": row["command_uid"]})

    def recording_url(self, row: dict[str, Any]) -> str:
        if self.recording_base_url:
            return f"{self.recording_base_url}/{row['storage_key']}"
        return f"{self.base_url}/api/v1/recordings/{row['id']}/download"

    def completed(self, row: dict[str, Any]) -> None:
        """recording.completed for the stored recording in `row`, to the app's webhook and
        to the recording's `action_url` if it has one."""
        payload = {
            "recording_id": row["id"],
            "session_uuid": row["session_uuid"],
            "recording_url": self.recording_url(row),
            "duration": row["duration"],
            "file_size": row["file_size"],
            "format": row["format"],
            "checksum": {"algorithm": "sha256", "value": row["sha256"]},
            "command_uid": row["command_uid"],
            "termination_reason": row["termination_reason"],
            "finish_key": row["finish_key"],
            # legs that never carried media, and why (ice_failed, dtls_failed, no_media)
            "failed_legs": [{"leg_id": leg["leg_id"], "role": leg["role"], "error": leg["error"]}
                            for leg in row["legs"] or [] if leg.get("error")],
        }
        self.outbox.emit(row["app_id"], "recording.completed", payload)
        action_url = row["options"].get("action_url")
        if action_url:
            record_verb = {
                "RecordingUrl": payload["recording_url"],
                "RecordingDuration": round(row["duration"] or 0),
                "RecordingSid": row["id"],
                "CallId": row["session_uuid"],
                "RecordingStatus": "completed",
                "Digits": row["finish_key"] or "",
            }
            self.outbox.emit(row["app_id"], "recording.completed", payload, url=action_url, extra=record_verb)
