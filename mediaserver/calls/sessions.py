"""The session an ingest joins: the live one it names, or a new one made for it."""

from __future__ import annotations

from mediaserver.recorder.engine import Engine, LiveSession


async def session_for_ingest(engine: Engine, app_id: str, uuid: str, source: str) -> tuple[LiveSession, bool]:
    """The live session `uuid` of `app_id`, or a new one when `uuid` is unknown; True when
    created here. A session that exists but is another app's or has ended is refused
    (`Engine.session_for`)."""
    if uuid in engine.sessions or await engine.catalog.session(uuid) is not None:
        return await engine.session_for(app_id, uuid), False
    return await engine.create_session(app_id, source, uuid), True
