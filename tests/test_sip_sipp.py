"""Real SIPp calls the server: recordings as long as what was sent, RFC 4733 digits,
re-INVITE, CANCEL, a server-side hangup and many concurrent calls."""

from __future__ import annotations

import asyncio
import os
import re
import struct
from dataclasses import dataclass

import numpy as np
import pytest
from audio import best_lag, noise, tone, write_wav
from servers import Server, free_udp_range
from sip_peers import (
    PCAPS,
    LegWatcher,
    SchedulingProbe,
    first_call,
    leg_stats,
    recordings,
    run_sipp,
    scenario,
    sender_report,
    sender_sets,
    sipp_available,
)

from mediaserver.api.keys import SERVICES
from mediaserver.codecs import g711

pytestmark = pytest.mark.skipif(not sipp_available(), reason="SIPp (sip-tester) is not installed")

RATE = 8000
TOLERANCE_S = 0.06
GRAM = 8  # consecutive samples of noise that are found once in three seconds of it
# A machine on which no process waited longer than this for a CPU is quiet: a sender
# there is not late by anything near the mix delay (jitter_ms), so nothing comes too late.
QUIET_WAIT_S = 0.02


def pcap_payloads(path) -> bytes:
    """The RTP payloads of a classic pcap of Ethernet/IPv4/UDP/RTP packets, in order."""
    data = path.read_bytes()
    order = "<" if struct.unpack("<I", data[:4])[0] in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    at, payloads = 24, []
    while at < len(data):
        _, _, length, _ = struct.unpack(order + "IIII", data[at:at + 16])
        frame = data[at + 16:at + 16 + length]
        ip = 14
        udp = ip + (frame[ip] & 0x0F) * 4
        rtp = frame[udp + 8:]
        payloads.append(rtp[12 + 4 * (rtp[0] & 0x0F):])
        at += 16 + length
    return b"".join(payloads)


def ulaw_file(tmp_path, samples: np.ndarray):
    path = tmp_path / "audio.ulaw"
    path.write_bytes(g711.encode_ulaw(samples))
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="SIPp replays captures through a raw socket, which needs root")
@pytest.mark.timeout(90)
async def test_pcma_capture_and_rfc4733_digits(tmp_path):
    """SIPp replays its PCMA capture, then the RFC 4733 captures of 1, 2 and #: the audio
    is in the recording sample for sample, the digits arrive once each, and # (the
    finish key) ends the recording where its event began."""
    async with Server(tmp_path, record_policy="all", default_finish_on_key="#") as server, LegWatcher(server) as watcher:
        result = await run_sipp(server, scenario(tmp_path, "uac_pcma_dtmf.xml"), tmp_path)
        assert result.returncode == 0, result.output
        [recording] = await recordings(server)
    assert watcher.key_presses() == ["1", "2", "#"]
    assert recording.meta["termination_reason"] == "finish_key" and recording.meta["finish_key"] == "#"
    sent = g711.decode_alaw(pcap_payloads(PCAPS / "g711a.pcap"))
    audio = recording.audio[:, 0]
    lag, score = best_lag(audio[:RATE // 2], sent[:RATE // 2], RATE // 4)
    assert lag >= 0 and score > 0.999
    assert np.array_equal(audio[lag:lag + len(sent)], sent)  # every sample, in place
    # The scenario plays # 7.1 + 0.3 + 0.3 s after the capture started.
    assert recording.meta["duration"] == pytest.approx(lag / RATE + 7.7, abs=TOLERANCE_S)


def write_pcmu_pcap(path, ulaw: bytes, sent_at_us: list[int]) -> None:
    """`ulaw` as a pcap of 20 ms PCMU packets (Ethernet/IPv4/UDP/RTP) captured at the
    given microseconds: SIPp's play_pcap_audio sends them with that spacing."""
    records = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for index, micros in enumerate(sent_at_us):
        rtp = struct.pack("!BBHII", 0x80, 0x80 if index == 0 else 0, index, index * 160, 0x5EED) + ulaw[index * 160:(index + 1) * 160]
        udp = struct.pack("!HHHH", 40000, 40002, 8 + len(rtp), 0) + rtp
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), index, 0, 64, 17, 0, bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1])) + udp
        frame = bytes(12) + b"\x08\x00" + ip
        records.append(struct.pack("<IIII", micros // 1_000_000, micros % 1_000_000, len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(records))


@pytest.mark.skipif(os.geteuid() != 0, reason="SIPp replays captures through a raw socket, which needs root")
async def test_a_stream_whose_first_packet_came_late_keeps_all_its_audio(tmp_path):
    """The call's first packet comes a few ms after the call began, the next two 1 ms
    after it, then every 20 ms: anchored on the least delayed, the stream starts about 19
    ms before its first packet arrived, which is before the session began. Every sample
    is still recorded (none dropped as late), in order."""
    sent = noise(2.0, seed=11, dbfs=-18)
    ulaw = g711.encode_ulaw(sent)
    packets = len(ulaw) // 160
    capture = tmp_path / "burst.pcap"
    write_pcmu_pcap(capture, ulaw, [n * 20_000 for n in range(packets)])
    path = scenario(tmp_path, "uac_pcmu_pcap.xml", pcap=capture)
    async with Server(tmp_path, record_policy="all") as server:
        result = await run_sipp(server, path, tmp_path, sets={"call_ms": 2300})
        assert result.returncode == 0, result.output
        [recording] = await recordings(server)
        status, metrics, _ = await server.api("GET", "/metrics")
    assert dropped_input(metrics.decode()).get("late_samples", 0) == 0
    [leg] = recording.meta["legs"]
    assert leg["audio_ms"] == pytest.approx(packets * 20, abs=0.2)
    where = placement(recording.audio[:, 0], g711.decode_ulaw(ulaw))
    assert where.missing == 0 and len(where.runs) == 1, where


@pytest.mark.parametrize("transport", ["u1", "t1"])
async def test_pcmu_rtp_stream_call(tmp_path, transport):
    """A PCMU call over UDP or TCP signalling: the recording holds what was streamed and
    lasts until the BYE (which SIPp sends 100 ms after the stream's end)."""
    sent = noise(2.0, seed=3, dbfs=-18)
    path = scenario(tmp_path, "uac_pcmu_rtpstream.xml", ulaw_file=ulaw_file(tmp_path, sent))
    async with Server(tmp_path, record_policy="all") as server:
        result = await run_sipp(server, path, tmp_path, transport=transport, sets={"call_ms": 2100})
        assert result.returncode == 0, result.output
        [recording] = await recordings(server)
    [leg] = recording.meta["legs"]
    assert leg["role"] == "caller" and leg["lost"] == 0 and leg["malformed"] == 0
    start = leg["first_ms"] / 1000
    assert recording.meta["duration"] == pytest.approx(start + 2.1, abs=TOLERANCE_S)
    assert leg["audio_ms"] / 1000 == pytest.approx(2.0, abs=TOLERANCE_S)
    lag, score = best_lag(recording.audio[:, 0], g711.decode_ulaw(g711.encode_ulaw(sent)), RATE // 5)
    assert score > 0.99 and abs(lag / RATE - start) < 0.002


async def test_record_policy_api_waits_for_record_start(tmp_path):
    """With record_policy = api a call is a session without a recording until the API
    starts one; it then records from that moment, with the options given."""
    sent = noise(3.0, seed=4, dbfs=-18)
    path = scenario(tmp_path, "uac_pcmu_rtpstream.xml", ulaw_file=ulaw_file(tmp_path, sent))
    async with Server(tmp_path, record_policy="api") as server:
        sipp = asyncio.create_task(run_sipp(server, path, tmp_path, sets={"call_ms": 3100}))
        uuid = await first_call(server)
        await asyncio.sleep(1.0)
        _, session, _ = await server.api("GET", f"/api/v1/sessions/{uuid}")
        assert (session["source"], session["recording_id"]) == ("sip", None)
        assert session["metadata"]["sip"]["request_uri"].startswith("sip:app1@")
        status, started = await server.command(uuid, "start", format="mp3")
        assert status == 202
        result = await sipp
        assert result.returncode == 0, result.output
        [recording] = await recordings(server)
    assert recording.meta["recording_id"] == started["recording_id"] and recording.meta["format"] == "mp3"
    [leg] = recording.meta["legs"]
    assert recording.meta["duration"] == pytest.approx(2.0, abs=0.25)  # the call's last two seconds or so
    assert leg["first_ms"] == 0  # the leg was already sending


@pytest.mark.timeout(60)
async def test_reinvite_hold_new_port_and_codec_change(tmp_path):
    """Hold by re-INVITE, then back on another port with PCMA only: one session, one leg,
    one recording, with both stretches of audio where they were sent."""
    first, second = tone(440, 1.5), tone(1000, 1.5)
    wavs = {"wav1": write_wav(tmp_path / "first.wav", first), "wav2": write_wav(tmp_path / "second.wav", second)}
    sport1, sport2 = free_udp_range(4)[0], free_udp_range(4)[0]
    sets = {**sender_sets(tmp_path, **wavs), "sport1": sport1, "sport2": sport2, "delay1": 0.6, "delay2": 3.6,
            "hold_ms": 2300, "resume_ms": 3300, "bye_ms": 5400}
    async with Server(tmp_path, record_policy="all") as server, LegWatcher(server) as watcher:
        result = await run_sipp(server, scenario(tmp_path, "uac_reinvite.xml"), tmp_path, sets=sets)
        assert result.returncode == 0, result.output
        [recording] = await recordings(server)
    [leg] = watcher.legs.values()
    assert leg.endpoint.stats.relatched == 1  # the new source port was taken up
    assert [codec.name for codec in leg.stream.formats.values()] == ["PCMA", "telephone-event"]
    [stats] = recording.meta["legs"]
    report1, report2 = sender_report(tmp_path, wavs["wav1"]), sender_report(tmp_path, wavs["wav2"])
    audio = recording.audio[:, 0]
    lag1, score1 = best_lag(audio, first, 2 * RATE)
    # A new SSRC from a new port is anchored at its arrival: the second stretch belongs as
    # far after the first as the senders' first packets actually left apart (a sender
    # process that starts late on a busy machine moves its stretch, rightly).
    apart = report2["first_sent"] - report1["first_sent"]
    start2 = lag1 + round(apart * RATE)
    lag2, score2 = best_lag(audio[start2 - RATE // 2:], second, RATE)
    print(f"re-INVITE: the senders' first packets left {apart:.3f} s apart (planned 3.0 s); the second stretch "
          f"is {lag2 - RATE // 2} samples from there; late datagrams {report1['behind']}, {report2['behind']}")
    assert score1 > 0.95 and score2 > 0.95
    assert abs(lag2 - RATE // 2) < 0.05 * RATE  # the second stretch is where it was sent
    silent = audio[lag1 + len(first) + RATE // 10:start2 - RATE // 10]  # between the senders: nothing
    assert len(silent) >= RATE // 2 and not silent.any()
    if report1["behind"] or report2["behind"]:
        pytest.skip("a sender fell behind its schedule, so the server may rightly have dropped late audio: "
                    f"audio length not judged (late datagrams {report1['behind']}, {report2['behind']})")
    assert stats["audio_ms"] / 1000 == pytest.approx(3.0, abs=TOLERANCE_S)


async def test_cancel_while_ringing(tmp_path):
    """CANCEL before the answer: 200 for the CANCEL, 487 for the INVITE, no session left."""
    async with Server(tmp_path, record_policy="all", sip_answer_delay_ms=1500) as server:
        result = await run_sipp(server, scenario(tmp_path, "uac_cancel.xml"), tmp_path)
        assert result.returncode == 0, result.output
        status, sessions, _ = await server.api("GET", "/api/v1/sessions")
        assert status == 200 and sessions["data"] == []
        assert not server.app[SERVICES]["sip"].calls and not server.app[SERVICES]["rtp"].legs


async def test_server_hangs_up_when_the_session_is_deleted(tmp_path):
    """DELETE /api/v1/sessions/{uuid} on a SIP call sends BYE in the dialog."""
    path = scenario(tmp_path, "uac_server_hangup.xml", ulaw_file=ulaw_file(tmp_path, tone(440, 1.0)))
    async with Server(tmp_path, record_policy="all") as server:
        sipp = asyncio.create_task(run_sipp(server, path, tmp_path, timeout_s=20))
        uuid = await first_call(server)
        await asyncio.sleep(1.0)
        status, _, _ = await server.api("DELETE", f"/api/v1/sessions/{uuid}")
        assert status == 202
        result = await sipp
        assert result.returncode == 0, result.output
        [recording] = await recordings(server)
    assert recording.meta["termination_reason"] == "hangup"
    assert recording.meta["duration"] == pytest.approx(1.0, abs=0.25)


@dataclass(frozen=True)
class Run:
    """A stretch of what was sent, found sample for sample in a recording."""

    sent: int  # index of its first sample in what was sent
    at: int  # where that sample is in the recording
    length: int

    @property
    def shift(self) -> int:
        return self.at - self.sent


def _gram_keys(samples: np.ndarray) -> np.ndarray:
    """A 64-bit key for every GRAM consecutive samples (the window starting at each index)."""
    windows = np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(samples.astype("<i2"), GRAM))
    words = windows.view("<u8")
    return (words[:, 0] * np.uint64(0x9E3779B97F4A7C15)) ^ words[:, 1]


def sent_runs(audio: np.ndarray, sent: np.ndarray) -> list[Run]:
    """Every stretch of `sent` (noise, so any GRAM samples of it occur once) that is in
    `audio` sample for sample, in the order it was sent."""
    keys = _gram_keys(audio)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    wanted = _gram_keys(sent)
    index = np.minimum(np.searchsorted(ordered, wanted), len(ordered) - 1)
    at = np.where(ordered[index] == wanted, order[index], -1)
    follows = np.zeros(len(at), dtype=bool)
    follows[1:] = (at[:-1] >= 0) & (at[1:] == at[:-1] + 1)
    breaks = np.append(np.flatnonzero(~follows), len(at))
    runs: list[Run] = []
    for first, after in zip(breaks[:-1], breaks[1:]):
        if at[first] < 0:
            continue
        run = Run(int(first), int(at[first]), int(after - first) + GRAM - 1)
        if runs:  # a sample that matched by chance across a boundary belongs to one side only
            last = runs[-1]
            cut = max(last.sent + last.length - run.sent, last.at + last.length - run.at, 0)
            runs[-1] = Run(last.sent, last.at, last.length - cut)
        runs.append(run)
    for run in runs:
        assert np.array_equal(audio[run.at:run.at + run.length], sent[run.sent:run.sent + run.length])
    return runs


def dropped_input(metrics: str) -> dict[str, int]:
    """`mediaserver_input_dropped_total` by reason, from the /metrics text."""
    found = re.findall(r'^mediaserver_input_dropped_total\{reason="([a-z_]+)"\} (\d+)$', metrics, re.MULTILINE)
    return {reason: int(count) for reason, count in found}


@dataclass(frozen=True)
class Placement:
    """How one leg's audio sits in its recording, against what its RTP said."""

    runs: list[Run]
    shifts: list[int]  # how far each stretch sits from where the one before it puts it (samples)
    missing: int  # samples sent but not in the recording
    unexplained: int  # of those, what no move of the leg's mapping overlapped

    @property
    def moves(self) -> list[int]:
        """The shifts between stretches that are not zero (a gap in the audio is none)."""
        return [shift for shift in self.shifts if shift]


def placement(audio: np.ndarray, sent: np.ndarray) -> Placement:
    """Where `sent` is in `audio`; fails if the stretches are out of order or if the
    recording holds anything besides them and silence."""
    runs = sent_runs(audio, sent)
    assert runs, "nothing that was sent is in the recording"
    for before, after in zip(runs, runs[1:]):
        assert after.at >= before.at + before.length, f"out of order: {before} then {after}"
    covered = np.zeros(len(audio), dtype=bool)
    for run in runs:
        covered[run.at:run.at + run.length] = True
    assert not audio[~covered].any(), "the recording holds audio that was never sent"
    shifts = [after.shift - before.shift for before, after in zip(runs, runs[1:])]
    unexplained = runs[0].sent + len(sent) - (runs[-1].sent + runs[-1].length)
    for before, after, shift in zip(runs, runs[1:], shifts):
        # A mapping moved back by n samples puts the next n samples onto audio already
        # placed: the mixer drops them (as overlap, or as late when already mixed).
        gap = after.sent - (before.sent + before.length)
        unexplained += gap - min(max(-shift, 0), gap)
    return Placement(runs, shifts, len(sent) - sum(run.length for run in runs), unexplained)


@pytest.mark.timeout(90)
async def test_many_concurrent_calls(tmp_path):
    """50 calls at once, each streaming 3 s: 50 recordings, each holding what its call
    sent sample for sample, in order, at the offsets its RTP timestamps give, except where
    the server reports that it moved the leg's mapping (a realignment or re-anchor, by its
    size); audio is missing only where such a move overlapped it or the server counted it
    as dropped, and on a machine that kept its processes waiting for no more than
    QUIET_WAIT_S, only where a move overlapped it."""
    calls = 50
    sent = noise(3.0, seed=9, dbfs=-18)
    path = scenario(tmp_path, "uac_load.xml", ulaw_file=ulaw_file(tmp_path, sent))
    low, high = free_udp_range(4 * calls + 8)
    async with Server(tmp_path, record_policy="all", rtp_port_min=low, rtp_port_max=high) as server:
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, len(server.app[SERVICES]["sip"].calls))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        # Each call lasts 100 ms longer than its file, so that a stream SIPp starts late
        # still ends before the BYE.
        async with SchedulingProbe() as probe:
            result = await run_sipp(server, path, tmp_path, calls=calls, sets={"call_ms": 3100}, timeout_s=60)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        assert result.returncode == 0, result.output
        found = await recordings(server, sessions=calls)
        stats = {leg["leg_id"]: leg for recording in found for leg in await leg_stats(server, recording.meta["session_uuid"])}
        status, metrics, _ = await server.api("GET", "/metrics")
        assert status == 200
    assert peak == calls
    assert len(found) == calls
    sent = g711.decode_ulaw(g711.encode_ulaw(sent))
    dropped = dropped_input(metrics.decode())
    missing = unexplained = moved = 0
    for recording in found:
        [leg] = recording.meta["legs"]
        rtp = stats[leg["leg_id"]]
        assert leg["lost"] == 0 and leg["malformed"] == 0
        where = placement(recording.audio[:, 0], sent)
        missing, unexplained, moved = missing + where.missing, unexplained + where.unexplained, moved + bool(where.moves)
        detail = f"{where} first_ms {leg['first_ms']} audio_ms {leg['audio_ms']} rtp {rtp}"
        # The first recorded sample is where the leg says, and every recorded sample counts.
        assert abs(where.runs[0].at - leg["first_ms"] * RATE / 1000) <= 1, detail
        assert abs(sum(run.length for run in where.runs) - leg["audio_ms"] * RATE / 1000) <= 1, detail
        # Stretches sit apart only where the server moved the mapping, and by as much as it says.
        assert len(where.moves) <= rtp["realigned"] + rtp["reanchored"], detail
        if not rtp["reanchored"]:  # a re-anchor moves it by an amount it does not report
            assert abs(sum(map(abs, where.moves)) - rtp["slipped_ms"] * RATE / 1000) <= 1, detail
        # The recording ends with the audio, or with the hangup (less the mix delay) if later.
        end = (where.runs[-1].at + where.runs[-1].length) / RATE
        assert end - TOLERANCE_S <= recording.meta["duration"] <= max(end, leg["first_ms"] / 1000 + 3.1) + TOLERANCE_S, detail
        if probe.worst_s < QUIET_WAIT_S:
            assert where.unexplained == 0, f"audio dropped although no process waited {QUIET_WAIT_S} s: {detail}"
    print(f"concurrent calls: {moved} of {calls} legs moved by the server; {missing} samples missing in all, "
          f"{unexplained} of them not overlapped by a move; dropped input {dropped}; longest wait for a CPU "
          f"{probe.worst_s * 1000:.1f} ms")
    # Nothing is missing that the server did not count as dropped.
    assert missing == dropped.get("late_samples", 0) + dropped.get("overlap_samples", 0)
