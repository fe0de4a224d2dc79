"""The seam between the core and the storage engines.

An engine is a ``Store`` (users and messages), a ``Feed`` (the stream of what
was stored and how states moved, as typed events) and a ``Presence`` (who is
online where). The core only ever sees the records of ``tidings.models``;
each engine decodes its own documents into them. Two engines stand behind
this seam: ``memory`` (the embedded default) and ``mongo``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from tidings.models import (
    Draft,
    FeedEvent,
    Message,
    Outcome,
    Position,
    StateChanged,
    Transition,
    User,
)

Sink = Callable[[FeedEvent], None]


class Store(Protocol):
    """Users and messages. Database failures raise ``StoreUnavailable``.

    The semantics every engine keeps (one contract suite checks them all):
    an id names one message per sender; sending it again stores nothing and
    answers the message's current state; states only move forward; positions
    grow in the order messages are stored.
    """

    async def start(self) -> None:
        """Prepare what the engine needs (indexes, connections)."""

    async def close(self) -> None:
        """Release everything; writes still waiting fail."""

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the database answers."""

    async def ensure_user(self, email: str) -> User:
        """The user record for ``email``, created on its first identification."""

    async def find_user(self, email: str) -> User | None:
        """The user record for ``email``, or ``None``."""

    async def send(self, sender: str, conn: str, drafts: Sequence[Draft]) -> list[Outcome]:
        """Store ``sender``'s drafts durably, in order, each once per sender and id.

        One outcome per draft, in order. An id already used for a message that
        is still on its way to someone else is refused (``failed``, ``invalid``).
        ``conn`` is the sending connection, which the feed's ``stored`` skips.
        """

    async def find_inbox(self, owner: str, ids: Sequence[str]) -> list[Message]:
        """``owner``'s received messages with any of these ids, from any sender."""

    async def backlog(
        self, owner: str, since: Position | None, after: Position | None, limit: int
    ) -> list[Message]:
        """``owner``'s next page of messages to deliver, oldest first.

        Those not yet delivered, and with ``since`` also every message after it;
        only those after ``after`` (the last one of the previous page).
        """

    async def record(self, transitions: Sequence[Transition]) -> None:
        """Persist state transitions, forward only; a stale one is a no-op.

        The inbox moves first and the sender's receipt after it, so a state
        reaches the sender only once it is durable.
        """

    async def states_since(self, sender: str, since: datetime) -> list[StateChanged]:
        """The current states of ``sender``'s messages whose state moved at or after ``since``.

        Oldest move first, read through an index: what a feed that lost its
        place re-reads for the sender.
        """


@dataclass(frozen=True, slots=True)
class FeedHealth:
    """What a feed tells about itself beyond ``running``: counts since it started.

    ``lag_seconds`` is how long ago the feed last confirmed it had delivered
    everything stored before; it grows only while the feed is stuck.
    ``resumes`` counts interruptions it recovered from its last position,
    ``restarts`` those after which it began again from now (and asked the
    sessions to re-read what they may have missed), ``interruptions`` the
    errors that stopped it, ``skipped_events`` events it could not decode.
    """

    lag_seconds: float = 0.0
    resumes: int = 0
    restarts: int = 0
    interruptions: int = 0
    skipped_events: int = 0


class Feed(Protocol):
    """One process's view of what the engine stored, as ``FeedEvent``s in stored order."""

    @property
    def running(self) -> bool:
        """True while the feed is delivering events; readiness depends on it."""

    @property
    def problem(self) -> str | None:
        """Why the feed is not running, when it is not."""

    def health(self) -> FeedHealth:
        """How the feed fares, read by ``/metrics`` at scrape time."""

    async def run(self, sink: Sink) -> None:
        """Deliver events to ``sink`` until cancelled."""

    def watch(self, email: str) -> None:
        """A session on this process now needs ``email``'s events."""

    def unwatch(self, email: str) -> None:
        """No session on this process needs ``email``'s events any more."""

    async def ready(self, email: str) -> None:
        """Wait until events for ``email`` that happen from now on will be delivered."""


class Presence(Protocol):
    """Which users hold a connection on some process.

    An engine whose records expire asks, through ``refresh_interval``, that
    the app call ``refresh`` that often with the users online on this process.
    """

    @property
    def refresh_interval(self) -> float | None:
        """Seconds between two calls of ``refresh``; ``None`` when records never expire."""

    async def is_online(self, email: str) -> bool:
        """Whether any process holds a connection of ``email``."""

    async def set(self, email: str, online: bool) -> None:
        """Record that this process does or no longer holds a connection of ``email``."""

    async def refresh(self, emails: Sequence[str]) -> None:
        """Keep this process's records of ``emails`` alive."""


async def nothing_to_prepare() -> None:
    """The ``prepare`` of an engine that is ready as soon as it is open."""


@dataclass(frozen=True, eq=False)
class Engine:
    """A store, its feed and presence, open for the app's lifetime.

    ``prepare`` is what the engine must do against its database before the
    app is ready (indexes, say). It raises ``StoreUnavailable``, saying which
    database and why, while that database does not answer; the app calls it
    again until it succeeds and is not ready meanwhile, so that a process
    started before its database needs no restart once the database answers.
    """

    name: str
    store: Store
    feed: Feed
    presence: Presence
    prepare: Callable[[], Awaitable[None]] = nothing_to_prepare
