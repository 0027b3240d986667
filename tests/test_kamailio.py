"""Kamailio, run from the repository's deploy/kamailio/kamailio.cfg, in front of two real
server processes: calls are spread over the nodes by Call-ID and recorded where they
land; the ACK and BYE follow Record-Route to the node that answered while the RTP goes
to that node directly; a killed node gets no new calls; a full node's calls (503) are
tried on the other; a CANCEL reaches the node that rings."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import shutil
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from audio import noise
from servers import Server, free_port, free_udp_range
from serverproc import ServerProcess
from sip_peers import Recorded, recordings, run_sipp, scenario, sipp_available

from mediaserver.codecs import g711
from mediaserver.tools.kamailio import Kamailio

pytestmark = [
    pytest.mark.skipif(not sipp_available(), reason="SIPp (sip-tester) is not installed"),
    pytest.mark.skipif(shutil.which("kamailio", path="/usr/sbin:/usr/bin") is None, reason="kamailio is not installed"),
    pytest.mark.timeout(180),
]

RATE = 8000
RTP_PORTS = 80  # per node: two ports per call, with room to spare
CALL_S = 3.0
CALL_MS = 3100  # the BYE 100 ms after the stream's end
GRAM = 8  # consecutive samples of noise that are found once in three seconds of it
PROBE_WAIT_S = 20.0  # how long Kamailio may take to see a node die (it probes every second)
_ANSWERED = re.compile(r"answered (\S+) contact sip:[^@\s]*@?([\d.]+):(\d+)\S* media ([\d.]+) (\d+)")


class Node:
    """A server process of the cluster (its own SIP port, RTP range and data directory),
    with the API helpers of `servers.Server`."""

    headers = Server.headers
    api = Server.api
    wait_recording = Server.wait_recording
    download = Server.download

    def __init__(self, root: Path, rtp_ports: tuple[int, int], **settings: Any) -> None:
        self.sip_port = free_port(socket.SOCK_DGRAM)
        self.rtp_ports = rtp_ports
        self.process = ServerProcess(root / "data", rtp_ports=rtp_ports, sip_port=self.sip_port,
                                     **{"record_policy": "all", **settings})
        self.http: aiohttp.ClientSession | None = None

    @property
    def uri(self) -> str:
        return f"sip:127.0.0.1:{self.sip_port}"

    async def start(self) -> None:
        await asyncio.to_thread(self.process.start)
        self.http = aiohttp.ClientSession(self.process.base_url)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None
        await asyncio.to_thread(self.process.stop)

    def kill(self) -> None:
        """SIGKILL, as a machine that dies: no goodbye to Kamailio or to the calls."""
        self.process.kill()

    async def sessions(self) -> list[dict]:
        status, data, _ = await self.api("GET", "/api/v1/sessions?limit=100")
        assert status == 200, data
        return data["data"]

    async def refused(self) -> int:
        """How many new calls it refused for being full (its /metrics)."""
        status, body, _ = await self.api("GET", "/metrics")
        assert status == 200
        found = re.search(r'^mediaserver_calls_refused_total\{reason="server.full"\} (\d+)$', body.decode(), re.MULTILINE)
        return int(found.group(1)) if found else 0


@dataclass
class Cluster:
    """The nodes and the Kamailio in front of them."""

    nodes: list[Node]
    proxy: Kamailio

    @property
    def target(self) -> str:
        return f"{self.proxy.host}:{self.proxy.port}"


@contextlib.asynccontextmanager
async def start_cluster(tmp_path: Path, *settings: dict[str, Any]) -> AsyncIterator[Cluster]:
    """Two nodes (settings of each on top of record_policy = all) and Kamailio in front,
    every process stopped on the way out, whatever happened."""
    low, _ = free_udp_range(RTP_PORTS * len(settings))
    nodes = [Node(tmp_path / f"node{i}", (low + i * RTP_PORTS, low + (i + 1) * RTP_PORTS - 1), **own)
             for i, own in enumerate(settings)]
    proxy = Kamailio(free_port(socket.SOCK_DGRAM), [node.uri for node in nodes], tmp_path / "kamailio")
    try:
        for node in nodes:
            await node.start()
        await asyncio.to_thread(proxy.start)
        await wait_for_flags(proxy, {node.uri: "A" for node in nodes})
        yield Cluster(nodes, proxy)
    finally:
        await asyncio.to_thread(proxy.stop)
        for node in nodes:
            await node.close()


async def wait_for_flags(proxy: Kamailio, wanted: dict[str, str], timeout: float = PROBE_WAIT_S) -> dict[str, str]:
    """Until each node's dispatcher flags are the state wanted (A active, I inactive) and
    P: it is being probed (a node not yet probed is shown AX)."""
    deadline = time.monotonic() + timeout
    while True:
        flags = await asyncio.to_thread(proxy.destinations)
        if all(flags.get(uri) == f"{state}P" for uri, state in wanted.items()):
            return flags
        assert time.monotonic() < deadline, f"dispatcher flags stayed {flags}, not {wanted}:\n{proxy.log_tail()}"
        await asyncio.sleep(0.1)


def ulaw_file(tmp_path: Path, samples: np.ndarray) -> Path:
    path = tmp_path / "audio.ulaw"
    path.write_bytes(g711.encode_ulaw(samples))
    return path


@dataclass(frozen=True)
class Answer:
    """Who answered a call, as SIPp saw the 200: its Contact and where its SDP said to send RTP."""

    contact: tuple[str, int]
    media: tuple[str, int]


async def call_through(group: Cluster, tmp_path: Path, calls: int, sent: np.ndarray, name: str) -> dict[str, Answer]:
    """`calls` concurrent SIPp calls to Kamailio, each streaming `sent`; every one must
    succeed. What answered each, by Call-ID."""
    workdir = tmp_path / name
    workdir.mkdir()
    path = scenario(workdir, "uac_proxied.xml", ulaw_file=ulaw_file(workdir, sent))
    result = await run_sipp(None, path, workdir, calls=calls, sets={"call_ms": CALL_MS}, timeout_s=60,
                            target=group.target, extra=("-trace_logs",))
    assert result.returncode == 0, f"{result.output}\n{group.proxy.log_tail()}"
    answers = {}
    for log in workdir.glob("*_logs.log"):
        for call_id, host, port, media_host, media_port in _ANSWERED.findall(log.read_text()):
            answers[call_id] = Answer((host, int(port)), (media_host, int(media_port)))
    assert len(answers) == calls, f"SIPp logged {len(answers)} answers of {calls} calls"
    return answers


async def recorded(node: Node, calls: int) -> list[tuple[dict, Recorded]]:
    """The node's sessions with their one recording each, once all `calls` have ended."""
    found = await recordings(node, sessions=calls) if calls else []
    sessions = {session["uuid"]: session for session in await node.sessions()}
    assert len(found) == calls, f"{len(found)} recordings of {calls} calls"
    return [(sessions[recording.meta["session_uuid"]], recording) for recording in found]


def assert_holds(recording: Recorded, sent: np.ndarray) -> None:
    """Nearly every 20 ms frame sent is in the recording sample for sample, and the
    recording is about as long as the call. Loosely: where each frame sits, and why one
    may be missing on a busy machine, is judged in test_sip_sipp.py."""
    audio = recording.audio[:, 0].astype("<i2").tobytes()
    sent = g711.decode_ulaw(g711.encode_ulaw(sent)).astype("<i2").tobytes()
    gram, frame = 2 * GRAM, 2 * RATE // 50  # in bytes
    grams = {audio[at:at + gram] for at in range(0, len(audio) - gram + 1, 2)}
    frames = range(0, len(sent) - frame + 1, frame)
    found = sum(sent[at:at + gram] in grams for at in frames)
    assert found >= 0.9 * len(frames), f"{found} of the {len(frames)} frames sent are in the recording"
    assert recording.meta["duration"] == pytest.approx(CALL_MS / 1000, abs=0.5)


async def test_calls_spread_over_both_nodes_each_recorded_where_it_landed(tmp_path):
    """20 calls through Kamailio: both nodes take some; each is recorded on the node that
    answered it, holding what was sent; its INVITE came from Kamailio, its ACK and BYE
    reached that node through Kamailio (Record-Route), and its SDP answer is the node's
    own, so the RTP went to the node directly."""
    sent = noise(CALL_S, seed=13, dbfs=-18)
    async with start_cluster(tmp_path, {}, {}) as group:
        answers = await call_through(group, tmp_path, 20, sent, "calls")
        per_node = [await node.sessions() for node in group.nodes]
        counts = [len(sessions) for sessions in per_node]
        assert sum(counts) == 20 and all(counts), f"calls per node: {counts}"
        for node, count in zip(group.nodes, counts):
            for session, recording in await recorded(node, count):
                sip = session["metadata"]["sip"]
                answer = answers[sip["call_id"]]
                # The INVITE (and so the dialog's flow) came from Kamailio, not from SIPp.
                assert sip["remote"] == group.target
                # The 200's Contact and SDP are the node's: the ACK, the BYE and the RTP
                # went there (SIPp sends every request to Kamailio; RTP it sends to the SDP).
                assert answer.contact == ("127.0.0.1", node.sip_port)
                assert answer.media[0] == "127.0.0.1" and node.rtp_ports[0] <= answer.media[1] <= node.rtp_ports[1]
                # The call ended by the BYE SIPp sent, about CALL_MS after the answer.
                assert recording.meta["state"] == "completed"
                assert_holds(recording, sent)
    print(f"calls per node: {counts}")


async def test_a_killed_node_gets_no_new_calls(tmp_path):
    """A node killed: the calls placed at once still all succeed (one sent to the dead
    node goes to the other after fr_timer); within a bounded wait Kamailio marks it
    inactive; every call after that lands on the survivor at once. With no node left,
    Kamailio answers 503 with Retry-After itself."""
    sent = noise(CALL_S, seed=14, dbfs=-18)
    async with start_cluster(tmp_path, {}, {}) as group:
        dead, survivor = group.nodes
        dead.kill()
        await call_through(group, tmp_path, 6, sent, "right-after")
        await wait_for_flags(group.proxy, {dead.uri: "I", survivor.uri: "A"})
        answers = await call_through(group, tmp_path, 10, sent, "after")
        assert {answer.contact for answer in answers.values()} == {("127.0.0.1", survivor.sip_port)}
        found = await recorded(survivor, 16)
        for _, recording in found:
            assert_holds(recording, sent)
        timeouts = group.proxy.log.read_text().count(f"node {dead.uri} did not answer")
        survivor.kill()  # and then there were none: Kamailio says so itself
        status, reason, headers = await asyncio.to_thread(invite, group.proxy.host, group.proxy.port)
    assert (status, reason, headers.get("retry-after")) == (503, "No Node Available", "5"), headers
    print(f"calls that timed out on the dead node and went to the survivor: {timeouts}")


async def test_a_full_node_has_its_calls_tried_on_the_other(tmp_path):
    """A node at its max_calls answers 503 with Retry-After: Kamailio tries the other node,
    and keeps the full one in its list (it is alive). When every node is full, the caller
    hears a node's 503 with its Retry-After."""
    sent = noise(CALL_S, seed=15, dbfs=-18)
    async with start_cluster(tmp_path, {"max_calls": 1}, {"max_calls": 12}) as group:
        full, other = group.nodes
        held = await full.api("POST", "/api/v1/sessions", json={})
        assert held[0] == 201, held  # the full node's one call
        answers = await call_through(group, tmp_path, 12, sent, "calls")
        assert {answer.contact for answer in answers.values()} == {("127.0.0.1", other.sip_port)}
        assert await full.refused() > 0  # some calls did go to it first
        for _, recording in await recorded(other, 12):
            assert_holds(recording, sent)
        assert (await asyncio.to_thread(group.proxy.destinations))[full.uri].startswith("A")
        for _ in range(12):
            assert (await other.api("POST", "/api/v1/sessions", json={}))[0] == 201
        status, reason, headers = await asyncio.to_thread(invite, group.proxy.host, group.proxy.port)
    # The node's own answer (Kamailio's, when it has no node, is "No Node Available").
    assert (status, reason, headers.get("retry-after")) == (503, "Service Unavailable", "5"), headers


async def test_cancel_reaches_the_node_that_rings(tmp_path):
    """A CANCEL sent to Kamailio while the node rings: 200 for the CANCEL, 487 for the
    INVITE (both through Kamailio), and no session is left on either node."""
    async with start_cluster(tmp_path, {"sip_answer_delay_ms": 1500}, {"sip_answer_delay_ms": 1500}) as group:
        result = await run_sipp(None, scenario(tmp_path, "uac_cancel.xml"), tmp_path, target=group.target)
        assert result.returncode == 0, f"{result.output}\n{group.proxy.log_tail()}"
        # A ringing node sets nothing up before it answers: cancelled, no session at all.
        assert [await node.sessions() for node in group.nodes] == [[], []]


def invite(host: str, port: int, timeout: float = 10.0) -> tuple[int, str, dict[str, str]]:
    """One INVITE over UDP: the final status, reason and headers (lower-case names); a
    failure response is acknowledged."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.settimeout(timeout)
        local = sock.getsockname()[1]
        branch, tag, call_id = "z9hG4bK" + secrets.token_hex(8), secrets.token_hex(4), secrets.token_hex(8)
        sdp = f"v=0\r\no=- 1 1 IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n"
        common = (f"Via: SIP/2.0/UDP {host}:{local};branch={branch};rport\r\nMax-Forwards: 70\r\n"
                  f"From: <sip:caller@{host}>;tag={tag}\r\n")
        sock.sendto((f"INVITE sip:app1@{host}:{port} SIP/2.0\r\n{common}To: <sip:app1@{host}:{port}>\r\n"
                     f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:caller@{host}:{local}>\r\n"
                     f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}").encode(), (host, port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, reason, headers = _response(sock.recv(65536))
            if status >= 200:
                if status >= 300:
                    sock.sendto((f"ACK sip:app1@{host}:{port} SIP/2.0\r\n{common}To: {headers['to']}\r\n"
                                 f"Call-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n").encode(), (host, port))
                return status, reason, headers
    raise AssertionError("no final response to the INVITE")


def _response(data: bytes) -> tuple[int, str, dict[str, str]]:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    start, *lines = head.split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    _, status, reason = start.split(" ", 2)
    return int(status), reason, headers
