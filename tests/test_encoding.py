"""Streaming encoders: every format, rate and channel count, checked by ffprobe and ffmpeg.

Audio is generated here (numpy tones, noise and chirps; espeak-ng speech through sox), fed in
blocks of irregular sizes, written the way storage writes it (appended, then the header
patch applied) and read back by the real tools.
"""

from __future__ import annotations

import json
import struct
import subprocess
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from mediaserver.encoding import Encoder, make_encoder, wav_header
from mediaserver.encoding.base import BlockBuffer
from mediaserver.encoding.mp3tag import RunningCrc16, crc16, frame_bytes, side_info_bytes
from mediaserver.errors import CodecError

RATES = {"wav": (8000, 16000), "mp3": (8000, 16000), "opus": (8000, 16000, 48000)}
CASES = [(fmt, rate, ch) for fmt, rates in RATES.items() for rate in rates for ch in (1, 2)]
BLOCKS = (1, 7, 160, 333, 8000)
SECONDS = 4.0
CHIRP_HZ = (150.0, 3300.0)
TONE_HZ = (440.0, 1250.0)
MP3_FRAME = 576
MP3_START = 576 + 529  # LAME's delay plus the decoder's, which readers skip
SPEECH_TEXT = (
    "Thank you for calling. Your call may be recorded for quality and training purposes. "
    "Please hold while we connect you to the next available agent."
)


# --- audio -------------------------------------------------------------------------------


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)


def tone(rate: int, seconds: float = SECONDS) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return to_int16(0.25 * np.sin(2 * np.pi * TONE_HZ[0] * t) + 0.15 * np.sin(2 * np.pi * TONE_HZ[1] * t))


def noise(rate: int, seconds: float = SECONDS) -> np.ndarray:
    return to_int16(np.random.default_rng(7).normal(0, 0.1, int(rate * seconds)))


def chirp(rate: int, seconds: float = SECONDS) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    f0, f1 = CHIRP_HZ
    return to_int16(0.3 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * seconds) * t * t)))


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[int, np.ndarray]:
    """espeak-ng speech resampled by sox to each rate, as 16-bit mono."""
    folder = tmp_path_factory.mktemp("speech")
    raw = folder / "raw.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), SPEECH_TEXT], check=True, capture_output=True)
    out = {}
    for rate in (8000, 16000, 48000):
        path = folder / f"speech{rate}.wav"
        subprocess.run(["sox", str(raw), "-r", str(rate), "-c", "1", "-b", "16", str(path)], check=True)
        out[rate], _ = soundfile.read(path, dtype="int16")
    return out


def signal(name: str, rate: int, speech: dict[int, np.ndarray]) -> np.ndarray:
    return speech[rate] if name == "speech" else {"tone": tone, "noise": noise, "chirp": chirp}[name](rate)


def left_only(mono: np.ndarray, channels: int) -> np.ndarray:
    if channels == 1:
        return mono
    return np.stack([mono, np.zeros_like(mono)], axis=1)


# --- encoding and reading back ------------------------------------------------------------


def feed(encoder: Encoder, pcm: np.ndarray, blocks: tuple[int, ...] = BLOCKS) -> tuple[list[bytes], bytes]:
    """Encode `pcm` in blocks cycling through `blocks`; (chunks returned by encode, close())."""
    chunks, start, i = [], 0, 0
    while start < len(pcm):
        size = blocks[i % len(blocks)]
        chunks.append(encoder.encode(pcm[start : start + size]))
        start, i = start + size, i + 1
    return chunks, encoder.close()


def write_file(path: Path, encoder: Encoder, chunks: list[bytes], tail: bytes) -> bytes:
    """Append like storage does, then write the header patch over the file."""
    with path.open("wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.write(tail)
        patch = encoder.header_patch()
        if patch is not None:
            f.seek(patch[0])
            f.write(patch[1])
    return path.read_bytes()


def encode_file(tmp_path: Path, encoder: Encoder, pcm: np.ndarray, name: str = "out") -> Path:
    path = tmp_path / f"{name}.{encoder.extension}"
    write_file(path, encoder, *feed(encoder, pcm))
    return path


def probe(path: Path) -> dict:
    entries = "stream=sample_rate,channels,duration,start_time"
    cmd = ["ffprobe", "-v", "error", "-show_entries", entries, "-of", "json", str(path)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    stream = json.loads(out)["streams"][0]
    return {
        "sample_rate": int(stream["sample_rate"]),
        "channels": stream["channels"],
        "duration": float(stream.get("duration", 0.0)),  # absent when there is no audio
        "start_time": float(stream.get("start_time", 0.0)),
    }


def decode(path: Path, rate: int | None = None, channels: int | None = None) -> np.ndarray:
    """(n, channels) int16 as ffmpeg decodes it; resampled only when `rate` is given."""
    cmd = ["ffmpeg", "-v", "error", "-i", str(path)]
    if rate:
        cmd += ["-ar", str(rate)]
    if channels:
        cmd += ["-ac", str(channels)]
    out = subprocess.run([*cmd, "-f", "s16le", "-"], check=True, capture_output=True).stdout
    pcm = np.frombuffer(out, dtype=np.int16)
    return pcm.reshape(-1, channels or probe(path)["channels"])


# --- content measures ---------------------------------------------------------------------


def telephone_band(x: np.ndarray, rate: int) -> np.ndarray:
    """Log magnitude spectra of 20 ms frames, 100-3400 Hz (what every setting must keep)."""
    size = rate // 50
    frames = len(x) // size
    spec = np.abs(np.fft.rfft(x[: frames * size].reshape(frames, size) * np.hanning(size), axis=1))
    freqs = np.fft.rfftfreq(size, 1 / rate)
    return 20 * np.log10(spec[:, (freqs >= 100) & (freqs <= 3400)] + 3.0)


def band_similarity(ref: np.ndarray, out: np.ndarray, rate: int) -> float:
    n = min(len(ref), len(out))
    a, b = telephone_band(ref[:n].astype(float), rate), telephone_band(out[:n].astype(float), rate)
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def tone_purity(out: np.ndarray, rate: int) -> float:
    """Share of the energy within 20 Hz of the two test tones."""
    spec = np.abs(np.fft.rfft(out.astype(float))) ** 2
    freqs = np.fft.rfftfreq(len(out), 1 / rate)
    near = np.zeros(len(freqs), dtype=bool)
    for f in TONE_HZ:
        near |= np.abs(freqs - f) <= 20
    return float(spec[near].sum() / spec.sum())


def chirp_tracking(out: np.ndarray, rate: int) -> float:
    """Share of 20 ms frames whose spectral peak sits within 60 Hz of the sweep."""
    size = rate // 50
    frames = min(len(out) // size, int(SECONDS * 50))
    spec = np.abs(np.fft.rfft(out[: frames * size].astype(float).reshape(frames, size) * np.hanning(size), axis=1))
    peak = np.fft.rfftfreq(size, 1 / rate)[np.argmax(spec, axis=1)]
    mid = (np.arange(frames) + 0.5) * size / rate
    expected = CHIRP_HZ[0] + (CHIRP_HZ[1] - CHIRP_HZ[0]) * mid / SECONDS
    return float(np.mean(np.abs(peak - expected) <= 60))


def lag(ref: np.ndarray, out: np.ndarray, rate: int, search: int = 100) -> int:
    """Samples by which `out` trails `ref`, from a 0.5 s window starting 1 s in."""
    window = ref[rate : rate + rate // 2].astype(float)
    region = out[rate - search : rate + rate // 2 + search].astype(float)
    return int(np.argmax(np.correlate(region, window, "valid"))) - search


def energy_db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(x.astype(float) ** 2) + 1e-9))


# --- every format, rate and channel count ---------------------------------------------------


def check_probe(path: Path, fmt: str, rate: int, channels: int, frames: int) -> None:
    info = probe(path)
    assert info["sample_rate"] == (48000 if fmt == "opus" else rate)  # Ogg Opus decodes at 48 kHz
    assert info["channels"] == channels
    seconds = frames / rate
    if fmt == "wav":
        assert info["duration"] == pytest.approx(seconds, abs=1 / rate)
    elif fmt == "mp3":
        # The audio starts after LAME's priming. FFmpeg 5.1 (Debian 12) still counts the
        # priming and end padding in the duration; later releases subtract both.
        assert info["start_time"] == pytest.approx(MP3_START / rate, abs=1e-6)
        span = info["duration"]
        if span * rate >= frames + MP3_START:
            span -= info["start_time"]
        assert 0 <= span - seconds < MP3_FRAME / rate
    else:
        assert info["duration"] == pytest.approx(seconds, abs=0.020)


def check_content(fmt: str, name: str, ref: np.ndarray, out: np.ndarray, rate: int) -> None:
    if fmt == "wav":
        np.testing.assert_array_equal(out, ref)
    elif name == "tone":
        assert tone_purity(out, rate) >= 0.9
    elif name == "chirp":
        assert chirp_tracking(out, rate) >= 0.9
    elif name == "noise":
        # A copy shifted by one 20 ms frame scores about 0.03.
        assert band_similarity(ref, out, rate) >= 0.5
    else:
        assert band_similarity(ref, out, rate) >= 0.9
        # The LAME tag trims MP3 to the sample; Opus is not waveform-exact, so allow 0.25 ms.
        tolerance = 0 if fmt == "mp3" else rate // 4000
        assert abs(lag(ref, out, rate)) <= tolerance


def stereo_bitrate(fmt: str, rate: int, channels: int) -> int | None:
    """The default, except 32 kbps for wideband stereo Opus.

    At 24 kbps for two channels libopus narrows the stereo image of 16 and 48 kHz input
    (a left-only tone leaks into the right channel at about -25 dB); from 32 kbps it keeps
    them apart.
    """
    return 32 if fmt == "opus" and channels == 2 and rate > 8000 else None


@pytest.mark.parametrize("name", ["tone", "noise", "chirp", "speech"])
@pytest.mark.parametrize(("fmt", "rate", "channels"), CASES)
def test_round_trip(tmp_path: Path, speech: dict, fmt: str, rate: int, channels: int, name: str) -> None:
    mono = signal(name, rate, speech)
    encoder = make_encoder(fmt, rate, channels, stereo_bitrate(fmt, rate, channels))
    path = encode_file(tmp_path, encoder, left_only(mono, channels))
    assert encoder.samples_in == len(mono)
    check_probe(path, fmt, rate, channels, len(mono))
    if fmt == "opus":
        assert len(decode(path)) == len(mono) * 48000 // rate
    out = decode(path, rate, channels)
    if fmt != "opus":
        assert len(out) == len(mono)
    check_content(fmt, name, mono, out[:, 0], rate)
    if channels == 2:
        assert energy_db(out[:, 1]) - energy_db(out[:, 0]) <= -40


@pytest.mark.parametrize(("fmt", "rate"), [("wav", 8000), ("mp3", 16000), ("opus", 8000), ("opus", 48000)])
def test_right_only_stays_right(tmp_path: Path, speech: dict, fmt: str, rate: int) -> None:
    pcm = np.stack([np.zeros_like(speech[rate]), speech[rate]], axis=1)
    path = encode_file(tmp_path, make_encoder(fmt, rate, 2, stereo_bitrate(fmt, rate, 2)), pcm)
    out = decode(path, rate, 2)
    assert energy_db(out[:, 0]) - energy_db(out[:, 1]) <= -40
    assert band_similarity(speech[rate], out[:, 1], rate) >= 0.9


# --- streaming ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["wav", "mp3", "opus"])
def test_bytes_flow_before_close(fmt: str) -> None:
    pcm = np.tile(noise(8000), 3)  # 12 s in 20 ms blocks, as the recorder hands it over
    encoder = make_encoder(fmt, 8000, 1)
    chunks, tail = feed(encoder, pcm, blocks=(160,))
    early = sum(map(len, chunks))
    assert early >= 0.8 * (early + len(tail))
    assert sum(1 for chunk in chunks if chunk) >= 10


def test_wav_hands_out_about_buffer_ms() -> None:
    encoder = make_encoder("wav", 8000, 1, wav_buffer_ms=500)
    chunks, _ = feed(encoder, noise(8000), blocks=(160,))
    sizes = [len(chunk) for chunk in chunks if chunk]
    assert sizes[0] == 44  # the header goes out on the first call
    assert set(sizes[1:]) == {8000}  # 500 ms of 8 kHz PCM16


def test_growing_wav_is_readable(tmp_path: Path) -> None:
    encoder = make_encoder("wav", 16000, 2)
    chunks, _ = feed(encoder, left_only(tone(16000), 2), blocks=(320,))
    path = tmp_path / "growing.wav"
    path.write_bytes(b"".join(chunks))  # what a reader sees before close()
    written = (path.stat().st_size - 44) // 4
    assert written >= 3 * 16000
    info = probe(path)
    assert (info["sample_rate"], info["channels"]) == (16000, 2)
    assert info["duration"] == pytest.approx(written / 16000, abs=1e-3)
    assert len(decode(path, 16000, 2)) == written
    data, rate = soundfile.read(path, dtype="int16")
    assert (len(data), rate) == (written, 16000)


@pytest.mark.parametrize("fmt", ["mp3", "opus"])
def test_unfinished_stream_plays(tmp_path: Path, fmt: str) -> None:
    """A stream cut off before close() (a crash) still opens and decodes what it holds."""
    encoder = make_encoder(fmt, 8000, 1)
    chunks, _ = feed(encoder, noise(8000), blocks=(160,))
    path = tmp_path / f"cut.{encoder.extension}"
    path.write_bytes(b"".join(chunks))
    assert probe(path)["channels"] == 1
    assert len(decode(path, 8000, 1)) >= 2.5 * 8000  # of 4 s; Ogg pages hold up to 1 s


# --- edges ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "rate", "channels"), CASES)
@pytest.mark.parametrize("touch", [False, True])
def test_empty_input_is_a_valid_file(tmp_path: Path, fmt: str, rate: int, channels: int, touch: bool) -> None:
    encoder = make_encoder(fmt, rate, channels)
    head = encoder.encode(np.zeros((0, channels), dtype=np.int16)) if touch else b""
    path = tmp_path / f"empty.{encoder.extension}"
    data = write_file(path, encoder, [head], encoder.close())
    assert data
    info = probe(path)
    assert info["channels"] == channels
    if fmt == "wav":
        assert data == wav_header(rate, channels, 0)
        assert soundfile.info(path).frames == 0
    elif fmt == "mp3":
        assert soundfile.info(path).frames == 0  # libsndfile honours the LAME tag
    else:
        # One silent input sample: the shortest Ogg Opus stream ffmpeg opens.
        assert info["duration"] < 0.020
        assert len(decode(path)) <= 960


def test_close_twice_and_encode_after_close() -> None:
    encoder = make_encoder("mp3", 8000, 1)
    encoder.encode(tone(8000, 0.5))
    assert encoder.close()
    assert encoder.close() == b""
    with pytest.raises(CodecError, match="closed"):
        encoder.encode(tone(8000, 0.1))


@pytest.mark.parametrize("fmt", ["wav", "mp3", "opus"])
def test_header_patch_needs_close(fmt: str) -> None:
    encoder = make_encoder(fmt, 8000, 1)
    encoder.encode(tone(8000, 0.1))
    with pytest.raises(CodecError, match="close"):
        encoder.header_patch()
    encoder.close()


@pytest.mark.parametrize(
    ("pcm", "channels", "message"),
    [
        (np.zeros(10, dtype=np.float32), 1, "int16"),
        ([0, 1, 2], 1, "int16"),
        (np.zeros(10, dtype=np.int16), 2, r"\(10,\)"),
        (np.zeros((10, 3), dtype=np.int16), 2, r"\(10, 3\)"),
        (np.zeros((10, 2), dtype=np.int16), 1, r"\(10, 2\)"),
    ],
)
def test_bad_pcm_raises(pcm: object, channels: int, message: str) -> None:
    encoder = make_encoder("wav", 8000, channels)
    with pytest.raises(CodecError, match=message):
        encoder.encode(pcm)  # type: ignore[arg-type]
    encoder.close()


def test_strided_input_is_accepted(tmp_path: Path) -> None:
    """A column slice of a wider array (not contiguous) encodes like a copy of it."""
    wide = np.stack([tone(8000), noise(8000), tone(8000)], axis=1)
    path = encode_file(tmp_path, make_encoder("wav", 8000, 2), wide[:, ::2])
    np.testing.assert_array_equal(decode(path, 8000, 2), wide[:, ::2])


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("flac", 8000, 1), {}, "format: 'flac'"),
        (("wav", 44100, 1), {}, "44100"),
        (("mp3", 48000, 1), {}, "48000"),
        (("opus", 22050, 1), {}, "22050"),
        (("wav", 8000.0, 1), {}, "8000.0"),
        (("wav", 8000, 3), {}, "channel count: 3"),
        (("wav", 8000, 0), {}, "channel count: 0"),
        (("wav", 8000, True), {}, "channel count: True"),
        (("wav", 8000, 1, 32), {}, "bitrate 32"),
        (("mp3", 8000, 1, 80), {}, "80"),
        (("mp3", 16000, 1, 192), {}, "192"),
        (("mp3", 8000, 1, 33), {}, "33"),
        (("opus", 8000, 1, 5), {}, "5"),
        (("opus", 48000, 1, 300), {}, "300"),
        (("opus", 8000, 1, 24.5), {}, "24.5"),
        (("mp3", 8000, 1), {"mp3_quality": 10}, "mp3_quality: 10"),
        (("opus", 8000, 1), {"opus_complexity": 11}, "opus_complexity: 11"),
        (("opus", 8000, 1), {"opus_complexity": -1}, "opus_complexity: -1"),
        (("wav", 8000, 1), {"wav_buffer_ms": -5}, "wav_buffer_ms: -5"),
    ],
)
def test_bad_arguments_raise_codec_error(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        make_encoder(*args, **kwargs)


def test_numpy_integers_are_accepted() -> None:
    encoder = make_encoder("mp3", np.int64(16000), np.int32(2), np.int64(64))  # type: ignore[arg-type]
    assert (encoder.sample_rate, encoder.channels) == (16000, 2)
    assert type(encoder.sample_rate) is int
    encoder.close()


@pytest.mark.parametrize(
    ("fmt", "content_type", "extension"),
    [("wav", "audio/wav", "wav"), ("mp3", "audio/mpeg", "mp3"), ("opus", "audio/ogg", "opus")],
)
def test_encoder_describes_its_file(fmt: str, content_type: str, extension: str) -> None:
    encoder = make_encoder(fmt, 16000, 2)
    assert isinstance(encoder, Encoder)
    assert (encoder.format, encoder.content_type, encoder.extension) == (fmt, content_type, extension)
    assert (encoder.sample_rate, encoder.channels, encoder.samples_in) == (16000, 2, 0)
    encoder.close()


@pytest.mark.parametrize(("fmt", "setting"), [("mp3", "mp3_quality"), ("opus", "opus_complexity")])
def test_speed_setting_reaches_the_codec(tmp_path: Path, fmt: str, setting: str) -> None:
    decoded = []
    for value in (0, 9):
        encoder = make_encoder(fmt, 16000, 1, **{setting: value})
        decoded.append(decode(encode_file(tmp_path, encoder, noise(16000, 2.0), f"{setting}{value}")))
    assert decoded[0].shape == decoded[1].shape
    assert not np.array_equal(decoded[0], decoded[1])


# --- headers ------------------------------------------------------------------------------


def test_wav_streams_with_unknown_sizes_then_patches_exact(tmp_path: Path) -> None:
    encoder = make_encoder("wav", 16000, 2)
    pcm = left_only(chirp(16000, 1.5), 2)
    chunks, tail = feed(encoder, pcm)
    first = next(chunk for chunk in chunks if chunk)
    assert struct.unpack_from("<I", first, 4)[0] == 0xFFFFFFFF  # RIFF size
    assert struct.unpack_from("<I", first, 40)[0] == 0xFFFFFFFF  # data size
    assert encoder.header_patch() == (0, wav_header(16000, 2, pcm.size * 2))
    path = tmp_path / "exact.wav"
    write_file(path, encoder, chunks, tail)
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (16000, 2, 2, len(pcm))


def test_wav_header_fields() -> None:
    header = wav_header(8000, 2, 32000)
    assert len(header) == 44
    fields = struct.unpack("<4sI4s4sIHHIIHH4sI", header)
    assert fields == (b"RIFF", 32036, b"WAVE", b"fmt ", 16, 1, 2, 8000, 32000, 4, 16, b"data", 32000)
    # Sizes RIFF cannot hold fall back to the "read to end of file" value.
    big = wav_header(16000, 2, 5 * 2**30)
    assert struct.unpack_from("<I", big, 4)[0] == struct.unpack_from("<I", big, 40)[0] == 0xFFFFFFFF


def read_info_tag(data: bytes, channels: int) -> dict:
    """The Xing/LAME fields of an MP3 stream's first frame."""
    at = 4 + side_info_bytes(channels)
    name, flags, frames, size = struct.unpack_from(">4sIII", data, at)
    lame = at + 120
    delays = int.from_bytes(data[lame + 21 : lame + 24], "big")
    music_length, music_crc, tag_crc = struct.unpack_from(">IHH", data, lame + 28)
    return {
        "name": name,
        "flags": flags,
        "frames": frames,
        "bytes": size,
        "version": data[lame : lame + 9],
        "delay": delays >> 12,
        "padding": delays & 0xFFF,
        "music_length": music_length,
        "music_crc": music_crc,
        "tag_crc": tag_crc,
        "tag_crc_expected": crc16(data[: lame + 34]),
    }


@pytest.mark.parametrize(("rate", "channels", "bitrate"), [(8000, 1, 32), (8000, 2, 8), (16000, 1, 8), (16000, 2, 64)])
def test_mp3_info_tag_describes_the_stream(tmp_path: Path, rate: int, channels: int, bitrate: int) -> None:
    pcm = left_only(noise(rate, 2.3), channels)
    encoder = make_encoder("mp3", rate, channels, bitrate)
    chunks, tail = feed(encoder, pcm)
    placeholder = read_info_tag(next(chunk for chunk in chunks if chunk), channels)
    assert (placeholder["frames"], placeholder["bytes"], placeholder["delay"]) == (0, 0, 576)
    data = write_file(tmp_path / "tagged.mp3", encoder, chunks, tail)
    tag = read_info_tag(data, channels)
    tag_frame = len(data) - tag["frames"] * frame_bytes(rate, bitrate)
    assert tag["name"] == b"Info" and tag["flags"] == 0x0F and tag["version"] == b"LAME3.100"
    assert tag["bytes"] == tag["music_length"] == len(data)
    assert tag["frames"] * MP3_FRAME - tag["delay"] - tag["padding"] == len(pcm)
    assert tag["tag_crc"] == tag["tag_crc_expected"]
    assert tag["music_crc"] == reference_crc16(data[tag_frame:])
    assert soundfile.info(tmp_path / "tagged.mp3").frames == len(pcm)
    with av.open(str(tmp_path / "tagged.mp3")) as container:  # the newer FFmpeg PyAV bundles
        stream = container.streams.audio[0]
        assert stream.duration * stream.time_base == Fraction(len(pcm), rate)


def test_mp3_tag_agrees_with_lame_cli(tmp_path: Path) -> None:
    """The lame command line writes its own tag for the same input; the counts must agree."""
    pcm = noise(8000, 3.0017)
    soundfile.write(tmp_path / "in.wav", pcm, 8000, subtype="PCM_16")
    subprocess.run(
        ["lame", "--silent", "-b", "32", "-q", "2", "--resample", "8", str(tmp_path / "in.wav"), str(tmp_path / "lame.mp3")],
        check=True,
    )
    theirs = read_info_tag((tmp_path / "lame.mp3").read_bytes(), 1)
    ours = read_info_tag(encode_file(tmp_path, make_encoder("mp3", 8000, 1), pcm).read_bytes(), 1)
    assert ours["delay"] == theirs["delay"] == 576
    # Both describe the same audio span; ours may drop LAME's padding-only last frame.
    assert ours["frames"] * MP3_FRAME - ours["padding"] == theirs["frames"] * MP3_FRAME - theirs["padding"]
    assert theirs["frames"] - 1 <= ours["frames"] <= theirs["frames"]


@pytest.mark.parametrize(("rate", "channels"), [(8000, 1), (16000, 2), (48000, 2)])
def test_opus_head_keeps_input_rate(tmp_path: Path, rate: int, channels: int) -> None:
    encoder = make_encoder("opus", rate, channels)
    data = encode_file(tmp_path, encoder, left_only(tone(rate, 0.5), channels)).read_bytes()
    at = data.index(b"OpusHead")
    version, count, pre_skip, input_rate = struct.unpack_from("<BBHI", data, at + 8)
    assert (version, count, input_rate) == (1, channels, rate)
    assert pre_skip == 312  # libopus's look-ahead at 48 kHz
    assert data.startswith(b"OggS")
    assert encoder.header_patch() is None


# --- building blocks ------------------------------------------------------------------------


def reference_crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def test_crc16_matches_bitwise_reference() -> None:
    assert crc16(b"123456789") == 0xBB3D  # the CRC-16/ARC check value
    rng = np.random.default_rng(5)
    for size in (0, 1, 2, 3, 1023, 1024, 1025, 2049, 5000):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert crc16(data) == reference_crc16(data)
        assert crc16(data[3:], crc16(data[:3])) == reference_crc16(data)
    running = RunningCrc16()
    data = rng.integers(0, 256, 20000, dtype=np.uint8).tobytes()
    for start in range(0, len(data), 333):
        running.update(data[start : start + 333])
    assert running.value == reference_crc16(data)


def test_block_buffer_regroups_without_loss() -> None:
    buffer = BlockBuffer(100, 2)
    pcm = np.arange(2 * 1234, dtype=np.int16).reshape(-1, 2)
    out, start, sizes = [], 0, [1, 7, 99, 250, 3, 100, 40]
    for i in range(len(pcm)):
        if start >= len(pcm):
            break
        size = sizes[i % len(sizes)]
        for block in buffer.feed(pcm[start : start + size]):
            assert len(block) >= 100
            out.append(block.copy())
        start += size
    out.extend(block.copy() for block in buffer.drain())
    np.testing.assert_array_equal(np.concatenate(out), pcm)


def test_block_buffer_passes_large_blocks_through() -> None:
    buffer = BlockBuffer(100, 1)
    pcm = np.zeros((500, 1), dtype=np.int16)
    (block,) = list(buffer.feed(pcm))
    assert np.shares_memory(block, pcm)
    assert list(buffer.drain()) == []
