"""What every benchmark shares: the machine description, CPU accounting, tables, verdicts, results.

A benchmark module has `TITLE` and `run(quick) -> dict` returning `{"settings", "figures",
"verdicts"}`; `write_result` wraps that with the machine and the date and writes
`results/<name>.json`. Numbers are printed and stored, never asserted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"


RESULTS = HERE / "results"


def fresh_work(name: str) -> Path:
    """`work/<name>`, emptied of what the last run of that benchmark left there."""
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


# -- the machine ---------------------------------------------------------------------------


def _first_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _package(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What the figures depend on: CPU, cores, interpreter and the media libraries/tools."""
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": _package("numpy"),
        "lameenc": _package("lameenc"),
        "av": _package("av"),
        "aiohttp": _package("aiohttp"),
        "ffmpeg": _first_line(["ffmpeg", "-hide_banner", "-version"]),
        "lame": _first_line(["lame", "--version"]),
    }


def commit_info() -> dict[str, Any]:
    """The commit measured and whether the working tree differed from it (figures from a
    dirty tree describe code that no commit holds). Nulls outside a git checkout."""
    head = _first_line(["git", "-C", str(HERE.parent), "rev-parse", "HEAD"])
    if head is None or len(head) != 40:
        return {"commit": None, "dirty": None, "dirty_files": None}
    out = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "--untracked-files=no"],
                         capture_output=True, text=True, check=False, timeout=30).stdout
    # Results files written earlier in the same run change no code that is measured.
    changed = sorted(line[3:] for line in out.splitlines() if line.strip() and not line[3:].startswith("benchmarks/results/"))
    return {"commit": head, "dirty": bool(changed), "dirty_files": changed}


def write_result(name: str, title: str, quick: bool, started: float, body: dict[str, Any]) -> Path:
    """Write results/<name>.json (<name>.quick.json for a quick run): the benchmark's settings,
    figures and verdicts, with the commit, the machine and the date."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "title": title,
        "date_utc": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "quick": quick,
        "wall_seconds": round(time.monotonic() - started, 1),
        "source": commit_info(),
        "machine": machine_info(),
        "settings": body["settings"],
        "figures": body["figures"],
        "verdicts": body["verdicts"],
    }
    # A quick run is a smoke test or a guard, not comparable with a full run: it must not
    # replace the full run's figures.
    path = RESULTS / (f"{name}.quick.json" if quick else f"{name}.json")
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return path


# -- CPU time --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cpu:
    """CPU seconds (user, system) and wall seconds of one measured run."""

    user: float
    system: float
    wall: float

    @property
    def total(self) -> float:
        return self.user + self.system


def median_cpu(runs: Sequence[Cpu]) -> Cpu:
    """The run with the median total CPU time (an actual run, so its parts add up)."""
    ordered = sorted(runs, key=lambda run: run.total)
    return ordered[(len(ordered) - 1) // 2]


def run_child(cmd: list[str], **kwargs: Any) -> Cpu:
    """Run `cmd` to completion; its CPU time comes from RUSAGE_CHILDREN before and after."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, **kwargs)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Cpu(after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, wall)


@contextlib.contextmanager
def self_cpu() -> Iterator[list[Cpu]]:
    """Measure this process (every thread) over the block; the Cpu lands in the yielded list."""
    box: list[Cpu] = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    began = time.perf_counter()
    yield box
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_SELF)
    box.append(Cpu(after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, wall))


def pick_core() -> int:
    """The highest-numbered core this process may use (core 0 tends to take the interrupts)."""
    return max(os.sched_getaffinity(0))


@contextlib.contextmanager
def pinned(core: int) -> Iterator[None]:
    """Pin every thread of this process to `core`; children started meanwhile inherit it."""
    tids = [int(tid) for tid in os.listdir("/proc/self/task")]
    saved = {}
    for tid in tids:
        with contextlib.suppress(OSError):
            saved[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, {core})
    try:
        yield
    finally:
        for tid, cores in saved.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cores)


# -- numbers and tables ----------------------------------------------------------------------


def rnd(value: float | None, digits: int = 2) -> float | None:
    """Round for the report; None (not measured, or infinite) stays None."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and spec:
        return format(value, spec)
    return str(value)


def print_table(title: str, columns: Sequence[tuple[str, str, str]], rows: Sequence[dict[str, Any]]) -> None:
    """Print `rows` under `title`; each column is (header, row key, format spec)."""
    cells = [[fmt(row.get(key), spec) for _, key, spec in columns] for row in rows]
    widths = [max([len(head)] + [len(line[i]) for line in cells]) for i, (head, _, _) in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(head.rjust(width) for (head, _, _), width in zip(columns, widths)))
    print("  ".join("-" * width for width in widths))
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
    sys.stdout.flush()


def verdict(target: str, value: float | None, threshold: float, unit: str, *, higher_is_better: bool = True,
            detail: str = "") -> dict[str, Any]:
    """Print and return one target's verdict: met, or short by how much (percent of the threshold)."""
    if value is None:
        met, short, words = False, None, "not met (no figure)"
    else:
        met = value >= threshold if higher_is_better else value <= threshold
        short = 0.0 if met else abs(value - threshold) / threshold * 100
        sign = ">=" if higher_is_better else "<="
        words = f"met ({value:g}{unit} {sign} {threshold:g}{unit})" if met else \
            f"short by {short:.1f}% ({value:g}{unit}, target {sign} {threshold:g}{unit})"
    print(f"VERDICT {target}: {words}" + (f" [{detail}]" if detail else ""))
    sys.stdout.flush()
    return {"target": target, "value": value, "threshold": threshold, "unit": unit,
            "higher_is_better": higher_is_better, "met": met, "short_by_percent": rnd(short, 1), "detail": detail}
