"""The gateway's recording commands: record/start, stop, pause and resume.

Each answer is kept under its `command_uid`, so the same command sent again (a retry after
a timeout, say) is answered the same and acted on once. Accepted commands share a
per-session cooldown. Checks and state changes happen under the session's lock without
awaiting in between, so concurrent or racing commands cannot both act.
"""

from __future__ import annotations

import math
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from mediaserver.errors import ServiceError
from mediaserver.ids import COMMAND_UID
from mediaserver.options import OptionError, PAUSE_BEHAVIORS
from mediaserver.recorder.engine import Engine, LiveSession

COMMANDS = ("start", "stop", "pause", "resume")


@dataclass(frozen=True, slots=True)
class CommandAnswer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def _command_uid(body: dict[str, Any]) -> str:
    uid = body.get("command_uid")
    if uid is None:
        return str(uuidlib.uuid4())
    if not isinstance(uid, str) or not COMMAND_UID.match(uid):
        raise ServiceError(400, "commands.invalid_command_uid",
                           "command_uid must be 1-128 characters of letters, digits, '.', '_' or '-'")
    return uid


async def run_command(engine: Engine, app_id: str, session_uuid: str, kind: str, body: Any) -> CommandAnswer:
    """Validate, deduplicate, rate-limit and apply one recording command."""
    if kind not in COMMANDS:
        raise ServiceError(404, "commands.unknown", f"unknown command record/{kind}")
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise ServiceError(400, "request.invalid_body", "the command body must be a JSON object")
    uid = _command_uid(body)
    live = engine.session_for(app_id, session_uuid)
    async with live.lock:
        prior = engine.catalog.command(session_uuid, uid)
        if prior is not None:
            return CommandAnswer(prior["status"], prior["response"], {})
        _check_cooldown(engine, live)
        try:
            response = _act(engine, live, kind, uid, body)
        except ServiceError as exc:
            if exc.status == 409:
                _remember(engine, live, kind, uid, 409, {"error": {"code": exc.code, "message": exc.message}})
                _announce(engine, live, kind, uid, "rejected", None, exc.code)
            raise
        live.last_command_at = engine.clock.monotonic()
        _remember(engine, live, kind, uid, 202, response)
        _announce(engine, live, kind, uid, "accepted", response["recording_id"], None)
        return CommandAnswer(202, response, {})


def _check_cooldown(engine: Engine, live: LiveSession) -> None:
    cooldown = engine.config.command_cooldown_s
    if live.last_command_at is None or cooldown <= 0:
        return
    remaining = live.last_command_at + cooldown - engine.clock.monotonic()
    if remaining > 0:
        raise ServiceError(429, "commands.cooldown", f"another recording command was accepted less than {cooldown:g} s ago",
                           {"Retry-After": str(max(1, math.ceil(remaining)))})


def _act(engine: Engine, live: LiveSession, kind: str, uid: str, body: dict[str, Any]) -> dict[str, Any]:
    rec = live.recording
    active = rec is not None and rec.state != "stopping"
    if kind == "start":
        if active:
            raise ServiceError(409, "recordings.already_active", f"recording {rec.id} is already active in this session")
        options = {k: v for k, v in body.items() if k != "command_uid"}
        try:
            merged = engine.defaults.merged(options)
        except OptionError as exc:
            raise ServiceError(400, exc.code, str(exc)) from None
        rec = engine.start_recording(live, merged, uid)
    else:
        allowed = {"command_uid", "behavior"} if kind == "pause" else {"command_uid"}
        extra = set(body) - allowed
        if extra:
            raise ServiceError(400, "request.invalid_body", f"unknown field for record/{kind}: {sorted(extra)[0]}")
        behavior = body.get("behavior", "skip")
        if behavior not in PAUSE_BEHAVIORS:
            raise ServiceError(400, "recordings.invalid_option", f"behavior must be one of {', '.join(PAUSE_BEHAVIORS)}")
        if not active:
            raise ServiceError(409, "recordings.not_active", f"no recording is active in this session to {kind}")
        if kind == "pause" and rec.state == "paused":
            raise ServiceError(409, "recordings.already_paused", f"recording {rec.id} is already paused")
        if kind == "resume" and rec.state != "paused":
            raise ServiceError(409, "recordings.not_paused", f"recording {rec.id} is not paused")
        engine.command_recording(live, kind, behavior)
    return {"command_uid": uid, "status": "accepted", "recording_id": rec.id}


def _remember(engine: Engine, live: LiveSession, kind: str, uid: str, status: int, response: dict[str, Any]) -> None:
    engine.catalog.put_command(live.uuid, uid, f"record/{kind}", status, response, engine.clock.time())


def _announce(engine: Engine, live: LiveSession, kind: str, uid: str, status: str, recording_id: str | None, error: str | None) -> None:
    payload = {"session_uuid": live.uuid, "command": f"record/{kind}", "command_uid": uid, "status": status, "recording_id": recording_id}
    if error:
        payload["error"] = error
    engine.outbox.emit(live.app_id, "command.result", payload)
