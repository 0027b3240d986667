"""Call control: the layer that owns each call and talks to the engine through one `Leg`
per leg (`mediaserver.recorder.legs`).

- `rtp`: RTP legs by SDP offer/answer, their ports and their statistics.
- `sip`: the SIP UAS; every INVITE becomes a session whose streams are RTP legs.
- `whip`: a WebRTC leg per WHIP offer, and where its decoded audio goes.
- `streams`: the wavstream and Twilio Media Streams loops over a WebSocket, with the
  backpressure that keeps a fast stream no further ahead of the mix than it should be.
- `sessions`: the session an ingest joins, made for it when it does not exist yet.

Nothing here speaks HTTP: a refusal is a domain error (`mediaserver.errors.Refused`),
which api/ answers with its status; api/ parses requests and calls in here.
"""
