"""A real `python -m mediaserver serve` for benchmarks, and what /proc says about it."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from typing import Any

from mediaserver.tools.ports import free_port
from mediaserver.tools.serverproc import ServerProcess

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


class Server(ServerProcess):
    """The server in its own data directory under `work`, on free ports, with `settings`
    (the server's own names) on top of the defaults; logging only warnings."""

    def __init__(self, work: Path, rtp_ports: tuple[int, int] | None = None, **settings: Any) -> None:
        settings.setdefault("log_level", "warning")
        port = free_port()
        super().__init__(work / f"data-{port}", [APP], port=port, rtp_ports=rtp_ports, **settings)

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
