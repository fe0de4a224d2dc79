"""The records that flow between the storage engines, the hub and the sessions.

Nothing here knows how an engine keeps them: a ``Position`` is opaque to the
core, which only compares positions of one recipient's messages.
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NewType, TypeVar, dataclass_transform

from tidings.states import MessageState

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True)
def record(cls: type[_T]) -> type[_T]:
    """A value record: immutable to the type checker, a plain slotted dataclass at run time.

    A frozen dataclass sets each field through ``object.__setattr__``, which
    makes it 3.5 times as slow to build, and a dozen of these are built for
    every message. mypy still refuses any assignment to a field; hashing and
    equality are a frozen dataclass's.
    """
    return dataclass(slots=True, unsafe_hash=True)(cls)


Position = NewType("Position", int)
"""Where a message stands in its recipient's inbox; later messages have larger ones.

Engines hand positions out in the order messages are stored, so that the
backlog, the live stream and ``since`` agree on one order.
"""


def collection_for(email: str) -> str:
    """The name of the collection (the USER object's ``collection``) of ``email``.

    Derived from the normalised e-mail, never taken from a client: a SHA-256
    hex digest is valid in every MongoDB namespace whatever the e-mail holds,
    has a fixed length, and two e-mails never share a collection.
    """
    return "m_" + hashlib.sha256(email.encode()).hexdigest()


def utcnow() -> datetime:
    """Now, truncated to the millisecond precision that BSON dates keep."""
    return _at_millisecond(time.time_ns() // 1_000_000)


@functools.lru_cache(maxsize=1)
def _at_millisecond(milliseconds: int) -> datetime:
    # Several calls a message, dozens in one millisecond at load: making the
    # datetime was 8 % of the server's CPU (py-spy) before it was memoised.
    return datetime.fromtimestamp(milliseconds / 1000, UTC)


@record
class User:
    """A user's record. Whether the user is online is presence's to say, not the store's."""

    id: str
    email: str
    name: str
    collection: str


@record
class Message:
    """One message as it lies in its recipient's inbox."""

    position: Position
    id: str
    sender: str
    recipient: str
    content: str
    sent_at: datetime
    state: MessageState

    @property
    def key(self) -> tuple[str, str]:
        """Ids are unique per sender, so this pair names a message everywhere."""
        return (self.sender, self.id)

    def moved_to(self, state: MessageState) -> Message:
        """This message in ``state``; ``dataclasses.replace`` costs several times more."""
        return Message(
            self.position, self.id, self.sender, self.recipient, self.content, self.sent_at, state
        )


@record
class Draft:
    """A message a sender asked to store: validated, not yet durable."""

    id: str
    recipient: str
    content: str


@record
class Outcome:
    """What a send came to: the message's state now, and the message if this send stored it.

    A refused send has state ``failed`` with the ``code`` and ``reason`` of its refusal.
    """

    id: str
    state: MessageState
    at: datetime
    stored: Message | None = None
    code: str | None = None
    reason: str | None = None


@record
class Transition:
    """A message of ``recipient``'s, from ``sender`` with ``id``, moves forward to ``state``."""

    sender: str
    recipient: str
    id: str
    state: MessageState

    @classmethod
    def of(cls, message: Message, state: MessageState) -> Transition:
        """The transition of ``message`` to ``state``."""
        return cls(message.sender, message.recipient, message.id, state)


@record
class Stored:
    """Feed event: ``message`` is now durable in its recipient's inbox."""

    message: Message


@record
class StateChanged:
    """Feed event: a message of ``sender``'s reached ``state`` at ``at``.

    ``origin`` is the connection that sent the message; it was answered
    ``stored`` directly, so the hub does not tell it again.
    """

    sender: str
    id: str
    state: MessageState
    at: datetime
    origin: str | None = None


@record
class Resync:
    """Feed event: changes may have been missed, so sessions re-read their backlog.

    ``email`` names the one user concerned; ``None`` means every user. With
    ``since``, state changes of the users' sent messages from then on may have
    been missed too, and are read again.
    """

    reason: str
    email: str | None = None
    since: datetime | None = None


FeedEvent = Stored | StateChanged | Resync
