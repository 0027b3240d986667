"""An RTP sender for tests: audio to packets, optional impairments, sent in real time.

As a module: `packetize()` makes the packets of one stream, `impair()` reorders, drops,
duplicates and restarts them (seeded, so a test is repeatable), `send()` /
`send_async()` send a plan at its times. As a program (SIPp scenarios start it with
<exec command>), it streams WAV files to ports:

    python rtp_sender.py --to 127.0.0.1:40000 --wav a.wav [--to 127.0.0.1:40002 --wav b.wav]
        [--codec PCMU|PCMA] [--from-port N] [--delay S] [--report FILE | --report-dir DIR]

Every datagram leaves at an absolute deadline from the start; `Sent` (and `--report`)
record how late each one actually left, so that a test can tell a sender that fell behind
(a busy machine) from a server that misplaced what arrived on time.
"""

from __future__ import annotations

import time

_STARTED = time.monotonic()  # --delay counts from here, so that import time does not add to it

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from mediaserver.codecs.registry import find_codec  # noqa: E402
from mediaserver.rtp.jitter import JUMP_S  # noqa: E402
from mediaserver.rtp.packet import RtpPacket  # noqa: E402

PTIME = 0.02  # what every stream here sends per packet (the codecs' encoders frame 20 ms)
# A datagram later than this is the sender's doing, not the network's: the server may then
# re-anchor the stream or drop the datagram as too late to mix (mediaserver.rtp.jitter).
ALLOWANCE_S = JUMP_S


@dataclass
class Planned:
    """One datagram to send `at` seconds after the start, and the audio it carries."""

    at: float
    packet: RtpPacket
    first_sample: int  # index in the source audio of its first sample (-1: not audio)


@dataclass
class Impairments:
    loss: float = 0.0  # fraction of packets never sent
    duplicate: float = 0.0  # fraction sent twice
    reorder: float = 0.0  # fraction held back by `hold` seconds
    hold: float = 0.045
    timestamp_jump_at: float | None = None  # seconds into the stream: timestamps jump
    ssrc_change_at: float | None = None  # a new SSRC, sequence and timestamp base
    marker_restart_at: float | None = None  # same SSRC, new sequence and timestamp, marker set
    seed: int = 7
    spare_first: bool = True  # never lose the first packet (it anchors the stream)
    log: dict = field(default_factory=dict)  # what was done, by index in the plan: lost, duplicated


def packetize(samples: np.ndarray, codec: str = "PCMU", payload_type: int | None = None, ssrc: int = 0x1234,
              seq: int = 1000, timestamp: int = 5000, rate: int = 8000, clock_rate: int | None = None) -> list[Planned]:
    """Packets of `samples` (int16 at `rate`), one per 20 ms, sent on time."""
    entry = find_codec(codec, clock_rate)
    encoder = entry.make_encoder(rate)
    step = rate * 20 // 1000
    pt = entry.payload_type if payload_type is None else payload_type
    plan = []
    for index, start in enumerate(range(0, len(samples) - step + 1, step)):
        payloads = encoder.encode(samples[start:start + step])
        stamp = (timestamp + index * encoder.timestamp_step) & 0xFFFFFFFF
        packet = RtpPacket(pt, (seq + index) & 0xFFFF, stamp, ssrc, b"".join(payloads), marker=index == 0)
        plan.append(Planned(index * PTIME, packet, start))
    return plan


def impair(plan: list[Planned], how: Impairments) -> list[Planned]:
    """The plan with its discontinuities applied, then lost, duplicated and reordered."""
    rng = random.Random(how.seed)
    plan = _discontinuities(plan, how)
    out = []
    for index, item in enumerate(plan):
        if rng.random() < how.loss and not (how.spare_first and index == 0):
            how.log.setdefault("lost", []).append(index)
            continue
        delay = how.hold if rng.random() < how.reorder else 0.0
        out.append(replace(item, at=item.at + delay))
        if rng.random() < how.duplicate:
            out.append(replace(item, at=item.at + delay + 0.003))
            how.log.setdefault("duplicated", []).append(index)
    out.sort(key=lambda item: item.at)
    return out


def _discontinuities(plan: list[Planned], how: Impairments) -> list[Planned]:
    """Timestamps, sequence numbers and SSRC as a sender that jumps or restarts makes them."""
    starts = [at for at in (how.ssrc_change_at, how.marker_restart_at) if at is not None]
    out = []
    for item in plan:
        packet = replace(item.packet)
        ts_shift = seq_shift = 0
        if how.timestamp_jump_at is not None and item.at >= how.timestamp_jump_at:
            ts_shift += 987_654
        if how.ssrc_change_at is not None and item.at >= how.ssrc_change_at:
            packet.ssrc, seq_shift, ts_shift = 0x5EED5EED, seq_shift + 31_000, ts_shift + 2_000_000_000
        if how.marker_restart_at is not None and item.at >= how.marker_restart_at:
            seq_shift, ts_shift = seq_shift + 12_345, ts_shift + 77_777_777
        if any(abs(item.at - at) < PTIME / 2 for at in starts):
            packet.marker = True
        packet.timestamp = (packet.timestamp + ts_shift) & 0xFFFFFFFF
        packet.sequence_number = (packet.sequence_number + seq_shift) & 0xFFFF
        out.append(replace(item, packet=packet))
    return out


@dataclass
class Sent:
    """What a sender did: when it started (time.monotonic(), which every process on the
    machine shares) and, per datagram in sending order, how late it left against its plan."""

    start: float
    lateness: list[float] = field(default_factory=list)  # seconds after its planned time

    @property
    def first_sent(self) -> float:
        """When the first datagram actually left."""
        return self.start + (self.lateness[0] if self.lateness else 0.0)

    def behind(self, allowance: float = ALLOWANCE_S) -> list[int]:
        """Indexes (in sending order) of the datagrams that left more than `allowance` late."""
        return [index for index, late in enumerate(self.lateness) if late > allowance]

    def describe(self, allowance: float = ALLOWANCE_S) -> str:
        late = self.behind(allowance)
        if not late:
            return f"on time (at most {max(self.lateness, default=0) * 1000:.1f} ms late)"
        return (f"{len(late)} of {len(self.lateness)} datagrams left more than {allowance * 1000:.0f} ms late, "
                f"the worst {max(self.lateness) * 1000:.0f} ms, from #{late[0]} on")


def _events(streams: list[tuple[list[Planned], tuple[str, int]]]) -> list[tuple[float, bytes, tuple[str, int]]]:
    return sorted(((item.at, bytes(item.packet), dest) for plan, dest in streams for item in plan), key=lambda e: e[0])


def send(streams: list[tuple[list[Planned], tuple[str, int]]], sock: socket.socket, start: float | None = None) -> Sent:
    """Send every stream's plan at its times (blocking), each at an absolute deadline from
    the start, so one late datagram does not delay the rest; returns what was done."""
    sent = Sent(time.monotonic() if start is None else start)
    for at, data, dest in _events(streams):
        delay = sent.start + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sock.sendto(data, dest)
        sent.lateness.append(time.monotonic() - sent.start - at)
    return sent


async def send_async(streams: list[tuple[list[Planned], tuple[str, int]]], sock: socket.socket) -> Sent:
    """`send` on the running event loop (for tests whose server runs in the same loop)."""
    sent = Sent(time.monotonic())
    for at, data, dest in _events(streams):
        delay = sent.start + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sock.sendto(data, dest)
        sent.lateness.append(time.monotonic() - sent.start - at)
    return sent


def _main() -> None:
    import soundfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--to", action="append", required=True, help="host:port, once per stream")
    parser.add_argument("--wav", action="append", required=True, help="a WAV file per stream (8 kHz mono)")
    parser.add_argument("--codec", default="PCMU")
    parser.add_argument("--from-port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds after the program started to send the first packet")
    parser.add_argument("--report", help="write what was sent, and when, to this JSON file")
    parser.add_argument("--report-dir", help="... or to DIR/<first WAV's name>.sent.json")
    args = parser.parse_args()
    streams = []
    for _index, (dest, wav) in enumerate(zip(args.to, args.wav)):
        samples, _ = soundfile.read(wav, dtype="int16")
        host, port = dest.rsplit(":", 1)
        # RFC 3550 §5.1: random SSRC, initial sequence number and timestamp.
        stream = packetize(samples, args.codec, ssrc=random.getrandbits(32), seq=random.getrandbits(16), timestamp=random.getrandbits(32))
        streams.append((stream, (host, int(port))))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", args.from_port))
        planned = _STARTED + args.delay
        sent = send(streams, sock, start=max(planned, time.monotonic()))
    if args.report_dir and not args.report:
        args.report = str(Path(args.report_dir) / (Path(args.wav[0]).stem + ".sent.json"))
    if args.report:
        report = {"planned_start": planned, "start": sent.start, "first_sent": sent.first_sent,
                  "lateness": sent.lateness, "behind": sent.behind()}
        Path(args.report).write_text(json.dumps(report))


if __name__ == "__main__":
    _main()
