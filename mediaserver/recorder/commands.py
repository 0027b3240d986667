"""The gateway's recording commands: record/start, stop, pause and resume.

Each answer is kept under its `command_uid`, so the same command sent again (a retry after
a timeout, say) is answered the same and acted on once. Accepted commands share a
per-session cooldown. Checks and state changes happen under the session's lock without
awaiting in between, so concurrent or racing commands cannot both act.

What an answer looks like is the caller's to say (`Answering`): this module decides only
whether a command is refused (a `Refused` kind), accepted, or a repeat of one already
answered, and keeps the caller's answer for the repeat.
"""

from __future__ import annotations

import math
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any, Protocol

from mediaserver.errors import Conflict, Invalid, NotFound, RateLimited
from mediaserver.ids import COMMAND_UID
from mediaserver.options import OptionError, PAUSE_BEHAVIORS
from mediaserver.recorder.engine import Engine, LiveSession

COMMANDS = ("start", "stop", "pause", "resume")


@dataclass(frozen=True, slots=True)
class CommandAnswer:
    """A command's answer as the caller gives it; `status` is the caller's, kept as given."""

    status: int
    body: dict[str, Any]


class Answering(Protocol):
    """How the caller answers a command. What it returns is stored with the command, and
    a repeat of the command is answered with exactly that."""

    def accepted(self, body: dict[str, Any]) -> CommandAnswer:
        """The answer to a command that was accepted and acted on."""

    def rejected(self, refusal: Conflict) -> CommandAnswer:
        """The answer to a command that did not fit the session's state (it stays refused)."""


def _command_uid(body: dict[str, Any]) -> str:
    uid = body.get("command_uid")
    if uid is None:
        return str(uuidlib.uuid4())
    if not isinstance(uid, str) or not COMMAND_UID.match(uid):
        raise Invalid("commands.invalid_command_uid",
                      "command_uid must be 1-128 characters of letters, digits, '.', '_' or '-'")
    return uid


async def run_command(engine: Engine, app_id: str, session_uuid: str, kind: str, body: Any,
                      answering: Answering) -> CommandAnswer:
    """Validate, deduplicate, rate-limit and apply one recording command.

    Returns the answer to give: `answering.accepted(...)` for a command acted on now, or
    the stored answer of a repeated `command_uid`. Raises the `Refused` kind otherwise; a
    `Conflict` is also remembered (as `answering.rejected(...)`) and announced.
    """
    if kind not in COMMANDS:
        raise NotFound("commands.unknown", f"unknown command record/{kind}")
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise Invalid("request.invalid_body", "the command body must be a JSON object")
    uid = _command_uid(body)
    live = await engine.session_for(app_id, session_uuid)
    async with live.lock:
        prior = await engine.catalog.command(session_uuid, uid)
        if prior is not None:
            return CommandAnswer(prior["status"], prior["response"])
        _check_cooldown(engine, live)
        try:
            response = _act(engine, live, kind, uid, body)
        except Conflict as exc:
            _remember(engine, live, kind, uid, answering.rejected(exc))
            _announce(engine, live, kind, uid, "rejected", None, exc.code)
            raise
        live.last_command_at = engine.clock.monotonic()
        answer = answering.accepted(response)
        _remember(engine, live, kind, uid, answer)
        _announce(engine, live, kind, uid, "accepted", response["recording_id"], None)
        return answer


def _check_cooldown(engine: Engine, live: LiveSession) -> None:
    cooldown = engine.settings.command_cooldown_s
    if live.last_command_at is None or cooldown <= 0:
        return
    remaining = live.last_command_at + cooldown - engine.clock.monotonic()
    if remaining > 0:
        raise RateLimited("commands.cooldown", f"another recording command was accepted less than {cooldown:g} s ago",
                          retry_after_s=max(1, math.ceil(remaining)))


def _act(engine: Engine, live: LiveSession, kind: str, uid: str, body: dict[str, Any]) -> dict[str, Any]:
    rec = live.recording
    active = rec is not None and rec.state != "stopping"
    if kind == "start":
        if active:
            raise Conflict("recordings.already_active", f"recording {rec.id} is already active in this session")
        options = {k: v for k, v in body.items() if k != "command_uid"}
        try:
            merged = engine.defaults.merged(options)
        except OptionError as exc:
            raise Invalid(exc.code, str(exc)) from None
        rec = engine.start_recording(live, merged, uid)
    else:
        allowed = {"command_uid", "behavior"} if kind == "pause" else {"command_uid"}
        extra = set(body) - allowed
        if extra:
            raise Invalid("request.invalid_body", f"unknown field for record/{kind}: {sorted(extra)[0]}")
        behavior = body.get("behavior", "skip")
        if behavior not in PAUSE_BEHAVIORS:
            raise Invalid("recordings.invalid_option", f"behavior must be one of {', '.join(PAUSE_BEHAVIORS)}")
        if not active:
            raise Conflict("recordings.not_active", f"no recording is active in this session to {kind}")
        if kind == "pause" and rec.state == "paused":
            raise Conflict("recordings.already_paused", f"recording {rec.id} is already paused")
        if kind == "resume" and rec.state != "paused":
            raise Conflict("recordings.not_paused", f"recording {rec.id} is not paused")
        engine.command_recording(live, kind, behavior)
    return {"command_uid": uid, "status": "accepted", "recording_id": rec.id}


def _remember(engine: Engine, live: LiveSession, kind: str, uid: str, answer: CommandAnswer) -> None:
    engine.catalog.put_command(live.uuid, uid, f"record/{kind}", answer.status, answer.body, engine.clock.time())


def _announce(engine: Engine, live: LiveSession, kind: str, uid: str, status: str, recording_id: str | None, error: str | None) -> None:
    payload = {"session_uuid": live.uuid, "command": f"record/{kind}", "command_uid": uid, "status": status, "recording_id": recording_id}
    if error:
        payload["error"] = error
    engine.outbox.emit(live.app_id, "command.result", payload)
