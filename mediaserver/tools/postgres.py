"""A local PostgreSQL for the cluster catalog, for tests and for trying cluster mode by hand.

    python -m mediaserver.tools.postgres [--dir D] [--port P]

initialises a cluster in D (once), starts it on 127.0.0.1, prints the `MEDIASERVER_*`
settings that point the server's catalog at it, and runs until Ctrl-C. Running it again
with the same directory finds the same catalog.

`LocalPostgres` is the launcher on its own; the test suite starts its PostgreSQL with it.
PostgreSQL refuses to run as root, so when this process is root `initdb` and `pg_ctl` run
as the `postgres` user (`runuser -u postgres --`), which then owns the directory.
"""

from __future__ import annotations

import argparse
import atexit
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from mediaserver.tools.ports import free_port

BIN_DIR = Path("/usr/lib/postgresql/15/bin")
SERVICE_USER = "postgres"
# A unix socket path may hold 107 bytes; past that the server would refuse to start.
SOCKET_PATH_MAX = 100
# Settings for a disposable server: durability off (a test's data is worth nothing after it).
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def _as_root() -> bool:
    return os.geteuid() == 0


class LocalPostgres:
    """One PostgreSQL server in its own directory, listening on a loopback TCP port.

    `start()` returns once the server accepts connections; `stop()` is a fast shutdown
    (`pg_ctl -m fast`) with SIGKILL of the server's process group as the fallback;
    `restart()` (or `stop()` then `start()`) brings it back on the same port with the same
    data. Without `root` a temp directory is made and `close()` (or leaving the `with`
    block) stops the server and removes it; with one, the data stays for the next run.
    """

    def __init__(self, root: Path | None = None, *, port: int | None = None, host: str = "127.0.0.1",
                 bin_dir: Path = BIN_DIR, settings: dict[str, str] | None = None) -> None:
        self._temporary = root is None
        self.root = Path(tempfile.mkdtemp(prefix="mediaserver-pg-")) if root is None else root.resolve()
        self.host = host
        self.port = port or 0
        self._fixed_port = port is not None
        self.bin_dir = bin_dir
        self.settings = {**FAST_SETTINGS, **(settings or {})}
        self._pid: int | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self._pid is not None and _alive(self._pid)

    def __enter__(self) -> "LocalPostgres":
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Initialise the cluster if needed, start it, and wait until it accepts connections."""
        if self.running:
            return
        self._check_binaries()
        self._prepare_root()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(timeout)
        other = self._read_pid()
        if other is not None and _alive(other):
            raise RuntimeError(f"a PostgreSQL server (pid {other}) is already running in {self.data_dir}")
        atexit.register(self.kill)
        # A port chosen here may be taken by someone else before the server binds it.
        for attempt in range(1 if self._fixed_port else 3):
            if not self._fixed_port and (attempt or not self.port):
                self.port = free_port(host=self.host)
            if self._pg_ctl_start(timeout):
                self._fixed_port = True  # restart() must come back where the clients look
                self._pid = self._read_pid()
                return
        self._pid = self._read_pid()  # pg_ctl may have given up on a server that came up late
        self.kill()
        raise RuntimeError(f"PostgreSQL did not start on {self.host}:{self.port}:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (open sessions are ended); SIGKILL if that fails. Idempotent."""
        if self.running:
            done = self._run_pg_ctl(["-m", "fast", "-w", "-t", str(int(timeout)), "stop"], timeout + 5)
            if not done:
                self.kill()
        self._pid = None
        atexit.unregister(self.kill)

    def close(self) -> None:
        """Stop, and remove the directory if it is a temp directory of our own. Idempotent."""
        self.stop()
        if self._temporary:
            shutil.rmtree(self.root, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server and its backends, as a crash would. Idempotent; data stays."""
        pid, self._pid = self._pid, None
        if pid is not None and _alive(pid):
            # pg_ctl starts the postmaster in a session of its own: its pid is the group id.
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_gone(pid, 5.0)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop and start again on the same port with the same data (an outage)."""
        self.stop()
        self.start(timeout)

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name` (a plain identifier) and return its DSN."""
        if not name.isidentifier():
            raise ValueError(f"not a plain database name: {name!r}")
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn_for(name)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with `psql` over TCP and return what it printed (unaligned, tuples only)."""
        command = [str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                   "-h", self.host, "-p", str(self.port), "-U", "postgres", "-d", database, "-c", sql]
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- the steps ------------------------------------------------------------------------

    def _check_binaries(self) -> None:
        missing = [name for name in ("initdb", "pg_ctl", "postgres") if not (self.bin_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(f"PostgreSQL 15 was not found in {self.bin_dir} (no {', '.join(missing)}): "
                                    "apt-get install postgresql")

    def _prepare_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if _as_root():
            account = pwd.getpwnam(SERVICE_USER)
            closed = _closed_ancestor(self.root, account)
            if closed is not None:
                raise RuntimeError(f"the {SERVICE_USER} user cannot enter {closed}, so cannot use {self.root}: "
                                   "choose a directory it can reach (for example under /tmp)")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            os.chmod(self.root, 0o700)

    def _initdb(self, timeout: float) -> None:
        command = [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "-A", "trust",
                   "-E", "UTF8", "--no-locale", "--no-sync"]
        result = subprocess.run(self._as_service_user(command), cwd=self.root, capture_output=True, text=True,
                                timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed in {self.data_dir}:\n{result.stdout}{result.stderr}")

    def _pg_ctl_start(self, timeout: float) -> bool:
        socket_dir = str(self.root) if len(str(self.root)) < SOCKET_PATH_MAX else ""
        options = [f"-p {self.port}", f"-c listen_addresses={self.host}", f"-c unix_socket_directories='{socket_dir}'"]
        options += [f"-c {name}={value}" for name, value in self.settings.items()]
        arguments = ["-l", str(self.log_path), "-w", "-t", str(int(timeout)), "-o", " ".join(options), "start"]
        return self._run_pg_ctl(arguments, timeout + 5)

    def _run_pg_ctl(self, arguments: list[str], timeout: float) -> bool:
        command = self._as_service_user([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *arguments])
        try:
            result = subprocess.run(command, cwd=self.root, stdin=subprocess.DEVNULL, capture_output=True,
                                    timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0

    def _read_pid(self) -> int | None:
        """The postmaster's pid from its pid file (first line), if there is one."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    @staticmethod
    def _as_service_user(command: list[str]) -> list[str]:
        return ["runuser", "-u", SERVICE_USER, "--", *command] if _as_root() else command


def _closed_ancestor(path: Path, account: pwd.struct_passwd) -> Path | None:
    """The first directory above `path` that `account` may not search, if any."""
    for parent in reversed(path.parents):
        info = parent.stat()
        if info.st_uid == account.pw_uid:
            bit = stat.S_IXUSR
        elif info.st_gid == account.pw_gid or info.st_gid in os.getgrouplist(account.pw_name, account.pw_gid):
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return parent
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def environment(server: LocalPostgres) -> dict[str, str]:
    """The settings that point mediaserver's catalog at this server."""
    return {"MEDIASERVER_CATALOG": "postgres", "MEDIASERVER_POSTGRES_DSN": server.dsn}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mediaserver.tools.postgres", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("data/postgres"), help="data directory (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5432, help="TCP port; 0 picks a free one (default: %(default)s)")
    args = parser.parse_args(argv)
    server = LocalPostgres(args.dir, port=args.port or None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the server on `kill` as on Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    try:
        return _serve(server)
    except KeyboardInterrupt:
        return 0
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        server.close()


def _serve(server: LocalPostgres) -> int:
    server.start()
    print(f"PostgreSQL at {server.host}:{server.port}, data in {server.data_dir}; Ctrl-C stops it. Use:\n")
    for name, value in environment(server).items():
        print(f"export {name}={value}")
    sys.stdout.flush()
    while server.running:
        time.sleep(0.5)
    print(f"PostgreSQL exited:\n{server.log_tail()}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
