"""A WHIP client made of GStreamer's webrtcbin, run by the system Python (python3-gi).

    /usr/bin/python3 tests/gst_whip_client.py URL WAV --codec opus|pcmu --ptime-ms N [--bearer KEY]
        [--setup passive]

Publishes the WAV file in real time with webrtcbin's default offer (its own DTLS
certificate, RSA, and `a=setup:actpass`; `passive` with --setup), waits for ICE
gathering to finish (no trickle), POSTs the offer, applies the answer, and after the
file's end of stream waits a moment and DELETEs the leg. The file starts once the peer
connection is up and is paced where it is read (`identity sync=true`), so its end of
stream comes when its last packet is sent, not when it has been read into a queue. ICE
gathers on `--local-address` only (127.0.0.1). Prints one JSON line: the status of the
POST and the DELETE, the RTP packets the payloader sent (counted on its source pad),
the offer and the answer.
Exits non-zero when the pipeline fails or the file does not play out in time.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import urllib.error
import urllib.request

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstSdp", "1.0")
gi.require_version("GstWebRTC", "1.0")
gi.require_version("Nice", "0.1")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC, Nice  # noqa: E402

AFTER_EOS_S = 0.5  # the last packets on their way before the DELETE
ENCODERS = {
    "opus": "audioresample ! audio/x-raw,rate=48000 ! opusenc frame-size={ptime} ! rtpopuspay name=pay pt=111 ! "
            "application/x-rtp,media=audio,encoding-name=OPUS,payload=111",
    "pcmu": "audioresample ! audio/x-raw,rate=8000,channels=1 ! mulawenc ! "
            "rtppcmupay name=pay pt=0 min-ptime={ns} max-ptime={ns} ! application/x-rtp,media=audio,encoding-name=PCMU,payload=0",
}


def request(method: str, url: str, headers: dict[str, str], body: bytes | None = None) -> tuple[int, str, dict]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=20) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)
    except urllib.error.URLError as exc:
        return 0, str(exc.reason), {}


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.headers = {"Authorization": f"Bearer {args.bearer}"} if args.bearer else {}
        self.result: dict = {"packets": 0}
        self.loop = GLib.MainLoop()
        encoder = ENCODERS[args.codec].format(ptime=args.ptime_ms, ns=args.ptime_ms * 1_000_000)
        self.pipeline = Gst.parse_launch(
            f"filesrc location={args.wav} ! wavparse ! audioconvert ! identity sync=true ! {encoder} ! webrtcbin name=send")
        self.webrtc = self.pipeline.get_by_name("send")
        self._gather_on(args.local_address)
        # The file waits until the peer connection is up, so that none of it is sent
        # before there is anyone to receive it.
        self.gate = self.pipeline.get_by_name("pay").get_static_pad("sink")
        self.blocked = self.gate.add_probe(Gst.PadProbeType.BLOCK | Gst.PadProbeType.BUFFER, lambda pad, info: Gst.PadProbeReturn.OK)
        self.webrtc.connect("notify::connection-state", self._connection)
        pad = self.pipeline.get_by_name("pay").get_static_pad("src")
        pad.add_probe(Gst.PadProbeType.BUFFER, self._count)
        # webrtcbin posts no EOS message of its own: the end of the file is seen here.
        pad.add_probe(Gst.PadProbeType.EVENT_DOWNSTREAM, self._event)
        self.webrtc.connect("on-negotiation-needed", self._negotiate)
        self.webrtc.connect("notify::ice-gathering-state", self._gathering)
        bus = self.pipeline.get_bus()
        bus.add_signal_watch()
        bus.connect("message", self._message)

    def _gather_on(self, address: str) -> None:
        # libnice leaves loopback out of its host candidates, like aioice; a server bound
        # to loopback is reachable only there, so the agent is given that address alone.
        self.ice = self.webrtc.get_property("ice-agent")  # kept: PyGObject drops a reference per get
        self.ice.set_property("ice-tcp", False)
        self.agent = self.ice.get_property("agent")
        local = Nice.Address.new()
        if not local.set_from_string(address) or not self.agent.add_local_address(local):
            raise SystemExit(f"cannot gather ICE candidates on {address}")

    def _count(self, pad, info):
        self.result["packets"] += 1
        return Gst.PadProbeReturn.OK

    def _connection(self, element, _) -> None:
        state = element.get_property("connection-state")
        if state == GstWebRTC.WebRTCPeerConnectionState.CONNECTED and self.blocked is not None:
            self.gate.remove_probe(self.blocked)
            self.blocked = None
        elif state == GstWebRTC.WebRTCPeerConnectionState.FAILED:
            self.result["error"] = "the peer connection failed"
            GLib.idle_add(self._finish, 6)

    def _event(self, pad, info):
        if info.get_event().type == Gst.EventType.EOS:
            GLib.timeout_add(int(AFTER_EOS_S * 1000), self._delete)
        return Gst.PadProbeReturn.OK

    def _negotiate(self, element) -> None:
        promise = Gst.Promise.new_with_change_func(self._offer_made, element, None)
        element.emit("create-offer", None, promise)

    def _offer_made(self, promise, element, _) -> None:
        reply = promise.get_reply()
        offer = reply.get_value("offer") if reply.has_field("offer") else None
        if offer is None:
            self.result["error"] = f"create-offer failed: {reply.to_string()}"
            self._finish(5)
            return
        if self.args.setup != "actpass":
            # The client insists on a DTLS role: webrtcbin takes it from its local description.
            text = offer.sdp.as_text().replace("a=setup:actpass", f"a=setup:{self.args.setup}")
            _, message = GstSdp.SDPMessage.new_from_text(text)
            offer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.OFFER, message)
        element.emit("set-local-description", offer, Gst.Promise.new())

    def _gathering(self, element, _) -> None:
        if element.get_property("ice-gathering-state") == GstWebRTC.WebRTCICEGatheringState.COMPLETE:
            GLib.idle_add(self._post)

    def _post(self) -> bool:
        if "post" in self.result:
            return False
        sdp = self.webrtc.get_property("local-description").sdp.as_text()
        status, body, headers = request("POST", self.args.url, {**self.headers, "Content-Type": "application/sdp"},
                                        sdp.encode())
        self.result.update(post=status, offer=sdp, answer=body)
        if status != 201:
            self._finish(2)
            return False
        self.location = headers.get("Location")
        _, message = GstSdp.SDPMessage.new_from_text(body)
        answer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, message)
        self.webrtc.emit("set-remote-description", answer, Gst.Promise.new())
        return False

    def _message(self, bus, message) -> None:
        if message.type == Gst.MessageType.ERROR:
            error, debug = message.parse_error()
            self.result["error"] = f"{error.message} ({debug})"
            self._finish(3)

    def _delete(self) -> bool:
        if "delete" in self.result:
            return False
        base = self.args.url.split("/whip/")[0]
        status, _, _ = request("DELETE", base + self.location, self.headers)
        self.result["delete"] = status
        self._finish(0)
        return False

    def _finish(self, code: int) -> bool:
        self.result.setdefault("exit", code)
        self.loop.quit()
        return False

    def run(self, timeout_s: float) -> int:
        self.pipeline.set_state(Gst.State.PLAYING)
        timer = threading.Timer(timeout_s, lambda: GLib.idle_add(self._timeout))
        timer.start()
        try:
            self.loop.run()
        finally:
            timer.cancel()
            self.pipeline.set_state(Gst.State.NULL)
        print(json.dumps(self.result), flush=True)
        return self.result["exit"]

    def _timeout(self) -> bool:
        self.result["error"] = "timed out"
        self._finish(4)
        return False


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("wav")
    parser.add_argument("--codec", choices=sorted(ENCODERS), default="opus")
    parser.add_argument("--ptime-ms", type=int, default=20)
    parser.add_argument("--bearer")
    parser.add_argument("--local-address", default="127.0.0.1")
    parser.add_argument("--setup", choices=("actpass", "passive"), default="actpass")
    parser.add_argument("--timeout", type=float, default=40.0)
    args = parser.parse_args()
    Gst.init(None)
    return Client(args).run(args.timeout)


if __name__ == "__main__":
    sys.exit(main())
