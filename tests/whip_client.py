"""A real WHIP client for tests: an aiortc peer connection that publishes audio samples.

`WavTrack` plays int16 samples in real time, as a microphone would, then keeps sending
silence until stopped, so the receiver's jitter buffer hands over the last of the audio
before the client ends the leg. ICE gathers on loopback only (as the server does).
Also: the cross-correlation used to find published audio in a recording.
"""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack, VideoStreamTrack

from mediaserver.webrtc.ice import gather_on

LOOPBACK = ("127.0.0.1",)
FRAME_S = 0.02


class WavTrack(MediaStreamTrack):
    """Audio samples paced in real time, then silence; `played` is set after the last sample."""

    kind = "audio"

    def __init__(self, samples: np.ndarray, rate: int) -> None:
        super().__init__()
        self.samples = samples
        self.rate = rate
        self.played = asyncio.Event()
        self._pos = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        n = round(self.rate * FRAME_S)
        if self._start is None:
            self._start = time.monotonic()
        await asyncio.sleep(max(0.0, self._start + self._pos / self.rate - time.monotonic()))
        chunk = self.samples[self._pos:self._pos + n]
        if len(chunk) < n:
            chunk = np.concatenate([chunk, np.zeros(n - len(chunk), dtype=np.int16)])
        if self._pos + n >= len(self.samples):
            self.played.set()
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._pos
        frame.time_base = fractions.Fraction(1, self.rate)
        self._pos += n
        return frame


async def offer_for(pc: RTCPeerConnection) -> str:
    """The client's offer with its loopback candidates (no trickle)."""
    with gather_on(LOOPBACK):
        await pc.setLocalDescription(await pc.createOffer())
    return pc.localDescription.sdp


def client_pc() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


class Publisher:
    """One published leg: the client peer connection, its track and the leg's Location."""

    def __init__(self, http, url: str, samples: np.ndarray, rate: int, headers: dict[str, str] | None = None,
                 codec: str | None = None, video: bool = False) -> None:
        self.http = http
        self.codec = codec  # offer only this codec (e.g. "PCMU"); None: aiortc's list
        self.video = video  # offer a camera too, as many WHIP clients do
        self.url = url
        self.headers = headers or {}
        self.track = WavTrack(samples, rate)
        self.pc = client_pc()
        self.location: str | None = None

    async def start(self) -> None:
        transceiver = self.pc.addTransceiver(self.track, direction="sendonly")
        if self.codec is not None:
            codecs = RTCRtpSender.getCapabilities("audio").codecs
            transceiver.setCodecPreferences([c for c in codecs if c.mimeType == f"audio/{self.codec}"])
        if self.video:
            self.pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
        offer = await offer_for(self.pc)
        headers = {**self.headers, "Content-Type": "application/sdp"}
        async with self.http.post(self.url, data=offer, headers=headers) as response:
            body = await response.text()
            assert response.status == 201, (response.status, body)
            assert response.content_type == "application/sdp"
            self.location = response.headers["Location"]
        await self.pc.setRemoteDescription(RTCSessionDescription(body, "answer"))

    async def delete(self, headers: dict[str, str] | None = None) -> int:
        async with self.http.delete(self.location, headers=self.headers if headers is None else headers) as response:
            return response.status

    async def close(self) -> None:
        self.track.stop()
        await self.pc.close()

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def align(recording: np.ndarray, reference: np.ndarray) -> tuple[int, float]:
    """Where `reference` starts in `recording` (samples) and the normalized correlation there.

    The lag is found by FFT cross-correlation over every shift, then the correlation is
    computed on the aligned samples alone.
    """
    rec = recording.astype(np.float64)
    ref = reference.astype(np.float64)
    n = 1 << int(np.ceil(np.log2(len(rec) + len(ref))))
    scores = np.fft.irfft(np.fft.rfft(rec, n) * np.conj(np.fft.rfft(ref, n)), n)[: len(rec)]
    lag = int(np.argmax(scores))
    segment = rec[lag:lag + len(ref)]
    part = ref[: len(segment)]
    denom = np.sqrt(np.dot(segment, segment) * np.dot(part, part))
    return lag, float(np.dot(segment, part) / denom) if denom else 0.0


def active_span(samples: np.ndarray, rate: int, threshold_dbfs: float = -40.0) -> tuple[float, float]:
    """First and last time (s) at which 10 ms windows rise above `threshold_dbfs`."""
    win = rate // 100
    frames = samples[: len(samples) // win * win].astype(np.float64).reshape(-1, win)
    rms = np.sqrt((frames ** 2).mean(axis=1)) / 32768
    loud = np.nonzero(rms > 10 ** (threshold_dbfs / 20))[0]
    assert len(loud), "no audio above the threshold"
    return loud[0] * win / rate, (loud[-1] + 1) * win / rate


def only_formats(text: str, formats: str) -> str:
    """The offer with its audio section cut down to these payload types."""
    keep = formats.split()
    lines = []
    for line in text.split("\r\n"):
        if line.startswith("m=audio"):
            line = " ".join(line.split()[:3] + keep)
        elif line.startswith(("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:")) and line.split(":")[1].split()[0] not in keep:
            continue
        lines.append(line)
    return "\r\n".join(lines)
