"""The hub: who is online on this process, and which feed event goes to whom."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from tidings.feed import ChangeFeed
from tidings.models import (
    INBOX,
    OUTBOX,
    Change,
    FeedEvent,
    Message,
    Resync,
    as_datetime,
    collection_for,
)
from tidings.protocol import MessageState, state_frame

log = logging.getLogger("tidings.hub")


class Subscriber(Protocol):
    """The side of a session that the hub talks to. None of these may block."""

    @property
    def conn_id(self) -> str:
        """The connection's id, as logs and message receipts name it."""

    def deliver(self, message: Message) -> None:
        """A message addressed to this subscriber's user was stored."""

    def notify(self, frame: dict[str, Any]) -> None:
        """A frame for this subscriber's user, such as a state change."""

    def resync(self) -> None:
        """The feed may have missed changes: re-read the backlog."""


class Hub:
    """Fans feed events out to the sessions of this process.

    The routing rule, the same whatever the feed: a new inbox document is a
    message for its recipient; a state change of an outbox receipt is a
    ``state`` frame for its sender. Everything else is ignored.
    """

    def __init__(self, feed: ChangeFeed) -> None:
        self._feed = feed
        self._sessions: dict[str, set[Subscriber]] = {}

    def attach(self, email: str, subscriber: Subscriber) -> bool:
        """Route ``email``'s events to ``subscriber``; ``True`` for its first session here."""
        sessions = self._sessions.setdefault(email, set())
        first = not sessions
        sessions.add(subscriber)
        if first:
            self._feed.watch(collection_for(email))
        return first

    def detach(self, email: str, subscriber: Subscriber) -> bool:
        """Stop routing to ``subscriber``; ``True`` when ``email`` has no session left here."""
        sessions = self._sessions.get(email)
        if sessions is None or subscriber not in sessions:
            return False
        sessions.discard(subscriber)
        if sessions:
            return False
        del self._sessions[email]
        self._feed.unwatch(collection_for(email))
        return True

    async def ready(self, email: str) -> None:
        """Wait until the feed delivers every change to ``email``'s collection from now on."""
        await self._feed.ready(collection_for(email))

    def online(self) -> list[str]:
        """The e-mails with at least one session on this process."""
        return list(self._sessions)

    def dispatch(self, event: FeedEvent) -> None:
        """Hand one feed event to the sessions it concerns."""
        if isinstance(event, Resync):
            log.warning("resync", extra={"reason": event.reason, "stream": event.collection})
            for email, sessions in list(self._sessions.items()):
                if event.collection in (None, collection_for(email)):
                    for session in list(sessions):
                        session.resync()
            return
        self._route(event)

    def _route(self, change: Change) -> None:
        doc = change.doc
        kind = doc.get("k")
        if kind == INBOX and change.operation == "insert":
            message = Message.from_doc(doc)
            for session in list(self._sessions.get(message.recipient, ())):
                session.deliver(message)
        elif kind == OUTBOX and change.operation == "update":
            self._state_changed(doc)

    def _state_changed(self, doc: Mapping[str, Any]) -> None:
        state = MessageState(doc["state"])
        frame = state_frame(doc["mid"], state, as_datetime(doc["at"][state.value]))
        # The connection that sent the message was answered ``stored`` directly.
        origin = doc.get("conn") if state is MessageState.STORED else None
        for session in list(self._sessions.get(doc["from"], ())):
            if session.conn_id != origin:
                session.notify(frame)
