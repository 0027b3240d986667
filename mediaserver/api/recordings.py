"""Recordings: metadata, listing, download and stream URLs, deletion, signed local files,
and the aliases that clients written against other platforms call."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from aiohttp import web

from mediaserver.api.common import iso, json_response, page, paging, parse_time
from mediaserver.api.keys import CALLER, CATALOG, CLOCK, ENGINE, STORAGE
from mediaserver.errors import Conflict, Forbidden, Gone, Invalid, NotFound, StorageError, Unavailable
from mediaserver.storage.local import LocalStorage

DOWNLOAD_TTL_S = 15 * 60
STREAM_TTL_S = 60 * 60
PENDING_STATES = ("initiated", "recording", "paused", "stopped", "processing")
STATES = PENDING_STATES + ("completed", "failed", "expired", "deleted")


def recording_view(request: web.Request, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "recording_id": row["id"],
        "session_uuid": row["session_uuid"],
        "app_id": row["app_id"],
        "state": row["state"],
        "format": row["format"],
        "content_type": row["content_type"],
        "sample_rate": row["sample_rate"],
        "channels": row["channels"],
        "bitrate": row["bitrate"],
        "duration": row["duration"],
        "file_size": row["file_size"],
        "checksum": {"algorithm": "sha256", "value": row["sha256"]} if row["sha256"] else None,
        "created_at": iso(row["created_at"]),
        "started_at": iso(row["started_at"]),
        "stopped_at": iso(row["stopped_at"]),
        "completed_at": iso(row["completed_at"]),
        "expires_at": iso(row["expires_at"]),
        "deleted_at": iso(row["deleted_at"]),
        "termination_reason": row["termination_reason"],
        "finish_key": row["finish_key"],
        "command_uid": row["command_uid"],
        "options": row["options"],
        "legs": row["legs"] or [],
        "error": row["error"],
        "recording_url": request.app[ENGINE].recording_url(row),
    }


async def own_recording(request: web.Request, recording_id: str) -> dict[str, Any]:
    row = await request.app[CATALOG].recording(recording_id)
    if row is None:
        raise NotFound("recordings.not_found", f"no recording {recording_id}")
    if row["app_id"] != request[CALLER].id:
        raise Forbidden("auth.forbidden", "this recording belongs to another app")
    return row


def _filename(row: dict[str, Any]) -> str:
    return row["storage_key"].rsplit("/", 1)[-1]


def _ready(row: dict[str, Any]) -> web.Response | None:
    """None when the file can be fetched; else the answer that says why not."""
    state = row["state"]
    if state == "completed":
        return None
    if state in PENDING_STATES:
        retry = 5 if state == "processing" else 10
        return json_response({"status": "pending", "state": state, "retry_after_seconds": retry}, status=202, headers={"Retry-After": str(retry)})
    if state in ("expired", "deleted"):
        raise Gone(f"recordings.{state}", f"recording {row['id']} is {state}: past retention or deleted")
    raise Conflict("recordings.failed", f"recording {row['id']} failed and has no file: {row['error']}")


async def _presigned(request: web.Request, row: dict[str, Any], ttl: int) -> str:
    try:
        return await request.app[STORAGE].presign(row["storage_key"], ttl, _filename(row), row["content_type"])
    except StorageError as exc:
        raise Unavailable("storage.unavailable", str(exc)) from None


async def list_recordings(request: web.Request) -> web.Response:
    limit, offset = paging(request)
    state = request.query.get("state") or None
    if state is not None and state not in STATES:
        raise Invalid("request.invalid_query", f"state must be one of {', '.join(STATES)}")
    rows, total = await request.app[CATALOG].recordings(
        request[CALLER].id, session_uuid=request.query.get("session_id") or None,
        since=parse_time("since", request.query.get("since")), until=parse_time("until", request.query.get("until")),
        state=state, limit=limit, offset=offset)
    return json_response(page([recording_view(request, row) for row in rows], total, limit, offset))


async def get_recording(request: web.Request) -> web.Response:
    return json_response(recording_view(request, await own_recording(request, request.match_info["id"])))


async def download(request: web.Request) -> web.Response:
    return await _download(request, await own_recording(request, request.match_info["id"]))


async def _download(request: web.Request, row: dict[str, Any]) -> web.Response:
    pending = _ready(row)
    if pending is not None:
        return pending
    raise web.HTTPFound(await _presigned(request, row, DOWNLOAD_TTL_S), headers={"Cache-Control": "no-store"})


async def stream(request: web.Request) -> web.Response:
    return await _stream(request, await own_recording(request, request.match_info["id"]))


async def _stream(request: web.Request, row: dict[str, Any]) -> web.Response:
    pending = _ready(row)
    if pending is not None:
        return pending
    url = await _presigned(request, row, STREAM_TTL_S)
    return json_response({"success": True, "data": {"url": url, "expires_in": STREAM_TTL_S, "content_type": row["content_type"], "filename": _filename(row)}})


async def delete_recording(request: web.Request) -> web.Response:
    row = await own_recording(request, request.match_info["id"])
    if row["state"] in PENDING_STATES:
        raise Conflict("recordings.active", f"recording {row['id']} is {row['state']}: stop it and wait until it is stored")
    if row["state"] == "deleted":
        raise Gone("recordings.deleted", f"recording {row['id']} is already deleted")
    if row["state"] in ("completed", "expired"):
        try:
            await request.app[STORAGE].delete(row["storage_key"])
        except StorageError as exc:
            raise Unavailable("storage.unavailable", str(exc)) from None
    now = request.app[CLOCK].time()
    request.app[CATALOG].update_recording(row["id"], state="deleted", deleted_at=now)
    return json_response({"recording_id": row["id"], "deleted_at": iso(now)})


async def serve_file(request: web.Request) -> web.StreamResponse:
    """A file of the local backend behind a signed, expiring URL (Range answered with 206)."""
    storage = request.app[STORAGE]
    if not isinstance(storage, LocalStorage):
        raise web.HTTPNotFound()
    key = unquote(request.match_info["key"])
    q = request.query
    if not storage.verify(key, q.get("expires", ""), q.get("filename", ""), q.get("type", ""), q.get("signature", "")):
        raise Forbidden("files.forbidden", "the link is invalid or has expired")
    path = storage.path(key)
    if not path.is_file():
        raise NotFound("files.not_found", "the file no longer exists")
    headers = {"Content-Type": q.get("type") or "application/octet-stream",
               "Content-Disposition": f'attachment; filename="{q.get("filename", "recording")}"', "Cache-Control": "private, no-store"}
    return web.FileResponse(path, headers=headers)


# -- aliases for clients written against other platforms ------------------------------


async def _latest_for_call(request: web.Request, call_id: str) -> dict[str, Any]:
    catalog = request.app[CATALOG]
    session = await catalog.session(call_id)
    if session is None:
        raise NotFound("calls.not_found", f"no call {call_id}")
    if session["app_id"] != request[CALLER].id:
        raise Forbidden("auth.forbidden", "this call belongs to another app")
    rows, _ = await catalog.recordings(request[CALLER].id, session_uuid=call_id, limit=1)
    if not rows:
        raise NotFound("recordings.not_found", f"call {call_id} has no recording")
    return rows[0]


async def call_recording(request: web.Request) -> web.Response:
    return await _download(request, await _latest_for_call(request, request.match_info["id"]))


async def call_recording_download(request: web.Request) -> web.Response:
    return await _download(request, await _latest_for_call(request, request.match_info["call_sid"]))


async def call_recording_stream(request: web.Request) -> web.Response:
    return await _stream(request, await _latest_for_call(request, request.match_info["call_sid"]))


def setup(app: web.Application) -> None:
    app.router.add_get("/api/v1/recordings", list_recordings)
    app.router.add_get("/api/v1/recordings/{id}", get_recording)
    app.router.add_delete("/api/v1/recordings/{id}", delete_recording)
    app.router.add_get("/api/v1/recordings/{id}/download", download)
    app.router.add_get("/api/v1/recordings/{id}/stream", stream)
    app.router.add_get("/files/{key:.+}", serve_file)
    app.router.add_get("/v1/calls/{id}/recording", call_recording)
    app.router.add_get("/api/calls/{call_sid}/recording/download", call_recording_download)
    app.router.add_get("/api/calls/{call_sid}/recording/stream", call_recording_stream)
