"""A process that stalls must not drop what its sockets received meanwhile as late.

Real sockets, receivers, sessions and processing thread on a uvloop loop (as in a worker),
a sender thread streaming PCMU in real time, and a callback on the loop that now and then
holds it for longer than the jitter allowance (as a garbage collection or a big message
does). Every packet leaves on time: none may be counted late.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvloop

from audio import tone
from mediaserver.clock import SystemClock
from mediaserver.config import Config
from mediaserver.recorder.processor import Processor
from mediaserver.recorder.rtpmedia import RtpMedia, formats_from
from mediaserver.recorder.session import Session
from mediaserver.rtp.endpoint import PortPool
from rtp_sender import Sent, packetize, send

SESSIONS = 20
SECONDS = 4.0
STALL_S = 0.3  # well beyond jitter_ms
STALLS_AT = (1.0, 2.0, 3.0)


class _Stall(asyncio.DatagramProtocol):
    """Holds the loop for STALL_S from inside an I/O callback, whenever a datagram comes."""

    def datagram_received(self, data: bytes, addr) -> None:
        time.sleep(STALL_S)


async def _scenario() -> tuple[int, int, Sent]:
    config = Config(jitter_ms=80, process_ms=200, tick_ms=20)
    clock = SystemClock()

    async def on_results(results) -> None:
        pass

    processor = Processor(config.processing(), clock, on_results)
    pool = PortPool("127.0.0.1", 0, 0)
    loop = asyncio.get_running_loop()
    stall, _ = await loop.create_datagram_endpoint(_Stall, local_addr=("127.0.0.1", 0))
    media, sessions, streams = [], [], []
    audio = tone(440, SECONDS + 0.5, 8000)
    for index in range(SESSIONS):
        session = Session(f"s{index}", "app", clock.monotonic(), 8000, jitter_s=config.jitter_ms / 1000)
        processor.add(session)
        sessions.append(session)
        for leg_id in ("a", "b"):
            session.add_leg(leg_id, "caller" if leg_id == "a" else "callee", clock.monotonic())
            leg = await RtpMedia.open(pool, clock, session, leg_id, formats_from({0: ("PCMU", 8000, 1)}), 0.04)
            media.append(leg)
            streams.append((packetize(audio, ssrc=0x1000 + len(streams)), ("127.0.0.1", leg.port)))
    processor.start()
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    kick = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sent = []
        sender = threading.Thread(target=lambda: sent.append(send(streams, out)))
        sender.start()
        started = time.monotonic()
        for at in STALLS_AT:
            await asyncio.sleep(max(started + at - time.monotonic(), 0))
            kick.sendto(b"stall", stall.get_extra_info("sockname"))
        while sender.is_alive():
            await asyncio.sleep(0.05)
        sender.join()
        await asyncio.sleep(0.5)  # the last packets are mixed
        late = sum(session.mixer.totals.late_samples for session in sessions)
        packets = sum(session.inputs[leg].packets for session in sessions for leg in ("a", "b"))
        return late, packets, sent[0]
    finally:
        out.close()
        kick.close()
        stall.close()
        for leg in media:
            await leg.close()
        await processor.close()


def test_a_stalled_loop_does_not_drop_what_waited_in_its_sockets():
    late, packets, sent = uvloop.run(_scenario())
    expected = SESSIONS * 2 * int(SECONDS / 0.02)
    assert packets >= expected * 0.99, f"{packets} of {expected} packets received (sender: {sent.describe()})"
    # Only a datagram that itself left later than the mix waits for it (the sender thread
    # shares a busy machine) may be late: 160 samples each. On time, none may be.
    excused = 160 * len(sent.behind())
    assert late <= excused, f"{late} samples dropped as late after the loop stalled (sender: {sent.describe()})"


def test_turns_keep_their_spread_after_a_stall():
    config = Config(process_ms=200, tick_ms=20)
    clock = SystemClock()

    async def on_results(results) -> None:
        pass

    processor = Processor(config.processing(), clock, on_results)
    start = clock.monotonic()
    sessions = [Session(f"s{index}", "app", start) for index in range(10)]
    for session in sessions:
        processor.add(session)
    before = [session.next_process for session in sessions]
    processor._turns(start + 1.0)  # the first turns after a second's stall: every session is overdue
    for first, session in zip(before, sessions):
        periods = (session.next_process - first) / 0.2
        assert start + 1.0 < session.next_process <= start + 1.2 + 1e-9
        assert abs(periods - round(periods)) < 1e-6, "the session's turn moved off its place in the spread"

