"""Change feeds: the stream of writes that carries stored messages to sessions.

A feed runs as one task per process and hands every ``FeedEvent`` to a sink,
the hub. This module holds the interface and the in-process feed of the
embedded store; the MongoDB change-stream feed lives in ``changestream``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from tidings.models import Change, FeedEvent

Sink = Callable[[FeedEvent], None]


class ChangeFeed(Protocol):
    """One process's view of the writes to the message collections."""

    @property
    def running(self) -> bool:
        """True while the feed is delivering changes; readiness depends on it."""

    async def run(self, sink: Sink) -> None:
        """Deliver events to ``sink`` until cancelled."""

    def watch(self, collection: str) -> None:
        """A session on this process now needs ``collection``'s changes."""

    def unwatch(self, collection: str) -> None:
        """No session on this process needs ``collection``'s changes any more."""

    async def ready(self, collection: str) -> None:
        """Wait until changes to ``collection`` made from now on will be delivered."""


class MemoryFeed:
    """The feed of the embedded store, which reports its own writes to ``publish``.

    It sees every collection, so ``watch`` and ``unwatch`` have nothing to do.
    """

    def __init__(self) -> None:
        self._changes: asyncio.Queue[Change] = asyncio.Queue()
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def publish(self, change: Change) -> None:
        """Queue a write, in the order the store made it."""
        self._changes.put_nowait(change)

    async def run(self, sink: Sink) -> None:
        self._running = True
        try:
            while True:
                sink(await self._changes.get())
                # get() does not yield while changes are queued; yielding here lets
                # the writers drain their queues between events, not after a burst.
                await asyncio.sleep(0)
        finally:
            self._running = False

    def watch(self, collection: str) -> None:
        pass

    def unwatch(self, collection: str) -> None:
        pass

    async def ready(self, collection: str) -> None:
        pass
