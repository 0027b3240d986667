"""One recording of a session: commands, termination and pause applied to aligned audio.

A `Recording` consumes the mixer's blocks in timeline order. Commands (pause, resume, stop)
take effect at a timeline position, so where they land in the file does not depend on when
a block happens to be processed. What is kept goes through the `OutputStage` to the
encoder and from there to the sink (the spool file).

States: initiated (before its start position) → recording ⇄ paused → stopped. The later
states (processing, completed, failed) belong to storage and are tracked by the engine.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from mediaserver.encoding import Encoder
from mediaserver.media import DtmfEvent
from mediaserver.mixing import Block, mixdown
from mediaserver.options import RecordingOptions
from mediaserver.recorder.messages import Event, RecordingPaused, RecordingResumed, RecordingStarted, RecordingStopped
from mediaserver.recorder.output import OutputStage
from mediaserver.recorder.termination import FRAME_MS, SilenceTracker, first_silence_end, mono_view

HOLD_MS = 200  # longer than the in-band detector's latency (two ~13 ms blocks + a 40 ms tone)


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...
    def patch(self, offset: int, data: bytes) -> None: ...


@dataclass(slots=True)
class LegTally:
    """What one leg contributed to a recording (samples at the recording's rate)."""

    role: str
    frames: int = 0
    samples: int = 0
    inserted_silence: int = 0
    first: int | None = None  # timeline position of its first recorded audio
    last: int | None = None  # timeline position just after its last recorded audio

    def add(self, spans: list[tuple[int, int]], start: int, end: int, live_from: int, live_until: int | None) -> None:
        covered = 0
        for span_start, span_end in spans:
            lo, hi = max(span_start, start), min(span_end, end)
            if hi <= lo:
                continue
            self.frames += start <= span_start < end
            covered += hi - lo
            self.first = lo if self.first is None else self.first
            self.last = hi
        live_lo = max(start, live_from)
        live_hi = min(end, live_until) if live_until is not None else end
        self.samples += covered
        self.inserted_silence += max(live_hi - live_lo - covered, 0)


@dataclass(order=True, slots=True)
class _Command:
    pos: int
    seq: int
    kind: str = field(compare=False)
    behavior: str = field(compare=False, default="skip")


class Recording:
    """Termination, pause/resume and stop for one recording, fed block by block."""

    def __init__(
        self,
        recording_id: str,
        options: RecordingOptions,
        start_pos: int,
        encoder: Encoder,
        sink: Sink,
        *,
        silence_threshold_dbfs: float = -45.0,
        trim_tail_max_s: float = 300.0,
    ) -> None:
        self.id = recording_id
        self.options = options
        self.rate = options.sample_rate
        self.start_pos = start_pos
        self.encoder = encoder
        self.sink = sink
        self.state = "initiated"
        self.position = start_pos  # next timeline position to judge
        self.recorded = 0  # samples that count towards max_length
        self.termination_reason: str | None = None
        self.finish_key: str | None = None
        self.ended_at: int | None = None
        self.legs: dict[str, LegTally] = {}
        self.events: list[Event] = []
        self.taps: list[Callable[[np.ndarray | None], None]] = []  # live listeners of what is encoded
        self._commands: list[_Command] = []
        self._seq = 0
        self._behavior = "skip"
        frame = self.rate * FRAME_MS // 1000
        self._max = round(options.max_length * self.rate)
        self._silence_timeout = round(options.silence_timeout * self.rate)
        self._silence = SilenceTracker(frame, silence_threshold_dbfs) if self._silence_timeout else None
        hold = self.rate * HOLD_MS // 1000 if options.finish_on_key else 0
        trim = SilenceTracker(frame, silence_threshold_dbfs) if options.trim_silence else None
        self.output = OutputStage(self._encode, hold, trim, round(trim_tail_max_s * self.rate))

    @property
    def done(self) -> bool:
        return self.state == "stopped"

    @property
    def duration_samples(self) -> int:
        return self.output.encoded

    def schedule(self, kind: str, pos: int, behavior: str = "skip") -> None:
        """Pause, resume or stop at timeline position `pos` (never before what was judged)."""
        if kind not in ("pause", "resume", "stop"):
            raise ValueError(f"unknown recording command {kind!r}")
        self._seq += 1
        bisect.insort(self._commands, _Command(max(pos, self.position), self._seq, kind, behavior))

    def feed(self, block: Block, dtmf: list[DtmfEvent] = ()) -> None:
        """Judge and keep the audio of `block` (positions before `self.position` are skipped)."""
        if self.done:
            return
        keys = [ev for ev in dtmf if ev.digit in self.options.finish_on_key]
        if keys:
            self._late_keys(keys)
        pos = max(block.start, self.position)
        while pos < block.end and not self.done:
            if self._commands and self._commands[0].pos <= pos:
                self._apply(self._commands.pop(0), pos)
                continue
            end = min(block.end, self._commands[0].pos) if self._commands else block.end
            self._segment(block, pos, end, keys)
            if not self.done:
                self.position = pos = end
        while self._commands and not self.done and self._commands[0].pos <= self.position:
            self._apply(self._commands.pop(0), self.position)

    def finish(self, reason: str, at: int | None = None) -> None:
        """End now (hangup, error, shutdown) at `at` or at what has been judged so far."""
        if not self.done:
            self._terminate(reason, self.position if at is None else min(at, self.position))

    def close(self) -> None:
        """Flush the output and the encoder into the sink; call once, after `done`."""
        self.output.close()
        tail = self.encoder.close()
        if tail:
            self.sink.write(tail)
        patch = self.encoder.header_patch()
        if patch is not None:
            self.sink.patch(*patch)
        for tap in self.taps:
            tap(None)
        self.taps.clear()

    # -- internals -------------------------------------------------------------------

    def _apply(self, command: _Command, pos: int) -> None:
        if command.kind == "stop":
            self._terminate("stop", pos)
        elif command.kind == "pause" and self.state == "recording":
            self.state, self._behavior = "paused", command.behavior
            self.events.append(RecordingPaused(self.id, pos, command.behavior))
        elif command.kind == "resume" and self.state == "paused":
            self.state = "recording"
            self.events.append(RecordingResumed(self.id, pos))

    def _segment(self, block: Block, start: int, end: int, keys: list[DtmfEvent]) -> None:
        if self.state == "initiated":
            self.state = "recording"
            self.events.append(RecordingStarted(self.id, start))
        lo, hi = start - block.start, end - block.start
        if self.state == "paused":
            if self._behavior == "silence":
                shape = (hi - lo,) if self.options.channels == 1 else (hi - lo, 2)
                self.output.append(start, np.zeros(shape, dtype=np.int16))
            return
        tracks = [leg.samples[lo:hi] for leg in block.legs]
        mix = mixdown(tracks, [leg.role for leg in block.legs], self.options.channels, self.options.participant, hi - lo)
        cut, reason = self._first_end(start, mix, keys)
        self.output.append(start, mix[:cut])
        self.recorded += cut
        self._tally(block, start, start + cut)
        if reason is not None:
            self._terminate(reason, start + cut, keys)

    def _first_end(self, start: int, mix: np.ndarray, keys: list[DtmfEvent]) -> tuple[int, str | None]:
        """Offset in `mix` where the recording must end, and why (None: it goes on)."""
        cut, reason = len(mix), None
        if self._max and self._max - self.recorded <= cut:
            cut, reason = self._max - self.recorded, "max_length"
        for event in keys:
            if start <= event.pts < start + cut:
                cut, reason = event.pts - start, "finish_key"
        if self._silence is not None:
            hit = first_silence_end(self._silence.feed(mono_view(mix)), self._silence_timeout)
            if hit is not None and hit <= cut:
                cut, reason = hit, "silence"
        return cut, reason

    def _late_keys(self, keys: list[DtmfEvent]) -> None:
        """A finish key whose tone began in audio already judged: cut the held audio back."""
        for event in sorted(keys, key=lambda ev: ev.pts):
            if self.start_pos <= event.pts < self.position and self.state == "recording":
                self.output.cut(event.pts)
                self._terminate("finish_key", event.pts, [event])
                return

    def _terminate(self, reason: str, at: int, keys: list[DtmfEvent] = ()) -> None:
        self.termination_reason = reason
        if reason == "finish_key":
            self.finish_key = next(ev.digit for ev in keys if ev.pts == at) if keys else None
            for tally in self.legs.values():
                if tally.last is not None and tally.last > at:
                    tally.last = at
        self.ended_at = at
        self.position = at
        self.state = "stopped"
        self._commands.clear()
        self.events.append(RecordingStopped(self.id, at, reason, self.finish_key))

    def _tally(self, block: Block, start: int, end: int) -> None:
        for leg in block.legs:
            tally = self.legs.get(leg.leg_id)
            if tally is None:
                tally = self.legs[leg.leg_id] = LegTally(leg.role)
            tally.add(leg.spans, start, end, leg.live_from, leg.live_until)

    def _encode(self, pcm: np.ndarray) -> None:
        data = self.encoder.encode(pcm)
        if data:
            self.sink.write(data)
        for tap in self.taps:
            tap(pcm)


def legs_view(recording: Recording, counters: dict[str, dict[str, int]] | None = None) -> list[dict[str, Any]]:
    """Per-leg statistics of a recording, in milliseconds on the recording's timeline,
    with the ingest's own counters (packets, lost, …) of each leg."""
    counters = counters or {}
    rate = recording.rate
    origin = recording.start_pos

    def ms(value: int | None) -> float | None:
        return None if value is None else round(max(value - origin, 0) * 1000 / rate, 1)

    return [
        {
            "leg_id": leg_id,
            "role": tally.role,
            "frames": tally.frames,
            "audio_ms": round(tally.samples * 1000 / rate, 1),
            "inserted_silence_ms": round(tally.inserted_silence * 1000 / rate, 1),
            "first_ms": ms(tally.first),
            "last_ms": ms(tally.last),
            **counters.get(leg_id, {}),
        }
        for leg_id, tally in recording.legs.items()
    ]
