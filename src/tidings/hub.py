"""The hub: who is online on this process, and which feed event goes to whom."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Protocol

from tidings.engine import Feed
from tidings.models import FeedEvent, Message, Resync, StateChanged, Stored
from tidings.states import MessageState

log = logging.getLogger("tidings.hub")


class Subscriber(Protocol):
    """The side of a session that the hub talks to. None of these may block."""

    @property
    def conn_id(self) -> str:
        """The connection's id, as logs and message receipts name it."""

    def deliver(self, message: Message) -> None:
        """A message addressed to this subscriber's user was stored."""

    def changed(self, change: StateChanged) -> None:
        """A message this subscriber's user sent moved to a new state."""

    def resync(self, since: datetime | None) -> None:
        """The feed may have missed changes: re-read the backlog, and states from ``since``."""


class Hub:
    """Fans feed events out to the sessions of this process.

    A stored message goes to its recipient's sessions; a state change goes to
    its sender's sessions, except ``stored`` to the connection that sent the
    message, which was answered directly.
    """

    def __init__(self, feed: Feed) -> None:
        self._feed = feed
        self._sessions: dict[str, set[Subscriber]] = {}

    def attach(self, email: str, subscriber: Subscriber) -> bool:
        """Route ``email``'s events to ``subscriber``; ``True`` for its first session here."""
        sessions = self._sessions.setdefault(email, set())
        first = not sessions
        sessions.add(subscriber)
        if first:
            self._feed.watch(email)
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
        self._feed.unwatch(email)
        return True

    async def ready(self, email: str) -> None:
        """Wait until the feed delivers every event for ``email`` from now on."""
        await self._feed.ready(email)

    def users(self) -> int:
        """How many users have a session on this process."""
        return len(self._sessions)

    def online(self) -> list[str]:
        """The e-mails with at least one session on this process."""
        return list(self._sessions)

    def dispatch(self, event: FeedEvent) -> None:
        """Hand one feed event to the sessions it concerns."""
        if isinstance(event, Stored):
            for session in list(self._sessions.get(event.message.recipient, ())):
                session.deliver(event.message)
        elif isinstance(event, StateChanged):
            origin = event.origin if event.state is MessageState.STORED else None
            for session in list(self._sessions.get(event.sender, ())):
                if session.conn_id != origin:
                    session.changed(event)
        elif isinstance(event, Resync):
            log.warning("resync", extra={"reason": event.reason, "email": event.email})
            for email, sessions in list(self._sessions.items()):
                if event.email in (None, email):
                    for session in list(sessions):
                        session.resync(event.since)
