"""Two clustered nodes on this machine: N two-leg RTP calls per node, ramped, on one
PostgreSQL and one SeaweedFS; what each call asks of the catalog and of S3, and what gives
out first.

One PostgreSQL (`LocalPostgres`, durable settings: fsync and synchronous commit on) and one
SeaweedFS (`weed mini` with its Prometheus metrics on) serve the whole ramp; each step gets
a fresh database, a fresh bucket and two fresh nodes (`python -m mediaserver serve`,
`catalog = postgres`, `storage = s3`, a worker process per usable core, as README's
performance rows run), with a webhook receiver in this process (a thread with its own event
loop) that checks every signature.

A step: the nodes idle (their background catalog traffic: heartbeats, outbox and leader
polls), then N sessions per node are made through the API, each with two RTP legs (PCMU, by
SDP offer/answer) and an MP3 recording. RTP legs, because their sender is the cheapest
there is: one process (`benchmarks.rtp_sender`) sends every leg's 20 ms packets from one
socket with `sendmmsg(2)`, while a wavstream leg costs a WebSocket frame per 20 ms in
Python. After a warm-up the steady window measures both nodes (CPU, RSS, tick lateness),
PostgreSQL (its postmaster and every backend, from /proc, the reaped ones included),
SeaweedFS, and the catalog counters of each node (`mediaserver_catalog_*_total`). Then
every call is hung up at once: the drain stores every recording (one PUT each, the
checkpoints listed and deleted) and delivers the webhooks of the burst. Every recording is
judged (completed, every packet sent counted on its leg, duration within a tolerance of
how long it ran), and every `recording.completed` must arrive exactly once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import math
import os
import threading
import time
import urllib.request
import uuid as uuidlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from benchmarks import audio, rtp_load
from benchmarks.common import fresh_work, print_table, rnd, verdict
from benchmarks.rtp_sender import PTIME
from benchmarks.server import APP, HEADERS, Server, process_tree
from mediaserver.catalog.postgres import PostgresCatalog
from mediaserver.config import Config
from mediaserver.tools.ports import free_port
from mediaserver.tools.postgres import LocalPostgres
from mediaserver.tools.seaweedfs import Credentials, WeedMini, free_ports
from mediaserver.webhooks import SIGNATURE_HEADER, verify

TITLE = ("Two clustered nodes on one PostgreSQL and one SeaweedFS: N two-leg RTP calls per node, ramped; "
         "CPU, catalog and S3 per call, webhooks once, what gives out first")

RAMP_PER_NODE = (50, 100, 200, 400)
QUICK_RAMP_PER_NODE = (20,)
RUN_S = 20.0
SETTLE_S = 2.0  # after the nodes answer, before their idle cost is measured (start-up work ends)
IDLE_S = 4.0  # the nodes' background catalog traffic is measured over this, before any call
SAMPLE_S = 0.5  # how often the backlogs are read from /metrics
NODE_NAMES = ("node-a", "node-b")
NODE_PORTS = ((30000, 34999), (35000, 39999))  # inside rtp_load.RTP_PORTS, whose queues _caught_up watches
WEBHOOK_SECRET = "cluster-load-webhook-secret"
SECRET_KEY = "cluster-load-secret-0123456789"
# Durable, as a deployment runs it: LocalPostgres's own defaults turn durability off for tests.
PG_SETTINGS = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
DURATION_TOLERANCE_S = 1.0
# A writer more than a full batch behind while calls are only being held is not keeping up.
BACKLOG_LIMIT = 200
# Each scrape of /metrics makes two catalog reads (recordings by state, the outbox backlog),
# each page of GET /api/v1/recordings one: the benchmark's own, taken off the figures.
SCRAPE_READS = 2
CONCURRENCY = 32
FAILING_STEPS_TO_STOP = 2


# -- the engines: PostgreSQL, SeaweedFS, the webhook receiver ------------------------------------


class Weed(WeedMini):
    """`weed mini` with its Prometheus metrics on a port of their own: what S3 was asked."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, Credentials.generate(), free_ports())
        self.metrics_port = free_port()

    def command(self) -> list[str]:
        return [*super().command(), f"-metricsPort={self.metrics_port}"]

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def requests(self, bucket: str) -> tuple[dict[str, float], float]:
        """S3 requests on `bucket` so far, by type (PUT, GET, LIST, DELETE, …), and how many
        of them were answered 5xx."""
        with urllib.request.urlopen(f"http://{self.host}:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        by_type: Counter[str] = Counter()
        failed = 0.0
        for line in text.splitlines():
            if not line.startswith("SeaweedFS_s3_request_total{"):
                continue
            labels, _, value = line.rpartition(" ")
            found = dict(part.split("=", 1) for part in labels[labels.index("{") + 1:-1].split(","))
            if found.get("bucket", "").strip('"') != bucket:
                continue
            by_type[found["type"].strip('"')] += float(value)
            failed += float(value) if found.get("code", '""').strip('"').startswith("5") else 0.0
        return dict(by_type), failed

    def inventory(self, bucket: str) -> dict[str, int]:
        """Objects in `bucket`, checkpoint objects left among them, and open multipart uploads."""
        client = self.client()
        try:
            objects = checkpoints = 0
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                keys = [item["Key"] for item in page.get("Contents", [])]
                objects += len(keys)
                checkpoints += sum(".ckpt/" in key for key in keys)
            uploads = len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))
        finally:
            client.close()
        return {"objects": objects, "checkpoint_objects": checkpoints, "open_uploads": uploads}


@dataclass(frozen=True, slots=True)
class Delivery:
    """One webhook event the receiver accepted."""

    at: float  # time.monotonic() on arrival
    kind: str
    event_id: str
    recording_id: str | None


class HookReceiver:
    """A webhook endpoint on loopback, in a thread of this process with its own event loop;
    answers 200 to every correctly signed event and notes when it arrived."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.url = ""
        self.bad_signatures = 0
        self._deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="webhook-receiver", daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def take(self) -> list[Delivery]:
        """Every delivery since the last `take()`, and forget them."""
        with self._lock:
            taken, self._deliveries = self._deliveries, []
            return taken

    def peek(self) -> list[Delivery]:
        with self._lock:
            return list(self._deliveries)

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(self.secret, body, request.headers.get(SIGNATURE_HEADER, ""), time.time()):
            self.bad_signatures += 1
            return web.Response(status=401)
        event = json.loads(body)
        delivery = Delivery(time.monotonic(), event["event_kind"], event["event_id"], event["payload"].get("recording_id"))
        with self._lock:
            self._deliveries.append(delivery)
        return web.Response(status=200)


def postmaster_pid(pg: LocalPostgres) -> int:
    return int((pg.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])


def cpu_with_reaped(pid: int) -> float:
    """CPU seconds of `pid` and its live descendants, plus what the children it has already
    reaped used: PostgreSQL's backends come and go with their connections."""
    total = 0.0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if member == pid else 0)
    return total / os.sysconf("SC_CLK_TCK")


# -- the nodes ------------------------------------------------------------------------------------


class Node(Server):
    """One clustered server; counts the catalog reads its own scrapes and listings cause."""

    def __init__(self, work: Path, name: str, rtp_ports: tuple[int, int], hooks_url: str, **settings: Any) -> None:
        super().__init__(work, rtp_ports=rtp_ports, node_id=name, **settings)
        self.env["MEDIASERVER_APPS"] = json.dumps([{**APP, "webhook_url": hooks_url, "webhook_secret": WEBHOOK_SECRET}])
        self._own_reads = 0
        self._lock = threading.Lock()

    def scrape(self) -> tuple[dict[str, float], int]:
        """/metrics, and the catalog reads this benchmark has caused on the node up to it."""
        values = self.metrics()
        with self._lock:
            self._own_reads += SCRAPE_READS
            return values, self._own_reads

    def count_reads(self, reads: int) -> None:
        with self._lock:
            self._own_reads += reads


def node_settings(dsn: str, weed: Weed, bucket: str) -> dict[str, Any]:
    return {"catalog": "postgres", "postgres_dsn": dsn, "storage": "s3", "s3_endpoint": weed.endpoint,
            "s3_bucket": bucket, "s3_region": "us-east-1", "s3_access_key": weed.credentials.access_key,
            "s3_secret_key": weed.credentials.secret_key, "secret_key": SECRET_KEY, **rtp_load.server_settings()}


def connections_per_node() -> dict[str, int]:
    """The PostgreSQL connections a node opens at most: its read pool, the writer's, the leader's."""
    pool = inspect.signature(PostgresCatalog).parameters["pool_size"].default
    return {"pool": pool, "writer": 1, "leader": 1, "total": pool + 2}


@dataclass
class Snapshot:
    """Everything read at one instant of a step."""

    at: float
    nodes: list[dict[str, Any]]  # tree_status of each node
    metrics: list[dict[str, float]]
    own_reads: list[int]
    pg_cpu: float
    weed_cpu: float
    s3: dict[str, float]
    s3_failed: float


@dataclass
class Step:
    """What one step runs on."""

    per_node: int
    seconds: float
    work: Path
    payload: Path
    pg: LocalPostgres
    weed: Weed
    hooks: HookReceiver
    bucket: str = ""
    database: str = ""
    nodes: list[Node] = field(default_factory=list)

    def snapshot(self) -> Snapshot:
        scraped = [node.scrape() for node in self.nodes]
        s3, failed = self.weed.requests(self.bucket)
        return Snapshot(time.monotonic(), [node.status() for node in self.nodes], [m for m, _ in scraped],
                        [own for _, own in scraped], cpu_with_reaped(postmaster_pid(self.pg)),
                        cpu_with_reaped(self.weed.pid), s3, failed)

    def pg_connections(self) -> int:
        return int(self.pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{self.database}'").strip())


class Sampler:
    """Reads the backlogs from every node's /metrics every SAMPLE_S in a thread: the outbox
    backlog (shared by the cluster) and each node's catalog writes not yet committed."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.phase = "idle"
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backlog-sampler", daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            try:
                metrics = [node.scrape()[0] for node in self.nodes]
            except OSError:
                continue
            self.samples.append({"phase": self.phase, "outbox": metrics[0].get("mediaserver_webhook_backlog", 0.0),
                                 "pending": [m.get("mediaserver_catalog_writes_pending", 0.0) for m in metrics]})

    def peak(self, what: str, phase: str) -> float:
        values = [max(s[what]) if isinstance(s[what], list) else s[what] for s in self.samples if s["phase"] == phase]
        return max(values, default=0.0)


# -- calls through the API -----------------------------------------------------------------------


@dataclass
class Call:
    node: int
    uuid: str = ""
    recording_id: str = ""
    ports: list[int] = field(default_factory=list)
    recording_since: float = 0.0  # when record/start was answered
    ended_at: float = 0.0  # when the hangup was answered
    error: str = ""


async def _request(http: aiohttp.ClientSession, method: str, path: str, **kwargs: Any) -> Any:
    for attempt in range(3):
        async with http.request(method, path, headers=HEADERS, **kwargs) as response:
            body = await response.json(content_type=None)
            if response.status < 300:
                return body
            if response.status != 503 or attempt == 2:
                raise RuntimeError(f"{method} {path.split('/')[-1]}: {response.status} {(body or {}).get('error', body)}")
        await asyncio.sleep(0.2 * (attempt + 1))


async def _open(http: aiohttp.ClientSession, call: Call, limit: asyncio.Semaphore) -> None:
    async with limit:
        try:
            call.uuid = (await _request(http, "POST", "/api/v1/sessions", json={}))["uuid"]
            for role in ("caller", "callee"):
                leg = await _request(http, "POST", f"/api/v1/sessions/{call.uuid}/legs",
                                     json={"role": role, "sdp": rtp_load.offer()})
                call.ports.append(rtp_load.answer_port(leg["sdp"]))
            answer = await _request(http, "POST", f"/api/v1/sessions/{call.uuid}/commands/record/start",
                                    json=rtp_load.RECORD)
            call.recording_id, call.recording_since = answer["recording_id"], time.monotonic()
        except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            call.error = str(exc) or type(exc).__name__


async def open_calls(nodes: list[Node], per_node: int) -> list[Call]:
    """`per_node` calls on each node, interleaved (A, B, A, B …) so that both nodes' streams
    start together; a call whose session, legs or recording was refused keeps its error."""
    calls = [Call(index % len(nodes)) for index in range(per_node * len(nodes))]
    timeout = aiohttp.ClientTimeout(total=120)
    sessions = [aiohttp.ClientSession(node.base_url, timeout=timeout) for node in nodes]
    try:
        limits = [asyncio.Semaphore(CONCURRENCY) for _ in nodes]
        await asyncio.gather(*(_open(sessions[c.node], c, limits[c.node]) for c in calls))
    finally:
        for http in sessions:
            await http.close()
    return calls


async def hang_up_and_drain(step: Step, calls: list[Call], sampler: Sampler, timeout: float) -> dict[str, Any]:
    """Hang up every call on its node, then wait until every recording is stored (listed
    through node A: any node answers for all) and every webhook is delivered."""
    sessions = [aiohttp.ClientSession(node.base_url, timeout=aiohttp.ClientTimeout(total=120)) for node in step.nodes]
    try:
        limit = asyncio.Semaphore(CONCURRENCY)

        async def hang_up(call: Call) -> None:
            async with limit:
                try:
                    await _request(sessions[call.node], "DELETE", f"/api/v1/sessions/{call.uuid}")
                except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    call.error = call.error or f"hangup: {exc}"
                call.ended_at = time.monotonic()

        began = time.monotonic()
        sampler.phase = "drain"
        await asyncio.gather(*(hang_up(call) for call in calls if call.uuid))
        wanted = {call.recording_id for call in calls if call.recording_id}
        deadline = began + timeout
        rows: list[dict[str, Any]] = []
        stored_at = None
        while time.monotonic() < deadline:
            rows = [row for row in await _recordings(sessions[0], step.nodes[0]) if row["recording_id"] in wanted]
            done = [row for row in rows if row["state"] in ("completed", "failed")]
            if len(done) == len(wanted):
                stored_at = stored_at or time.monotonic()
                completed = {d.recording_id for d in step.hooks.peek() if d.kind == "recording.completed"}
                backlog = step.nodes[0].scrape()[0].get("mediaserver_webhook_backlog", 0.0)
                if completed >= {row["recording_id"] for row in done if row["state"] == "completed"} and not backlog:
                    break
            await asyncio.sleep(0.5)
        return {"began": began, "rows": rows, "stored_s": None if stored_at is None else stored_at - began,
                "delivered_s": time.monotonic() - began}
    finally:
        for http in sessions:
            await http.close()


async def _recordings(http: aiohttp.ClientSession, node: Node) -> list[dict[str, Any]]:
    rows, offset = [], 0
    while True:
        page = await _request(http, "GET", f"/api/v1/recordings?limit=500&offset={offset}")
        node.count_reads(1)
        rows += page["data"]
        if not page["pagination"]["has_more"]:
            return rows
        offset += 500


def expected_packets(count: int, seconds: float) -> list[int]:
    """Packets `benchmarks.rtp_sender` sends each of `count` targets: the streams begin one
    after another over the first `ramp_s` and all run to the end."""
    ticks = int(seconds / PTIME)
    ramp_ticks = max(int(rtp_load.STREAM_RAMP_S / PTIME), 1)
    first = [0] * count
    started = 0
    for tick in range(ticks):
        now = min(count * (tick + 1) // ramp_ticks, count)
        for target in range(started, now):
            first[target] = tick
        started = now
    return [ticks - first[target] if target < started else 0 for target in range(count)]


# -- one step -------------------------------------------------------------------------------------


def _start_nodes(step: Step, settings: dict[str, Any]) -> None:
    step.nodes = [Node(step.work, name, ports, step.hooks.url, **settings) for name, ports in zip(NODE_NAMES, NODE_PORTS)]
    with concurrent.futures.ThreadPoolExecutor(len(step.nodes)) as pool:
        list(pool.map(lambda node: node.start(), step.nodes))


def _stop_nodes(step: Step) -> None:
    with concurrent.futures.ThreadPoolExecutor(len(step.nodes) or 1) as pool:
        list(pool.map(lambda node: node.stop(), step.nodes))


def measure(step: Step, index: int) -> dict[str, Any]:
    """One step of the ramp: `per_node` calls on each of two fresh nodes."""
    step.database = f"cluster_load_{index}_{uuidlib.uuid4().hex[:8]}"
    dsn = step.pg.create_database(step.database)
    step.bucket = f"cluster-load-{index}-{uuidlib.uuid4().hex[:8]}"
    step.weed.create_bucket(step.bucket)
    step.hooks.take()
    step.hooks.bad_signatures = 0
    sender = None
    try:
        _start_nodes(step, node_settings(dsn, step.weed, step.bucket))
        time.sleep(SETTLE_S)
        with Sampler(step.nodes) as sampler:
            idle0 = step.snapshot()
            time.sleep(IDLE_S)
            idle1 = step.snapshot()
            sampler.phase = "open"
            calls = asyncio.run(open_calls(step.nodes, step.per_node))
            opened = step.snapshot()
            live = [call for call in calls if call.recording_id]
            targets = [port for call in live for port in call.ports]
            udp0 = rtp_load._udp_errors()
            sampler.phase = "steady"
            sender = rtp_load._sender({"targets": targets, "seconds": step.seconds, "payload": str(step.payload),
                                       "ramp_s": rtp_load.STREAM_RAMP_S}, step.work)
            time.sleep(rtp_load.WARMUP_S)
            s1 = step.snapshot()
            time.sleep(max(step.seconds - rtp_load.WARMUP_S - 1.0, 1.0))
            s2 = step.snapshot()
            connections = step.pg_connections()
            sent = json.loads(sender.communicate(timeout=step.seconds + 60)[0])
            rtp_load._caught_up(step.nodes[0])
            udp1 = rtp_load._udp_errors()
            drain = asyncio.run(hang_up_and_drain(step, calls, sampler, timeout=90 + len(calls) / 5))
            s3 = step.snapshot()
        inventory = step.weed.inventory(step.bucket)
    finally:
        if sender is not None and sender.poll() is None:
            sender.kill()
            sender.wait()
        _stop_nodes(step)
    deliveries = step.hooks.take()
    row = {"per_node": step.per_node, "calls": len(calls)}
    row |= _calls_figures(calls, drain["rows"], sent, targets, step.seconds, s3, udp0, udp1)
    row |= _cpu_figures(step, (idle0, idle1), s1, s2, s3, sent["cpu_s"] / sent["wall_s"])
    row |= _catalog_figures(idle0, idle1, opened, s1, s2, s3, len(live), sampler, connections)
    row |= _webhook_figures(deliveries, drain, live, sampler, step.hooks.bad_signatures)
    row |= _s3_figures(opened, s3, len(live), inventory)
    row["open_s"] = rnd(opened.at - idle1.at, 2)
    row["refused_examples"] = sorted({call.error for call in calls if call.error})[:3]
    row["failures"] = failures(row)
    return row


def _calls_figures(calls: list[Call], rows: list[dict[str, Any]], sent: dict[str, Any], targets: list[int],
                   seconds: float, end: Snapshot, udp0: dict[str, int], udp1: dict[str, int]) -> dict[str, Any]:
    """Every recording judged: stored, each leg's packets all counted, its duration within
    DURATION_TOLERANCE_S of how long it ran (record/start answered to hangup answered)."""
    expected = dict(zip(targets, expected_packets(len(targets), seconds)))
    by_id = {row["recording_id"]: row for row in rows}
    stored = bad_duration = short_legs = 0
    received, errors, durations = 0, [], []
    for call in (c for c in calls if c.recording_id):
        row = by_id.get(call.recording_id)
        if row is None or row["state"] != "completed":
            continue
        stored += 1
        legs = {leg["role"]: leg for leg in row["legs"]}
        counted = [legs.get(role, {}).get("packets", 0) for role in ("caller", "callee")]
        received += sum(counted)
        short_legs += sum(got < expected[port] for got, port in zip(counted, call.ports))
        ran = call.ended_at - call.recording_since
        errors.append(abs((row["duration"] or 0.0) - ran))
        durations.append(row["duration"] or 0.0)
        bad_duration += errors[-1] > DURATION_TOLERANCE_S
    late = [m.get('mediaserver_input_dropped_total{reason="late_samples"}', 0.0) for m in end.metrics]
    return {
        "opened": sum(bool(c.recording_id) for c in calls), "refused": sum(not c.recording_id for c in calls),
        "stored": stored, "failed_recordings": sum(row["state"] == "failed" for row in rows),
        "bad_duration": bad_duration, "duration_error_max_s": rnd(max(errors, default=0.0), 3),
        "duration_mean_s": rnd(sum(durations) / len(durations), 2) if durations else None, "short_legs": short_legs,
        "packets_sent": sent["packets_sent"], "packets_received": received,
        "packets_dropped": sent["packets_sent"] - received, "send_errors": sent["send_errors"],
        "udp_rcvbuf_errors": udp1.get("RcvbufErrors", 0) - udp0.get("RcvbufErrors", 0),
        "late_samples": int(sum(late)),
        "sender_cpu_pct": rnd(sent["cpu_s"] / sent["wall_s"] * 100, 1), "sender_late_max_ms": rnd(sent["late_max_ms"], 1),
    }


def _cores(before: Snapshot, after: Snapshot, what: str) -> float:
    return (getattr(after, what) - getattr(before, what)) / (after.at - before.at)


def _node_cores(a: Snapshot, b: Snapshot) -> list[float]:
    return [(sb["cpu"] - sa["cpu"]) / (b.at - a.at) for sa, sb in zip(a.nodes, b.nodes)]


def _cpu_figures(step: Step, idle: tuple[Snapshot, Snapshot], s1: Snapshot, s2: Snapshot, s3: Snapshot,
                 sender_cores: float) -> dict[str, Any]:
    """Cores over the steady window, and per call net of what the idle node burns (its tick
    loops, heartbeats, polls); PostgreSQL and SeaweedFS net of their own idle cost too."""
    node_cores, node_idle = _node_cores(s1, s2), _node_cores(*idle)
    p99 = [rtp_load._lateness(a, b)["p99_ms"] for a, b in zip(s1.metrics, s2.metrics)]
    pg, weed = _cores(s1, s2, "pg_cpu"), _cores(s1, s2, "weed_cpu")
    return {
        "node_cores": [rnd(c, 3) for c in node_cores], "node_idle_cores": [rnd(c, 3) for c in node_idle],
        "cpu_per_call_pct": [rnd(max(c - i, 0.0) / step.per_node * 100, 3) for c, i in zip(node_cores, node_idle)],
        "rss_kib": [s["VmRSS"] for s in s2.nodes],
        "rss_per_call_kib": [rnd((b["VmRSS"] - a["VmRSS"]) / step.per_node, 1) for a, b in zip(idle[1].nodes, s2.nodes)],
        "tick_p99_ms": None if None in p99 else max(p99),
        "pg_cores": rnd(pg, 3), "pg_idle_cores": rnd(_cores(*idle, "pg_cpu"), 3),
        "weed_cores": rnd(weed, 3), "weed_idle_cores": rnd(_cores(*idle, "weed_cpu"), 3),
        "pg_cores_drain": rnd(_cores(s2, s3, "pg_cpu"), 3), "weed_cores_drain": rnd(_cores(s2, s3, "weed_cpu"), 3),
        "machine_cores_used": rnd(sum(node_cores) + pg + weed + sender_cores, 2),
        "machine_cores": len(os.sched_getaffinity(0)), "window_s": rnd(s2.at - s1.at, 2),
    }


def _catalog_delta(a: Snapshot, b: Snapshot, name: str) -> float:
    """Both nodes' `mediaserver_catalog_<name>_total` from `a` to `b`, less the benchmark's own reads."""
    total = sum(mb.get(f"mediaserver_catalog_{name}_total", 0.0) - ma.get(f"mediaserver_catalog_{name}_total", 0.0)
                for ma, mb in zip(a.metrics, b.metrics))
    if name == "reads":
        total -= sum(ob - oa for oa, ob in zip(a.own_reads, b.own_reads))
    return total


def _catalog_figures(idle0: Snapshot, idle1: Snapshot, opened: Snapshot, s1: Snapshot, s2: Snapshot, s3: Snapshot,
                     calls: int, sampler: Sampler, connections: int) -> dict[str, Any]:
    """Per call: from before the first call is opened until every webhook is delivered,
    less what the idle nodes do in that time; per second: over the steady window."""
    figures: dict[str, Any] = {}
    idle_s, life_s, window_s = idle1.at - idle0.at, s3.at - idle1.at, s2.at - s1.at
    for name in ("reads", "writes", "transactions"):
        background = _catalog_delta(idle0, idle1, name) / idle_s
        life = _catalog_delta(idle1, s3, name) - background * life_s
        figures[f"catalog_{name}_per_call"] = rnd(life / calls, 2) if calls else None
        figures[f"catalog_{name}_per_s"] = rnd(_catalog_delta(s1, s2, name) / window_s, 1)
        figures[f"catalog_{name}_idle_per_s"] = rnd(background, 2)
    figures["catalog_writes_open_per_call"] = rnd(_catalog_delta(idle1, opened, "writes") / calls, 2) if calls else None
    figures["catalog_retries"] = int(_catalog_delta(idle0, s3, "retries"))
    figures["writes_pending_peak"] = sampler.peak("pending", "steady")
    figures["writes_pending_peak_drain"] = sampler.peak("pending", "drain")
    figures["pg_connections"] = connections
    return figures


def _webhook_figures(deliveries: list[Delivery], drain: dict[str, Any], live: list[Call], sampler: Sampler,
                     bad_signatures: int) -> dict[str, Any]:
    """Each recording.completed exactly once; the rate the burst after the hangup drained at."""
    completed = Counter(d.recording_id for d in deliveries if d.kind == "recording.completed")
    wanted = {call.recording_id for call in live}
    ids = Counter(d.event_id for d in deliveries)
    burst = sorted(d.at - drain["began"] for d in deliveries if d.at >= drain["began"])
    span = burst[-1] if burst else 0.0
    per_second = Counter(int(at) for at in burst)
    return {
        "webhooks": len(deliveries), "webhook_kinds": dict(sorted(Counter(d.kind for d in deliveries).items())),
        "completed_once": sum(completed[rid] == 1 for rid in wanted),
        "completed_missing": sum(completed[rid] == 0 for rid in wanted),
        "completed_duplicated": sum(completed[rid] > 1 for rid in wanted),
        "events_duplicated": sum(count > 1 for count in ids.values()), "bad_signatures": bad_signatures,
        "burst_events": len(burst), "delivery_per_s": rnd(len(burst) / span, 1) if span > 0 else None,
        "delivery_peak_per_s": max(per_second.values(), default=0),
        "outbox_backlog_peak": max(sampler.peak("outbox", "drain"), sampler.peak("outbox", "open")),
        "stored_s": rnd(drain["stored_s"], 2), "drained_s": rnd(drain["delivered_s"], 2),
    }


def _s3_figures(opened: Snapshot, s3: Snapshot, calls: int, inventory: dict[str, int]) -> dict[str, Any]:
    requests = {kind: s3.s3.get(kind, 0.0) - opened.s3.get(kind, 0.0) for kind in sorted(set(s3.s3) | set(opened.s3))}
    total = sum(requests.values())
    return {"s3_requests": {kind: int(count) for kind, count in requests.items()},
            "s3_requests_per_call": rnd(total / calls, 2) if calls else None,
            "s3_per_call_by_type": {kind: rnd(count / calls, 2) for kind, count in requests.items()} if calls else {},
            "s3_failed": int(s3.s3_failed - opened.s3_failed), **inventory}


def failures(row: dict[str, Any]) -> list[str]:
    """What gave out at this step, by the resource that did: an empty list is a pass."""
    found = []
    if row["refused"]:
        found.append(f"refused calls ({row['refused']})")
    if row["packets_dropped"] or row["send_errors"] or row["short_legs"]:
        found.append(f"lost audio ({row['packets_dropped']} packets, {row['short_legs']} legs short)")
    if row["late_samples"] or row["tick_p99_ms"] is None or row["tick_p99_ms"] > rtp_load.LATENESS_MS:
        found.append(f"late audio ({row['late_samples']} samples, p99 tick {row['tick_p99_ms']} ms)")
    if row["stored"] != row["opened"] or row["bad_duration"]:
        found.append(f"recordings ({row['opened'] - row['stored']} not stored, {row['bad_duration']} wrong duration)")
    if row["writes_pending_peak"] > BACKLOG_LIMIT or row["catalog_retries"]:
        found.append(f"catalog backlog ({row['writes_pending_peak']:g} writes pending, {row['catalog_retries']} retries)")
    if row["s3_failed"] or row["failed_recordings"] or row["open_uploads"] or row["checkpoint_objects"]:
        found.append(f"S3 ({row['s3_failed']} 5xx, {row['open_uploads']} uploads and "
                     f"{row['checkpoint_objects']} checkpoints left)")
    if row["completed_once"] != row["stored"] or row["events_duplicated"] or row["bad_signatures"]:
        found.append(f"webhooks ({row['completed_missing']} missing, {row['completed_duplicated']} twice)")
    return found


# -- the report -----------------------------------------------------------------------------------


def _per_node(values: list[Any], spec: str) -> str:
    return "/".join(format(v, spec) if v is not None else "-" for v in values)


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    shown = [{**row, "cores": _per_node(row["node_cores"], ".2f"), "idle": _per_node(row["node_idle_cores"], ".2f"),
              "cpu_call": _per_node(row["cpu_per_call_pct"], ".3f"), "rss_call": _per_node(row["rss_per_call_kib"], ".0f"),
              "rss": _per_node([r // 1024 for r in row["rss_kib"]], "d"), "ok": not row["failures"]} for row in rows]
    print_table(f"{title}: calls and audio", [
        ("per node", "per_node", ""), ("opened", "opened", ""), ("refused", "refused", ""), ("stored", "stored", ""),
        ("bad dur", "bad_duration", ""), ("dur err s", "duration_error_max_s", ".2f"), ("dropped", "packets_dropped", ""),
        ("late smp", "late_samples", ""), ("p99 ms", "tick_p99_ms", "g"), ("open s", "open_s", ".1f"),
        ("stored s", "stored_s", ".1f"), ("sender CPU %", "sender_cpu_pct", ".0f"), ("ok", "ok", "")], shown)
    print_table(f"{title}: CPU (cores over the steady window) and memory", [
        ("per node", "per_node", ""), ("node cores A/B", "cores", ""), ("idle A/B", "idle", ""),
        ("CPU %/call A/B", "cpu_call", ""), ("RSS MiB A/B", "rss", ""), ("KiB/call A/B", "rss_call", ""),
        ("PG cores", "pg_cores", ".3f"), ("PG idle", "pg_idle_cores", ".3f"), ("S3 cores", "weed_cores", ".3f"),
        ("S3 idle", "weed_idle_cores", ".3f"), ("PG drain", "pg_cores_drain", ".3f"), ("S3 drain", "weed_cores_drain", ".3f"),
        ("machine", "machine_cores_used", ".2f")], shown)
    print_table(f"{title}: catalog (both nodes), webhooks and S3", [
        ("per node", "per_node", ""), ("reads/call", "catalog_reads_per_call", ".1f"),
        ("writes/call", "catalog_writes_per_call", ".1f"), ("tx/call", "catalog_transactions_per_call", ".1f"),
        ("reads/s", "catalog_reads_per_s", ".0f"), ("writes/s", "catalog_writes_per_s", ".0f"),
        ("tx/s", "catalog_transactions_per_s", ".0f"), ("pending peak", "writes_pending_peak", "g"),
        ("PG conns", "pg_connections", ""), ("hooks/s", "delivery_per_s", ".0f"),
        ("backlog peak", "outbox_backlog_peak", "g"), ("completed once", "completed_once", ""),
        ("S3 req/call", "s3_requests_per_call", ".1f"), ("S3 5xx", "s3_failed", "")], shown)
    for row in rows:
        if row["failures"]:
            print(f"  {row['per_node']} per node failed: {'; '.join(row['failures'])}"
                  + (f" (e.g. {row['refused_examples'][0]})" if row["refused_examples"] else ""))


def _per_1000(cores: float, idle: float, calls: int) -> float | None:
    return rnd(max(cores - idle, 0.0) / calls * 1000, 3) if calls else None


def capacity(row: dict[str, Any], checkpoint_s: float) -> dict[str, Any]:
    """What README's capacity model takes, from one step: per call, per node, per core."""
    duration = row["duration_mean_s"] or RUN_S
    # Checkpoints come at most checkpoint_s apart, so a call of d seconds takes ceil(d / checkpoint_s).
    checkpoints = math.ceil(duration / checkpoint_s)
    return {
        "from_step_per_node": row["per_node"], "recording_mean_s": duration,
        "catalog_writes_per_call": row["catalog_writes_per_call"],
        "catalog_transactions_per_call": row["catalog_transactions_per_call"],
        "catalog_reads_per_call": row["catalog_reads_per_call"],
        "catalog_writes_per_s_per_call_held": rnd(row["catalog_writes_per_s"] / row["opened"], 3) if row["opened"] else None,
        "s3_requests_per_call": row["s3_requests_per_call"],
        "s3_requests_per_call_by_type": {kind: n for kind, n in row["s3_per_call_by_type"].items() if n},
        "s3_derived_per_call": {"checkpoint_puts": checkpoints, "object_put": 1, "checkpoint_list": 1,
                                "checkpoint_delete": 1, "total": checkpoints + 3},
        "objects_per_call_at_rest": rnd(row["objects"] / row["stored"], 2) if row["stored"] else None,
        "connections_per_node": connections_per_node(), "pg_connections_measured": row["pg_connections"],
        "server_cpu_per_call_pct": row["cpu_per_call_pct"],
        "pg_cores_per_1000_calls": _per_1000(row["pg_cores"], row["pg_idle_cores"], row["opened"]),
        "s3_cores_per_1000_calls": _per_1000(row["weed_cores"], row["weed_idle_cores"], row["opened"]),
        "machine_cores_used": row["machine_cores_used"], "machine_cores": row["machine_cores"],
    }


def print_capacity(model: dict[str, Any]) -> None:
    conns, derived = model["connections_per_node"], model["s3_derived_per_call"]
    print(f"\nCAPACITY (from the {model['from_step_per_node']}-calls-per-node step; recordings "
          f"{model['recording_mean_s']} s on average):")
    print(f"  catalog per call: {model['catalog_writes_per_call']} writes in {model['catalog_transactions_per_call']} "
          f"transactions, {model['catalog_reads_per_call']} reads; while held, "
          f"{model['catalog_writes_per_s_per_call_held']} writes/s per call")
    print(f"  S3 per call: {model['s3_requests_per_call']} requests counted by SeaweedFS "
          f"{model['s3_requests_per_call_by_type']}; derived from checkpoint_s and the duration: {derived['total']} "
          f"({derived['checkpoint_puts']} checkpoint PUTs + 1 PutObject, the MP3 being below one part, + 1 LIST "
          f"and 1 DeleteObjects of the checkpoints); {model['objects_per_call_at_rest']} objects per call at rest")
    print(f"  PostgreSQL connections per node: {conns['total']} at most (pool {conns['pool']} + writer + leader); "
          f"measured for the two nodes: {model['pg_connections_measured']}")
    print(f"  CPU per 1000 calls held, net of idle: PostgreSQL {model['pg_cores_per_1000_calls']} cores, SeaweedFS "
          f"{model['s3_cores_per_1000_calls']} cores; server {_per_node(model['server_cpu_per_call_pct'], '.3f')} % of a "
          f"core per call (A/B); the machine {model['machine_cores_used']} of {model['machine_cores']} cores busy")


def effective_settings() -> dict[str, Any]:
    config = Config()
    return {**rtp_load.effective_settings(rtp_load.server_settings()), "catalog": "postgres", "storage": "s3",
            "checkpoint_s": config.checkpoint_s, "node_timeout_s": config.node_timeout_s,
            "connections_per_node": connections_per_node()}


def summary(rows: list[dict[str, Any]]) -> str:
    best = 0
    for row in rows:
        if row["failures"]:
            break
        best = row["per_node"]
    text = f"{best} calls per node pass ({2 * best} on the two nodes)"
    if best:
        row = next(r for r in rows if r["per_node"] == best)
        text += (f": nodes {_per_node(row['node_cores'], '.2f')} cores, PostgreSQL {row['pg_cores']} cores, "
                 f"SeaweedFS {row['weed_cores']} cores, {row['machine_cores_used']} of {row['machine_cores']} cores "
                 f"busy; {row['catalog_writes_per_call']} catalog writes and {row['s3_requests_per_call']} S3 requests "
                 f"per call; webhooks {row['delivery_per_s']}/s")
    first_fail = next((r for r in rows if r["failures"]), None)
    if first_fail is not None:
        text += f"; first to give out at {first_fail['per_node']} per node: {'; '.join(first_fail['failures'])}"
    return text


def run(quick: bool) -> dict[str, Any]:
    ramp = QUICK_RAMP_PER_NODE if quick else RAMP_PER_NODE
    work = fresh_work("cluster_load")
    payload, _ = audio.speech_legs(work, 60)
    settings = effective_settings()
    print(f"cluster_load: node settings {settings}", flush=True)
    rows: list[dict[str, Any]] = []
    pg, weed, hooks = LocalPostgres(settings=PG_SETTINGS), Weed(work / "seaweedfs"), HookReceiver(WEBHOOK_SECRET)
    try:
        pg.start()
        weed.start()
        hooks.start()
        for index, per_node in enumerate(ramp):
            print(f"cluster_load: {per_node} calls per node for {RUN_S:.0f} s …", flush=True)
            rows.append(measure(Step(per_node, RUN_S, work, payload, pg, weed, hooks), index))
            print_rows("so far", rows[-1:])
            if len(rows) >= FAILING_STEPS_TO_STOP and all(r["failures"] for r in rows[-FAILING_STEPS_TO_STOP:]):
                break
    finally:
        hooks.stop()
        weed.stop()
        pg.close()
    print_rows("Cluster load (two nodes; a fresh database, bucket and nodes per step)", rows)
    basis = next((r for r in reversed(rows) if not r["failures"]), rows[-1])
    model = capacity(basis, settings["checkpoint_s"])
    print_capacity(model)
    line = summary(rows)
    print(f"\nSUMMARY cluster_load: {line}", flush=True)
    steps = len(rows)
    once = sum(r["completed_once"] for r in rows) / max(sum(r["stored"] for r in rows), 1) * 100
    verdicts = [verdict("each stored recording's recording.completed delivered exactly once, at every step", rnd(once, 2),
                        100.0, " %", detail=f"{steps} steps" + ("; quick: one small step" if quick else ""))]
    settings_out = {"ramp_per_node": list(ramp), "audio_s": RUN_S, "warmup_s": rtp_load.WARMUP_S, "idle_s": IDLE_S,
                    "record": rtp_load.RECORD, "codec": "PCMU 20 ms, RTP legs", "node_settings": settings,
                    "postgres_settings": PG_SETTINGS, "duration_tolerance_s": DURATION_TOLERANCE_S,
                    "backlog_limit": BACKLOG_LIMIT, "lateness_limit_ms": rtp_load.LATENESS_MS,
                    "stream_ramp_s": rtp_load.STREAM_RAMP_S}
    return {"settings": settings_out, "figures": {"steps": rows, "capacity": model, "summary": line},
            "verdicts": verdicts}
