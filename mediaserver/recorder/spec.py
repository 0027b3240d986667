"""What it takes to make a recording, as plain data: it travels to whichever thread or
process runs the call's session, which opens the encoder and the spool there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mediaserver.encoding import make_encoder
from mediaserver.options import RecordingOptions
from mediaserver.recorder.recording import Recording
from mediaserver.storage.spool import Spool


@dataclass(frozen=True, slots=True)
class RecordingSpec:
    recording_id: str
    options: RecordingOptions
    spool_path: str
    mp3_quality: int = 7
    opus_complexity: int = 10
    wav_buffer_ms: int = 250
    silence_threshold_dbfs: float = -45.0


def open_recording(spec: RecordingSpec) -> Recording:
    """The recording, with its encoder and its spool file opened."""
    options = spec.options
    encoder = make_encoder(options.format, options.sample_rate, options.channels, options.effective_bitrate,
                           mp3_quality=spec.mp3_quality, opus_complexity=spec.opus_complexity,
                           wav_buffer_ms=spec.wav_buffer_ms)
    spool = Spool(Path(spec.spool_path))
    return Recording(spec.recording_id, options, 0, encoder, spool, silence_threshold_dbfs=spec.silence_threshold_dbfs)
