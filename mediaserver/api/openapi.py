"""The OpenAPI 3.1 description of every route the server answers (a test keeps it true)."""

from __future__ import annotations

from typing import Any

from mediaserver import __version__

_ERROR = {"$ref": "#/components/schemas/Error"}


def _op(summary: str, responses: dict[int, str], *, body: str | None = None, params: tuple[str, ...] = (), tags: tuple[str, ...] = (), security: bool = True) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": list(tags), "responses": {}}
    for status, text in responses.items():
        entry: dict[str, Any] = {"description": text}
        if status >= 400:
            entry["content"] = {"application/json": {"schema": _ERROR}}
        op["responses"][str(status)] = entry
    if params:
        op["parameters"] = [_param(name) for name in params]
    if body:
        op["requestBody"] = {"required": False, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}}}
    if not security:
        op["security"] = []
    return op


def _param(name: str) -> dict[str, Any]:
    where = "path" if name in ("uuid", "id", "command", "role", "call_sid", "key", "leg_id") else "query"
    return {"name": name, "in": where, "required": where == "path", "schema": {"type": "string"}}


AUTH = {401: "missing or wrong credentials", 403: "another app's resource"}


def _paths() -> dict[str, dict[str, Any]]:
    s, r = ("sessions",), ("recordings",)
    return {
        "/api/v1/sessions": {
            "post": _op("Create a session; answers its ingest URLs", {201: "created", 400: "bad body", 409: "uuid exists", **AUTH}, body="SessionCreate", tags=s),
            "get": _op("List sessions", {200: "a page", 400: "bad query", **AUTH}, params=("state", "limit", "offset"), tags=s),
        },
        "/api/v1/sessions/{uuid}": {
            "get": _op("A session", {200: "the session", 404: "unknown", **AUTH}, params=("uuid",), tags=s),
            "delete": _op("End a session; its recording finishes", {202: "ending", 404: "unknown", 409: "already ended", **AUTH}, params=("uuid",), tags=s),
        },
        "/api/v1/sessions/{uuid}/legs": {
            "post": _op("Add an RTP leg by SDP offer; answers the SDP answer", {201: "leg added", 400: "bad SDP", 404: "unknown", 409: "ended", 503: "RTP off", **AUTH}, body="RtpLeg", params=("uuid",), tags=s),
        },
        "/api/v1/sessions/{uuid}/commands/record/{command}": {
            "post": _op("record/start|stop|pause|resume", {202: "accepted", 400: "bad option or command_uid", 404: "unknown session", 409: "not allowed in this state", 429: "cooldown (Retry-After)", **AUTH}, body="Command", params=("uuid", "command"), tags=s),
        },
        "/api/v1/sessions/{uuid}/recording/file.wav": {
            "get": _op("The recording in progress as a growing WAV stream", {200: "audio/wav", 404: "unknown", 409: "nothing recording", **AUTH}, params=("uuid",), tags=s),
        },
        "/api/v1/recordings": {
            "get": _op("List recordings", {200: "a page", 400: "bad query", **AUTH}, params=("session_id", "since", "until", "state", "limit", "offset"), tags=r),
        },
        "/api/v1/recordings/{id}": {
            "get": _op("Recording metadata", {200: "the recording", 404: "unknown", **AUTH}, params=("id",), tags=r),
            "delete": _op("Delete a recording and its file", {200: "deleted", 404: "unknown", 409: "still active", 410: "already deleted", **AUTH}, params=("id",), tags=r),
        },
        "/api/v1/recordings/{id}/download": {
            "get": _op("Redirect to a presigned GET URL (15 min)", {302: "to the file", 202: "not stored yet", 404: "unknown", 409: "failed", 410: "past retention", **AUTH}, params=("id",), tags=r),
        },
        "/api/v1/recordings/{id}/stream": {
            "get": _op("A presigned URL (1 h) for streaming", {200: "the URL", 202: "not stored yet", 404: "unknown", 409: "failed", 410: "past retention", **AUTH}, params=("id",), tags=r),
        },
        "/files/{key}": {
            "get": _op("A stored file behind a signed, expiring URL (Range: 206)", {200: "the file", 206: "a range", 403: "expired or tampered", 404: "gone"}, params=("key", "expires", "filename", "type", "signature"), tags=r, security=False),
        },
        "/v1/calls/{id}/recording": {
            "get": _op("Alias: the call's latest recording", {302: "to the file", 202: "pending", 404: "unknown", 410: "past retention", **AUTH}, params=("id",), tags=r),
        },
        "/api/calls/{call_sid}/recording/download": {
            "get": _op("Alias: download the call's latest recording", {302: "to the file", 202: "pending", 404: "unknown", 410: "past retention", **AUTH}, params=("call_sid",), tags=r),
        },
        "/api/calls/{call_sid}/recording/stream": {
            "get": _op("Alias: stream URL of the call's latest recording", {200: "the URL", 202: "pending", 404: "unknown", 410: "past retention", **AUTH}, params=("call_sid",), tags=r),
        },
        "/ws/v1/sessions/{uuid}/legs/{role}": {
            "get": _op("WebSocket (wavstream) audio of one leg", {101: "switching protocols", 401: "unauthenticated", 403: "another app's session", 409: "session ended"}, params=("uuid", "role", "token"), tags=("ingest",)),
        },
        "/ws/v1/twilio": {
            "get": _op("WebSocket in the Twilio Media Streams JSON protocol; without API headers or ?token=, the session and token may come as start.customParameters (closed with 1008 and a reason when missing or wrong, before any audio is kept)", {101: "switching protocols", 401: "unauthenticated"}, params=("session", "token"), tags=("ingest",)),
        },
        **_whip_paths(),
        "/healthz": {"get": _op("Liveness", {200: "ok"}, tags=("operations",), security=False)},
        "/metrics": {"get": _op("Prometheus metrics", {200: "text exposition format"}, tags=("operations",), security=False)},
        "/openapi.json": {"get": _op("This document", {200: "OpenAPI 3.1"}, tags=("operations",), security=False)},
    }


def _sdp(op: dict[str, Any], *, request: bool = False, status: str | None = None) -> dict[str, Any]:
    """`op` with an SDP request body or an SDP response (WHIP speaks application/sdp)."""
    sdp = {"application/sdp": {"schema": {"type": "string"}}}
    if request:
        op["requestBody"] = {"required": True, "content": sdp}
    if status:
        op["responses"][status]["content"] = sdp
    return op


def _whip_paths() -> dict[str, dict[str, Any]]:
    """WHIP (RFC 9725): auth by API headers or the session's ingest `token`."""
    w = ("ingest",)
    created = {201: "the SDP answer; Location names the leg", 400: "malformed SDP, uuid or role", 401: "unauthenticated",
               403: "another app's session", 406: "no recordable audio in the offer", 409: "session ended",
               415: "not application/sdp", 503: "WebRTC ingest off"}
    return {
        "/whip/v1/sessions/{uuid}/legs/{role}": {
            "post": _sdp(_op("WHIP: publish a leg by SDP offer (an unknown session is created)", created,
                             params=("uuid", "role", "token"), tags=w), request=True, status="201"),
            "options": _op("WHIP: what the endpoint accepts (Accept-Post)", {204: "no content"}, params=("uuid", "role"), tags=w, security=False),
        },
        "/whip/v1/sessions/{uuid}/legs/{role}/{leg_id}": {
            "delete": _op("WHIP: end the leg", {200: "ended", 401: "unauthenticated", 403: "another app's leg", 404: "no such leg"},
                          params=("uuid", "role", "leg_id", "token"), tags=w),
            "patch": _op("WHIP: trickle ICE / ICE restart (not supported)", {501: "not implemented"}, params=("uuid", "role", "leg_id"), tags=w, security=False),
        },
        "/whip/publish": {"get": _op("A page that publishes the browser's microphone by WHIP", {200: "text/html"}, tags=w, security=False)},
        "/whip/publish.js": {"get": _op("The page's script", {200: "text/javascript"}, tags=w, security=False)},
    }


def _schemas() -> dict[str, Any]:
    opts = {
        "format": {"enum": ["wav", "mp3", "opus"]}, "channels": {"enum": [1, 2]},
        "participant": {"enum": ["all", "caller", "callee"]}, "sample_rate": {"enum": [8000, 16000, 48000]},
        "bitrate": {"type": "integer"}, "silence_timeout": {"type": "number"}, "max_length": {"type": "number"},
        "finish_on_key": {"type": "string"}, "trim_silence": {"type": "boolean"}, "action_url": {"type": "string"},
        "transcribe": {"type": "boolean"}, "transcribe_callback": {"type": "string"},
        "behavior": {"enum": ["skip", "silence"]},
        "command_uid": {"type": "string", "pattern": "^[a-zA-Z0-9._-]+$", "maxLength": 128},
    }
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message"],
                  "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
        "SessionCreate": {"type": "object", "properties": {"uuid": {"type": "string", "format": "uuid"}, "metadata": {"type": "object"}}},
        "RtpLeg": {"type": "object", "required": ["role", "sdp"], "properties": {"role": {"type": "string"}, "sdp": {"type": "string"}}},
        "Command": {"type": "object", "properties": opts},
    }


def spec(base_url: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "mediaserver", "version": __version__, "description": "Call recording: sessions, commands, recordings."},
        "servers": [{"url": base_url}],
        "security": [{"bearer": []}, {"appKey": [], "appId": []}],
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "appKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "appId": {"type": "apiKey", "in": "header", "name": "X-App-ID"},
            },
            "schemas": _schemas(),
        },
        "paths": _paths(),
    }
