"""G.722 and Opus through PyAV: ffmpeg's reference streams, round trips, loss, bad input."""

from __future__ import annotations

import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mediaserver.codecs.pyav import (
    G722_CLOCK_RATE,
    OPUS_CLOCK_RATE,
    G722Decoder,
    G722Encoder,
    OpusDecoder,
    OpusEncoder,
)
from mediaserver.errors import CodecError

CODECS_DIR = Path(__file__).resolve().parents[1] / "codecs"
OPUS_PRE_SKIP = 312  # from the OpusHead of codecs/opus_ffmpeg.opus, 48 kHz samples
RESAMPLER_DELAY_S = 0.0015


def speech_like(rate: int, seconds: float = 1.0) -> np.ndarray:
    """A voiced-speech stand-in: a gliding harmonic comb shaped by formants, syllable AM."""
    n = round(rate * seconds)
    t = np.arange(n) / rate
    f0 = 100 + 80 * t / seconds + 10 * np.sin(2 * np.pi * 5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    top = min(0.45 * rate, 7000)
    formants = [(600, 150, 1.0), (1400, 200, 0.6), (2600, 300, 0.35), (3600, 400, 0.2), (5000, 600, 0.1)]
    out = np.zeros(n)
    for k in range(1, int(top // 100) + 1):
        fk = k * f0
        envelope = sum(a * np.exp(-0.5 * ((fk - fc) / bw) ** 2) for fc, bw, a in formants)
        out += np.where(fk < top, envelope * np.sin(k * phase), 0) / k**0.3
    out *= 0.55 + 0.45 * np.sin(2 * np.pi * 3.5 * t)
    return np.round(out * 12000 / np.abs(out).max()).astype(np.int16)


def aligned_quality(sent: np.ndarray, received: np.ndarray, max_lag: int) -> tuple[int, float, float]:
    """(lag, SNR dB, correlation) of `received` against `sent` at the best lag."""
    x = sent.astype(np.float64)
    y = received.astype(np.float64)
    start, stop = len(x) // 10, len(x) - max_lag - len(x) // 10
    ref = x[start:stop]
    lag = max(range(max_lag), key=lambda k: float(np.dot(y[start + k : stop + k], ref)))
    got = y[start + lag : stop + lag]
    snr = 10 * np.log10(np.sum(ref**2) / np.sum((got - ref) ** 2))
    return lag, float(snr), float(np.corrcoef(got, ref)[0, 1])


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))


def opus_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return [bytes(packet) for packet in container.demux(stream) if packet.size]


def opus_toc(packet: bytes) -> tuple[str, int]:
    """RFC 6716 §3.1: (bandwidth, frame length in 48 kHz samples) from the TOC byte."""
    config = packet[0] >> 3
    if config < 12:
        return ("NB", "MB", "WB")[config // 4], (480, 960, 1920, 2880)[config % 4]
    if config < 16:
        return ("SWB", "FB")[(config - 12) // 2], (480, 960)[config % 2]
    return ("NB", "WB", "SWB", "FB")[(config - 16) // 4], (120, 240, 480, 960)[config % 4]


# G.722


def test_g722_decode_matches_ffmpeg_bit_for_bit() -> None:
    bitstream = (CODECS_DIR / "g722_ffmpeg.g722").read_bytes()
    expected = np.fromfile(CODECS_DIR / "g722_ffmpeg_decode.s16le", dtype="<i2")
    decoder = G722Decoder()
    decoded = np.concatenate([decoder.decode(bitstream[i : i + 160]) for i in range(0, len(bitstream), 160)])
    np.testing.assert_array_equal(decoded, expected)


def test_g722_state_carries_across_payloads_of_any_size() -> None:
    bitstream = (CODECS_DIR / "g722_ffmpeg.g722").read_bytes()
    expected = np.fromfile(CODECS_DIR / "g722_ffmpeg_decode.s16le", dtype="<i2")
    decoder, out, start = G722Decoder(), [], 0
    for size in [1, 7, 333, 2, 160] * 40:
        out.append(decoder.decode(bitstream[start : start + size]))
        start += size
    np.testing.assert_array_equal(np.concatenate(out), expected[: 2 * start])


def test_g722_encode_matches_ffmpeg_bit_for_bit() -> None:
    pcm = np.fromfile(CODECS_DIR / "speech_like_16k.s16le", dtype="<i2").astype(np.int16)
    encoder = G722Encoder()
    # Fed in uneven pieces: the 20 ms framing must not depend on how PCM arrives.
    payloads = [p for start in range(0, len(pcm), 1234) for p in encoder.encode(pcm[start : start + 1234])]
    assert [len(p) for p in payloads] == [160] * 50
    assert b"".join(payloads) == (CODECS_DIR / "g722_ffmpeg.g722").read_bytes()
    assert encoder.flush() == []


def test_g722_rtp_clock_is_half_the_sample_rate() -> None:
    # RFC 3551 §4.5.2: 20 ms of 16 kHz audio is 320 samples but 160 RTP clock ticks.
    encoder = G722Encoder()
    assert (encoder.sample_rate, encoder.timestamp_step, G722_CLOCK_RATE) == (16000, 160, 8000)
    assert G722Decoder().sample_rate == 16000


def test_g722_round_trip_of_speech_like_audio() -> None:
    sent = speech_like(16000)
    encoder, decoder = G722Encoder(), G722Decoder()
    received = np.concatenate([decoder.decode(p) for p in encoder.encode(sent)])
    lag, snr, corr = aligned_quality(sent, received, 100)
    assert lag == 22  # the QMF band split and merge together delay by 22 samples (1.375 ms)
    assert snr >= 15
    assert corr >= 0.98


def test_g722_any_octets_decode_to_two_samples_each() -> None:
    decoder = G722Decoder()
    payload = np.random.default_rng(5).integers(0, 256, 321).astype(np.uint8).tobytes()
    assert len(decoder.decode(payload)) == 642
    assert len(decoder.decode(b"")) == 0
    assert len(decoder.decode(b"\x00" * 160)) == 320  # still decoding after the empty one


def test_g722_conceals_with_silence_as_long_as_the_last_packet() -> None:
    decoder = G722Decoder()
    assert len(decoder.conceal()) == 320
    decoder.decode(b"\x55" * 80)
    concealed = decoder.conceal()
    assert len(concealed) == 160 and not concealed.any()


def test_g722_flush_pads_the_last_frame() -> None:
    encoder = G722Encoder()
    assert len(encoder.encode(np.full(500, 1000, dtype=np.int16))) == 1  # 180 samples wait
    assert [len(p) for p in encoder.flush()] == [160]
    assert encoder.flush() == []


# Opus


def test_opus_decode_of_ffmpeg_packets_matches_ffmpeg() -> None:
    packets = opus_packets(CODECS_DIR / "opus_ffmpeg.opus")
    assert len(packets) == 51
    expected = np.fromfile(CODECS_DIR / "opus_ffmpeg_decode_48k.s16le", dtype="<i2").astype(np.int32)
    decoder = OpusDecoder(48000)
    decoded = np.concatenate([decoder.decode(p) for p in packets]).astype(np.int32)
    # RTP has no pre-skip: the raw stream starts with the encoder's look-ahead.
    assert len(decoded) == 51 * 960
    difference = decoded[OPUS_PRE_SKIP : OPUS_PRE_SKIP + len(expected)] - expected
    assert np.abs(difference).max() <= 2


@pytest.mark.parametrize(("rate", "min_snr", "min_corr"), [(8000, 5.0, 0.85), (16000, 10.0, 0.95), (48000, 10.0, 0.95)])
def test_opus_round_trip_at_each_rate(rate: int, min_snr: float, min_corr: float) -> None:
    sent = speech_like(rate)
    encoder, decoder = OpusEncoder(rate), OpusDecoder(rate)
    payloads = encoder.encode(sent)
    assert len(payloads) == 50
    received = np.concatenate([decoder.decode(p) for p in payloads])
    assert len(received) == len(sent)
    lag, snr, corr = aligned_quality(sent, received, rate // 50)
    # libopus's 6.5 ms look-ahead, plus the resampler's 1.5 ms below 48 kHz.
    expected_lag = OPUS_PRE_SKIP * rate // 48000 + (round(RESAMPLER_DELAY_S * rate) if rate != 48000 else 0)
    assert abs(lag - expected_lag) <= max(1, rate // 10000)
    assert snr >= min_snr
    assert corr >= min_corr


@pytest.mark.parametrize(("rate", "bandwidths"), [(8000, {"NB"}), (16000, {"WB"}), (48000, {"SWB", "FB"})])
def test_opus_encoder_sends_20ms_packets_on_the_48khz_clock(rate: int, bandwidths: set[str]) -> None:
    encoder = OpusEncoder(rate)
    assert encoder.timestamp_step == 960 and OPUS_CLOCK_RATE == 48000  # RFC 7587 §4.1
    payloads = encoder.encode(speech_like(rate, 0.2))
    assert len(payloads) == 10
    tocs = [opus_toc(p) for p in payloads]
    assert {frame for _, frame in tocs} == {960}
    assert {band for band, _ in tocs} <= bandwidths
    assert all(p[0] & 3 == 0 for p in payloads)  # one frame per packet


def test_opus_decodes_a_stereo_stream_to_mono() -> None:
    # RFC 7587 §7: the SDP always says two channels; a sender may really send two.
    left = speech_like(48000)
    right = (left // 2).astype(np.int16)
    ctx = av.CodecContext.create("libopus", "w")
    ctx.sample_rate, ctx.format, ctx.layout, ctx.bit_rate = 48000, "s16", "stereo", 96000
    ctx.open()
    interleaved = np.column_stack((left, right)).reshape(1, -1)
    payloads = []
    for start in range(0, len(left), 960):
        frame = av.AudioFrame.from_ndarray(interleaved[:, 2 * start : 2 * (start + 960)].copy(), format="s16", layout="stereo")
        frame.sample_rate, frame.pts = 48000, start
        payloads += [bytes(p) for p in ctx.encode(frame)]
    assert payloads[5][0] & 0x04  # the TOC's stereo flag
    decoder = OpusDecoder(48000)
    received = np.concatenate([decoder.decode(p) for p in payloads])
    mixed = ((left.astype(np.int32) + right) // 2).astype(np.int16)
    lag, snr, corr = aligned_quality(mixed, received, 960)
    assert lag == OPUS_PRE_SKIP
    assert corr >= 0.99


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
def test_opus_conceals_a_lost_packet_by_continuing_the_signal(rate: int) -> None:
    payloads = OpusEncoder(rate).encode(speech_like(rate))
    decoder = OpusDecoder(rate)
    last = [decoder.decode(p) for p in payloads[:20]][-1]
    concealed = decoder.conceal()
    assert len(concealed) == len(last) == rate // 50
    level_db = 20 * np.log10(rms(concealed) / rms(last))
    assert -6 <= level_db <= 3
    assert len(decoder.decode(payloads[21])) == rate // 50


def test_opus_conceals_as_long_as_a_40ms_packet() -> None:
    ctx = av.CodecContext.create("libopus", "w")
    ctx.sample_rate, ctx.format, ctx.layout = 48000, "s16", "mono"
    ctx.options = {"frame_duration": "40"}
    ctx.open()
    pcm = speech_like(48000, 0.2)
    payloads = []
    for start in range(0, len(pcm) - 1919, 1920):
        frame = av.AudioFrame.from_ndarray(pcm[None, start : start + 1920].copy(), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 48000, start
        payloads += [bytes(p) for p in ctx.encode(frame)]
    for rate in (48000, 8000):
        decoder = OpusDecoder(rate)
        assert [len(decoder.decode(p)) for p in payloads[:3]] == [rate // 25] * 3
        concealed = decoder.conceal()
        assert len(concealed) == rate // 25 and concealed.any()


def test_opus_conceal_before_any_packet_is_20ms_of_silence() -> None:
    concealed = OpusDecoder(16000).conceal()
    assert len(concealed) == 320 and not concealed.any()


def test_opus_empty_payload_is_a_codec_error() -> None:
    with pytest.raises(CodecError) as info:
        OpusDecoder().decode(b"")
    assert str(info.value) == "Opus payload is empty; a packet has at least one TOC byte"


@pytest.mark.parametrize(
    "payload",
    [
        b"\x03",  # code 3 without its frame-count byte
        b"\x03\xff\xff",  # code 3: 63 frames of 10 ms, over the 120 ms limit (R5)
        b"\x0b\x82\xfa\x00",  # code 3 VBR: the first frame's 250 bytes are not there (R6)
        b"\x00" * 2000,  # a single frame longer than 1275 bytes
        b"\x01\x00\x00\x00",  # code 1 with an odd remainder: two frames cannot be equal (R3)
    ],
)
def test_malformed_opus_is_a_codec_error_and_the_stream_goes_on(payload: bytes) -> None:
    payloads = OpusEncoder(16000).encode(speech_like(16000, 0.4))
    clean = OpusDecoder(16000)
    expected = np.concatenate([clean.decode(p) for p in payloads])
    decoder, out = OpusDecoder(16000), []
    for index, packet in enumerate(payloads):
        if index == 10:
            with pytest.raises(CodecError, match=f"^Opus payload of {len(payload)} bytes cannot be decoded"):
                decoder.decode(payload)
        out.append(decoder.decode(packet))
    np.testing.assert_array_equal(np.concatenate(out), expected)


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(min_size=1, max_size=200))
def test_any_bytes_give_opus_audio_or_a_codec_error(payload: bytes) -> None:
    decoder = OpusDecoder(8000)
    try:
        samples = decoder.decode(payload)
    except CodecError:
        return
    assert samples.dtype == np.int16 and len(samples) <= 120 * 8


def test_opus_rates_are_checked() -> None:
    with pytest.raises(ValueError, match="Opus output rate must be one of"):
        OpusDecoder(44100)
    with pytest.raises(ValueError, match="Opus input rate must be one of"):
        OpusEncoder(24000)


def test_encoders_take_only_1d_int16() -> None:
    with pytest.raises(ValueError, match="1-D int16"):
        OpusEncoder(8000).encode(np.zeros(160, dtype=np.float32))
    with pytest.raises(ValueError, match="1-D int16"):
        G722Encoder().encode(np.zeros((2, 320), dtype=np.int16))


def test_opus_decodes_espeak_speech(tmp_path: Path) -> None:
    wav = tmp_path / "speech.wav"
    raw = tmp_path / "speech.s16le"
    subprocess.run(["espeak-ng", "-w", str(wav), "recording starts after the tone"], check=True)
    subprocess.run(["sox", str(wav), "-r", "16000", "-e", "signed", "-b", "16", "-c", "1", "-t", "raw", str(raw)], check=True)
    sent = np.fromfile(raw, dtype="<i2").astype(np.int16)
    encoder, decoder = OpusEncoder(16000), OpusDecoder(16000)
    received = np.concatenate([decoder.decode(p) for p in encoder.encode(sent) + encoder.flush()])
    lag, snr, corr = aligned_quality(sent, received, 320)
    assert abs(lag - 128) <= 2
    assert corr >= 0.9
