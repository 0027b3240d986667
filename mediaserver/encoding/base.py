"""What every streaming encoder shares: the `Encoder` interface, input checks and block gathering.

An encoder turns int16 PCM into the bytes of one file, in order, as they become ready; the
caller appends them to storage. Nothing holds a whole recording: the only state is a block
buffer of at most a second of audio plus whatever the codec library keeps.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from mediaserver.errors import CodecError


@runtime_checkable
class Encoder(Protocol):
    """A streaming encoder for one recording; used by one thread at a time.

    `encode()` takes int16 samples shaped (n,) for mono or (n, channels) with one row per
    sample instant, and returns the next bytes of the file (often b"" while it buffers).
    The first `encode()` call returns the container header, so even an empty recording
    starts with one. `close()` flushes the rest; after it, `header_patch()` gives bytes to
    write over the file at an offset so that its header carries exact sizes, or None.
    """

    format: str
    content_type: str
    extension: str
    sample_rate: int
    channels: int
    samples_in: int

    def encode(self, pcm: np.ndarray) -> bytes: ...

    def close(self) -> bytes: ...

    def header_patch(self) -> tuple[int, bytes] | None: ...


def as_frames(pcm: np.ndarray, channels: int) -> np.ndarray:
    """`pcm` as a C-contiguous (n, channels) int16 view, copying only when it is strided."""
    if not isinstance(pcm, np.ndarray) or pcm.dtype != np.int16:
        kind = pcm.dtype if isinstance(pcm, np.ndarray) else type(pcm).__name__
        raise CodecError(f"PCM must be an int16 numpy array, got {kind}")
    if pcm.ndim == 1 and channels == 1:
        pcm = pcm.reshape(-1, 1)
    elif pcm.ndim != 2 or pcm.shape[1] != channels:
        raise CodecError(f"PCM shape {pcm.shape} does not fit {channels} channel(s)")
    return np.ascontiguousarray(pcm)


def little_endian(block: np.ndarray) -> np.ndarray:
    """`block` with little-endian samples, as WAV and LAME take them (a no-op on x86/ARM)."""
    return block if sys.byteorder == "little" else block.astype("<i2")


def join(parts: Iterable[bytes | bytearray]) -> bytes:
    """Concatenate encoder output without a second copy when there is a single piece."""
    pieces = [part for part in parts if part]
    if len(pieces) == 1 and type(pieces[0]) is bytes:
        return pieces[0]
    return b"".join(pieces)


class BlockBuffer:
    """Gathers small PCM blocks into blocks of at least `frames` frames.

    Codec libraries pay a fixed cost per call, and storage per write, while callers hand
    over 20 ms at a time. Input that is already large enough passes through uncopied; the
    rest is copied once into a preallocated buffer. Yielded blocks are only valid until
    the generator resumes, so callers consume each one inside their loop.
    """

    def __init__(self, frames: int, channels: int) -> None:
        self._size = max(1, frames)
        self._buf = np.empty((self._size, channels), dtype=np.int16)
        self._fill = 0

    def feed(self, frames: np.ndarray) -> Iterator[np.ndarray]:
        """Yield the blocks that `frames` completes; keep the remainder for later."""
        if self._fill:
            take = min(self._size - self._fill, len(frames))
            self._buf[self._fill : self._fill + take] = frames[:take]
            self._fill += take
            frames = frames[take:]
            if self._fill < self._size:
                return
            yield self._buf
            self._fill = 0
        if len(frames) >= self._size:
            yield frames
        elif len(frames):
            self._buf[: len(frames)] = frames
            self._fill = len(frames)

    def drain(self) -> Iterator[np.ndarray]:
        """Yield whatever is left (a partial block), then start empty."""
        if self._fill:
            yield self._buf[: self._fill]
            self._fill = 0


class StreamEncoder(ABC):
    """Plumbing shared by the encoders: checks, header first, block gathering, close once.

    Subclasses set the class attributes and implement `_start` (container header bytes),
    `_encode_block` (bytes for one gathered block), `_finish` (codec flush and trailer)
    and `_patch` (the header rewrite, asked only after close).
    """

    format: ClassVar[str]
    content_type: ClassVar[str]
    extension: ClassVar[str]

    def __init__(self, sample_rate: int, channels: int, block_frames: int) -> None:
        self.sample_rate = sample_rate
        self.channels = channels
        self.samples_in = 0
        self._blocks = BlockBuffer(block_frames, channels)
        self._started = False
        self._closed = False

    def encode(self, pcm: np.ndarray) -> bytes:
        """Accept int16 PCM; return the bytes that are ready (b"" while buffering)."""
        if self._closed:
            raise CodecError(f"{self.format} encoder is closed")
        frames = as_frames(pcm, self.channels)
        self.samples_in += len(frames)
        head = self._begin()
        return join([head, *(self._encode_block(block) for block in self._blocks.feed(frames))])

    def close(self) -> bytes:
        """Flush buffered audio and the codec; return the last bytes. Later calls return b""."""
        if self._closed:
            return b""
        self._closed = True
        head = self._begin()
        tail = [self._encode_block(block) for block in self._blocks.drain()]
        return join([head, *tail, self._finish()])

    def header_patch(self) -> tuple[int, bytes] | None:
        """(offset, bytes) to write over the finished file so it is exact, or None."""
        if not self._closed:
            raise CodecError(f"{self.format} header_patch() needs close() first")
        return self._patch()

    def _begin(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        return self._start()

    @abstractmethod
    def _start(self) -> bytes: ...

    @abstractmethod
    def _encode_block(self, block: np.ndarray) -> bytes | bytearray: ...

    @abstractmethod
    def _finish(self) -> bytes | bytearray: ...

    @abstractmethod
    def _patch(self) -> tuple[int, bytes] | None: ...
