"""The RTP audio codecs this server speaks, by SDP encoding name and by payload type.

Static payload types come from RFC 3551 Table 4; the rest are dynamic (96-127, RFC 3551
§3) and bound per session by SDP `a=rtpmap:<pt> <name>/<clock>[/<channels>]`. Every entry
makes decoders and encoders with the one interface of `base.Decoder` / `base.Encoder`,
so callers never special-case a codec: G.711 and L16 are wrapped the same way as the
stateful G.722 and Opus codecs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from mediaserver.codecs import g711, l16
from mediaserver.codecs.base import (
    Decoder,
    Encoder,
    ResamplingDecoder,
    ResamplingEncoder,
    SampleDecoder,
    SampleEncoder,
)
from mediaserver.codecs.pyav import (
    G722_CLOCK_RATE,
    G722_SAMPLE_RATE,
    OPUS_CLOCK_RATE,
    G722Decoder,
    G722Encoder,
    OpusDecoder,
    OpusEncoder,
)
from mediaserver.errors import CodecError
from mediaserver.media import SUPPORTED_RATES

# RFC 3551 §3: payload types 96-127 are dynamic, bound by out-of-band signalling (SDP).
DYNAMIC_PAYLOAD_TYPES = range(96, 128)


@dataclass(frozen=True)
class RtpCodec:
    """One RTP payload format: what SDP calls it and how to turn it into PCM."""

    name: str  # encoding name as written in SDP a=rtpmap
    clock_rate: int  # RTP timestamp clock
    sample_rate: int  # rate of the audio carried; G.722 is the one that differs
    channels: int  # as written in SDP a=rtpmap
    payload_type: int | None  # static PT from RFC 3551 Table 4, None when dynamic
    decoder: Callable[[int], Decoder] | None = None  # called with the output rate
    encoder: Callable[[int], Encoder] | None = None  # called with the input rate

    @property
    def dynamic(self) -> bool:
        return self.payload_type is None

    @property
    def is_audio(self) -> bool:
        return self.decoder is not None

    @property
    def rtpmap(self) -> str:
        """The `<name>/<clock>[/<channels>]` part of an SDP a=rtpmap line."""
        suffix = f"/{self.channels}" if self.channels != 1 else ""
        return f"{self.name}/{self.clock_rate}{suffix}"

    def make_decoder(self, output_rate: int | None = None) -> Decoder:
        """A decoder for one stream, producing mono int16 at `output_rate`.

        `None` keeps the codec's own `sample_rate`; another supported rate adds a
        streaming resampler (and its constant 1.5 ms delay).
        """
        if self.decoder is None:
            raise CodecError(f"{self.name} carries RFC 4733 events, not audio; it has no decoder")
        return self.decoder(self._rate(output_rate))

    def make_encoder(self, input_rate: int | None = None) -> Encoder:
        """An encoder for one stream, fed mono int16 at `input_rate` (default: `sample_rate`)."""
        if self.encoder is None:
            raise CodecError(f"{self.name} carries RFC 4733 events, not audio; it has no encoder")
        return self.encoder(self._rate(input_rate))

    def _rate(self, rate: int | None) -> int:
        if rate is None:
            return self.sample_rate
        if rate not in SUPPORTED_RATES:
            raise ValueError(f"unsupported sample rate {rate}; expected one of {SUPPORTED_RATES}")
        return rate


def _decoder_at(make: Callable[[], Decoder], output_rate: int) -> Decoder:
    """`make()`'s decoder, behind a resampler when its own rate is not `output_rate`."""
    decoder = make()
    return decoder if decoder.sample_rate == output_rate else ResamplingDecoder(decoder, output_rate)


def _encoder_at(make: Callable[[], Encoder], input_rate: int) -> Encoder:
    """`make()`'s encoder, behind a resampler when its own rate is not `input_rate`."""
    encoder = make()
    return encoder if encoder.sample_rate == input_rate else ResamplingEncoder(encoder, input_rate)


def _sample_codec(name: str, rate: int, payload_type: int | None, decode: Callable, encode: Callable,
                  bytes_per_sample: int = 1) -> RtpCodec:
    """An entry for a codec without memory, one sample per RTP clock tick."""
    return RtpCodec(
        name, rate, rate, 1, payload_type,
        decoder=partial(_decoder_at, partial(SampleDecoder, decode, rate, bytes_per_sample)),
        encoder=partial(_encoder_at, partial(SampleEncoder, encode, rate, rate)),
    )


def _l16(rate: int) -> RtpCodec:
    # RFC 3551 §4.5.11: L16 travels in network byte order. Its static payload types,
    # 10 (44.1 kHz stereo) and 11 (44.1 kHz mono), are not telephony rates and are not
    # supported; 8 and 16 kHz mono L16 always use a dynamic payload type.
    decode = partial(l16.decode_l16, byteorder="big")
    encode = partial(l16.encode_l16, byteorder="big")
    return _sample_codec("L16", rate, None, decode, encode, bytes_per_sample=2)


def _telephone_event(rate: int) -> RtpCodec:
    # RFC 4733: events sharing an audio stream's SSRC use that audio codec's clock.
    return RtpCodec("telephone-event", rate, rate, 1, None)


CODECS: tuple[RtpCodec, ...] = (
    _sample_codec("PCMU", 8000, 0, g711.decode_ulaw, g711.encode_ulaw),
    _sample_codec("PCMA", 8000, 8, g711.decode_alaw, g711.encode_alaw),
    # RFC 3551 §4.5.2: G.722 is 16 kHz audio on an 8000 Hz RTP clock.
    RtpCodec(
        "G722", G722_CLOCK_RATE, G722_SAMPLE_RATE, 1, 9,
        decoder=partial(_decoder_at, G722Decoder),
        encoder=partial(_encoder_at, G722Encoder),
    ),
    _l16(8000),
    _l16(16000),
    # RFC 7587 §7: always opus/48000/2 in SDP, whatever the stream's channels and rate.
    RtpCodec("opus", OPUS_CLOCK_RATE, 48000, 2, None, decoder=OpusDecoder, encoder=OpusEncoder),
    _telephone_event(8000),
    _telephone_event(16000),
    _telephone_event(48000),
)


def find_codec(name: str, clock_rate: int | None = None, channels: int | None = None) -> RtpCodec | None:
    """The codec an SDP rtpmap names (the name is case-insensitive, RFC 4855 §3), or None.

    With `clock_rate` or `channels` left out, the first entry of that name matches.
    """
    wanted = name.lower()
    for codec in CODECS:
        if codec.name.lower() != wanted:
            continue
        if clock_rate is not None and codec.clock_rate != clock_rate:
            continue
        if channels is not None and codec.channels != channels:
            continue
        return codec
    return None


def codec_for_payload_type(payload_type: int) -> RtpCodec | None:
    """The codec a static payload type stands for without SDP, or None (RFC 3551 Table 4)."""
    for codec in CODECS:
        if codec.payload_type == payload_type:
            return codec
    return None
