"""WebSocket calls whose audio is late or still on its way: a hangup that overtakes audio,
a stream held up by a busy server, and many calls in worker processes ending mid-stream."""

import asyncio

import aiohttp
import numpy as np
import pytest

from audio import MemorySink, tone
from mediaserver.encoding import make_encoder
from mediaserver.media import PcmFrame
from mediaserver.options import RecordingOptions
from mediaserver.recorder.messages import RecordingClosed, RecordingStopped
from mediaserver.recorder.recording import Recording
from mediaserver.recorder.session import STREAM_HOLD_S, Session
from servers import Server

pytestmark = pytest.mark.timeout(120)

RATE = 8000
FRAME = 160  # 20 ms


def live_call(channels: int = 1) -> tuple[Session, MemorySink]:
    """A live session with two legs and a WAV recording from time 0."""
    session = Session("s", "app", 0.0, RATE, live=True, jitter_s=0.08)
    sink = MemorySink()
    options = RecordingOptions().merged({"channels": channels})
    session.start_recording(Recording("rec_l", options, 0, make_encoder("wav", RATE, channels), sink), 0.0)
    session.add_leg("a", "caller", 0.0)
    session.add_leg("b", "callee", 0.0)
    return session, sink


def stream(session: Session, leg_id: str, samples: np.ndarray, at: float) -> None:
    for start in range(0, len(samples), FRAME):
        session.post_pcm(PcmFrame(samples[start:start + FRAME], RATE, None, leg_id), at)


def closed(events) -> RecordingClosed:
    return next(event for event in events if isinstance(event, RecordingClosed))


@pytest.mark.parametrize("late", ["pcm", "end", "pcm_then_end"])
def test_audio_or_an_end_that_a_hangup_overtook_is_dropped_not_a_crash(late):
    session, sink = live_call()
    stream(session, "a", tone(400, 0.5), 0.0)
    stream(session, "b", tone(900, 0.5), 0.0)
    session.process(0.6)
    session.hangup(0.6)
    events = session.process(0.6)  # the legs end with the call, and the mixer lets them go
    assert "hangup" in [event.reason for event in events if isinstance(event, RecordingStopped)]
    assert not session.mixer.legs
    # What was still on its way from the legs' sockets arrives after that.
    if late in ("pcm", "pcm_then_end"):
        stream(session, "a", tone(400, 0.1), 0.6)
    if late in ("end", "pcm_then_end"):
        session.end_leg("a", 0.7)
        session.end_leg("b", 0.7)
    assert session.process(0.7) == []
    assert session.mixer.totals.late_samples == (800 if late != "end" else 0)
    assert session.inputs["a"].backlog == 0
    assert closed(events).error is None and len(sink.pcm()) == round(0.6 * RATE)


def test_a_stream_held_up_by_the_server_is_waited_for_not_cut_and_shifted():
    session, sink = live_call(channels=2)
    a, b = tone(400, 4.0, dbfs=-16), tone(900, 4.0, dbfs=-16)
    stream(session, "a", a[:RATE], 0.0)
    stream(session, "b", b[:RATE], 0.0)
    session.process(1.0)
    # b's next 1.5 s are held up (a busy server, a slow pipe); a keeps coming in real time.
    now = 1.0
    for step in range(1, 8):
        now = 1.0 + step * 0.2
        stream(session, "a", a[round((now - 0.2) * RATE):round(now * RATE)], now)
        session.process(now)
    stream(session, "b", b[RATE:round(now * RATE)], now)  # then all of it at once
    session.process(now)
    stream(session, "a", a[round(now * RATE):], now)
    stream(session, "b", b[round(now * RATE):], now)
    session.end_leg("a", now)
    session.end_leg("b", now)
    session.hangup(now)
    events = session.process(now)
    pcm = sink.pcm()
    assert len(pcm) == 4 * RATE
    assert session.inputs["b"].resyncs == 0 and session.mixer.totals.late_samples == 0
    for channel, sent in ((0, a), (1, b)):
        assert np.abs(pcm[:, channel].astype(np.int32) - sent).max() <= 1  # every sample where it was sent
    assert closed(events).duration == 4.0


def test_a_stream_that_stops_sending_is_given_up_after_the_hold():
    session, sink = live_call()
    stream(session, "a", tone(400, 1.0), 0.0)
    stream(session, "b", tone(900, 1.0), 0.0)
    session.process(1.0)
    now = 1.0
    while now < 1.0 + STREAM_HOLD_S + 1.0:  # b is silent; a goes on
        now += 0.2
        stream(session, "a", tone(400, 0.2), now)
        session.process(now)
    assert session.mixer.cursor >= round((now - 1.0) * RATE)  # the mix went on without b


@pytest.fixture
async def server(tmp_path):
    async with Server(tmp_path, workers=2) as srv:
        yield srv


async def _call_hung_up_mid_stream(server, index: int) -> str:
    session = await server.create_session()
    status, answer = await server.command(session["uuid"], "start", format="mp3", bitrate=16)
    assert status == 202, answer
    urls = session["ingest"]["wavstream"]
    payload = [tone(400 + 100 * index, 3.0, dbfs=-16).astype("<i2").tobytes(), tone(1000, 3.0, dbfs=-16).astype("<i2").tobytes()]
    async with aiohttp.ClientSession() as http:
        sockets = [await http.ws_connect(urls[role]) for role in ("caller", "callee")]
        try:
            for ws in sockets:
                await ws.send_json({"event": "start", "encoding": "L16", "sample_rate": RATE, "channels": 1})
            hung_up = None
            for i, start in enumerate(range(0, len(payload[0]), 2 * FRAME)):
                for ws, data in zip(sockets, payload):
                    await ws.send_bytes(data[start:start + 2 * FRAME])
                if i == 50:  # one second in, the call is hung up while both legs go on sending
                    hung_up = asyncio.ensure_future(server.api("DELETE", f"/api/v1/sessions/{session['uuid']}"))
                await asyncio.sleep(0.01)
            assert (await hung_up)[0] == 202
        finally:
            for ws in sockets:
                await ws.close()
    return answer["recording_id"]


async def test_many_calls_in_workers_hung_up_while_their_audio_is_in_flight(server):
    rids = await asyncio.gather(*(_call_hung_up_mid_stream(server, i) for i in range(24)))
    for rid in rids:
        meta = await server.wait_recording(rid, timeout=60)
        assert (meta["state"], meta["termination_reason"]) == ("completed", "hangup"), meta
        assert meta["duration"] >= 0.9
    for _ in range(50):  # the workers report their counters every second
        await asyncio.sleep(0.1)
        if server.engine.shards[0].lateness.count:
            break
    await asyncio.sleep(1.2)
    status, metrics, _ = await server.api("GET", "/metrics")
    assert "mediaserver_processing_errors_total 0\n" in metrics.decode()
