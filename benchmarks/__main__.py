"""`python -m benchmarks [name ...] [--quick]`: run benchmarks, print tables, write results/<name>.json.

With no names every implemented benchmark runs, in the order of `BENCHMARKS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from benchmarks.common import write_result

# name -> module. A module has TITLE and run(quick) -> {"settings", "figures", "verdicts"}.
BENCHMARKS: dict[str, str] = {
    "mix_encode": "benchmarks.mix_encode",
    "memory_length": "benchmarks.memory_length",
    "rtp_load": "benchmarks.rtp_load",
    "cost_per_call": "benchmarks.cost_per_call",
    "cluster_load": "benchmarks.cluster_load",
    "sip_cps": "benchmarks.sip_cps",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="name", help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="shorter inputs and fewer passes (a smoke run, ~2 min)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return parser


def _list() -> None:
    for name, module in BENCHMARKS.items():
        print(f"{name:15} {importlib.import_module(module).TITLE}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        _list()
        return 0
    names = args.names or list(BENCHMARKS)
    for name in names:
        if name not in BENCHMARKS:
            print(f"benchmarks: unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})", file=sys.stderr)
            return 2
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        print(f"\n=== {name}: {module.TITLE}", flush=True)
        started = time.monotonic()
        body = module.run(args.quick)
        path = write_result(name, module.TITLE, args.quick, started, body)
        print(f"\n{name}: {time.monotonic() - started:.0f} s, results in {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
