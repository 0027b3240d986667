"""SIPREC (RFC 7866): the multipart INVITE body and the recording metadata (RFC 7865).

A recording session's INVITE carries `multipart/mixed` (RFC 2046 §5.1) with an SDP part,
one m= line per recorded stream, each named by `a=label` (RFC 4574), and an
`application/rs-metadata+xml` part that says which participant sends which stream.

Roles: the first participant the metadata lists is the caller, the second the callee
(the order SRCs such as SBCs and PBXs write them in: the originating side first); any
further one is named after its AOR's user part or display name. A stream takes the role
of the participant that sends it (`participantstreamassoc/send`, or `send` inside
`participant` as earlier drafts had it). Streams the metadata does not place fall back to
their order: first caller, second callee.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from mediaserver.errors import ProtocolError

SIPREC_OPTION_TAG = "siprec"  # RFC 7866 §12.2
METADATA_TYPE = "application/rs-metadata+xml"  # RFC 7866 §12.1
SDP_TYPE = "application/sdp"
MAX_METADATA_BYTES = 65536

_BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_ROLE = re.compile(r"[^A-Za-z0-9._-]+")


class MultipartError(ProtocolError):
    """A multipart body that does not follow RFC 2046 §5.1."""


class MetadataError(ProtocolError):
    """Recording metadata that does not follow RFC 7865."""


@dataclass(slots=True)
class BodyPart:
    """One part of a multipart body."""

    content_type: str  # lower case, without parameters
    headers: dict[str, str]  # lower-case names
    body: bytes


def parse_multipart(content_type: str, body: bytes) -> list[BodyPart]:
    """The parts of a multipart body whose Content-Type header value is `content_type`."""
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise MultipartError("multipart body without a boundary parameter")
    delimiter = b"--" + (match[1] or match[2]).encode()
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise MultipartError("multipart body has no complete part")
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # the close delimiter
        parts.append(_part(chunk))
    else:
        raise MultipartError("multipart body has no closing delimiter")
    return parts


def _part(chunk: bytes) -> BodyPart:
    # The rest of the delimiter line comes first; the CRLF before the next delimiter
    # belongs to that delimiter (RFC 2046 §5.1.1).
    chunk = chunk.split(b"\n", 1)[1] if b"\n" in chunk else b""
    chunk = chunk[:-2] if chunk.endswith(b"\r\n") else chunk[:-1] if chunk.endswith(b"\n") else chunk
    if chunk.startswith(b"\r\n") or chunk.startswith(b"\n"):
        head, body = b"", chunk.split(b"\n", 1)[1]  # no header lines: text/plain by default
    else:
        head, sep, body = chunk.partition(b"\r\n\r\n")
        if not sep:
            head, sep, body = chunk.partition(b"\n\n")
        if not sep:
            raise MultipartError("multipart part has no end of headers")
    headers = {}
    for line in head.decode("utf-8", "replace").replace("\r\n", "\n").split("\n"):
        name, colon, value = line.partition(":")
        if line.strip() and not colon:
            raise MultipartError("multipart part has a malformed header line")
        if colon:
            headers[name.strip().lower()] = value.strip()
    content_type = headers.get("content-type", "text/plain").split(";")[0].strip().lower()
    return BodyPart(content_type, headers, body)


@dataclass(slots=True)
class Participant:
    """A participant of the recorded call, and the streams (by stream id) it sends."""

    id: str
    aor: str | None = None
    name: str | None = None
    sends: list[str] = field(default_factory=list)  # stream ids


@dataclass(slots=True)
class RecordingMetadata:
    """What a recording session's metadata says about participants and streams."""

    session_id: str | None = None
    participants: list[Participant] = field(default_factory=list)
    stream_labels: dict[str, str] = field(default_factory=dict)  # stream id -> SDP label

    @classmethod
    def parse(cls, data: bytes) -> RecordingMetadata:
        if len(data) > MAX_METADATA_BYTES:
            raise MetadataError(f"rs-metadata of {len(data)} bytes is larger than {MAX_METADATA_BYTES}")
        if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
            raise MetadataError("rs-metadata must not carry a document type declaration")
        try:
            root = ET.fromstring(data)
        except ET.ParseError as exc:
            raise MetadataError(f"rs-metadata is not well-formed XML: {exc}") from None
        if _local(root.tag) != "recording":
            raise MetadataError(f"rs-metadata root element is <{_local(root.tag)}>, not <recording>")
        metadata = cls()
        by_id: dict[str, Participant] = {}
        for element in root:
            metadata._element(element, by_id)
        return metadata

    def _element(self, element: ET.Element, by_id: dict[str, Participant]) -> None:
        kind = _local(element.tag)
        if kind == "session" and self.session_id is None:
            self.session_id = element.get("session_id")
        elif kind == "participant":
            self._participant(element, by_id)
        elif kind == "stream":
            stream_id, label = element.get("stream_id"), _child_text(element, "label")
            if not stream_id or label is None:
                raise MetadataError("rs-metadata <stream> needs a stream_id and a <label>")
            self.stream_labels[stream_id] = label
        elif kind == "participantstreamassoc":
            participant = by_id.get(element.get("participant_id") or "")
            if participant is None:
                raise MetadataError("rs-metadata <participantstreamassoc> names an unknown participant")
            participant.sends += [text for text in _children_text(element, "send")]

    def _participant(self, element: ET.Element, by_id: dict[str, Participant]) -> None:
        pid = element.get("participant_id")
        if not pid:
            raise MetadataError("rs-metadata <participant> needs a participant_id")
        participant = by_id.get(pid)
        if participant is None:
            participant = by_id[pid] = Participant(pid)
            self.participants.append(participant)
        for child in element:
            if _local(child.tag) in ("nameID", "nameid"):
                participant.aor = child.get("aor")
                participant.name = _child_text(child, "name")
        participant.sends += [text for text in _children_text(element, "send")]

    def roles(self) -> dict[str, str]:
        """Stream label → role of the participant that sends it."""
        labels = {}
        for index, participant in enumerate(self.participants):
            role = participant_role(index, participant)
            for stream_id in participant.sends:
                label = self.stream_labels.get(stream_id)
                if label is not None:
                    labels.setdefault(label, role)
        return labels


def participant_role(index: int, participant: Participant) -> str:
    """The role of the metadata's `index`-th participant: caller, callee, then its name."""
    if index == 0:
        return "caller"
    if index == 1:
        return "callee"
    user = (participant.aor or "").split(":", 1)[-1].split("@")[0]
    name = _ROLE.sub("_", user or participant.name or "").strip("_")[:64]
    return name or f"participant{index + 1}"


def stream_roles(labels: list[str | None], metadata: RecordingMetadata | None) -> list[str]:
    """A role for each recorded stream (by its SDP label), distinct where the metadata
    does not say: metadata first, then the order of the streams."""
    known = metadata.roles() if metadata is not None else {}
    taken = {known[label] for label in labels if label in known}
    fallback = iter(role for role in ("caller", "callee") if role not in taken)
    roles = []
    for index, label in enumerate(labels):
        role = known.get(label) if label is not None else None
        roles.append(role or next(fallback, f"participant{index + 1}"))
    return roles


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(element: ET.Element, name: str) -> str | None:
    for child in element:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return None


def _children_text(element: ET.Element, name: str) -> list[str]:
    return [(child.text or "").strip() for child in element if _local(child.tag) == name and (child.text or "").strip()]
