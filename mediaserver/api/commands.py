"""`POST /api/v1/sessions/{uuid}/commands/record/{command}`: the HTTP side of the gateway's
recording commands.

recorder/commands.py validates, deduplicates, rate-limits and applies a command; this
module says how each outcome is answered: 202 with the command's result when it is
accepted, and a remembered refusal (a `Conflict`) as its status and error envelope. Both
answers are stored with the command, as the status and body sent, so the same command
sent again gets the same answer, in rows written before and after alike.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mediaserver.api.common import error_body, json_body, json_response, refusal_status
from mediaserver.api.keys import CALLER, ENGINE
from mediaserver.errors import Conflict
from mediaserver.recorder.commands import CommandAnswer, run_command

ACCEPTED = 202  # the command is taken; the recording follows (its webhooks say how it went)


class HttpAnswers:
    """A command's answers as HTTP statuses and JSON bodies (`recorder.commands.Answering`)."""

    def accepted(self, body: dict[str, Any]) -> CommandAnswer:
        return CommandAnswer(ACCEPTED, body)

    def rejected(self, refusal: Conflict) -> CommandAnswer:
        # The same status and envelope the errors middleware answers the first time with.
        return CommandAnswer(refusal_status(refusal), error_body(refusal.code, refusal.message))


HTTP_ANSWERS = HttpAnswers()


async def command(request: web.Request) -> web.Response:
    body = await json_body(request)
    answer = await run_command(request.app[ENGINE], request[CALLER].id, request.match_info["uuid"],
                               request.match_info["command"], body, HTTP_ANSWERS)
    return json_response(answer.body, status=answer.status)
