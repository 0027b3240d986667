"""Past its capacity the server refuses new calls (503 with Retry-After, over HTTP, WebSocket
and SIP) and the calls it holds go on; the refusal shows in /healthz and the metrics."""

from __future__ import annotations

import asyncio

import aiohttp

from mediaserver.api.keys import SERVICES
from mediaserver.config import AdmissionSettings
from mediaserver.errors import Unavailable
from mediaserver.recorder.admission import Admission
from mediaserver.recorder.processor import LatenessHistogram
from servers import APP1, Server, SteppedClock
from test_sip_fixtures import MESSAGES, UdpPeer

HEADERS = {"X-App-ID": APP1["id"], "X-API-Key": APP1["key"]}


async def test_a_full_server_refuses_new_sessions_and_keeps_recording_the_ones_it_holds(tmp_path):
    async with Server(tmp_path, max_calls=2) as server:
        held = [(await server.create_session())["uuid"] for _ in range(2)]
        status, data, response = await server.api("POST", "/api/v1/sessions")
        assert status == 503 and data["error"]["code"] == "server.full", data
        assert response.headers["Retry-After"] == "5"
        # The calls already taken are untouched: they take commands and new legs.
        assert (await server.command(held[0], "start", command_uid="s"))[0] == 202
        async with aiohttp.ClientSession(server.base_url, headers=HEADERS) as http:
            async with http.ws_connect(f"/ws/v1/sessions/{held[1]}/legs/caller") as ws:
                await ws.send_json({"event": "start", "encoding": "L16", "sample_rate": 8000, "channels": 1})
                await ws.send_bytes(bytes(320))
            # A WebSocket stream that would make a new session is refused at the upgrade.
            fresh = f"{'0' * 8}-0000-4000-8000-{'0' * 12}"
            try:
                async with http.ws_connect(f"/ws/v1/sessions/{fresh}/legs/caller"):
                    raise AssertionError("a full server upgraded a stream for a new session")
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 503 and exc.headers["Retry-After"] == "5"
        health = await (await server.http.get("/healthz")).json()
        assert health["admission"] == {"state": "full", "calls": 2, "max_calls": 2, "late_tick_share": 0.0}
        metrics = await (await server.http.get("/metrics")).text()
        assert 'mediaserver_calls_refused_total{reason="server.full"} 2' in metrics
        assert "mediaserver_admission_open 0" in metrics
        # A call that ends makes room for the next.
        assert (await server.api("DELETE", f"/api/v1/sessions/{held[0]}"))[0] in (200, 202, 204)
        for _ in range(100):
            if len(server.engine.sessions) < 2:
                break
            await asyncio.sleep(0.05)
        assert (await server.api("POST", "/api/v1/sessions"))[0] == 201
        assert "mediaserver_admission_open 0" in await (await server.http.get("/metrics")).text()  # full again


async def test_a_full_server_answers_an_invite_503_with_retry_after(tmp_path):
    async with Server(tmp_path, max_calls=1, record_policy="all") as server:
        await server.create_session()
        port = server.app[SERVICES]["sip"].port
        peer = UdpPeer()
        try:
            answers = await peer.exchange((MESSAGES / "invite_pcmu.sip").read_bytes(), port, wait=2.0)
        finally:
            peer.close()
        final = answers[-1]
        assert (final.status, final.reason) == (503, "Service Unavailable"), [a.status for a in answers]
        assert final.headers.get("Retry-After") == "5"
        assert len(server.engine.sessions) == 1


def _late(histogram: LatenessHistogram, seconds: float, n: int) -> None:
    for _ in range(n):
        histogram.observe(seconds)


def test_processing_that_falls_behind_closes_admission_for_the_hold_then_it_reopens():
    clock = SteppedClock()
    admission = Admission(AdmissionSettings(max_calls=0, overload_lateness_ms=200, overload_hold_s=10), clock)
    lateness = LatenessHistogram()
    _late(lateness, 0.001, 1000)
    admission.observe(lateness)  # the first reading is the baseline
    _late(lateness, 0.001, 995)
    _late(lateness, 0.3, 5)  # 0.5 % late: still open
    admission.observe(lateness)
    admission.check(500)
    _late(lateness, 0.001, 980)
    _late(lateness, 0.3, 20)  # 2 % of this interval's ticks 300 ms late
    admission.observe(lateness)
    try:
        admission.check(1)
    except Unavailable as exc:
        assert (exc.code, exc.retry_after_s) == ("server.overloaded", 10)
    else:
        raise AssertionError("an overloaded server took a call")
    assert admission.state(1)["state"] == "overloaded"
    clock.advance(9.5)
    _late(lateness, 0.001, 1000)
    admission.observe(lateness)  # a clean interval does not end the hold early
    assert admission.state(1)["state"] == "overloaded"
    clock.advance(1.0)
    admission.check(1)
    assert admission.state(1)["state"] == "open" and admission.refused == {"server.overloaded": 1}


def test_ticks_just_under_the_limit_do_not_count_as_late():
    admission = Admission(AdmissionSettings(overload_lateness_ms=200), SteppedClock())
    lateness = LatenessHistogram()
    admission.observe(lateness)
    _late(lateness, 0.15, 100)  # all 150 ms late: under 200
    admission.observe(lateness)
    assert admission.late_share == 0.0 and not admission.overloaded
