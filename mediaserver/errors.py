"""The exception hierarchy shared by every layer.

Parsers raise a specific `ProtocolError` subclass with an exact message; transports catch
them, count and drop. Below the HTTP layer a refusal is a `Refused` subclass saying what
kind of refusal it is (not found, forbidden, conflict, …) with a stable code; api/ maps
each kind to its HTTP status in one place. `ServiceError` names an HTTP status itself, for
the answers only HTTP has (401 with its challenge header): only api/ raises it, and a test
checks that.
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


class Refused(MediaServerError):
    """A request the service refuses, with a stable error code (DESIGN.md's `error.code`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):
        # Pickled as itself (a worker's refusal reaches the server process as what it was).
        return type(self), (self.code, self.message)


class Unauthorized(Refused):
    """No credentials, or wrong ones."""


class Invalid(Refused):
    """The request is malformed or names an option out of range."""


class NotFound(Refused):
    """What the request names does not exist (or not for this caller)."""


class Forbidden(Refused):
    """It exists but belongs to another app."""


class Conflict(Refused):
    """The request does not fit the current state (already recording, session ended, …)."""


class Gone(Refused):
    """It existed and has been deleted or has expired."""


class Unacceptable(Refused):
    """Nothing in the request can be served (an offer with no codec this server records)."""


class UnsupportedMedia(Refused):
    """The body is of a type this resource does not take."""


class NotSupported(Refused):
    """A method or feature this server does not implement."""


class RateLimited(Refused):
    """Too soon after the last accepted request; try again after `retry_after_s`."""

    def __init__(self, code: str, message: str, retry_after_s: int) -> None:
        super().__init__(code, message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return type(self), (self.code, self.message, self.retry_after_s)


class Unavailable(Refused):
    """The server cannot take it now (no free port, past capacity, shutting down); when
    `retry_after_s` is given, it may take it again after that long."""

    def __init__(self, code: str, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(code, message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return type(self), (self.code, self.message, self.retry_after_s)


class ServiceError(MediaServerError):
    """A refusal of the HTTP layer's own: HTTP status, stable error code, message, headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
