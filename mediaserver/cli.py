"""Command line: `mediaserver serve` runs the server, `mediaserver mix` records files offline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mediaserver.errors import MediaServerError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mediaserver", description="A telephony media server that records calls.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--config", type=Path, help="a TOML file of settings (the environment wins over it)")
    mix = commands.add_parser("mix", help="record WAV files (caller, callee, more) into one recording, offline")
    mix.add_argument("-o", "--output", type=Path, required=True, help="the file to write")
    mix.add_argument("inputs", nargs="+", type=Path, help="mono WAV files at 8, 16 or 48 kHz: caller, callee, others")
    mix.add_argument("--format", choices=("wav", "mp3", "opus"), default="wav")
    mix.add_argument("--channels", type=int, choices=(1, 2), default=1)
    mix.add_argument("--participant", choices=("all", "caller", "callee"), default="all")
    mix.add_argument("--sample-rate", type=int, default=None, help="8000 or 16000 (48000 for opus); default 8000")
    mix.add_argument("--bitrate", type=int, default=None, help="kbps for mp3 (default 32) and opus (default 24)")
    mix.add_argument("--silence-timeout", type=float, default=0.0, help="seconds of silence that end it; 0 off")
    mix.add_argument("--silence-threshold", type=float, default=-45.0, help="dBFS under which audio is silence")
    mix.add_argument("--max-length", type=float, default=14400.0, help="seconds; 0 off")
    mix.add_argument("--finish-on-key", default="", help='DTMF digits that end it, e.g. "#"')
    mix.add_argument("--trim-silence", action="store_true", help="drop leading and trailing silence")
    mix.add_argument("--mp3-quality", type=int, default=7, choices=range(10), metavar="0-9")
    mix.add_argument("--opus-complexity", type=int, default=10, choices=range(11), metavar="0-10")
    return parser


def _mix(args: argparse.Namespace) -> int:
    from mediaserver.options import RecordingOptions
    from mediaserver.recorder.offline import EncoderSettings, mix_files

    options = RecordingOptions().merged({
        "format": args.format,
        "channels": args.channels,
        "participant": args.participant,
        "sample_rate": args.sample_rate or (8000 if args.format != "opus" else 8000),
        "bitrate": args.bitrate,
        "silence_timeout": args.silence_timeout,
        "max_length": args.max_length,
        "finish_on_key": args.finish_on_key,
        "trim_silence": args.trim_silence,
    })
    summary = mix_files(list(args.inputs), args.output, options,
                        EncoderSettings(args.mp3_quality, args.opus_complexity), args.silence_threshold)
    print(json.dumps(summary, indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from mediaserver.api.server import serve

    return serve(args.config)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _mix(args) if args.command == "mix" else _serve(args)
    except MediaServerError as exc:
        print(f"mediaserver: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
