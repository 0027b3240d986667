"""`mediaserver serve` as a real process, for tests that kill and restart it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from servers import APP1, APP2, free_port, free_udp_range


class ServerProcess:
    def __init__(self, data_dir: Path, **settings) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        rtp_min, rtp_max = free_udp_range()
        self.env = {
            **os.environ,
            "MEDIASERVER_DATA_DIR": str(data_dir),
            "MEDIASERVER_HTTP_PORT": str(self.port),
            "MEDIASERVER_PUBLIC_URL": self.base_url,
            "MEDIASERVER_APPS": json.dumps([APP1, APP2]),
            "MEDIASERVER_COMMAND_COOLDOWN_S": "0",
            "MEDIASERVER_SIP_PORT": str(free_port()),
            "MEDIASERVER_RTP_PORT_MIN": str(rtp_min),
            "MEDIASERVER_RTP_PORT_MAX": str(rtp_max),
            **{f"MEDIASERVER_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.proc: subprocess.Popen | None = None
        self.log = data_dir.parent / f"server-{self.port}.log"

    def start(self, timeout: float = 20.0) -> "ServerProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "mediaserver", "serve"], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT)
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

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
