"""Every error Tidings raises on purpose, in one tree.

::

    TidingsError
    ├── ConfigError          the settings cannot run a safe service (exit code 2)
    ├── AuthFailed           a handshake is refused (HTTP 403; the reason goes to the log)
    ├── FrameRefused         one frame is refused (an error frame; the connection stays)
    ├── CloseConnection      abuse or overload ends the connection (a close code)
    ├── StoreUnavailable     the database did not answer in time (``unavailable`` or 1013)
    ├── ConnectionGone       the peer is no longer there to write to
    └── (an engine's own)    e.g. ``engine.mongo.errors.StreamClosed``, caught inside it

Lower-level errors are mapped into this tree once, where they arise: database
errors in the storage engines (``engine/mongo/errors.py``), socket errors in the
endpoint's transport. The endpoint is the one place that turns them into error
frames and close codes.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    """The ``code`` of an error frame, as fixed by the protocol."""

    BAD_JSON = "bad_json"
    INVALID = "invalid"
    UNKNOWN_TYPE = "unknown_type"
    NOT_IDENTIFIED = "not_identified"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    RATE_LIMITED = "rate_limited"
    TOO_LARGE = "too_large"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class CloseCode(IntEnum):
    """WebSocket close codes Tidings uses, from RFC 6455 and the IANA registry."""

    NORMAL = 1000
    POLICY_VIOLATION = 1008
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013


class TidingsError(Exception):
    """Base class of every error Tidings raises on purpose."""


class ConfigError(TidingsError):
    """The settings cannot run a safe service; the message says how to fix them."""


class AuthFailed(TidingsError):
    """A handshake is refused. The message is for the server log, never the client."""


class FrameRefused(TidingsError):
    """A frame the server will not act on; answered with an error frame.

    The connection stays open: only the offending frame is refused.
    """

    def __init__(self, code: ErrorCode, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


class CloseConnection(TidingsError):
    """Abuse or overload that ends the connection with a close code and reason."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        # RFC 6455 caps a close reason at 123 bytes of UTF-8.
        self.reason = reason.encode()[:123].decode(errors="ignore")


class StoreUnavailable(TidingsError):
    """The database did not answer in time; the outcome of a write is unknown."""


class ConnectionGone(TidingsError):
    """The peer is no longer there to write to."""
