"""What the client hands the application: messages, state changes and errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, eq=False)
class Message:
    """A message sent to this client's user.

    It is acknowledged (``delivered`` for its sender) when the application asks
    the iterator of :meth:`Client.messages` for the next one, or earlier with
    :meth:`ack`; :meth:`read` marks it ``read``, which implies ``delivered``.
    """

    id: str
    sender: str
    recipient: str
    content: str
    sent_at: datetime
    state: str
    _ack: Callable[[Message], Awaitable[None]] = field(repr=False)
    _read: Callable[[Message], Awaitable[None]] = field(repr=False)

    @property
    def key(self) -> tuple[str, str]:
        """(sender, id): what tells messages apart, since ids are unique per sender only."""
        return (self.sender, self.id)

    async def ack(self) -> None:
        """Acknowledge it now (idempotent)."""
        await self._ack(self)

    async def read(self) -> None:
        """Mark it read (idempotent; implies the acknowledgement)."""
        await self._read(self)


@dataclass(frozen=True)
class StateChange:
    """A state of a message this user sent: ``received``, ``stored``, ``sent``,
    ``delivered``, ``read`` or ``failed`` (with ``code`` and ``reason``).

    States may repeat and may skip steps (a later state implies the earlier ones).
    """

    id: str
    state: str
    at: datetime | None
    code: str | None = None
    reason: str | None = None

    @classmethod
    def from_frame(cls, frame: dict[str, Any]) -> StateChange:
        """The state change a ``state`` frame reports."""
        at = frame.get("at")
        return cls(
            id=str(frame["id"]),
            state=str(frame["state"]),
            at=datetime.fromisoformat(at) if isinstance(at, str) else None,
            code=frame.get("code"),
            reason=frame.get("reason"),
        )


class ClientError(Exception):
    """Base class of the errors this client raises."""


class MessageFailed(ClientError):
    """The server refused a message for good: resending it would not help."""

    def __init__(self, message_id: str, code: str, reason: str) -> None:
        super().__init__(f"message {message_id!r} failed: {code}: {reason}")
        self.message_id = message_id
        self.code = code
        self.reason = reason


class SendTimeout(ClientError, TimeoutError):
    """A message did not reach ``stored`` within the send timeout; its outcome is unknown.

    Sending it again with the same id is safe: the server stores an id once.
    """

    def __init__(self, message_id: str) -> None:
        super().__init__(f"message {message_id!r} was not stored in time; resend the same id")
        self.message_id = message_id


class ConnectFailed(ClientError):
    """The server could not be reached, or the handshake failed for a reason that may pass."""


class AuthRefused(ClientError):
    """The server refused these credentials (HTTP 403 at the handshake, or ``forbidden``
    for this e-mail). Reconnecting with them would not help."""


class ConnectionEnded(ClientError):
    """The connection ended for good: closed by the server with a code that forbids
    reconnecting (1008, policy), or reconnect attempts ran out."""

    def __init__(self, message: str, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class ClientClosed(ClientError):
    """The client was closed by the application."""
