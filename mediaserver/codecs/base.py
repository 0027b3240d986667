"""The interface every codec speaks, so that callers never special-case one.

A `Decoder` turns RTP payloads of one stream into mono int16 PCM at its `sample_rate` and
fills in for a lost packet; an `Encoder` cuts mono int16 PCM at its `sample_rate` into
RTP payloads of `FRAME_MS` each, advancing the RTP timestamp by `timestamp_step` per
payload. Stateless sample codecs (G.711, L16) are wrapped here; codecs with memory live in
`pyav`. `ResamplingDecoder` and `ResamplingEncoder` adapt either to another PCM rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from mediaserver.codecs.resample import Resampler

# RFC 3551 §4.2: the default packetization interval is 20 ms.
FRAME_MS = 20


class Decoder(Protocol):
    sample_rate: int

    def decode(self, payload: bytes) -> np.ndarray:
        """One RTP payload to int16 samples; a malformed payload raises CodecError."""
        ...

    def conceal(self) -> np.ndarray:
        """Samples standing in for one lost packet."""
        ...


class Encoder(Protocol):
    sample_rate: int
    timestamp_step: int

    def encode(self, samples: np.ndarray) -> list[bytes]:
        """Buffer 1-D int16 samples and return the payloads of every whole frame."""
        ...

    def flush(self) -> list[bytes]:
        """The buffered remainder padded with silence to a whole frame (or nothing)."""
        ...


def check_pcm(samples: np.ndarray) -> np.ndarray:
    """Return `samples` if they are 1-D int16, else raise ValueError."""
    if not isinstance(samples, np.ndarray) or samples.dtype != np.int16 or samples.ndim != 1:
        raise ValueError("PCM samples must be a 1-D int16 numpy array")
    return samples


class Framer:
    """Cuts a stream of int16 samples into frames of exactly `size` samples."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._pending = np.empty(0, dtype=np.int16)

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        """Every whole frame now available, oldest first; the rest waits."""
        data = np.concatenate((self._pending, check_pcm(samples)))
        whole = len(data) - len(data) % self.size
        self._pending = data[whole:]
        return list(data[:whole].reshape(-1, self.size))

    def flush(self) -> list[np.ndarray]:
        """The partial frame padded with silence, or nothing when none is pending."""
        if not len(self._pending):
            return []
        frame = np.zeros(self.size, dtype=np.int16)
        frame[: len(self._pending)] = self._pending
        self._pending = self._pending[:0]
        return [frame]


class SampleDecoder:
    """Decoder for a codec without memory: each payload is decoded on its own.

    A lost packet is replaced by silence as long as the last packet received. Payloads of
    whole samples (`bytes_per_sample` each) may also be joined and decoded in one call,
    which is how a receiver decodes many packets at a time.
    """

    def __init__(self, decode: Callable[[bytes], np.ndarray], sample_rate: int, bytes_per_sample: int = 1) -> None:
        self.sample_rate = sample_rate
        self.bytes_per_sample = bytes_per_sample
        self._decode = decode
        self._last_length = sample_rate * FRAME_MS // 1000

    def decode(self, payload: bytes) -> np.ndarray:
        samples = self._decode(payload)
        if len(samples):
            self._last_length = len(samples)
        return samples

    def decode_joined(self, payloads: list[bytes]) -> np.ndarray:
        """Several consecutive payloads (each of whole samples) decoded in one call."""
        samples = self._decode(payloads[0] if len(payloads) == 1 else b"".join(payloads))
        if payloads[-1]:
            self._last_length = len(payloads[-1]) // self.bytes_per_sample
        return samples

    def conceal(self) -> np.ndarray:
        return np.zeros(self._last_length, dtype=np.int16)


class SampleEncoder:
    """Encoder for a codec without memory: one function call per 20 ms frame."""

    def __init__(self, encode: Callable[[np.ndarray], bytes], sample_rate: int, clock_rate: int) -> None:
        self.sample_rate = sample_rate
        self.timestamp_step = clock_rate * FRAME_MS // 1000
        self._encode = encode
        self._framer = Framer(sample_rate * FRAME_MS // 1000)

    def encode(self, samples: np.ndarray) -> list[bytes]:
        return [self._encode(frame) for frame in self._framer.push(samples)]

    def flush(self) -> list[bytes]:
        return [self._encode(frame) for frame in self._framer.flush()]


class ResamplingDecoder:
    """A decoder whose output is converted to `sample_rate` by a streaming Resampler.

    The conversion adds `Resampler.delay_seconds` of constant delay.
    """

    def __init__(self, inner: Decoder, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._inner = inner
        self._resampler = Resampler(inner.sample_rate, sample_rate)

    def decode(self, payload: bytes) -> np.ndarray:
        return self._resampler.process(self._inner.decode(payload))

    def conceal(self) -> np.ndarray:
        return self._resampler.process(self._inner.conceal())


class ResamplingEncoder:
    """An encoder fed at `sample_rate`, converted to the inner encoder's rate first."""

    def __init__(self, inner: Encoder, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self.timestamp_step = inner.timestamp_step
        self._inner = inner
        self._resampler = Resampler(sample_rate, inner.sample_rate)

    def encode(self, samples: np.ndarray) -> list[bytes]:
        return self._inner.encode(self._resampler.process(check_pcm(samples)))

    def flush(self) -> list[bytes]:
        return self._inner.flush()
