"""The HTTP side of telephony: the RTP and SIP services built from the configuration, and
the body of `POST /api/v1/sessions/{uuid}/legs` parsed.

The call control itself is in `mediaserver.calls.rtp` (`RtpService`) and
`mediaserver.calls.sip` (`SipService`).
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from mediaserver.api.keys import CONFIG, ENGINE, SERVICES
from mediaserver.calls.rtp import RtpService
from mediaserver.calls.sip import SipService
from mediaserver.errors import Invalid
from mediaserver.sip.sdp import SdpError, SessionDescription

ROLE = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # caller, callee or a participant name


def leg_request(body: Any) -> tuple[str, SessionDescription]:
    """The role and the SDP offer of `POST /api/v1/sessions/{uuid}/legs` (`Invalid` if malformed)."""
    if not isinstance(body, dict):
        raise Invalid("request.invalid_body", "the body must be a JSON object")
    unknown = set(body) - {"role", "sdp"}
    if unknown:
        raise Invalid("request.invalid_body", f"unknown field: {sorted(unknown)[0]}")
    role = body.get("role", "caller")
    if not isinstance(role, str) or not ROLE.fullmatch(role):
        raise Invalid("legs.invalid_role", "role must be 1-64 letters, digits, '_' or '-'")
    sdp = body.get("sdp")
    if not isinstance(sdp, str) or not sdp.strip():
        raise Invalid("sdp.missing", "sdp must be the SDP offer as a string")
    try:
        return role, SessionDescription.parse(sdp)
    except SdpError as exc:
        raise Invalid("sdp.invalid", str(exc)) from None


def make_rtp_service(app: web.Application) -> RtpService:
    """The "rtp" service of `_service_factories`."""
    config = app[CONFIG]
    return RtpService(app[ENGINE], config.sip_host, config.jitter_ms, config.tick_ms)


def make_sip_service(app: web.Application) -> SipService:
    """The "sip" service of `_service_factories`; needs "rtp" started before it."""
    config = app[CONFIG]
    return SipService(app[ENGINE], app[SERVICES]["rtp"], host=config.sip_host, port=config.sip_port,
                      app_ids=[a.id for a in config.apps], answer_delay_s=config.sip_answer_delay_ms / 1000,
                      record_all=config.record_policy == "all")
