"""In a cluster, a request about a live session goes to the node that holds it.

The legs of one session are mixed on one node, and its commands are serialised there (which
is what makes a `command_uid` sent to two nodes at once act once). So a request that names
a live session held by another node — a command, a hangup, a new leg, the live WAV, a
WebSocket or WHIP leg — is passed on to that node's `node_url` as it came (method, path,
query, credentials, body) and its answer passed back; a WebSocket is relayed frame by frame
both ways. Everything else (listing, fetching, deleting recordings; reading a session) is
answered by any node from the shared catalog. A forwarded request carries
`X-Mediaserver-Forwarded-By`, and is never forwarded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
from aiohttp import web

from mediaserver.api.common import error_response
from mediaserver.api.keys import ENGINE
from mediaserver.errors import Unavailable

log = logging.getLogger(__name__)

FORWARDED_BY = "X-Mediaserver-Forwarded-By"
# Routes of a live session: (method or "*", the route's path template).
HELD_ROUTES = {
    ("DELETE", "/api/v1/sessions/{uuid}"),
    ("*", "/api/v1/sessions/{uuid}/legs"),
    ("*", "/api/v1/sessions/{uuid}/commands/record/{command}"),
    ("*", "/api/v1/sessions/{uuid}/recording/file.wav"),
    ("*", "/ws/v1/sessions/{uuid}/legs/{role}"),
    ("*", "/ws/v1/twilio"),
    ("*", "/whip/v1/sessions/{uuid}/legs/{role}"),
    ("*", "/whip/v1/sessions/{uuid}/legs/{role}/{leg_id}"),
}
# Headers that belong to one connection, not to the request (RFC 9110 §7.6.1), and those
# the client library sets itself.
HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer", "Transfer-Encoding",
    "Upgrade", "Host", "Content-Length", "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Accept", "Content-Encoding"))
CONNECT_TIMEOUT_S = 5.0
COMMIT_WAIT_S = 5.0  # how long an answer waits for the catalog to take what the request changed
SESSION = web.AppKey("forwarding client", aiohttp.ClientSession)


def held_session(request: web.Request) -> str | None:
    """The session a request is about, when it must be answered where that session is held."""
    info = request.match_info
    route = info.route.resource.canonical if info.route.resource is not None else None
    if (request.method, route) not in HELD_ROUTES and ("*", route) not in HELD_ROUTES:
        return None
    return info.get("uuid") or request.query.get("session")


@web.middleware
async def forward_middleware(request: web.Request, handler):
    engine = request.app[ENGINE]
    membership = engine.membership
    if membership is None:
        return await handler(request)
    # A request forwarded here is answered here, and waits for the catalog like any other:
    # the client's next request may go to the node that forwarded it.
    uuid = None if FORWARDED_BY in request.headers else held_session(request)
    owner = None if uuid is None or uuid in engine.sessions else await membership.owner_url(uuid)
    if owner is None:  # held here, forwarded here, or not live anywhere (a new session, a 404, a 409)
        response = await handler(request)
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            await _committed(request)
        return response
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await _relay_websocket(request, owner)
    return await _forward(request, owner)


async def _committed(request: web.Request) -> None:
    """Wait until what the request changed is in the shared catalog, so that the client's
    next request, to whichever node, sees it."""
    try:
        await request.app[ENGINE].catalog.flush(timeout=COMMIT_WAIT_S)
    except TimeoutError:
        log.warning("%s %s answered before the catalog took its changes (it will)", request.method, request.path)


async def client_ctx(app: web.Application):
    """The client that forwards requests, for the app's life."""
    app[SESSION] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
                                         auto_decompress=False)
    yield
    await app[SESSION].close()


def _headers(request: web.Request) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    headers[FORWARDED_BY] = request.app[ENGINE].settings.node.node_id
    return headers


async def _forward(request: web.Request, owner: str) -> web.StreamResponse:
    body = await request.read()
    try:
        upstream = await request.app[SESSION].request(request.method, owner + request.path_qs, headers=_headers(request),
                                                      data=body, allow_redirects=False)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise Unavailable("cluster.node_unreachable", f"the node holding this session does not answer: {exc}",
                          retry_after_s=1) from None
    async with upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP})
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def _relay_websocket(request: web.Request, owner: str) -> web.StreamResponse:
    try:
        upstream = await request.app[SESSION].ws_connect(owner + request.path_qs, headers=_headers(request),
                                                         max_msg_size=0, autoclose=False)
    except aiohttp.WSServerHandshakeError as exc:  # the owner refused the upgrade: so does this node
        return error_response(exc.status, "cluster.forwarded_refusal", f"the node holding this session refused: {exc.message}")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise Unavailable("cluster.node_unreachable", f"the node holding this session does not answer: {exc}",
                          retry_after_s=1) from None
    client = web.WebSocketResponse(max_msg_size=0, autoclose=False)
    await client.prepare(request)
    async with upstream:
        await asyncio.gather(_pipe(client, upstream), _pipe(upstream, client))
    return client


async def _pipe(source, sink) -> None:
    """Frames from `source` to `sink` until `source` closes; then `sink` is closed with the
    same code and reason."""
    code, reason = aiohttp.WSCloseCode.GOING_AWAY, ""
    while True:
        message = await source.receive()
        if message.type == aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        else:
            if message.type == aiohttp.WSMsgType.CLOSE:
                code, reason = message.data, message.extra or ""
            break
    for side in (source, sink):
        if not side.closed:
            with contextlib.suppress(ConnectionError):  # that side is already gone
                await side.close(code=code, message=reason.encode())
