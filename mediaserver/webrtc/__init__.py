"""WebRTC ingest (WHIP, RFC 9725) with aiortc: peer connections that only receive audio.

- `offer`: the SDP offer, checked before a peer connection exists (400 / 406 material).
- `ice`: ICE host candidates on the address the server listens on.
- `audio`: decoded frames to mono int16, lost packets to silence.
- `dtls`: the DTLS role and suites other stacks need, and the end of a stream drained.
- `peer`: one leg's receive-only peer connection and its receiving task.
- `service`: every peer of the process, and how each one ends.

Nothing here knows about sessions or HTTP: a leg's audio leaves through an `AudioSink`,
which the API layer points at the engine.
"""

from mediaserver.webrtc.offer import Offer, OfferError
from mediaserver.webrtc.peer import AudioSink, IngestPeer
from mediaserver.webrtc.service import WhipService

__all__ = ["AudioSink", "IngestPeer", "Offer", "OfferError", "WhipService"]
