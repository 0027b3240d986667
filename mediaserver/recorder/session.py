"""A session: its legs, its mixer, the in-band DTMF detectors and the active recording.

Everything that touches a session's audio runs on the engine's processing thread. Other
threads (the event loop receiving packets, the API) only `post()` messages into the
session's inbox, a deque, and the processing thread drains it in order; so a command is
applied after all the audio that was received before it, and there are no locks.

The messages are the dataclasses of `recorder.messages`, made by the calls of
`PostingCalls` (which a worker's `RemoteSession` shares): legs, audio (PCM, or RTP payloads
decoded here, off the loop), key presses, recording commands, taps and the hangup.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from mediaserver.codecs.resample import Resampler
from mediaserver.dsp.dtmf import DtmfDetector
from mediaserver.errors import CodecError
from mediaserver.media import DtmfEvent, PcmFrame, rescale
from mediaserver.recorder.messages import (AddLeg, Command, Counters, Dtmf, DtmfNow, Encoded, EndLeg, Event, Hangup,
                                            LegJoined, Message, Pcm, RecordingClosed, Start, Tap)
from mediaserver.mixing import Block, Mixer
from mediaserver.recorder.recording import Recording, legs_view
from mediaserver.recorder.spec import RecordingSpec, open_recording
from mediaserver.storage.spool import write_checkpoint

CHECKPOINT_S = 0.5  # legs are checkpointed at most this often, and only when the spool grew

# How long a live mix waits for a streamed leg (PCM over TCP: WebSocket) that has gone
# quiet before it goes on with silence for it. Such audio comes late under load, never
# lost: reading past it would leave a hole and push the rest of the leg later.
STREAM_HOLD_S = 2.0

# A leg's first packet comes a packetisation interval after its first sample was taken, and
# a stream is anchored on its least delayed first packets: so the first audio of a call
# answered and recorded at once lies up to about one packet before the recording's start.
# A recording that has not begun yet starts with that audio instead (this far at most).
EARLY_START_S = 0.06


@dataclass(slots=True)
class LegInput:
    """One leg's audio on its way into the mixer: its clock, resampler and counters."""

    leg_id: str
    role: str
    rate: int = 0  # the rate its audio arrives at; 0 until the first audio
    next_pts: int | None = None  # at `rate`: where counted audio continues
    resampler: Resampler | None = None
    detector: DtmfDetector | None = None
    posted: int = 0  # samples (at `rate`) posted by ingest; written by the ingest side only
    posted_rate: int = 0  # the rate ingest posts at, known before the processor has seen any
    applied: int = 0  # samples of those the processor has placed on the timeline
    ahead: int = 0  # samples (at `rate`) placed but not yet read out by the mixer
    resyncs: int = 0
    streamed: bool = False  # its audio comes as PCM (a stream that is late rather than lost)
    heard_at: float = 0.0  # monotonic time its latest PCM was taken from the inbox
    packets: int = 0  # counters kept by the ingest side (RTP: packets received and lost)
    lost: int = 0
    malformed: int = 0
    decode_errors: int = 0
    error: str | None = None  # why the leg never carried media (ice_failed, dtls_failed, no_media)
    joined_at: int = 0  # timeline position at the mixer's rate
    dtmf: list[DtmfEvent] = field(default_factory=list)

    @property
    def backlog(self) -> int:
        """Samples received but not yet mixed: what backpressure on a fast stream watches."""
        return self.posted - self.applied + self.ahead


@dataclass(slots=True)
class _Run:
    """Consecutive audio of one leg waiting to be placed in one go: PCM arrays, or the raw
    payloads of a decoder that decodes joined payloads (G.711, L16) in one call."""

    rate: int
    pts: int | None  # None: counted audio (placed after the leg's previous audio)
    at: float
    decoder: Any  # None for PCM parts
    parts: list = field(default_factory=list)
    length: int = 0  # samples

    def follows(self, rate: int, pts: int | None, decoder: Any) -> bool:
        """Whether audio at `pts` continues this run directly."""
        if rate != self.rate or decoder is not self.decoder or (pts is None) != (self.pts is None):
            return False
        return pts is None or pts == self.pts + self.length

    def add(self, part, samples: int) -> None:
        self.parts.append(part)
        self.length += samples

    def samples(self) -> np.ndarray:
        if self.decoder is not None:
            return self.decoder.decode_joined(self.parts)
        return self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)


class SessionPort(Protocol):
    """What ingest, commands and the engine may ask of a session, wherever it runs: the
    in-process `Session` and a worker's `RemoteSession` both are one."""

    uuid: str
    app_id: str
    t0: float
    inputs: dict[str, LegInput]
    ended: bool

    def add_leg(self, leg_id: str, role: str, at_mono: float) -> LegInput: ...
    def post_pcm(self, frame: PcmFrame, at_mono: float = 0.0) -> None: ...
    def end_leg(self, leg_id: str, at_mono: float) -> None: ...
    def dtmf(self, leg_id: str, event: DtmfEvent) -> None: ...
    def dtmf_now(self, leg_id: str, digit: str, source: str) -> None: ...
    def start_recording(self, recording, at_mono: float) -> None: ...
    def command(self, kind: str, behavior: str, at_mono: float) -> None: ...
    def tap(self, listener, attach: bool) -> None: ...
    def hangup(self, at_mono: float) -> None: ...
    def expedite(self) -> None: ...
    def timeline(self, mono: float) -> int: ...
    def timeline_at(self, mono: float, rate: int) -> int: ...


class PostingCalls:
    """The calls of `SessionPort` that are one message each, made here for both kinds of
    session; each kind says how a message reaches its inbox (`post`)."""

    def post(self, message: Message) -> None:
        raise NotImplementedError

    def dtmf(self, leg_id: str, event: DtmfEvent) -> None:
        """An RFC 4733 key press, placed at the event's own timestamp."""
        self.post(Dtmf(leg_id, event))

    def dtmf_now(self, leg_id: str, digit: str, source: str) -> None:
        """A digit signalled without a time (WebSocket): placed where the leg's audio has got to."""
        self.post(DtmfNow(leg_id, digit, source))

    def start_recording(self, recording, at_mono: float) -> None:
        """Start `recording` (a RecordingSpec, or a Recording offline) where `at_mono` falls."""
        self.post(Start(recording, at_mono))

    def command(self, kind: str, behavior: str, at_mono: float) -> None:
        """pause, resume or stop the active recording."""
        self.post(Command(kind, behavior, at_mono))

    def tap(self, listener, attach: bool) -> None:
        """Attach (or detach) a live listener of the active recording's audio."""
        self.post(Tap(listener, attach))

    def hangup(self, at_mono: float) -> None:
        self.post(Hangup(at_mono))


class Session(PostingCalls):
    """One call's audio path, driven by `process()` on the processing thread."""

    def __init__(self, uuid: str, app_id: str, t0: float, rate: int = 8000, *, live: bool = True, jitter_s: float = 0.08) -> None:
        self.uuid = uuid
        self.app_id = app_id
        self.t0 = t0
        self.live = live
        self.jitter_s = jitter_s
        self.mixer = Mixer(rate)
        self.inputs: dict[str, LegInput] = {}
        self.recording: Recording | None = None
        self.ended = False
        self.next_process = 0.0  # monotonic time of its next turn (the processor's schedule)
        self.expedited = False  # an ingest waits for it: process it now, not at its turn
        self.on_expedite: Callable[[], None] | None = None  # wakes whoever gives it its turns
        self.hangup_posted = False
        self.takes_pcm = False  # some leg posts PCM (whose backlog ingest watches)
        self._hangup_at = 0
        self._early_floor = 0  # how far before its start the recording may begin with a leg's first audio
        self._checkpoint = (-1, 0.0)  # the spool's size and the time when legs were last checkpointed
        self.inbox: deque[Message] = deque()
        self._events: list[Event] = []

    @property
    def rate(self) -> int:
        return self.mixer.rate

    def post(self, message: Message) -> None:
        """Thread-safe: queue a message for the processing thread."""
        if type(message) is Hangup:
            self.hangup_posted = True  # processed at the next tick, not at its turn
        self.inbox.append(message)

    def expedite(self) -> None:
        """An ingest waits for this session's mix: process it now, not at its turn."""
        self.expedited = True
        if self.on_expedite is not None:
            self.on_expedite()

    def add_leg(self, leg_id: str, role: str, at_mono: float) -> LegInput:
        """Ingest side: a new leg; audio may be posted for it at once."""
        if leg_id in self.inputs:
            raise ValueError(f"leg {leg_id} already exists")
        leg = self.inputs[leg_id] = LegInput(leg_id, role)
        self.post(AddLeg(leg_id, at_mono))
        return leg

    def post_pcm(self, frame: PcmFrame, at_mono: float = 0.0) -> None:
        """Ingest side: audio of the leg `frame.leg` (`pts` None: right after its previous)."""
        leg = self.inputs[frame.leg]
        leg.posted += len(frame.samples)
        leg.posted_rate = frame.rate
        self.takes_pcm = True
        self.post(Pcm(frame, at_mono))

    def post_encoded(self, leg_id: str, payload: bytes | None, pts: int, decoder) -> None:
        """Ingest side: one codec payload (None for a lost one) placed at `pts`.

        `decoder` belongs to the leg's stream and is used only on the processing thread.
        Called for every packet, so it queues directly rather than through `post`.
        """
        self.inbox.append(Encoded(leg_id, payload, pts, decoder))

    def end_leg(self, leg_id: str, at_mono: float) -> None:
        self.post(EndLeg(leg_id, at_mono))

    def timeline(self, mono: float) -> int:
        """The timeline position (at the mixer's rate) of a monotonic clock reading."""
        return self.timeline_at(mono, self.mixer.rate)

    def timeline_at(self, mono: float, rate: int) -> int:
        """The timeline position at `rate` of a monotonic clock reading (any thread)."""
        return max(int((mono - self.t0) * rate), 0)

    # -- processing thread -----------------------------------------------------------

    def process(self, now: float, flush: bool = False) -> list[Event]:
        """Apply the inbox, then mix, judge and encode as far as the timeline allows.

        `flush` mixes everything received (used when the session ends or offline).
        """
        self._drain(now)
        if self.ended or flush:
            target = max(self.mixer.written_until(), self._hangup_at)
        else:
            target = self.mixer.ready_until()
            if self.live:
                target = max(target, self._live_deadline(now))
        self._advance(target)
        if self.ended:
            self._end_recording("hangup")
        elif self.live:
            self._checkpoint_legs(now)
        events, self._events = self._events, []
        return events

    def _live_deadline(self, now: float) -> int:
        """How far a live mix reads whether or not every leg has delivered: `jitter_s`
        behind the clock, but not past what a streamed leg that is still going has
        delivered, unless nothing has come from it for STREAM_HOLD_S (it has stalled, and
        the call goes on with silence for it). A stream is placed by its sample count, so
        it is waited for however late the server's load makes it, as long as it flows."""
        deadline = self.timeline(now - self.jitter_s)
        for leg_id, buffer in self.mixer.legs.items():
            leg = self.inputs[leg_id]
            if leg.streamed and buffer.first_pts is not None and not buffer.ended and now - leg.heard_at < STREAM_HOLD_S:
                deadline = min(deadline, buffer.write_pos)
        return deadline

    def _drain(self, now: float) -> None:
        """Apply the inbox in order, joining each leg's consecutive audio into one run.

        Audio arrives a packet at a time; placing it costs the same whatever its length,
        so each leg's frames that follow one another are joined and placed once. Any other
        message first places all pending audio, which keeps everything in arrival order.
        """
        runs: dict[str, _Run] = {}
        inbox = self.inbox
        while inbox:
            message = inbox.popleft()
            kind = type(message)  # audio first, and by identity: this runs for every packet
            if kind is Encoded:
                self._encoded(runs, message)
            elif kind is Pcm:
                self.takes_pcm = True
                frame = message.frame
                if frame.leg in self.inputs:
                    self.inputs[frame.leg].streamed, self.inputs[frame.leg].heard_at = True, now
                self._collect(runs, frame.leg, frame.samples, len(frame.samples), frame.rate, frame.pts, message.at_mono, None)
            else:
                self._flush(runs)
                self._apply(message)
        self._flush(runs)

    def _encoded(self, runs: dict[str, "_Run"], message: Encoded) -> None:
        leg_id, payload, pts, decoder = message.leg_id, message.payload, message.pts, message.decoder
        leg = self.inputs.get(leg_id)
        if leg is None:
            return
        step = getattr(decoder, "bytes_per_sample", 0)  # SampleDecoders decode joined payloads
        if payload is not None and step and len(payload) % step == 0:
            n = len(payload) // step
            leg.posted += n
            run = runs.get(leg_id)
            # Almost every packet continues its leg's run: extend it here (what `_collect`
            # and `_Run.follows` would decide) rather than through two more calls.
            if run is not None and run.decoder is decoder and run.pts is not None and pts == run.pts + run.length:
                run.parts.append(payload)
                run.length += n
                return
            self._collect(runs, leg_id, payload, n, decoder.sample_rate, pts, 0.0, decoder)
            return
        try:
            samples = decoder.conceal() if payload is None else decoder.decode(payload)
        except CodecError:
            leg.decode_errors += 1
            return
        leg.posted += len(samples)
        self._collect(runs, leg_id, samples, len(samples), decoder.sample_rate, pts, 0.0, None)

    def _collect(self, runs: dict[str, "_Run"], leg_id: str, part, n: int, rate: int, pts: int | None,
                 at_mono: float, decoder) -> None:
        run = runs.get(leg_id)
        if run is not None and not run.follows(rate, pts, decoder):
            self._place(leg_id, run)
            run = None
        if run is None:
            run = runs[leg_id] = _Run(rate, pts, at_mono, decoder)
        run.add(part, n)

    def _flush(self, runs: dict[str, "_Run"]) -> None:
        for leg_id, run in runs.items():
            self._place(leg_id, run)
        runs.clear()

    def _place(self, leg_id: str, run: "_Run") -> None:
        try:
            samples = run.samples()
        except CodecError:
            self.inputs[leg_id].decode_errors += 1
            return
        self._pcm(leg_id, samples, run.rate, run.pts, run.at)

    def _apply(self, message: Message) -> None:
        match message:
            case Dtmf(leg_id, event):
                self._rfc4733(leg_id, event)
            case DtmfNow(leg_id, digit, source):
                self._dtmf_now(leg_id, digit, source)
            case AddLeg(leg_id, at_mono):
                self._add(leg_id, at_mono)
            case Counters(leg_id, packets, lost, error):
                leg = self.inputs.get(leg_id)
                if leg is not None:
                    leg.packets, leg.lost, leg.error = packets, lost, error
            case EndLeg(leg_id, at_mono):
                if leg_id in self.mixer.legs:  # not when the hangup has ended it already
                    self.mixer.end_leg(leg_id, max(self.timeline(at_mono), self.mixer.cursor) if self.live else None)
            case Start(recording, at_mono):
                self._start(recording, at_mono)
            case Command(kind, behavior, at_mono):
                if self.recording is not None:
                    self.recording.schedule(kind, self._command_pos(at_mono), behavior)
            case Tap(listener, attach):
                self._tap(listener, attach)
            case Hangup(at_mono):
                self.ended = True
                # A live call lasts until the moment it was hung up, silence included.
                self._hangup_at = self.timeline(at_mono) if self.live else 0
                for leg in self.mixer.legs.values():
                    leg.end(max(self.mixer.cursor, leg.write_pos))
            case _:
                raise TypeError(f"not a session message: {message!r}")

    def _tap(self, listener, attach: bool) -> None:
        recording = self.recording
        if recording is None or recording.done:
            if attach:
                listener(None)
        elif attach:
            recording.taps.append(listener)
        elif listener in recording.taps:
            recording.taps.remove(listener)

    def _command_pos(self, at_mono: float) -> int:
        """Where a command lands: after all audio received before it, and not before now."""
        pos = self.mixer.written_until()
        return max(pos, self.timeline(at_mono)) if self.live else pos

    def _add(self, leg_id: str, at_mono: float) -> None:
        leg = self.inputs[leg_id]
        at = self._command_pos(at_mono) if self.live else 0
        leg.joined_at = self.mixer.add_leg(leg_id, leg.role, at).joined_at
        self._events.append(LegJoined(leg_id, leg.role, leg.joined_at))

    def _pcm(self, leg_id: str, samples: np.ndarray, rate: int, pts: int | None, at_mono: float = 0.0) -> None:
        leg = self.inputs.get(leg_id)
        if leg is None or len(samples) == 0:
            return
        leg.applied += len(samples)
        if leg_id not in self.mixer.legs:
            # Audio still on its way when the leg ended and the mixer let it go (a hangup
            # overtook it): too late for the timeline.
            self.mixer.totals.late_samples += rescale(len(samples), rate, self.rate)
            return
        if leg.rate != rate:
            self._retune_leg(leg, rate)
        if pts is None:
            pts = self._counted_pts(leg, rate, at_mono)
        leg.next_pts = pts + len(samples)
        if leg.resampler is not None:
            samples = leg.resampler.process(samples)
        buffer, at = self.mixer.legs[leg_id], rescale(pts, rate, self.rate)
        if buffer.first_pts is None:
            self._start_with(at)
        buffer.push(samples, at, self.mixer.cursor)

    def _start_with(self, first: int) -> None:
        """A leg's first audio, just before a recording that has not begun: it begins there."""
        recording = self.recording
        if (recording is not None and recording.state == "initiated" and recording.position == recording.start_pos
                and self._early_floor <= first < recording.start_pos and first >= self.mixer.cursor):
            recording.start_pos = recording.position = first

    def _counted_pts(self, leg: LegInput, rate: int, at_mono: float) -> int:
        """Where counted audio goes: after the leg's previous audio; its first audio where it
        arrived (live) or where the leg joined; never behind the mix."""
        floor = rescale(self.mixer.cursor, self.rate, rate)
        if leg.next_pts is not None:
            if leg.next_pts >= floor:
                return leg.next_pts
            # A counted stream that fell behind the mix (a stall, then a burst) continues
            # from the mix rather than being dropped as late for ever.
            leg.resyncs += 1
            return floor
        start = rescale(leg.joined_at, self.rate, rate)
        if self.live and at_mono:
            start = max(start, self.timeline_at(at_mono, rate))
        return max(start, floor)

    def _retune_leg(self, leg: LegInput, rate: int) -> None:
        if leg.next_pts is not None and leg.rate:
            leg.next_pts = rescale(leg.next_pts, leg.rate, rate)
        leg.rate = rate
        leg.resampler = None if rate == self.rate else Resampler(rate, self.rate)

    def _rfc4733(self, leg_id: str, event: DtmfEvent) -> None:
        leg = self.inputs.get(leg_id)
        wanted = self.recording is not None and not self.recording.done and self.recording.options.finish_on_key
        if leg is not None and wanted:
            moved = DtmfEvent(event.digit, rescale(event.pts, event.rate, self.rate), self.rate, leg_id, rescale(event.duration, event.rate, self.rate), event.source)
            leg.dtmf.append(moved)

    def _dtmf_now(self, leg_id: str, digit: str, source: str) -> None:
        leg = self.inputs.get(leg_id)
        if leg is None:
            return
        if leg.rate and leg.next_pts is not None:
            pts, rate = leg.next_pts, leg.rate
        else:
            pts, rate = max(leg.joined_at, self.mixer.cursor), self.rate
        self._rfc4733(leg_id, DtmfEvent(digit, max(pts, rescale(self.mixer.cursor, self.rate, rate)), rate, leg_id, 0, source))

    def _start(self, recording: Recording | RecordingSpec, at_mono: float) -> None:
        if self.recording is not None and not self.recording.done:
            self._finish_recording("stop")
        if isinstance(recording, RecordingSpec):
            try:
                recording = open_recording(recording)
            except Exception as exc:  # a spool that cannot be created, say: the recording fails
                self._events.append(RecordingClosed(recording.recording_id, 0.0, [], f"could not start: {exc}"))
                return
        if recording.rate != self.rate:
            self._retune_mixer(recording.rate)
        recording.start_pos = recording.position = self._command_pos(at_mono)
        self._early_floor = recording.start_pos - round(EARLY_START_S * self.rate)
        self.recording = recording
        self._checkpoint = (-1, 0.0)
        for leg in list(self.inputs.values()):
            leg.dtmf.clear()
            leg.detector = None

    def _retune_mixer(self, rate: int) -> None:
        """Move the timeline to a new rate (a recording asked for another sample rate)."""
        old = self.mixer
        self.mixer = Mixer(rate, rescale(old.cursor, old.rate, rate))
        self.mixer.totals = old.totals
        for leg_id, buffer in old.legs.items():
            leg = self.inputs[leg_id]
            leg.detector = None
            new = self.mixer.add_leg(leg_id, buffer.role, rescale(buffer.joined_at, old.rate, rate))
            # A leg that has not delivered up to the cursor (a quiet RTP leg) has nothing pending.
            pending, _ = buffer.read(old.cursor, max(old.cursor, buffer.write_pos))
            if len(pending):
                new.push(Resampler(old.rate, rate).process(pending), self.mixer.cursor, self.mixer.cursor)
            if buffer.ended:
                new.end(rescale(buffer.ended_at, old.rate, rate))
            leg.joined_at = new.joined_at
            leg.resampler = None if leg.rate in (0, rate) else Resampler(leg.rate, rate)

    def _advance(self, target: int) -> None:
        """Read the mixer up to `target` in blocks of at most one second and feed them on."""
        while self.mixer.cursor < target:
            end = min(target, self.mixer.cursor + self.rate)
            block = self.mixer.read(end)
            if self.recording is not None and not self.recording.done:
                self._feed(block)
        if self.recording is not None and not self.recording.done and self.recording.position <= self.mixer.cursor:
            # Commands at the cursor take effect now rather than with the next block: after
            # a stream faster than real time the cursor is ahead of the clock, and no block
            # would come until the clock had caught up with it.
            self._feed(Block(self.mixer.cursor, self.mixer.cursor))
        for leg_id, buffer in self.mixer.legs.items():
            leg = self.inputs[leg_id]
            if leg.rate:
                leg.ahead = rescale(max(buffer.write_pos - self.mixer.cursor, 0), self.rate, leg.rate)
        self.mixer.drop_finished_legs()

    def _feed(self, block: Block) -> None:
        recording = self.recording
        events = self._detect(block) if recording.options.finish_on_key and len(block) else []
        recording.feed(block, events)
        self._events.extend(recording.events)
        recording.events.clear()
        if recording.done:
            self._close_recording()

    def _detect(self, block: Block) -> list[DtmfEvent]:
        """In-band digits in this block plus signalled digits whose onset it has reached."""
        events: list[DtmfEvent] = []
        for part in block.legs:
            leg = self.inputs.get(part.leg_id)
            if leg is not None:
                if leg.detector is None:
                    leg.detector = DtmfDetector(self.rate, leg.leg_id)
                events.extend(leg.detector.process(part.samples, block.start))
        for leg in list(self.inputs.values()):
            if leg.dtmf:
                # Signalled digits wait for the block their onset falls in (even after the
                # leg itself has ended).
                events.extend(ev for ev in leg.dtmf if ev.pts < block.end)
                leg.dtmf[:] = [ev for ev in leg.dtmf if ev.pts >= block.end]
        return sorted(events, key=lambda ev: ev.pts)

    def _checkpoint_legs(self, now: float) -> None:
        """Write what the spool has gathered for long enough, and keep the active recording's
        leg statistics beside it whenever it has grown (at most every CHECKPOINT_S), so a
        crash loses no more of them than of the audio."""
        recording = self.recording
        path = getattr(recording.sink, "path", None) if recording is not None and not recording.done else None
        if path is None:
            return
        recording.sink.flush_due()
        written, at = self._checkpoint
        if recording.sink.written != written and now - at >= CHECKPOINT_S:
            try:
                write_checkpoint(path, self._legs_view(recording))
            except OSError:
                return  # the spool's own writes will fail loudly if the disk is the trouble
            self._checkpoint = (recording.sink.written, now)

    def _legs_view(self, recording: Recording) -> list[dict[str, Any]]:
        counters = {leg.leg_id: {"packets": leg.packets, "lost": leg.lost, "malformed": leg.malformed, "decode_errors": leg.decode_errors,
                                 "error": leg.error}
                    for leg in list(self.inputs.values())}
        return legs_view(recording, counters)

    def _end_recording(self, reason: str) -> None:
        if self.recording is not None and not self.recording.done:
            self._finish_recording(reason)

    def _finish_recording(self, reason: str) -> None:
        recording = self.recording
        recording.finish(reason, self.mixer.cursor)
        self._events.extend(recording.events)
        recording.events.clear()
        self._close_recording()

    def _close_recording(self, error: str | None = None) -> None:
        """Flush the encoder into the spool and close it; report the recording's summary.

        The spool is closed without waiting for the disk: storing it syncs it, off this thread.
        """
        recording = self.recording
        try:
            recording.close()
        finally:
            if hasattr(recording.sink, "close"):
                recording.sink.close(sync=False)
        self._events.append(RecordingClosed(recording.id, recording.duration_samples / recording.rate,
                                            self._legs_view(recording), error))
