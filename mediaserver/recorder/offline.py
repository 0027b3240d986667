"""Recording WAV files as fast as possible through the same engine the server runs.

This is what `mediaserver mix` and the benchmarks drive: every input file is a leg that
starts at time zero (first file the caller, second the callee, the rest conference
participants), the session runs without a wall clock, and the recording ends when the
inputs do (termination reason `hangup`) unless silence, a length limit or a finish key
end it first.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from mediaserver.encoding import make_encoder
from mediaserver.errors import MediaServerError
from mediaserver.media import SUPPORTED_RATES, PcmFrame
from mediaserver.options import RecordingOptions
from mediaserver.recorder.recording import Recording
from mediaserver.recorder.session import Session
from mediaserver.storage.spool import Spool, file_sha256

CHUNK_S = 1.0


class InputError(MediaServerError):
    """An input file that cannot be read as a mono telephony WAV."""


@dataclass(frozen=True, slots=True)
class EncoderSettings:
    mp3_quality: int = 7
    opus_complexity: int = 10


def role_for(index: int) -> str:
    return ("caller", "callee")[index] if index < 2 else f"participant{index + 1}"


def _open(path: Path) -> soundfile.SoundFile:
    try:
        sf = soundfile.SoundFile(path)
    except (OSError, RuntimeError, soundfile.LibsndfileError) as exc:
        raise InputError(f"{path}: cannot read audio: {exc}") from None
    if sf.samplerate not in SUPPORTED_RATES:
        sf.close()
        raise InputError(f"{path}: sample rate {sf.samplerate} Hz is not one of {', '.join(map(str, SUPPORTED_RATES))}")
    return sf


def _read(sf: soundfile.SoundFile, frames: int) -> np.ndarray:
    data = sf.read(frames, dtype="int16", always_2d=True)
    if data.shape[1] == 1:
        return data[:, 0].copy()
    # A stereo input counts as one leg: its channels are averaged.
    return data.astype(np.int32).mean(axis=1).astype(np.int16)


def mix_files(inputs: list[Path], output: Path, options: RecordingOptions,
              settings: EncoderSettings = EncoderSettings(), silence_threshold_dbfs: float = -45.0) -> dict[str, Any]:
    """Record `inputs` into `output`; returns the summary the CLI prints."""
    if not inputs:
        raise InputError("at least one input file is needed")
    files = []
    try:
        for path in inputs:
            files.append(_open(path))
        return _run(files, inputs, output, options, settings, silence_threshold_dbfs)
    finally:
        for sf in files:
            sf.close()


def _run(files, inputs, output, options, settings, threshold) -> dict[str, Any]:
    started = time.process_time()
    encoder = make_encoder(options.format, options.sample_rate, options.channels, options.effective_bitrate,
                           mp3_quality=settings.mp3_quality, opus_complexity=settings.opus_complexity)
    spool_path = output.with_name(f".{output.name}.part")
    spool = Spool(spool_path)
    try:
        session = Session("offline", "offline", 0.0, options.sample_rate, live=False)
        recording = Recording("offline", options, 0, encoder, spool, silence_threshold_dbfs=threshold)
        session.start_recording(recording, 0.0)
        legs = [session.add_leg(f"leg{i}", role_for(i), 0.0) for i in range(len(files))]
        _pump(session, files, legs, recording)
        spool.close()
        os.replace(spool_path, output)
    except BaseException:
        spool.close()
        spool_path.unlink(missing_ok=True)
        raise
    return _summary(recording, inputs, output, options, time.process_time() - started)


def _pump(session: Session, files, legs, recording: Recording) -> None:
    open_files = list(range(len(files)))
    while open_files and not recording.done:
        for index in list(open_files):
            sf = files[index]
            block = _read(sf, int(sf.samplerate * CHUNK_S))
            if len(block):
                session.post_pcm(PcmFrame(block, sf.samplerate, None, legs[index].leg_id))
            if len(block) < int(sf.samplerate * CHUNK_S):
                session.end_leg(legs[index].leg_id, 0.0)
                open_files.remove(index)
        session.process(0.0)
    session.hangup(0.0)
    session.process(0.0, flush=True)


def _summary(recording: Recording, inputs, output: Path, options: RecordingOptions, cpu: float) -> dict[str, Any]:
    rate = recording.rate
    duration = recording.duration_samples / rate
    legs = []
    for leg_id, tally in sorted(recording.legs.items()):
        legs.append({
            "leg_id": leg_id,
            "role": tally.role,
            "input": str(inputs[int(leg_id[3:])]),
            "frames": tally.frames,
            "samples": tally.samples,
            "inserted_silence_ms": round(tally.inserted_silence * 1000 / rate, 1),
            "first_ms": None if tally.first is None else round(tally.first * 1000 / rate, 1),
            "last_ms": None if tally.last is None else round(tally.last * 1000 / rate, 1),
        })
    return {
        "output": str(output),
        "format": options.format,
        "sample_rate": rate,
        "channels": options.channels,
        "bitrate": options.effective_bitrate,
        "duration": round(duration, 3),
        "termination_reason": recording.termination_reason,
        "finish_key": recording.finish_key,
        "file_size": output.stat().st_size,
        "sha256": file_sha256(output),
        "legs": legs,
        "cpu_seconds": round(cpu, 3),
        "speed": round(duration / cpu, 1) if cpu > 0 else None,
    }
