"""`python -m mediaserver serve` as a real child process on free loopback ports: what
tests that kill and restart a server, and benchmarks that measure one, start."""

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


class ServerProcess:
    """A server with its own data directory, on free ports (or `port`), configured by the
    environment: `apps` plus `settings` (the server's own names) on top of the defaults.
    Its output goes to `server-<port>.log` beside the data directory."""

    def __init__(self, data_dir: Path, apps: list[dict[str, Any]], *, port: int | None = None,
                 rtp_ports: tuple[int, int] | None = None, **settings: Any) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir
        self.log = data_dir.parent / f"server-{self.port}.log"
        self.base_url = f"http://127.0.0.1:{self.port}"
        rtp_min, rtp_max = rtp_ports or free_udp_range()
        self.env = {
            **os.environ,
            "MEDIASERVER_DATA_DIR": str(data_dir),
            "MEDIASERVER_HTTP_PORT": str(self.port),
            "MEDIASERVER_PUBLIC_URL": self.base_url,
            "MEDIASERVER_SIP_PORT": str(free_port()),
            "MEDIASERVER_RTP_PORT_MIN": str(rtp_min),
            "MEDIASERVER_RTP_PORT_MAX": str(rtp_max),
            "MEDIASERVER_APPS": json.dumps(apps),
            "MEDIASERVER_COMMAND_COOLDOWN_S": "0",
            **{f"MEDIASERVER_{name.upper()}": str(value) for name, value in settings.items()},
        }
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        """Start it and wait until /healthz answers."""
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
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start in time")

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as after a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGINT, as Ctrl-C: the server finishes what it holds; killed if it takes too long."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
