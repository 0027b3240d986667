"""G.722 and Opus decoders and encoders with memory, through PyAV (libavcodec).

Each object owns one codec context, opened once for the life of its RTP stream: both
codecs predict from earlier samples, so a stream must not be split across contexts, and
opening a context per packet would cost more than decoding it. Payloads go in and out as
raw bytes, exactly as RTP carries them (RFC 3551 §4.5.2 for G.722, RFC 7587 for Opus).
libavcodec errors become CodecError and leave the context usable for the next packet.
"""

from __future__ import annotations

import av
import numpy as np

from mediaserver.codecs.base import FRAME_MS, Framer
from mediaserver.codecs.resample import Resampler
from mediaserver.errors import CodecError

# RFC 3551 §4.5.2: G.722 audio is sampled at 16 kHz, but its RTP clock runs at 8000 Hz
# (a value RFC 1890 assigned in error and kept for compatibility); one octet per tick.
G722_CLOCK_RATE = 8000
G722_SAMPLE_RATE = 16000

# RFC 7587 §4.1: the Opus RTP clock is 48 kHz whatever the audio bandwidth, and SDP
# always says opus/48000/2 (§7) even for mono streams.
OPUS_CLOCK_RATE = 48000
OPUS_RATES = (8000, 16000, 48000)
OPUS_BITRATE = 32000
# libavcodec's libopus wrapper always decodes at 48 kHz; other rates are resampled.
_OPUS_DECODE_RATE = 48000
# RFC 6716 §3.1: frame length in 48 kHz samples by configuration number (TOC >> 3).
_OPUS_FRAME = (480, 960, 1920, 2880) * 3 + (480, 960) * 2 + (120, 240, 480, 960) * 4


def _decoder_context(codec: str, sample_rate: int) -> av.AudioCodecContext:
    ctx = av.CodecContext.create(codec, "r")
    ctx.sample_rate = sample_rate
    ctx.layout = "mono"
    return ctx


def _encoder_context(codec: str, sample_rate: int, bit_rate: int, options: dict[str, str]) -> av.AudioCodecContext:
    ctx = av.CodecContext.create(codec, "w")
    ctx.sample_rate = sample_rate
    ctx.format = "s16"
    ctx.layout = "mono"
    ctx.bit_rate = bit_rate
    ctx.options = options
    ctx.open()
    return ctx


def _decode_packet(ctx: av.AudioCodecContext, payload: bytes, label: str) -> np.ndarray:
    """Every sample libavcodec decodes from one packet, as mono int16."""
    try:
        frames = ctx.decode(av.Packet(payload))
    except av.error.FFmpegError as exc:
        raise CodecError(f"{label} payload of {len(payload)} bytes cannot be decoded: {exc}") from exc
    for frame in frames:
        if frame.format.name != "s16" or len(frame.layout.channels) != 1:
            raise CodecError(f"{label} decoder produced {frame.format.name} {frame.layout.name}, not s16 mono")
    if not frames:
        return np.empty(0, dtype=np.int16)
    return np.concatenate([frame.to_ndarray().reshape(-1) for frame in frames])


class _AvEncoder:
    """Shared encoder plumbing: 20 ms frames in, one RTP payload out per frame."""

    label = ""

    def __init__(self, ctx: av.AudioCodecContext, timestamp_step: int) -> None:
        self.sample_rate: int = ctx.sample_rate
        self.timestamp_step = timestamp_step
        self._ctx = ctx
        self._framer = Framer(self.sample_rate * FRAME_MS // 1000)
        self._pts = 0

    def encode(self, samples: np.ndarray) -> list[bytes]:
        """Buffer 1-D int16 samples; return a payload for every whole 20 ms frame."""
        return [payload for frame in self._framer.push(samples) for payload in self._encode_frame(frame)]

    def flush(self) -> list[bytes]:
        """Encode the buffered remainder padded with silence to a whole frame."""
        return [payload for frame in self._framer.flush() for payload in self._encode_frame(frame)]

    def _encode_frame(self, pcm: np.ndarray) -> list[bytes]:
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        self._pts += len(pcm)
        try:
            return [bytes(packet) for packet in self._ctx.encode(frame)]
        except av.error.FFmpegError as exc:
            raise CodecError(f"{self.label} encoder failed: {exc}") from exc


class G722Decoder:
    """G.722 payloads (one octet per two 16 kHz samples) to 16 kHz int16 PCM.

    libavcodec has no G.722 packet loss concealment, so a lost packet becomes silence as
    long as the last packet received.
    """

    sample_rate = G722_SAMPLE_RATE

    def __init__(self) -> None:
        self._ctx = _decoder_context("g722", G722_SAMPLE_RATE)
        self._last_length = G722_SAMPLE_RATE * FRAME_MS // 1000

    def decode(self, payload: bytes) -> np.ndarray:
        # An empty packet would tell libavcodec the stream has ended.
        if not len(payload):
            return np.empty(0, dtype=np.int16)
        samples = _decode_packet(self._ctx, payload, "G.722")
        self._last_length = len(samples)
        return samples

    def conceal(self) -> np.ndarray:
        return np.zeros(self._last_length, dtype=np.int16)


class G722Encoder(_AvEncoder):
    """16 kHz int16 PCM to G.722 payloads of 20 ms (160 octets, 160 RTP clock ticks)."""

    label = "G.722"

    def __init__(self) -> None:
        ctx = _encoder_context("g722", G722_SAMPLE_RATE, 64000, {})
        super().__init__(ctx, G722_CLOCK_RATE * FRAME_MS // 1000)


class OpusDecoder:
    """Opus payloads (RFC 7587) to mono int16 PCM at `output_rate`.

    Stereo streams are downmixed by libopus. Lost packets are concealed by libopus itself
    (see `conceal`). Output below 48 kHz passes through a streaming Resampler, which adds
    its constant `delay_seconds`.
    """

    def __init__(self, output_rate: int = 48000) -> None:
        if output_rate not in OPUS_RATES:
            raise ValueError(f"Opus output rate must be one of {OPUS_RATES}, not {output_rate}")
        self.sample_rate = output_rate
        self._ctx = _decoder_context("libopus", _OPUS_DECODE_RATE)
        self._resampler = Resampler(_OPUS_DECODE_RATE, output_rate)
        self._toc: int | None = None
        self._last_length = _OPUS_DECODE_RATE * FRAME_MS // 1000

    def decode(self, payload: bytes) -> np.ndarray:
        # RFC 6716 §3.1: a packet has at least the TOC byte; an empty one would also be
        # read by libavcodec as the end of the stream.
        if not len(payload):
            raise CodecError("Opus payload is empty; a packet has at least one TOC byte")
        pcm = _decode_packet(self._ctx, payload, "Opus")
        self._toc = payload[0]
        self._last_length = len(pcm)
        return self._resampler.process(pcm)

    def conceal(self) -> np.ndarray:
        """Audio for one lost packet, as long as the last packet received.

        RFC 6716 §3.2.1 allows frames of length zero (DTX), and libopus answers them with
        its packet loss concealment. The packet built here repeats the last TOC
        configuration and packs as many empty frames with code 3 (§3.2.5) as the last
        packet lasted, so the concealment continues the signal for that long.
        """
        if self._toc is None:
            pcm = np.zeros(self._last_length, dtype=np.int16)
        else:
            frame = _OPUS_FRAME[self._toc >> 3]
            count = max(1, self._last_length // frame)
            pcm = _decode_packet(self._ctx, bytes(((self._toc & 0xFC) | 3, count)), "Opus")
        return self._resampler.process(pcm)


class OpusEncoder(_AvEncoder):
    """Mono int16 PCM at 8, 16 or 48 kHz to one Opus packet per 20 ms (960 clock ticks).

    libopus takes these rates directly, so no resampling happens here.
    """

    label = "Opus"

    def __init__(self, input_rate: int = 48000, bit_rate: int = OPUS_BITRATE) -> None:
        if input_rate not in OPUS_RATES:
            raise ValueError(f"Opus input rate must be one of {OPUS_RATES}, not {input_rate}")
        options = {"application": "voip", "frame_duration": str(FRAME_MS)}
        ctx = _encoder_context("libopus", input_rate, bit_rate, options)
        super().__init__(ctx, OPUS_CLOCK_RATE * FRAME_MS // 1000)
