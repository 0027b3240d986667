"""The exception hierarchy shared by every layer.

Parsers raise a specific `ProtocolError` subclass with an exact message; transports catch
them, count and drop. `ApiError` carries the stable error code the HTTP API answers with.
"""


class MediaServerError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(MediaServerError):
    """A setting is missing, malformed or out of range; the message names it."""


class ProtocolError(MediaServerError):
    """Bytes on the wire that do not follow their protocol."""


class CodecError(MediaServerError):
    """A payload that cannot be decoded or audio that cannot be encoded."""


class StorageError(MediaServerError):
    """A storage backend failed to write, publish or read an object."""


class ServiceError(MediaServerError):
    """A request the service refuses: HTTP status, stable error code, message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
