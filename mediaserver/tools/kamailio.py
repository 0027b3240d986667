"""Kamailio in front of mediaserver nodes, from the config the repository ships.

    python -m mediaserver.tools.kamailio [--port P] [--dir D] sip:127.0.0.1:5071 sip:127.0.0.1:5072

writes the dispatcher list for the given nodes into D, runs Kamailio in the foreground on
`deploy/kamailio/kamailio.cfg` (the very file an operator deploys), waits until it answers
OPTIONS and runs until Ctrl-C. Kamailio runs as root (`apt-get install kamailio`).

`Kamailio` is the launcher on its own; the cluster tests start their proxy with it.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "kamailio" / "kamailio.cfg"
NODES_SET = 1  # the dispatcher set the config sends new calls to
# kamcmd dispatcher.list prints each destination's URI, then its FLAGS: A(ctive) or
# I(nactive), and P when it is being probed.
_DESTINATION = re.compile(r"URI:\s*(\S+)\s+FLAGS:\s*(\w+)")


def kamailio_binary() -> str:
    """The `kamailio` executable (Debian installs it in /usr/sbin, often not on PATH)."""
    found = shutil.which("kamailio") or shutil.which("kamailio", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise FileNotFoundError("the `kamailio` binary was not found: apt-get install kamailio")
    return found


def dispatcher_list(nodes: Sequence[str]) -> str:
    """A dispatcher list file sending new calls to `nodes` (SIP URIs), all in one set."""
    for node in nodes:
        if not node.startswith(("sip:", "sips:")) or any(ch.isspace() for ch in node):
            raise ValueError(f"a node is a SIP URI without spaces, such as sip:10.0.0.7:5060, not {node!r}")
    lines = ["# setid destination flags priority", *(f"{NODES_SET} {node} 0 0" for node in nodes)]
    return "\n".join(lines) + "\n"


class Kamailio:
    """One Kamailio process on `host:listen_port` (UDP and TCP) dispatching to `nodes`.

    Its dispatcher list, RPC socket and log (`kamailio.log`) live in `workdir`. `start()`
    returns once Kamailio answers an OPTIONS; `stop()` sends SIGTERM and kills it after a
    bound. Also a context manager.
    """

    def __init__(self, listen_port: int, nodes: Sequence[str], workdir: Path, *, host: str = "127.0.0.1",
                 cfg_path: Path = CONFIG, binary: str | None = None) -> None:
        dispatcher_list(nodes)  # a node that is not a SIP URI is refused here, not at start
        self.host = host
        self.port = listen_port
        self.nodes = list(nodes)
        self.workdir = workdir
        self.cfg_path = cfg_path
        self.binary = binary or kamailio_binary()
        self.list_file = workdir / "dispatcher.list"
        self.ctl_socket = workdir / "kamailio_ctl"
        self.log = workdir / "kamailio.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def uri(self) -> str:
        """Where callers send their INVITEs."""
        return f"sip:{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        """The command line: the shipped config, its settings given as -A defines."""
        return [
            self.binary, "-DD", "-E", "-f", str(self.cfg_path), "-Y", str(self.workdir), "-w", str(self.workdir),
            "-A", f"LISTEN={self.host}:{self.port}",
            "-A", f'DS_LIST="{self.list_file}"',
            "-A", f'CTL_SOCKET="unix:{self.ctl_socket}"',
            "-A", "CHILDREN=2",  # callers and nodes of a test or a trial are few
        ]

    def start(self, timeout: float = 15.0) -> "Kamailio":
        """Write the node list, start Kamailio and wait until it answers OPTIONS."""
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.list_file.write_text(dispatcher_list(self.nodes))
        self._log = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise RuntimeError(f"kamailio exited during start-up:\n{self.log_tail()}")
            if options_ping(self.host, self.port, timeout=0.5) == 200:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"kamailio on {self.host}:{self.port} not ready after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds. Idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            # Kamailio's processes share its process group (start_new_session): the main
            # one stops the others on SIGTERM; the kill takes them all.
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def rpc(self, *args: str, timeout: float = 5.0) -> str:
        """One RPC command over the control socket (`kamcmd`), its output as text."""
        kamcmd = shutil.which("kamcmd") or shutil.which("kamcmd", path="/usr/sbin:/usr/local/sbin")
        if kamcmd is None:
            raise FileNotFoundError("the `kamcmd` binary was not found: apt-get install kamailio")
        done = subprocess.run([kamcmd, "-s", f"unix:{self.ctl_socket}", *args], capture_output=True, text=True,
                              timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"kamcmd {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def destinations(self) -> dict[str, str]:
        """The dispatcher's flags for each node: "AP" active, "IP" inactive (probed)."""
        return dict(_DESTINATION.findall(self.rpc("dispatcher.list")))

    def set_nodes(self, nodes: Sequence[str]) -> None:
        """Replace the node list and have Kamailio reload it (adding or draining a node)."""
        self.nodes = list(nodes)
        self.list_file.write_text(dispatcher_list(self.nodes))
        self.rpc("dispatcher.reload")

    def log_tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> "Kamailio":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def options_ping(host: str, port: int, timeout: float = 1.0) -> int | None:
    """Send one OPTIONS over UDP to `host:port`; the status of the answer, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.settimeout(timeout)
        local = sock.getsockname()[1]
        tag, branch = secrets.token_hex(4), "z9hG4bK" + secrets.token_hex(8)
        request = (f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
                   f"Via: SIP/2.0/UDP {host}:{local};branch={branch};rport\r\n"
                   f"Max-Forwards: 70\r\nFrom: <sip:probe@{host}>;tag={tag}\r\nTo: <sip:{host}:{port}>\r\n"
                   f"Call-ID: {secrets.token_hex(8)}@{host}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
        sock.sendto(request.encode(), (host, port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except (TimeoutError, ConnectionRefusedError):
                return None
            match = re.match(rb"SIP/2\.0 (\d{3}) ", data)
            if match and branch.encode() in data and int(match.group(1)) >= 200:
                return int(match.group(1))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mediaserver.tools.kamailio", description=__doc__.split("\n\n")[0])
    parser.add_argument("nodes", nargs="+", help="the nodes' SIP URIs, e.g. sip:127.0.0.1:5071")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5060, help="SIP port, UDP and TCP (default: %(default)s)")
    parser.add_argument("--dir", type=Path, default=Path("data/kamailio"), help="list, socket and log (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        proxy = Kamailio(args.port, args.nodes, args.dir.resolve(), host=args.host)
    except (FileNotFoundError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop Kamailio on `kill` as on Ctrl-C
    try:
        proxy.start()
        print(f"Kamailio on {proxy.uri} (UDP and TCP) for {', '.join(proxy.nodes)}; log {proxy.log}; Ctrl-C stops it")
        sys.stdout.flush()
        while proxy.running:
            time.sleep(0.5)
        print(f"kamailio exited:\n{proxy.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        proxy.stop()


if __name__ == "__main__":
    sys.exit(main())
