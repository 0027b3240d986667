"""The codec table: lookups by name and payload type, and one interface for every codec."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mediaserver.codecs import g711
from mediaserver.codecs.registry import CODECS, DYNAMIC_PAYLOAD_TYPES, RtpCodec, codec_for_payload_type, find_codec
from mediaserver.errors import CodecError

RATES = (8000, 16000, 48000)
AUDIO = [codec for codec in CODECS if codec.is_audio]
AUDIO_IDS = [codec.rtpmap for codec in AUDIO]


def tone(freq: float, rate: int, seconds: float, amplitude: float = 10000.0) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return np.round(amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def amplitude_at(samples: np.ndarray, freq: float, rate: int) -> float:
    t = np.arange(len(samples)) / rate
    basis = np.column_stack((np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)))
    coef, *_ = np.linalg.lstsq(basis, samples.astype(np.float64), rcond=None)
    return float(np.hypot(*coef))


@pytest.mark.parametrize(
    ("payload_type", "rtpmap", "sample_rate"),
    [(0, "PCMU/8000", 8000), (8, "PCMA/8000", 8000), (9, "G722/8000", 16000)],
)
def test_static_payload_types(payload_type: int, rtpmap: str, sample_rate: int) -> None:
    codec = codec_for_payload_type(payload_type)
    assert codec is not None
    assert (codec.rtpmap, codec.sample_rate, codec.payload_type) == (rtpmap, sample_rate, payload_type)
    assert not codec.dynamic


@pytest.mark.parametrize("payload_type", [3, 10, 11, 13, 18, 96, 101, 111, 127])
def test_payload_types_without_a_static_codec_here(payload_type: int) -> None:
    # 10 and 11 are L16 at 44.1 kHz (stereo, mono): not telephony rates, not supported.
    assert codec_for_payload_type(payload_type) is None


def test_the_table() -> None:
    rows = [(c.name, c.clock_rate, c.sample_rate, c.channels, c.payload_type, c.is_audio) for c in CODECS]
    assert rows == [
        ("PCMU", 8000, 8000, 1, 0, True),
        ("PCMA", 8000, 8000, 1, 8, True),
        ("G722", 8000, 16000, 1, 9, True),
        ("L16", 8000, 8000, 1, None, True),
        ("L16", 16000, 16000, 1, None, True),
        ("opus", 48000, 48000, 2, None, True),
        ("telephone-event", 8000, 8000, 1, None, False),
        ("telephone-event", 16000, 16000, 1, None, False),
        ("telephone-event", 48000, 48000, 1, None, False),
    ]
    assert list(DYNAMIC_PAYLOAD_TYPES) == list(range(96, 128))


@pytest.mark.parametrize(
    ("name", "clock_rate", "channels", "rtpmap"),
    [
        ("pcmu", None, None, "PCMU/8000"),
        ("Pcma", 8000, 1, "PCMA/8000"),
        ("g722", 8000, None, "G722/8000"),
        ("l16", 16000, 1, "L16/16000"),
        ("L16", None, None, "L16/8000"),
        ("OPUS", 48000, 2, "opus/48000/2"),
        ("Telephone-Event", 16000, None, "telephone-event/16000"),
    ],
)
def test_find_by_sdp_name_is_case_insensitive(name: str, clock_rate: int | None, channels: int | None, rtpmap: str) -> None:
    codec = find_codec(name, clock_rate, channels)
    assert codec is not None and codec.rtpmap == rtpmap


@pytest.mark.parametrize(
    ("name", "clock_rate", "channels"),
    [("G729", None, None), ("L16", 44100, None), ("L16", 8000, 2), ("opus", 16000, None), ("PCMU", 16000, None), ("", None, None)],
)
def test_unsupported_formats_are_not_found(name: str, clock_rate: int | None, channels: int | None) -> None:
    assert find_codec(name, clock_rate, channels) is None


@pytest.mark.parametrize("codec", AUDIO, ids=AUDIO_IDS)
def test_encoders_make_20ms_payloads(codec: RtpCodec) -> None:
    encoder = codec.make_encoder()
    assert encoder.sample_rate == codec.sample_rate
    # 20 ms of RTP clock: the step follows the clock, not the audio rate (G.722).
    assert encoder.timestamp_step == codec.clock_rate // 50
    payloads = encoder.encode(tone(1000, codec.sample_rate, 0.1))
    assert len(payloads) == 5
    sizes = {"PCMU": 160, "PCMA": 160, "G722": 160, "L16": codec.clock_rate // 50 * 2}
    if codec.name in sizes:
        assert {len(p) for p in payloads} == {sizes[codec.name]}


@pytest.mark.parametrize(("codec", "rate"), list(itertools.product(AUDIO, RATES)), ids=[f"{c.rtpmap}-{r}" for c in AUDIO for r in RATES])
def test_every_codec_round_trips_a_tone_at_every_rate(codec: RtpCodec, rate: int) -> None:
    encoder = codec.make_encoder(rate)
    decoder = codec.make_decoder(rate)
    assert encoder.sample_rate == decoder.sample_rate == rate
    decoded = [decoder.decode(p) for p in encoder.encode(tone(1000, rate, 0.5))]
    assert {len(chunk) for chunk in decoded} == {rate // 50}
    settled = np.concatenate(decoded)[rate // 10 :]
    gain_db = 20 * np.log10(amplitude_at(settled, 1000, rate) / 10000)
    assert abs(gain_db) <= 1.0, gain_db
    concealed = decoder.conceal()
    assert concealed.dtype == np.int16 and len(concealed) == rate // 50


def test_pcmu_decoder_is_the_g711_table() -> None:
    pcmu = find_codec("PCMU")
    assert pcmu is not None
    decoder = pcmu.make_decoder()
    payload = bytes(range(256))
    np.testing.assert_array_equal(decoder.decode(payload), g711.decode_ulaw(payload))
    assert decoder.conceal().tolist() == [0] * 256  # as long as the last packet


def test_l16_decoder_reads_network_order_and_refuses_odd_payloads() -> None:
    l16 = find_codec("L16", 16000)
    assert l16 is not None
    decoder = l16.make_decoder()
    assert decoder.decode(b"\x12\x34\xff\xfe").tolist() == [0x1234, -2]
    with pytest.raises(CodecError, match="odd length"):
        decoder.decode(b"\x00\x01\x02")


def test_g722_decoder_at_8khz_resamples_its_16khz_audio() -> None:
    g722 = codec_for_payload_type(9)
    assert g722 is not None
    decoder = g722.make_decoder(8000)
    assert decoder.sample_rate == 8000
    assert len(decoder.decode(b"\x00" * 160)) == 160


def test_telephone_event_has_no_audio_codec() -> None:
    events = find_codec("telephone-event")
    assert events is not None and not events.is_audio
    with pytest.raises(CodecError, match="telephone-event carries RFC 4733 events, not audio"):
        events.make_decoder()
    with pytest.raises(CodecError, match="telephone-event carries RFC 4733 events, not audio"):
        events.make_encoder()


@pytest.mark.parametrize("rate", [11025, 44100, 0])
def test_unsupported_pcm_rates_are_refused(rate: int) -> None:
    pcmu = codec_for_payload_type(0)
    assert pcmu is not None
    with pytest.raises(ValueError, match="unsupported sample rate"):
        pcmu.make_decoder(rate)
    with pytest.raises(ValueError, match="unsupported sample rate"):
        pcmu.make_encoder(rate)


def test_each_make_gives_an_independent_stream() -> None:
    opus = find_codec("opus")
    assert opus is not None
    first, second = opus.make_encoder(16000), opus.make_encoder(16000)
    pcm = tone(440, 16000, 0.1)
    assert first.encode(pcm) == second.encode(pcm)
