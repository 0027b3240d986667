"""The wavstream and Twilio Media Streams parsers: every event, every close code and reason,
channel splitting, µ-law decoding, and fuzzing that lets only WsProtocolError escape."""

from __future__ import annotations

import ast
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mediaserver.ws as ws
from mediaserver.codecs.g711 import decode_alaw, decode_ulaw, encode_alaw, encode_ulaw
from mediaserver.errors import ProtocolError
from mediaserver.ws import MAX_CLOSE_REASON_BYTES, CloseCode, WsProtocolError
from mediaserver.ws import twilio as tw
from mediaserver.ws import wavstream as wv

UNSUPPORTED, INVALID, POLICY, TOO_BIG = 1003, 1007, 1008, 1009

TONE = (8000 * np.sin(np.arange(160) * 2 * np.pi * 440 / 8000)).astype(np.int16)


def expect_error(call: Callable[[], Any], code: int, reason: str) -> WsProtocolError:
    with pytest.raises(WsProtocolError) as info:
        call()
    assert (info.value.close_code, info.value.reason) == (code, reason)
    assert str(info.value) == reason
    return info.value


def text(**fields: Any) -> str:
    return json.dumps(fields)


# --- shared ---------------------------------------------------------------------------


def test_error_is_a_protocol_error_with_an_int_close_code() -> None:
    error = WsProtocolError(CloseCode.POLICY_VIOLATION, "no")
    assert isinstance(error, ProtocolError)
    assert error.close_code == 1008 and isinstance(error.close_code, int)
    assert [int(code) for code in CloseCode] == [1003, 1007, 1008, 1009]


def test_close_reason_is_cut_to_123_utf8_bytes() -> None:
    reason = "ü" * 100
    error = WsProtocolError(CloseCode.INVALID_PAYLOAD, reason)
    assert str(error) == reason
    assert error.reason == "ü" * 60 + "..."
    assert len(error.reason.encode()) == MAX_CLOSE_REASON_BYTES
    assert WsProtocolError(CloseCode.INVALID_PAYLOAD, "x" * 123).reason == "x" * 123


def test_long_values_are_shortened_in_reasons() -> None:
    parser = wv.WavstreamParser()
    expect_error(
        lambda: parser.feed_text(text(event="x" * 500)),
        POLICY,
        f"unknown event '{'x' * 36}...; expected start, dtmf or stop",
    )


@pytest.mark.parametrize("parser_type", [wv.WavstreamParser, tw.TwilioParser])
def test_max_frame_bytes_must_be_positive(parser_type: type) -> None:
    with pytest.raises(ValueError, match="max_frame_bytes must be positive, not 0"):
        parser_type(max_frame_bytes=0)


def test_ws_modules_import_nothing_above_their_layer() -> None:
    allowed = ("mediaserver.errors", "mediaserver.jsonsafe", "mediaserver.media", "mediaserver.codecs", "mediaserver.ws")
    outside = {"__future__", "base64", "binascii", "collections", "dataclasses", "enum", "json", "typing", "numpy"}
    for path in Path(ws.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "mediaserver":
                    assert name.startswith(allowed), f"{path.name} imports {name}"
                else:
                    assert name.split(".")[0] in outside, f"{path.name} imports {name}"


# --- wavstream: happy paths -----------------------------------------------------------


def started(encoding: str = "L16", sample_rate: int = 16000, channels: int = 1, **kwargs: Any) -> wv.WavstreamParser:
    parser = wv.WavstreamParser(**kwargs)
    events = parser.feed_text(text(event="start", encoding=encoding, sample_rate=sample_rate, channels=channels))
    assert events == [wv.Started(encoding, sample_rate, channels)]
    return parser


def test_wavstream_session() -> None:
    parser = started("L16", 16000, 1)
    assert parser.started and not parser.stopped
    assert parser.format == wv.Started("L16", 16000, 1)
    [audio] = parser.feed_binary(TONE.astype("<i2").tobytes())
    assert isinstance(audio, wv.Audio)
    assert audio.sample_rate == 16000 and audio.samples == 160
    assert len(audio.channels) == 1
    np.testing.assert_array_equal(audio.channels[0], TONE)
    assert audio.channels[0].dtype == np.dtype(np.int16) and audio.channels[0].dtype.isnative
    assert parser.feed_text(text(event="dtmf", digit="5")) == [wv.Dtmf("5")]
    assert parser.feed_text(text(event="stop")) == [wv.Stopped()]
    assert parser.stopped
    assert parser.stats == wv.WavstreamStats(frames=1, bytes=320, samples=160, text_frames=3, dtmf=1)


def test_wavstream_l16_is_little_endian() -> None:
    [audio] = started("L16", 8000).feed_binary(b"\x01\x00\x00\x80\xff\x7f")
    np.testing.assert_array_equal(audio.channels[0], np.array([1, -32768, 32767], dtype=np.int16))


@pytest.mark.parametrize(
    ("encoding", "rate"), [("L16", 8000), ("L16", 16000), ("L16", 48000), ("PCMU", 8000), ("PCMA", 8000)]
)
def test_wavstream_accepts_every_format(encoding: str, rate: int) -> None:
    for channels in (1, 2):
        assert started(encoding, rate, channels).format == wv.Started(encoding, rate, channels)


@pytest.mark.parametrize(
    ("encoding", "encode", "decode"), [("PCMU", encode_ulaw, decode_ulaw), ("PCMA", encode_alaw, decode_alaw)]
)
def test_wavstream_g711_matches_the_codec(encoding: str, encode: Any, decode: Any) -> None:
    payload = encode(TONE)
    [audio] = started(encoding, 8000).feed_binary(payload)
    np.testing.assert_array_equal(audio.channels[0], decode(payload))


def test_wavstream_splits_interleaved_l16() -> None:
    caller = np.array([1, 2, 3, -32768], dtype=np.int16)
    callee = np.array([-1, -2, -3, 32767], dtype=np.int16)
    frame = np.column_stack((caller, callee)).reshape(-1).astype("<i2").tobytes()
    [audio] = started("L16", 48000, 2).feed_binary(frame)
    assert audio.samples == 4 and audio.sample_rate == 48000
    np.testing.assert_array_equal(audio.channels[0], caller)
    np.testing.assert_array_equal(audio.channels[1], callee)
    assert all(channel.flags.c_contiguous for channel in audio.channels)
    assert wv.CHANNEL_ROLES == ("caller", "callee")


def test_wavstream_splits_interleaved_pcmu() -> None:
    caller, callee = encode_ulaw(TONE), encode_ulaw(-TONE)
    frame = bytes(b for pair in zip(caller, callee, strict=True) for b in pair)
    parser = started("PCMU", 8000, 2)
    [audio] = parser.feed_binary(frame)
    np.testing.assert_array_equal(audio.channels[0], decode_ulaw(caller))
    np.testing.assert_array_equal(audio.channels[1], decode_ulaw(callee))
    assert (parser.stats.bytes, parser.stats.samples) == (320, 160)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.int16, st.tuples(st.integers(0, 400), st.just(2))))
def test_wavstream_split_round_trips(pairs: np.ndarray) -> None:
    parser = started("L16", 16000, 2)
    events = parser.feed_binary(pairs.reshape(-1).astype("<i2").tobytes())
    if not len(pairs):
        assert events == []
        return
    [audio] = events
    np.testing.assert_array_equal(audio.channels[0], pairs[:, 0])
    np.testing.assert_array_equal(audio.channels[1], pairs[:, 1])


def test_wavstream_empty_binary_frame_yields_nothing() -> None:
    parser = started()
    assert parser.feed_binary(b"") == []
    assert (parser.stats.frames, parser.stats.bytes, parser.stats.samples) == (1, 0, 0)


def test_wavstream_accepts_bytearray_and_memoryview() -> None:
    parser = started()
    for frame in (bytearray(b"\x01\x00"), memoryview(b"\x01\x00")):
        [audio] = parser.feed_binary(frame)
        np.testing.assert_array_equal(audio.channels[0], [1])


def test_wavstream_lowercase_dtmf_letters_and_every_digit() -> None:
    parser = started()
    assert parser.feed_text(text(event="dtmf", digit="a")) == [wv.Dtmf("A")]
    for digit in "0123456789*#ABCD":
        assert parser.feed_text(text(event="dtmf", digit=digit)) == [wv.Dtmf(digit)]


def test_wavstream_ignores_extra_fields() -> None:
    parser = wv.WavstreamParser()
    start = text(event="start", encoding="PCMA", sample_rate=8000, channels=1, client="softphone 2.1")
    assert parser.feed_text(start) == [wv.Started("PCMA", 8000, 1)]


def test_wavstream_close_stops_once() -> None:
    parser = started()
    assert parser.feed_close() == [wv.Stopped()]
    assert parser.feed_close() == []
    stopped = started()
    stopped.feed_text(text(event="stop"))
    assert stopped.feed_close() == []


def test_wavstream_stop_or_close_before_start() -> None:
    assert wv.WavstreamParser().feed_text(text(event="stop")) == [wv.Stopped()]
    parser = wv.WavstreamParser()
    assert parser.feed_close() == [wv.Stopped()]
    assert not parser.started and parser.stopped


def test_wavstream_error_leaves_state_unchanged() -> None:
    parser = wv.WavstreamParser()
    with pytest.raises(WsProtocolError):
        parser.feed_text(text(event="start", encoding="L16", sample_rate=44100, channels=1))
    assert not parser.started
    assert parser.feed_text(text(event="start", encoding="L16", sample_rate=8000, channels=1))
    with pytest.raises(WsProtocolError):
        parser.feed_binary(b"\x00")
    assert parser.stats.frames == 0


# --- wavstream: errors ----------------------------------------------------------------

START_L16 = text(event="start", encoding="L16", sample_rate=16000, channels=1)
START_L16_2 = text(event="start", encoding="L16", sample_rate=16000, channels=2)
START_PCMU_2 = text(event="start", encoding="PCMU", sample_rate=8000, channels=2)
STOP = text(event="stop")


def start_with(**changes: Any) -> str:
    fields: dict[str, Any] = {"event": "start", "encoding": "L16", "sample_rate": 16000, "channels": 1}
    fields.update(changes)
    return json.dumps({k: v for k, v in fields.items() if v is not ...})


WAVSTREAM_ERRORS: list[tuple[list[str | bytes], str | bytes, int, str]] = [
    # 1003 unsupported data
    ([], b"\x00\x00", UNSUPPORTED, "binary frame before start"),
    ([], start_with(encoding="G722"), UNSUPPORTED, "unsupported encoding 'G722'; expected L16, PCMU or PCMA"),
    ([], start_with(encoding="l16"), UNSUPPORTED, "unsupported encoding 'l16'; expected L16, PCMU or PCMA"),
    # 1007 invalid payload
    ([], "", INVALID, "invalid JSON: Expecting value at offset 0"),
    ([], "{", INVALID, "invalid JSON: Expecting property name enclosed in double quotes at offset 1"),
    ([], "[1]", INVALID, "text frame must be a JSON object, not an array"),
    ([], '"start"', INVALID, "text frame must be a JSON object, not 'start'"),
    ([], "null", INVALID, "text frame must be a JSON object, not null"),
    ([], "[" * 50_000, INVALID, "invalid JSON: nested too deeply"),
    ([], '{"sample_rate": ' + "9" * 5000 + "}", INVALID, "invalid JSON: number has too many digits"),
    ([], "{}", INVALID, "missing field event"),
    ([], text(event=5), INVALID, "event must be a string, not 5"),
    ([], start_with(encoding=...), INVALID, "missing field encoding"),
    ([], start_with(encoding=["L16"]), INVALID, "encoding must be a string, not an array"),
    ([], start_with(sample_rate=...), INVALID, "missing field sample_rate"),
    ([], start_with(sample_rate="8000"), INVALID, "sample_rate must be an integer, not '8000'"),
    ([], start_with(sample_rate=8000.0), INVALID, "sample_rate must be an integer, not 8000.0"),
    ([], start_with(sample_rate=True), INVALID, "sample_rate must be an integer, not true"),
    ([], start_with(channels=None), INVALID, "channels must be an integer, not null"),
    ([], start_with(channels={}), INVALID, "channels must be an integer, not an object"),
    ([START_L16], text(event="dtmf", digit=5), INVALID, "digit must be a string, not 5"),
    ([START_L16], text(event="dtmf"), INVALID, "missing field digit"),
    ([START_L16], b"\x00\x00\x00", INVALID,
     "binary frame of 3 bytes is not a whole number of 2-byte sample frames (L16, 1 channel)"),
    ([START_L16_2], b"\x00" * 6, INVALID,
     "binary frame of 6 bytes is not a whole number of 4-byte sample frames (L16, 2 channels)"),
    ([START_PCMU_2], b"\x00" * 3, INVALID,
     "binary frame of 3 bytes is not a whole number of 2-byte sample frames (PCMU, 2 channels)"),
    # a sample split across frames is refused, not carried over
    ([START_L16, b"\x00\x00"], b"\x00", INVALID,
     "binary frame of 1 bytes is not a whole number of 2-byte sample frames (L16, 1 channel)"),
    # 1008 policy
    ([START_L16], START_L16, POLICY, "start received twice"),
    ([], text(event="dtmf", digit="1"), POLICY, "dtmf before start"),
    ([START_L16, STOP], b"\x00\x00", POLICY, "binary frame after stop"),
    ([START_L16, STOP], text(event="dtmf", digit="1"), POLICY, "text frame after stop"),
    ([START_L16, STOP], STOP, POLICY, "text frame after stop"),
    ([STOP], START_L16, POLICY, "text frame after stop"),
    ([START_L16], text(event="pause"), POLICY, "unknown event 'pause'; expected start, dtmf or stop"),
    ([], text(event="media"), POLICY, "unknown event 'media'; expected start, dtmf or stop"),
    ([START_L16], text(event="dtmf", digit="X"), POLICY, "digit 'X' is not a DTMF digit (0-9, *, #, A-D)"),
    ([START_L16], text(event="dtmf", digit="12"), POLICY, "digit '12' is not a DTMF digit (0-9, *, #, A-D)"),
    ([START_L16], text(event="dtmf", digit=""), POLICY, "digit '' is not a DTMF digit (0-9, *, #, A-D)"),
    ([], start_with(sample_rate=44100), POLICY,
     "sample_rate 44100 is not supported for L16; expected 8000, 16000 or 48000"),
    ([], start_with(sample_rate=0), POLICY, "sample_rate 0 is not supported for L16; expected 8000, 16000 or 48000"),
    ([], start_with(encoding="PCMU", sample_rate=16000), POLICY,
     "sample_rate 16000 is not supported for PCMU; expected 8000"),
    ([], start_with(encoding="PCMA", sample_rate=48000), POLICY,
     "sample_rate 48000 is not supported for PCMA; expected 8000"),
    ([], start_with(channels=3), POLICY, "channels 3 is out of range; expected 1 or 2"),
    ([], start_with(channels=0), POLICY, "channels 0 is out of range; expected 1 or 2"),
    ([], start_with(channels=-1), POLICY, "channels -1 is out of range; expected 1 or 2"),
    # 1009 too big
    ([START_L16], b"\x00" * 65538, TOO_BIG, "binary frame of 65538 bytes exceeds the 65536-byte limit"),
    ([], " " * 65537, TOO_BIG, "text frame of 65537 bytes exceeds the 65536-byte limit"),
    ([], '"' + "é" * 32768 + '"', TOO_BIG, "text frame of 65538 bytes exceeds the 65536-byte limit"),
]


def feed(parser: wv.WavstreamParser | tw.TwilioParser, message: str | bytes) -> list[Any]:
    return parser.feed_binary(message) if isinstance(message, bytes) else parser.feed_text(message)


@pytest.mark.parametrize(("before", "message", "code", "reason"), WAVSTREAM_ERRORS)
def test_wavstream_errors(before: list[str | bytes], message: str | bytes, code: int, reason: str) -> None:
    parser = wv.WavstreamParser()
    for earlier in before:
        feed(parser, earlier)
    error = expect_error(lambda: feed(parser, message), code, reason)
    assert len(error.reason.encode()) <= MAX_CLOSE_REASON_BYTES


def test_wavstream_frame_limit_is_configurable() -> None:
    limit = len(START_L16) + len(START_L16) % 2  # whole L16 samples
    parser = wv.WavstreamParser(max_frame_bytes=limit)
    assert parser.feed_text(START_L16)
    assert parser.feed_binary(b"\x00" * limit)
    expect_error(
        lambda: parser.feed_binary(b"\x00" * (limit + 2)),
        TOO_BIG,
        f"binary frame of {limit + 2} bytes exceeds the {limit}-byte limit",
    )
    padded = text(event="stop", note="x" * limit)
    expect_error(
        lambda: parser.feed_text(padded), TOO_BIG, f"text frame of {len(padded)} bytes exceeds the {limit}-byte limit"
    )


# --- Twilio: messages as Twilio sends them --------------------------------------------

STREAM_SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
CALL_SID = "CA0123456789abcdef0123456789abcdef"
ACCOUNT_SID = "AC0123456789abcdef0123456789abcdef"


def connected_msg() -> str:
    return text(event="connected", protocol="Call", version="1.0.0")


def start_msg(seq: int = 1, media_format: dict[str, Any] | None = None, **start_changes: Any) -> str:
    start: dict[str, Any] = {
        "accountSid": ACCOUNT_SID,
        "streamSid": STREAM_SID,
        "callSid": CALL_SID,
        "tracks": ["inbound", "outbound"],
        "customParameters": {"tenant": "acme", "agent": "42"},
        "mediaFormat": media_format or {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    start.update(start_changes)
    start = {k: v for k, v in start.items() if v is not ...}
    return text(event="start", sequenceNumber=str(seq), start=start, streamSid=STREAM_SID)


def media_msg(seq: int, track: str = "inbound", chunk: Any = "1", timestamp: Any = "5",
              payload: Any = None, **top: Any) -> str:
    media = {"track": track, "chunk": chunk, "timestamp": timestamp,
             "payload": base64.b64encode(encode_ulaw(TONE)).decode() if payload is None else payload}
    media = {k: v for k, v in media.items() if v is not ...}
    fields = {"event": "media", "sequenceNumber": str(seq), "media": media, "streamSid": STREAM_SID}
    fields.update(top)
    return json.dumps(fields)


def dtmf_msg(seq: int, digit: Any = "5", track: str = "inbound_track") -> str:
    return text(event="dtmf", streamSid=STREAM_SID, sequenceNumber=str(seq), dtmf={"track": track, "digit": digit})


def mark_msg(seq: int, name: Any = "greeting played") -> str:
    return text(event="mark", sequenceNumber=str(seq), streamSid=STREAM_SID, mark={"name": name})


def stop_msg(seq: int) -> str:
    return text(event="stop", sequenceNumber=str(seq), streamSid=STREAM_SID,
                stop={"accountSid": ACCOUNT_SID, "callSid": CALL_SID})


def twilio_started() -> tw.TwilioParser:
    parser = tw.TwilioParser()
    parser.feed_text(connected_msg())
    parser.feed_text(start_msg())
    return parser


# --- Twilio: happy paths --------------------------------------------------------------


def test_twilio_session() -> None:
    parser = tw.TwilioParser()
    assert parser.feed_text(connected_msg()) == [tw.Connected("Call", "1.0.0")]
    [start] = parser.feed_text(start_msg(1))
    assert start == tw.TwilioStart(
        stream_sid=STREAM_SID,
        call_sid=CALL_SID,
        account_sid=ACCOUNT_SID,
        tracks=("inbound", "outbound"),
        custom_parameters={"tenant": "acme", "agent": "42"},
        encoding="audio/x-mulaw",
        sample_rate=8000,
        channels=1,
    )
    assert start.roles == ("caller", "callee")
    assert parser.started and parser.stream == start
    [inbound] = parser.feed_text(media_msg(2, "inbound", chunk="1", timestamp="5"))
    [outbound] = parser.feed_text(media_msg(3, "outbound", chunk="1", timestamp="25"))
    assert (inbound.role, inbound.chunk, inbound.timestamp_ms) == ("caller", 1, 5)
    assert (outbound.role, outbound.chunk, outbound.timestamp_ms) == ("callee", 1, 25)
    assert parser.feed_text(dtmf_msg(4, "7")) == [tw.Dtmf("caller", "7")]
    assert parser.feed_text(mark_msg(5)) == [tw.Mark("greeting played")]
    assert parser.feed_text(stop_msg(6)) == [tw.Stopped()]
    assert parser.stopped
    stats = parser.stats
    assert (stats.messages, stats.ignored, stats.sequence_gaps, stats.sequence_reordered) == (7, 0, 0, 0)
    assert (stats.dtmf, stats.marks) == (1, 1)
    assert stats.by_role == {"caller": tw.TrackStats(1, 160, 160), "callee": tw.TrackStats(1, 160, 160)}
    assert (stats.frames, stats.bytes, stats.samples) == (2, 320, 320)


def test_twilio_media_is_decoded_ulaw() -> None:
    payload = encode_ulaw(TONE)
    [media] = twilio_started().feed_text(media_msg(2, payload=base64.b64encode(payload).decode()))
    np.testing.assert_array_equal(media.samples, decode_ulaw(payload))
    assert media.samples.dtype == np.dtype(np.int16) and media.samples.ndim == 1


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000))
def test_twilio_any_ulaw_payload_decodes_like_the_codec(payload: bytes) -> None:
    [media] = twilio_started().feed_text(media_msg(2, payload=base64.b64encode(payload).decode()))
    np.testing.assert_array_equal(media.samples, decode_ulaw(payload))


def test_twilio_start_without_connected_or_custom_parameters() -> None:
    parser = tw.TwilioParser()
    [start] = parser.feed_text(start_msg(customParameters=..., tracks=["inbound"]))
    assert start.custom_parameters == {} and start.roles == ("caller",)


def test_twilio_track_spellings() -> None:
    parser = twilio_started()
    assert parser.feed_text(dtmf_msg(2, "#", "outbound_track")) == [tw.Dtmf("callee", "#")]
    assert parser.feed_text(dtmf_msg(3, "b", "inbound")) == [tw.Dtmf("caller", "B")]
    [media] = parser.feed_text(media_msg(4, "outbound_track"))
    assert media.role == "callee"


def test_twilio_media_on_an_unannounced_track_is_accepted() -> None:
    parser = tw.TwilioParser()
    parser.feed_text(start_msg(tracks=["inbound"]))
    [media] = parser.feed_text(media_msg(2, "outbound"))
    assert media.role == "callee"


def test_twilio_ignores_unknown_events() -> None:
    parser = tw.TwilioParser()
    assert parser.feed_text(text(event="clear", streamSid=STREAM_SID)) == []
    parser.feed_text(start_msg(1))
    assert parser.feed_text(text(event="someFutureEvent", sequenceNumber="2", data=[1, 2])) == []
    assert parser.stats.ignored == 2
    assert parser.stats.sequence_gaps == 0


def test_twilio_counts_sequence_gaps_and_reordering() -> None:
    parser = twilio_started()
    parser.feed_text(media_msg(2))
    parser.feed_text(media_msg(5))  # 3 and 4 missing
    parser.feed_text(media_msg(4))  # late
    parser.feed_text(media_msg(5))  # repeated
    parser.feed_text(media_msg(6))
    assert (parser.stats.sequence_gaps, parser.stats.sequence_reordered) == (2, 2)
    assert parser.stats.by_role["caller"].frames == 5


def test_twilio_messages_without_sequence_numbers_are_accepted() -> None:
    parser = twilio_started()
    [media] = parser.feed_text(json.dumps({"event": "media", "media": json.loads(media_msg(2))["media"]}))
    assert media.chunk == 1
    assert parser.stats.sequence_gaps == 0


def test_twilio_empty_payload() -> None:
    [media] = twilio_started().feed_text(media_msg(2, payload=""))
    assert len(media.samples) == 0


def test_twilio_close_stops_once() -> None:
    parser = twilio_started()
    assert parser.feed_close() == [tw.Stopped()]
    assert parser.feed_close() == []
    stopped = twilio_started()
    stopped.feed_text(stop_msg(2))
    assert stopped.feed_close() == []
    assert tw.TwilioParser().feed_text(text(event="stop")) == [tw.Stopped()]


# --- Twilio: errors -------------------------------------------------------------------

MULAW = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
STARTED = [connected_msg(), start_msg(1)]

TWILIO_ERRORS: list[tuple[list[str], str | bytes, int, str]] = [
    # 1003 unsupported data
    ([], b"{}", UNSUPPORTED, "binary frame; Twilio Media Streams sends JSON text frames"),
    (STARTED, b"\xff\x7f", UNSUPPORTED, "binary frame; Twilio Media Streams sends JSON text frames"),
    # 1007 invalid payload
    ([], "not json", INVALID, "invalid JSON: Expecting value at offset 0"),
    ([], "[]", INVALID, "text frame must be a JSON object, not an array"),
    ([], "{}", INVALID, "missing field event"),
    ([], text(event=None), INVALID, "event must be a string, not null"),
    ([], text(event="connected", protocol=1), INVALID, "protocol must be a string, not 1"),
    ([], text(event="start", sequenceNumber="1"), INVALID, "missing field start"),
    ([], text(event="start", start=[]), INVALID, "start must be an object, not an array"),
    ([], start_msg(callSid=...), INVALID, "missing field start.callSid"),
    ([], start_msg(streamSid=7), INVALID, "start.streamSid must be a string, not 7"),
    ([], start_msg(accountSid=None), INVALID, "start.accountSid must be a string, not null"),
    ([], start_msg(tracks="inbound"), INVALID, "start.tracks must be an array, not 'inbound'"),
    ([], start_msg(tracks=["inbound", 2]), INVALID, "start.tracks[1] must be a string, not 2"),
    ([], start_msg(customParameters={"x": 1}), INVALID, "start.customParameters.x must be a string, not 1"),
    ([], start_msg(customParameters="x=1"), INVALID, "start.customParameters must be an object, not 'x=1'"),
    ([], start_msg(mediaFormat=...), INVALID, "missing field start.mediaFormat"),
    ([], start_msg(media_format={**MULAW, "sampleRate": "8000"}), INVALID,
     "start.mediaFormat.sampleRate must be an integer, not '8000'"),
    ([], start_msg(media_format={"encoding": "audio/x-mulaw", "sampleRate": 8000}), INVALID,
     "missing field start.mediaFormat.channels"),
    ([], text(event="start", sequenceNumber=1), INVALID, "sequenceNumber must be a string, not 1"),
    ([], text(event="start", sequenceNumber="-1"), INVALID,
     "sequenceNumber must be a string of decimal digits, not '-1'"),
    ([], text(event="mystery", sequenceNumber="1" * 19), INVALID,
     f"sequenceNumber must be a string of decimal digits, not '{'1' * 19}'"),
    (STARTED, media_msg(2, timestamp=5), INVALID, "media.timestamp must be a string, not 5"),
    (STARTED, media_msg(2, timestamp="5.0"), INVALID, "media.timestamp must be a string of decimal digits, not '5.0'"),
    (STARTED, media_msg(2, timestamp="\u0665"), INVALID,
     "media.timestamp must be a string of decimal digits, not '\u0665'"),
    (STARTED, media_msg(2, chunk=...), INVALID, "missing field media.chunk"),
    (STARTED, media_msg(2, chunk=""), INVALID, "media.chunk must be a string of decimal digits, not ''"),
    (STARTED, media_msg(2, payload=...), INVALID, "missing field media.payload"),
    (STARTED, media_msg(2, payload=[1]), INVALID, "media.payload must be a string, not an array"),
    (STARTED, media_msg(2, payload="abc"), INVALID, "media.payload is not valid base64"),
    (STARTED, media_msg(2, payload="ab!="), INVALID, "media.payload is not valid base64"),
    (STARTED, media_msg(2, payload="AAAA\nAAAA"), INVALID, "media.payload is not valid base64"),
    (STARTED, media_msg(2, payload="ÿÿÿÿ"), INVALID, "media.payload is not valid base64"),
    (STARTED, text(event="media", media="AAAA"), INVALID, "media must be an object, not 'AAAA'"),
    (STARTED, dtmf_msg(2, digit=5), INVALID, "dtmf.digit must be a string, not 5"),
    (STARTED, mark_msg(2, name=1), INVALID, "mark.name must be a string, not 1"),
    (STARTED, text(event="mark"), INVALID, "missing field mark"),
    (STARTED, media_msg(2, streamSid=1), INVALID, "streamSid must be a string, not 1"),
    # 1008 policy
    ([], media_msg(2), POLICY, "media before start"),
    ([connected_msg()], dtmf_msg(2), POLICY, "dtmf before start"),
    ([], mark_msg(2), POLICY, "mark before start"),
    (STARTED, start_msg(2), POLICY, "start received twice"),
    (STARTED, connected_msg(), POLICY, "connected after start"),
    ([start_msg(1)], connected_msg(), POLICY, "connected after start"),
    ([connected_msg()], connected_msg(), POLICY, "connected received twice"),
    ([*STARTED, stop_msg(2)], media_msg(3), POLICY, "text frame after stop"),
    ([*STARTED, stop_msg(2)], text(event="anything"), POLICY, "text frame after stop"),
    ([], start_msg(media_format={**MULAW, "encoding": "audio/x-alaw"}), POLICY,
     "start.mediaFormat.encoding 'audio/x-alaw' is not supported; expected 'audio/x-mulaw'"),
    ([], start_msg(media_format={**MULAW, "sampleRate": 16000}), POLICY,
     "start.mediaFormat.sampleRate 16000 is not supported; expected 8000"),
    ([], start_msg(media_format={**MULAW, "channels": 2}), POLICY,
     "start.mediaFormat.channels 2 is not supported; expected 1"),
    ([], start_msg(tracks=["inbound", "both_tracks"]), POLICY,
     "start.tracks[1] 'both_tracks' is not inbound or outbound"),
    (STARTED, media_msg(2, track="both"), POLICY, "media.track 'both' is not inbound or outbound"),
    (STARTED, dtmf_msg(2, track="Inbound"), POLICY, "dtmf.track 'Inbound' is not inbound or outbound"),
    (STARTED, dtmf_msg(2, digit="E"), POLICY, "dtmf.digit 'E' is not a DTMF digit (0-9, *, #, A-D)"),
    (STARTED, media_msg(2, streamSid="MZother"), POLICY, "streamSid 'MZother' differs from the started stream's"),
    # 1009 too big
    ([], " " * 65537, TOO_BIG, "text frame of 65537 bytes exceeds the 65536-byte limit"),
]


@pytest.mark.parametrize(("before", "message", "code", "reason"), TWILIO_ERRORS)
def test_twilio_errors(before: list[str], message: str | bytes, code: int, reason: str) -> None:
    parser = tw.TwilioParser()
    for earlier in before:
        parser.feed_text(earlier)
    error = expect_error(lambda: feed(parser, message), code, reason)
    assert len(error.reason.encode()) <= MAX_CLOSE_REASON_BYTES


def test_twilio_frame_limit_is_configurable() -> None:
    parser = tw.TwilioParser(max_frame_bytes=100)
    message = media_msg(2)
    expect_error(
        lambda: parser.feed_text(message), TOO_BIG, f"text frame of {len(message)} bytes exceeds the 100-byte limit"
    )


# --- fuzzing: only WsProtocolError may escape -----------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELD_NAMES = st.sampled_from([
    "event", "encoding", "sample_rate", "channels", "digit", "sequenceNumber", "streamSid", "start", "media",
    "dtmf", "mark", "stop", "track", "chunk", "timestamp", "payload", "name", "tracks", "mediaFormat",
    "customParameters", "callSid", "accountSid", "sampleRate",
])
EVENT_NAMES = st.sampled_from(["start", "media", "dtmf", "mark", "stop", "connected", "other"])


@st.composite
def plausible_messages(draw: st.DrawFn) -> str:
    """JSON objects built from the protocols' own field names, to reach the type checks."""
    fields = draw(st.dictionaries(FIELD_NAMES, JSON_VALUES | st.dictionaries(FIELD_NAMES, JSON_VALUES), max_size=6))
    fields["event"] = draw(EVENT_NAMES | JSON_SCALARS)
    return json.dumps(fields)


# Each valid message with the parser state it is valid in.
VALID_MESSAGES: dict[str, tuple[str, str]] = {
    "wavstream start": ("wavstream new", START_L16),
    "wavstream stereo start": ("wavstream new", START_PCMU_2),
    "wavstream dtmf": ("wavstream L16 stereo", text(event="dtmf", digit="5")),
    "wavstream stop": ("wavstream PCMU", STOP),
    "twilio connected": ("twilio new", connected_msg()),
    "twilio start": ("twilio new", start_msg(1)),
    "twilio media": ("twilio started", media_msg(2)),
    "twilio dtmf": ("twilio started", dtmf_msg(3)),
    "twilio mark": ("twilio started", mark_msg(4)),
    "twilio stop": ("twilio started", stop_msg(5)),
}
# Values close to valid ones: base64-ish text, digit strings, and any JSON at all.
NEAR_VALUES = (
    st.text(alphabet="ABab09+/=!-_ \n\u0665", max_size=12)
    | st.from_regex(r"-?[0-9]{0,20}(\.[0-9])?", fullmatch=True)
    | st.sampled_from(["inbound", "outbound_track", "audio/x-mulaw", "L16", "PCMU", "A", "#", "1", "", 8000, 2])
    | JSON_VALUES
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key or index path inside a JSON value."""
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return []
    found = []
    for key, child in items:
        found.append((*prefix, key))
        found.extend(paths(child, (*prefix, key)))
    return found


@st.composite
def mutated(draw: st.DrawFn, message: str) -> str:
    """`message` with one field, at any depth, replaced by a near-valid or any JSON value, or removed."""
    fields = json.loads(message)
    *parents, last = draw(st.sampled_from(paths(fields)))
    container = fields
    for key in parents:
        container = container[key]
    if isinstance(container, dict) and draw(st.booleans()):
        del container[last]
    else:
        container[last] = draw(NEAR_VALUES)
    return json.dumps(fields)


MESSAGES = (
    st.text(max_size=300)
    | st.binary(max_size=300)
    | plausible_messages()
    | st.sampled_from([message for _, message in VALID_MESSAGES.values()]).flatmap(mutated)
    | st.sampled_from([message for _, message in VALID_MESSAGES.values()])
)
PARSERS: dict[str, Callable[[], wv.WavstreamParser | tw.TwilioParser]] = {
    "wavstream new": wv.WavstreamParser,
    "wavstream L16 stereo": lambda: started("L16", 48000, 2),
    "wavstream PCMU": lambda: started("PCMU", 8000, 1),
    "wavstream PCMA stereo": lambda: started("PCMA", 8000, 2),
    "twilio new": tw.TwilioParser,
    "twilio started": twilio_started,
}


def feed_checked(parser: wv.WavstreamParser | tw.TwilioParser, message: str | bytes) -> None:
    try:
        events = feed(parser, message)
    except WsProtocolError as error:
        assert error.close_code in set(CloseCode)
        assert 0 < len(error.reason.encode()) <= MAX_CLOSE_REASON_BYTES
    else:
        assert isinstance(events, list)


@pytest.mark.parametrize("state", list(PARSERS))
@settings(max_examples=300, deadline=None)
@given(message=st.text())
def test_fuzz_feed_text(state: str, message: str) -> None:
    feed_checked(PARSERS[state](), message)


@pytest.mark.parametrize("state", list(PARSERS))
@settings(max_examples=300, deadline=None)
@given(message=st.binary())
def test_fuzz_feed_binary(state: str, message: bytes) -> None:
    feed_checked(PARSERS[state](), message)


@pytest.mark.parametrize("state", list(PARSERS))
@settings(max_examples=300, deadline=None)
@given(message=plausible_messages())
def test_fuzz_plausible_json(state: str, message: str) -> None:
    feed_checked(PARSERS[state](), message)


@pytest.mark.parametrize("name", list(VALID_MESSAGES))
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fuzz_mutated_messages(name: str, data: st.DataObject) -> None:
    state, message = VALID_MESSAGES[name]
    assert isinstance(feed(PARSERS[state](), message), list)  # valid as it stands
    feed_checked(PARSERS[state](), data.draw(mutated(message)))


@pytest.mark.parametrize("state", list(PARSERS))
@settings(max_examples=100, deadline=None)
@given(messages=st.lists(MESSAGES, max_size=8))
def test_fuzz_message_sequences(state: str, messages: list[str | bytes]) -> None:
    parser = PARSERS[state]()
    for message in messages:
        feed_checked(parser, message)
    assert isinstance(parser.feed_close(), list)
