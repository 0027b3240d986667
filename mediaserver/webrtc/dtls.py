"""What aiortc's receive path needs changed for WebRTC stacks other than its own.

DTLS roles and ciphers. aiortc answers an `a=setup:actpass` offer with `active`, so it
is the DTLS client, and its DTLS context offers only ECDHE-ECDSA suites: a peer whose
certificate is RSA (GStreamer's webrtcbin) can pick none of them and ends the handshake
with "no shared cipher". So the server takes the passive role whenever the offer leaves
the choice to it. RFC 5763 §5 recommends an active answerer, so that the handshake can
start as the answer arrives; a WHIP answer reaches the client in the response to its
own POST, so being passive costs at most one round trip, and it lets the client's suite
list meet our ECDSA certificate. For a client that insists on being the DTLS server
(`a=setup:passive`), the server's own suite list takes the ECDHE-RSA suites as well.

The end of a stream. aiortc's audio jitter buffer holds the newest packets (prefetch 4)
until later ones push them out; when the stream ends it stops the decoder and whatever
the buffer still holds is never decoded, so every leg would lose its last four packets
(80 ms at 20 ms packets, 512 ms at 128 ms). `drain_on_stop()` hands the buffered
packets to the decoder, in sequence order, just before the decoder is told to stop.

Both reach into aiortc's private state (name-mangled attributes), checked as each peer
is set up, so that an aiortc that no longer has them fails loudly and at once.
"""

from __future__ import annotations

from aiortc import RTCPeerConnection, RTCRtpReceiver
from aiortc.jitterbuffer import JitterBuffer, JitterFrame

# Forward-secret (ECDHE) suites only, as WebRTC requires; the SHA-1 ones are aiortc's own fallbacks.
CIPHERS = b":".join([
    b"ECDHE-ECDSA-AES128-GCM-SHA256", b"ECDHE-RSA-AES128-GCM-SHA256",
    b"ECDHE-ECDSA-AES256-GCM-SHA384", b"ECDHE-RSA-AES256-GCM-SHA384",
    b"ECDHE-ECDSA-CHACHA20-POLY1305", b"ECDHE-RSA-CHACHA20-POLY1305",
    b"ECDHE-ECDSA-AES128-SHA", b"ECDHE-RSA-AES128-SHA", b"ECDHE-ECDSA-AES256-SHA", b"ECDHE-RSA-AES256-SHA",
])
AUDIO_CAPACITY, AUDIO_PREFETCH = 16, 4  # aiortc's own audio jitter buffer


def _private(owner: object, cls: type, name: str):
    attribute = f"_{cls.__name__}__{name}"
    if not hasattr(owner, attribute):
        raise RuntimeError(f"aiortc's {cls.__name__} has no {name}: this aiortc version is not supported")
    return attribute


def accept_rsa_peers(pc: RTCPeerConnection) -> None:
    """Offer ECDHE-RSA suites as well as aiortc's ECDHE-ECDSA ones, on this peer's certificates."""
    for certificate in getattr(pc, _private(pc, RTCPeerConnection, "certificates")):
        make_context = certificate._create_ssl_context

        def with_rsa(srtp_profiles, make_context=make_context):
            context = make_context(srtp_profiles)
            context.set_cipher_list(CIPHERS)
            return context

        certificate._create_ssl_context = with_rsa


def answer_passive(receiver: RTCRtpReceiver, offered_setup: str | None) -> None:
    """Be the DTLS server when the offer lets the answerer choose (actpass, or no a=setup)."""
    if offered_setup in (None, "actpass"):
        receiver.transport._set_role("server")


class DrainingJitterBuffer(JitterBuffer):
    """aiortc's audio jitter buffer, which can also give up everything it holds."""

    def __init__(self) -> None:
        super().__init__(capacity=AUDIO_CAPACITY, prefetch=AUDIO_PREFETCH)

    def drain(self) -> list[tuple[int, JitterFrame]]:
        """(payload type, frame) of every packet still held, in sequence order; empties it."""
        if self._origin is None:
            return []
        frames: list[tuple[int, JitterFrame]] = []
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self.capacity]
            if packet is not None:  # a hole is a packet lost: the decoder's clock shows the gap
                frames.append((packet.payload_type, JitterFrame(data=packet._data, timestamp=packet.timestamp)))
        self.remove(self.capacity)
        return frames


def drain_on_stop(receiver: RTCRtpReceiver) -> None:
    """Have `receiver` decode the packets its jitter buffer still holds when its stream ends."""
    names = {name: _private(receiver, RTCRtpReceiver, name)
             for name in ("jitter_buffer", "stop_decoder", "decoder_thread", "decoder_queue", "codecs", "timestamp_mapper")}
    buffer = DrainingJitterBuffer()
    setattr(receiver, names["jitter_buffer"], buffer)
    stop_decoder = getattr(receiver, names["stop_decoder"])

    def drain_then_stop() -> None:
        if getattr(receiver, names["decoder_thread"]) is not None:
            codecs, mapper = getattr(receiver, names["codecs"]), getattr(receiver, names["timestamp_mapper"])
            queue = getattr(receiver, names["decoder_queue"])
            for payload_type, frame in buffer.drain():
                codec = codecs.get(payload_type)
                if codec is not None:
                    frame.timestamp = mapper.map(frame.timestamp)
                    queue.put((codec, frame))
        stop_decoder()

    setattr(receiver, names["stop_decoder"], drain_then_stop)
