"""`mediaserver mix`: the engine run offline on WAV files, checked with ffprobe."""

import json
import subprocess
import sys

import numpy as np
import pytest

from audio import correlation, dtmf, ffprobe, read_audio, speech, tone, write_wav

LEG_COUNTS = (1, 2, 5)


@pytest.fixture(scope="module")
def legs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("legs")
    texts = ["the caller is asking about an invoice", "the callee answers the question politely",
             "a third participant joins the conference", "a fourth voice says hello", "and a fifth says goodbye"]
    paths = []
    for i, text in enumerate(texts):
        voice = speech(tmp, text, voice="en-us" if i % 2 == 0 else "en-us+f3")
        padded = np.concatenate([np.zeros(800 * i, dtype=np.int16), voice])  # staggered starts
        paths.append(write_wav(tmp / f"leg{i}.wav", padded))
    return paths


def mix(args, *inputs):
    result = subprocess.run([sys.executable, "-m", "mediaserver", "mix", *map(str, args), *map(str, inputs)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("fmt", ["wav", "mp3", "opus"])
@pytest.mark.parametrize("count", LEG_COUNTS)
@pytest.mark.parametrize("channels", [1, 2])
def test_mix_writes_a_file_ffprobe_agrees_with(tmp_path, legs, fmt, count, channels):
    out = tmp_path / f"out.{fmt}"
    summary = mix(["--format", fmt, "--channels", channels, "-o", out], *legs[:count])
    longest = max(ffprobe(p)["duration"] for p in legs[:count])
    assert summary["termination_reason"] == "hangup"
    assert summary["duration"] == pytest.approx(longest, abs=0.001)
    info = ffprobe(out)
    frame = {"wav": 0.0, "mp3": 0.072, "opus": 0.02}[fmt]
    assert abs(info["duration"] - longest) <= frame + 0.001
    assert info["channels"] == channels
    assert info["sample_rate"] == (48000 if fmt == "opus" else 8000)
    assert len(summary["legs"]) == count
    assert summary["sha256"] == __import__("hashlib").sha256(out.read_bytes()).hexdigest()


def test_dual_channel_keeps_caller_left_and_callee_right(tmp_path, legs):
    out = tmp_path / "dual.wav"
    mix(["--channels", 2, "-o", out], legs[0], legs[1])
    pcm, _ = read_audio(out)
    caller, _ = read_audio(legs[0])
    callee, _ = read_audio(legs[1])
    assert correlation(pcm[:, 0], caller[:, 0]) > 0.999
    assert correlation(pcm[:len(callee), 1], callee[:, 0]) > 0.999


def test_mix_16k_and_terminations_through_the_cli(tmp_path):
    caller = np.concatenate([tone(300, 2.0, rate=16000, dbfs=-20), dtmf("#", 0.1, rate=16000), tone(300, 2.0, rate=16000, dbfs=-20)])
    path = write_wav(tmp_path / "c16.wav", caller, 16000)
    out = tmp_path / "key.mp3"
    summary = mix(["--format", "mp3", "--sample-rate", 16000, "--finish-on-key", "#", "-o", out], path)
    assert (summary["termination_reason"], summary["finish_key"]) == ("finish_key", "#")
    assert abs(summary["duration"] - 2.0) <= 0.02
    assert ffprobe(out)["sample_rate"] == 16000
    summary = mix(["--max-length", "1.5", "-o", tmp_path / "max.wav"], path)
    assert (summary["termination_reason"], summary["duration"]) == ("max_length", 1.5)


def test_mix_refuses_bad_input_clearly(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not a wav file")
    result = subprocess.run([sys.executable, "-m", "mediaserver", "mix", "-o", str(tmp_path / "o.wav"), str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot read audio" in result.stderr
    odd = write_wav(tmp_path / "odd.wav", tone(440, 0.5, rate=22050), 22050)
    result = subprocess.run([sys.executable, "-m", "mediaserver", "mix", "-o", str(tmp_path / "o.wav"), str(odd)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "22050" in result.stderr
    assert not (tmp_path / "o.wav").exists()
