"""What crosses into and out of a session: one frozen dataclass per kind of inbox message
and per kind of event it reports.

The event loop (ingest, commands, the engine) posts these into a session's inbox and the
processing thread applies them in order (`Session._drain` matches on their class), so a
command is applied after all the audio received before it. A worker's `RemoteSession`
sends the same messages, pickled, to the session in its worker process.

`Encoded` is the one message per RTP packet: it is a plain slotted dataclass, not a frozen
one, because freezing costs about 0.4 µs per packet (a frozen dataclass sets its fields
through `object.__setattr__`), a few per cent of the whole server path; nothing mutates
one after it is posted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from mediaserver.media import DtmfEvent, PcmFrame


@dataclass(frozen=True, slots=True)
class AddLeg:
    """A new leg, joining where `at_mono` falls on the timeline (live sessions)."""

    leg_id: str
    at_mono: float


@dataclass(frozen=True, slots=True)
class Pcm:
    """A leg's audio (`frame.leg`): its `pts` on the timeline, or None to follow the leg's
    previous audio (a sample-count clock); `at_mono`: when it arrived."""

    frame: PcmFrame
    at_mono: float


@dataclass(slots=True, eq=False)
class Encoded:
    """One RTP payload (None: lost, the decoder conceals it) at `pts`, at the decoder's
    rate; decoded on the processing thread with the leg's `decoder`."""

    leg_id: str
    payload: bytes | None
    pts: int
    decoder: Any


@dataclass(frozen=True, slots=True)
class Dtmf:
    """An RFC 4733 key press, at the event's own timestamp and rate."""

    leg_id: str
    event: DtmfEvent


@dataclass(frozen=True, slots=True)
class DtmfNow:
    """A digit signalled without a time (WebSocket): placed where the leg's audio has got to."""

    leg_id: str
    digit: str
    source: str


@dataclass(frozen=True, slots=True)
class EndLeg:
    leg_id: str
    at_mono: float


@dataclass(frozen=True, slots=True)
class Counters:
    """What the ingest side counted of a leg whose audio it posts as PCM (a worker's
    stand-in sends these, so that the legs' stats the session reports are current)."""

    leg_id: str
    packets: int
    lost: int
    error: str | None


@dataclass(frozen=True, slots=True)
class Start:
    """Start a recording (a RecordingSpec; a Recording when offline) at `at_mono`."""

    recording: Any
    at_mono: float


@dataclass(frozen=True, slots=True)
class Command:
    """pause, resume or stop the active recording (`behavior`: pause's skip or silence)."""

    kind: str
    behavior: str
    at_mono: float


@dataclass(frozen=True, slots=True)
class Tap:
    """Attach or detach a live listener of the active recording's audio. In a worker the
    listener is a token that the worker relays audio under."""

    listener: Callable[[np.ndarray | None], None] | int
    attach: bool


@dataclass(frozen=True, slots=True)
class Hangup:
    """The call is over at `at_mono`: every leg ends, the recording finishes."""

    at_mono: float


Message = AddLeg | Pcm | Encoded | Dtmf | DtmfNow | EndLeg | Counters | Start | Command | Tap | Hangup


# -- what a session reports -----------------------------------------------------------------
# Each turn's events go back to the engine on the event loop (pickled, from a worker), which
# writes them to the catalog and announces them. Positions are samples at the session's rate.


@dataclass(frozen=True, slots=True)
class LegJoined:
    leg_id: str
    role: str
    at: int


@dataclass(frozen=True, slots=True)
class RecordingStarted:
    recording_id: str
    at: int


@dataclass(frozen=True, slots=True)
class RecordingPaused:
    recording_id: str
    at: int
    behavior: str


@dataclass(frozen=True, slots=True)
class RecordingResumed:
    recording_id: str
    at: int


@dataclass(frozen=True, slots=True)
class RecordingStopped:
    recording_id: str
    at: int
    reason: str  # the termination reason: stop, hangup, silence, max_length, finish_key, error
    finish_key: str | None


@dataclass(frozen=True, slots=True)
class RecordingClosed:
    """The recording's spool is final: store it. `legs`: each leg's stats."""

    recording_id: str
    duration: float
    legs: list
    error: str | None = None


Event = LegJoined | RecordingStarted | RecordingPaused | RecordingResumed | RecordingStopped | RecordingClosed
