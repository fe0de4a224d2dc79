"""The records that flow from the store through the feed and hub to sessions."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from bson import ObjectId

from tidings.protocol import MessageState, rfc3339

INBOX = "in"
OUTBOX = "out"


def collection_for(email: str) -> str:
    """The name of the collection that holds ``email``'s messages.

    Derived from the normalised e-mail, never taken from a client: a SHA-256
    hex digest is valid in every MongoDB namespace whatever the e-mail holds,
    has a fixed length, and two e-mails never share a collection.
    """
    return "m_" + hashlib.sha256(email.encode()).hexdigest()


def utcnow() -> datetime:
    """Now, truncated to the millisecond precision that BSON dates keep."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def as_datetime(value: datetime | str) -> datetime:
    """A stored timestamp as a datetime.

    MongoDB keeps the datetimes Tidings writes as BSON dates. nx-27017 turns a
    datetime written by ``$set`` into an ISO string; this is the one place that
    takes it back.
    """
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def current_state(doc: Mapping[str, Any]) -> tuple[MessageState, datetime]:
    """A message document's state, and when it reached it (inbox or receipt alike)."""
    state = MessageState(doc["state"])
    return state, as_datetime(doc.get("at", {}).get(state.value, doc["sent_at"]))


@dataclass(frozen=True, slots=True)
class User:
    """A user's public record; ``online`` is filled in when it is looked up."""

    id: str
    email: str
    name: str
    collection: str
    online: bool = False

    def public(self) -> dict[str, Any]:
        """The USER object of the wire protocol."""
        return {
            "id": self.id,
            "email": self.email,
            "name": self.name,
            "collection": self.collection,
            "online": self.online,
        }


@dataclass(frozen=True, slots=True)
class Message:
    """One message as it lies in its recipient's collection."""

    oid: ObjectId
    id: str
    sender: str
    recipient: str
    content: str
    sent_at: datetime
    state: MessageState
    # When the message reached its current state.
    state_at: datetime

    @property
    def key(self) -> tuple[str, str]:
        """Ids are unique per sender, so this pair names a message everywhere."""
        return (self.sender, self.id)

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Message:
        """Read an inbox document."""
        state, state_at = current_state(doc)
        return cls(
            oid=doc["_id"],
            id=doc["mid"],
            sender=doc["from"],
            recipient=doc["to"],
            content=doc["content"],
            sent_at=doc["sent_at"],
            state=state,
            state_at=state_at,
        )

    def frame(self) -> dict[str, Any]:
        """The ``message`` frame pushed to the recipient."""
        return {
            "type": "message",
            "id": self.id,
            "from": self.sender,
            "to": self.recipient,
            "content": self.content,
            "sent_at": rfc3339(self.sent_at),
            "state": self.state.value,
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a send came to: the message's state, and the message if this send stored it."""

    id: str
    state: MessageState
    at: datetime
    stored: Message | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """A write to a message collection, as a change feed reports it.

    ``doc`` is the document after the write; for an update its ``state`` is the
    one that write set, not a later one, so every transition is seen.
    """

    operation: Literal["insert", "update"]
    doc: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Resync:
    """The feed may have missed changes: sessions must re-read their backlog.

    ``collection`` names the one collection concerned; ``None`` means all.
    """

    reason: str
    collection: str | None = None


FeedEvent = Change | Resync
