"""SIPREC (RFC 7866): multipart INVITE, rs-metadata (RFC 7865), one session, and by
default one dual-channel recording in which each channel carries its own stream."""

from __future__ import annotations

import pytest

from audio import best_lag, correlation, noise, write_wav
from mediaserver.api.keys import CATALOG
from mediaserver.sip.siprec import MetadataError, MultipartError, RecordingMetadata, parse_multipart, stream_roles
from servers import Server
from sip_peers import SCENARIOS, LegWatcher, recordings, run_sipp, scenario, sender_sets, sipp_available

RATE = 8000


def metadata_xml() -> bytes:
    text = (SCENARIOS / "uac_siprec.xml").read_text()
    start, end = text.index("<?xml version=\"1.0\" encoding=\"UTF-8\"?>"), text.index("</recording>") + len("</recording>")
    return text[start:end].encode()


def test_metadata_roles_follow_the_participants_not_the_stream_order():
    metadata = RecordingMetadata.parse(metadata_xml())
    assert metadata.session_id == "hVpd7YQgRW2nD22h7q60JQ=="
    assert [(p.aor, p.name) for p in metadata.participants] == [("sip:alice@example.com", "Alice"), ("sip:bob@example.com", "Bob")]
    assert metadata.roles() == {"2": "caller", "1": "callee"}
    assert stream_roles(["1", "2"], metadata) == ["callee", "caller"]


def test_streams_the_metadata_does_not_place_fall_back_to_their_order():
    assert stream_roles(["a", "b", "c"], None) == ["caller", "callee", "participant3"]
    metadata = RecordingMetadata.parse(metadata_xml().replace(b"<label>1</label>", b"<label>9</label>"))
    assert stream_roles(["1", "2"], metadata) == ["callee", "caller"]  # 2 is Alice's; 1 takes what is left


def test_participant_send_inside_participant_as_early_drafts_had_it():
    xml = b"""<recording xmlns='urn:ietf:params:xml:ns:recording'>
      <participant participant_id="p1"><nameID aor="sip:carol@example.com"/><send>s1</send></participant>
      <participant participant_id="p2"><nameID aor="sip:dave@example.com"/><send>s2</send></participant>
      <participant participant_id="p3"><nameID aor="sip:eve.x@example.com"/><send>s3</send></participant>
      <stream stream_id="s1"><label>10</label></stream><stream stream_id="s2"><label>11</label></stream>
      <stream stream_id="s3"><label>12</label></stream></recording>"""
    assert RecordingMetadata.parse(xml).roles() == {"10": "caller", "11": "callee", "12": "eve.x"}


@pytest.mark.parametrize("xml, message", [
    (b"<recording><participant></recording>", "rs-metadata is not well-formed XML: mismatched tag: line 1, column 26"),
    (b"<session/>", "rs-metadata root element is <session>, not <recording>"),
    (b"<recording><participant/></recording>", "rs-metadata <participant> needs a participant_id"),
    (b"<recording><stream stream_id='x'/></recording>", "rs-metadata <stream> needs a stream_id and a <label>"),
    (b"<recording><participantstreamassoc participant_id='nobody'/></recording>",
     "rs-metadata <participantstreamassoc> names an unknown participant"),
    (b'<!DOCTYPE r [<!ENTITY a "b">]><recording/>', "rs-metadata must not carry a document type declaration"),
])
def test_malformed_metadata(xml, message):
    with pytest.raises(MetadataError) as caught:
        RecordingMetadata.parse(xml)
    assert str(caught.value) == message


def test_multipart_parts_and_errors():
    body = b"preamble\r\n--b1\r\nContent-Type: application/sdp\r\n\r\nv=0\r\n\r\n--b1\r\n\r\nplain\r\n--b1--\r\nepilogue"
    sdp, plain = parse_multipart('multipart/mixed; boundary="b1"', body)
    assert (sdp.content_type, sdp.body) == ("application/sdp", b"v=0\r\n")
    assert (plain.content_type, plain.body) == ("text/plain", b"plain")
    for content_type, data, message in [
        ("multipart/mixed", body, "multipart body without a boundary parameter"),
        ("multipart/mixed;boundary=zz", body, "multipart body has no complete part"),
        ("multipart/mixed;boundary=b1", body.split(b"--b1--")[0], "multipart body has no closing delimiter"),
        ("multipart/mixed;boundary=b1", b"--b1\r\nContent-Type: a/b\r\n--b1--", "multipart part has no end of headers"),
    ]:
        with pytest.raises(MultipartError) as caught:
            parse_multipart(content_type, data)
        assert str(caught.value) == message


@pytest.mark.skipif(not sipp_available(), reason="SIPp (sip-tester) is not installed")
@pytest.mark.timeout(60)
async def test_siprec_session_is_one_dual_channel_recording(tmp_path):
    """SIPp sets up the recording session, an RTP sender streams the two sides: one
    session, two legs named by the metadata, one stereo recording with Alice (sending the
    stream labelled 2) on the left and Bob on the right, each channel its own stream."""
    alice, bob = noise(3.0, seed=21, dbfs=-16), noise(3.0, seed=22, dbfs=-16)
    # Stream 1 (the answer's first port) is Bob's, stream 2 Alice's.
    sets = {**sender_sets(wav1=write_wav(tmp_path / "bob.wav", bob), wav2=write_wav(tmp_path / "alice.wav", alice)),
            "call_ms": 4500}
    async with Server(tmp_path, record_policy="all") as server, LegWatcher(server) as watcher:
        result = await run_sipp(server, scenario(tmp_path, "uac_siprec.xml"), tmp_path, sets=sets)
        assert result.returncode == 0, result.output
        [recording] = await recordings(server)
        [session] = (await server.api("GET", "/api/v1/sessions"))[1]["data"]
        legs = await server.app[CATALOG].legs(session["uuid"])
    assert session["source"] == "siprec"
    assert session["metadata"]["siprec"]["participants"] == [
        {"role": "caller", "aor": "sip:alice@example.com", "name": "Alice"},
        {"role": "callee", "aor": "sip:bob@example.com", "name": "Bob"}]
    assert sorted(leg["role"] for leg in legs) == ["callee", "caller"]
    assert {leg.stream.label: leg.role for leg in watcher.legs.values()} == {"1": "callee", "2": "caller"}
    assert recording.meta["channels"] == 2 and recording.audio.shape[1] == 2
    assert recording.meta["duration"] == pytest.approx(4.5, abs=0.1)  # the session's length
    for stats in recording.meta["legs"]:
        assert stats["audio_ms"] / 1000 == pytest.approx(3.0, abs=0.06) and stats["lost"] == 0
    left, right = recording.audio[:, 0], recording.audio[:, 1]
    lag, score = best_lag(left, alice, 2 * RATE)
    assert score > 0.99
    assert best_lag(right, bob, 2 * RATE) == (pytest.approx(lag, abs=8), pytest.approx(1.0, abs=0.01))
    assert abs(correlation(left[lag:], bob)) < 0.05 and abs(correlation(right[lag:], alice)) < 0.05
