"""A real `python -m mediaserver serve` for benchmarks, and what /proc says about it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from mediaserver.tools.ports import free_port, free_udp_range

APP = {"id": "bench", "key": "bench-key"}
HEADERS = {"X-App-ID": APP["id"], "X-API-Key": APP["key"]}


def proc_status(pid: int) -> dict[str, Any]:
    """VmRSS, VmHWM, RssAnon, RssFile (KiB) and CPU seconds (user + system) of a process."""
    values: dict[str, Any] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                name, value = line.split(":", 1)
                values[name] = int(value.split()[0])
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    values["cpu"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return values


def process_tree(pid: int) -> list[int]:
    """`pid` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def tree_status(pid: int) -> dict[str, Any]:
    """RSS (KiB) and CPU seconds summed over the server and its worker processes."""
    total = {"VmRSS": 0, "cpu": 0.0, "processes": 0}
    for member in process_tree(pid):
        try:
            status = proc_status(member)
        except OSError:
            continue
        total["VmRSS"] += status.get("VmRSS", 0)
        total["cpu"] += status["cpu"]
        total["processes"] += 1
    return total


class Server:
    """`python -m mediaserver serve` in its own data directory, on free ports, with `settings`
    (the server's own names) on top of the defaults."""

    def __init__(self, work: Path, rtp_ports: tuple[int, int] | None = None, **settings: Any) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.data_dir = work / f"data-{self.port}"
        self.log = work / f"server-{self.port}.log"
        rtp_min, rtp_max = rtp_ports or free_udp_range()
        self.env = {
            **os.environ,
            "MEDIASERVER_DATA_DIR": str(self.data_dir),
            "MEDIASERVER_HTTP_PORT": str(self.port),
            "MEDIASERVER_PUBLIC_URL": self.base_url,
            "MEDIASERVER_SIP_PORT": str(free_port()),
            "MEDIASERVER_RTP_PORT_MIN": str(rtp_min),
            "MEDIASERVER_RTP_PORT_MAX": str(rtp_max),
            "MEDIASERVER_APPS": json.dumps([APP]),
            "MEDIASERVER_COMMAND_COOLDOWN_S": "0",
            "MEDIASERVER_LOG_LEVEL": "warning",
            **{f"MEDIASERVER_{name.upper()}": str(value) for name, value in settings.items()},
        }
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "mediaserver", "serve"], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start in time")

    def status(self) -> dict[str, Any]:
        return tree_status(self.proc.pid)

    def metrics(self) -> dict[str, float]:
        """The /metrics samples as {name{labels}: value}."""
        with urllib.request.urlopen(f"{self.base_url}/metrics", timeout=10) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
