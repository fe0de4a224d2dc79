"""The memory engine's feed: what its store wrote, handed to the hub in the same process."""

from __future__ import annotations

import asyncio
import logging

from tidings.engine.base import FeedHealth, Sink
from tidings.models import FeedEvent

log = logging.getLogger("tidings.engine.memory")

# Feed events handed to the hub between two yields to the event loop.
_EVENTS_PER_TURN = 32


class MemoryFeed:
    """The in-process feed of the memory engine: its store reports every write here."""

    def __init__(self) -> None:
        self._events: asyncio.Queue[FeedEvent] = asyncio.Queue()
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    @property
    def problem(self) -> str | None:
        return None if self._running else "the in-process feed is not running"

    def health(self) -> FeedHealth:
        """In one process nothing is lost or late: every count stays zero."""
        return FeedHealth()

    def publish(self, event: FeedEvent) -> None:
        """Queue an event, in the order the store made it."""
        self._events.put_nowait(event)

    async def run(self, sink: Sink) -> None:
        self._running = True
        try:
            while True:
                # get() does not yield while events are queued. Yielding after a
                # turn's worth lets the writers drain their queues during a burst,
                # not after it; yielding after each event was a turn of the loop
                # per event, several per message.
                turn = [await self._events.get()]
                while len(turn) < _EVENTS_PER_TURN and not self._events.empty():
                    turn.append(self._events.get_nowait())
                for event in turn:
                    try:
                        sink(event)
                    except Exception:
                        # One event the hub cannot route must not stop delivery of the rest.
                        log.exception(
                            "feed_event_failed", extra={"event_type": type(event).__name__}
                        )
                await asyncio.sleep(0)
        finally:
            self._running = False

    def watch(self, email: str) -> None:
        pass

    def unwatch(self, email: str) -> None:
        pass

    async def ready(self, email: str) -> None:
        pass
