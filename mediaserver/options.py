"""Recording options: defaults from the server config, overridden per `record/start`.

Validation lives here so that the HTTP API, the SIP policy and the offline CLI refuse the
same inputs with the same messages.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

from mediaserver.errors import MediaServerError
from mediaserver.media import DTMF_DIGITS

FORMATS = ("wav", "mp3", "opus")
PARTICIPANTS = ("all", "caller", "callee")
PAUSE_BEHAVIORS = ("skip", "silence")
DEFAULT_BITRATES = {"mp3": 32, "opus": 24}
# lameenc accepts the MPEG-1/2/2.5 bitrate ladder; 8 kbps is the lowest MPEG-2.5 rate.
MP3_BITRATES = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, 192, 224, 256, 320)
_URL = re.compile(r"^https?://[^\s/$.?#][^\s]*$", re.IGNORECASE)


class OptionError(MediaServerError):
    """A recording option is malformed or not offered; `code` is the API error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _invalid(message: str) -> OptionError:
    return OptionError("recordings.invalid_option", message)


@dataclass(frozen=True, slots=True)
class RecordingOptions:
    format: str = "wav"
    channels: int = 1
    participant: str = "all"
    sample_rate: int = 8000
    bitrate: int | None = None  # kbps; None means the format's default
    silence_timeout: float = 0.0
    max_length: float = 14400.0
    finish_on_key: str = ""
    trim_silence: bool = False
    action_url: str | None = None
    transcribe: bool = False
    transcribe_callback: str | None = None

    @property
    def effective_bitrate(self) -> int | None:
        """kbps the encoder runs at; the Opus default is per channel, as stereo Opus at
        24 kbps in all smears one channel into the other."""
        if self.format == "wav":
            return None
        if self.bitrate:
            return self.bitrate
        return DEFAULT_BITRATES[self.format] * (self.channels if self.format == "opus" else 1)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["bitrate"] = self.effective_bitrate
        return data

    def merged(self, overrides: Mapping[str, Any] | None) -> "RecordingOptions":
        """These options with `overrides` applied, validated; unknown keys are refused."""
        if overrides is None:
            return self
        if not isinstance(overrides, Mapping):
            raise _invalid("recording options must be a JSON object")
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise _invalid(f"unknown recording option: {unknown[0]}")
        values = {name: _coerce(name, value) for name, value in overrides.items()}
        if "format" in values and "bitrate" not in values and values["format"] != self.format:
            values["bitrate"] = None
        if "format" in values and "sample_rate" not in values and values["format"] != "opus":
            values["sample_rate"] = min(self.sample_rate, 16000)
        return dataclasses.replace(self, **values).validated()

    def validated(self) -> "RecordingOptions":
        """These options, or an OptionError naming the first field that is wrong."""
        if self.format not in FORMATS:
            raise _invalid(f"format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.channels not in (1, 2):
            raise _invalid(f"channels must be 1 or 2, not {self.channels!r}")
        if self.participant not in PARTICIPANTS:
            raise _invalid(f"participant must be one of {', '.join(PARTICIPANTS)}, not {self.participant!r}")
        rates = (8000, 16000, 48000) if self.format == "opus" else (8000, 16000)
        if self.sample_rate not in rates:
            raise _invalid(f"sample_rate for {self.format} must be one of {', '.join(map(str, rates))}, not {self.sample_rate!r}")
        self._check_bitrate()
        if self.silence_timeout < 0:
            raise _invalid("silence_timeout must be 0 (off) or a positive number of seconds")
        if self.max_length < 0:
            raise _invalid("max_length must be 0 (off) or a positive number of seconds")
        bad = [key for key in self.finish_on_key if key not in DTMF_DIGITS]
        if bad or len(set(self.finish_on_key)) != len(self.finish_on_key):
            raise _invalid(f"finish_on_key must be distinct digits of {DTMF_DIGITS!r}, not {self.finish_on_key!r}")
        for name in ("action_url", "transcribe_callback"):
            url = getattr(self, name)
            if url is not None and not _URL.match(url):
                raise _invalid(f"{name} must be an http(s) URL, not {url!r}")
        if self.transcribe:
            raise OptionError("recordings.unsupported_option", "transcribe is not available on this server yet")
        return self

    def _check_bitrate(self) -> None:
        if self.bitrate is None:
            return
        if self.format == "wav":
            raise _invalid("bitrate applies to mp3 and opus only; wav is PCM16")
        if self.format == "mp3":
            # MPEG-2 and 2.5 (16 and 8 kHz) top out at 160 and 64 kbps.
            allowed = [b for b in MP3_BITRATES if b <= (64 if self.sample_rate == 8000 else 160)]
            if self.bitrate not in allowed:
                raise _invalid(f"bitrate for mp3 at {self.sample_rate} Hz must be one of {', '.join(map(str, allowed))} kbps, not {self.bitrate}")
        if self.format == "opus" and not 6 <= self.bitrate <= 256 * self.channels:
            raise _invalid(f"bitrate for opus must be between 6 and {256 * self.channels} kbps, not {self.bitrate}")


_TYPES: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "channels": (int,),
    "participant": (str,),
    "sample_rate": (int,),
    "bitrate": (int, type(None)),
    "silence_timeout": (int, float),
    "max_length": (int, float),
    "finish_on_key": (str,),
    "trim_silence": (bool,),
    "action_url": (str, type(None)),
    "transcribe": (bool,),
    "transcribe_callback": (str, type(None)),
}


def _coerce(name: str, value: Any) -> Any:
    types = _TYPES[name]
    # JSON true is an int in Python; a boolean is never a valid number here.
    if isinstance(value, bool) and bool not in types:
        raise _invalid(f"{name} must be {_type_words(types)}, not a boolean")
    if not isinstance(value, types):
        raise _invalid(f"{name} must be {_type_words(types)}, not {type(value).__name__}")
    if name in ("silence_timeout", "max_length"):
        return float(value)
    return value


def _type_words(types: tuple[type, ...]) -> str:
    words = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", type(None): "null"}
    return " or ".join(dict.fromkeys(words[t] for t in types))
