"""`mediaserver serve` as a real process, for tests that kill and restart it."""

from __future__ import annotations

from pathlib import Path

from servers import APP1, APP2

from mediaserver.tools import serverproc


class ServerProcess(serverproc.ServerProcess):
    """The tests' two apps, recordings under `data_dir`, the log beside it."""

    def __init__(self, data_dir: Path, **settings) -> None:
        super().__init__(data_dir, [APP1, APP2], **settings)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")
