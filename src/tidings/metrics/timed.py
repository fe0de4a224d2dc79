"""The storage seam, timed: a ``Store`` that measures every call of the one it wraps.

It stands where the core meets the engine, so every engine is measured the
same way and none of them knows about metrics.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Sequence
from datetime import datetime
from typing import TypeVar

from tidings.engine.base import Store
from tidings.errors import StoreUnavailable
from tidings.metrics.counts import Metrics
from tidings.models import Draft, Message, Outcome, Position, StateChanged, Transition, User

_T = TypeVar("_T")


class TimedStore:
    """A ``Store`` that observes the duration of each call, and counts the failed ones.

    ``start`` and ``close`` pass through untimed: they run once, at the edges
    of the app's life, and belong to the engine rather than to the traffic.
    """

    def __init__(self, inner: Store, metrics: Metrics) -> None:
        self._inner = inner
        self._seconds = metrics.store_seconds
        self._errors = metrics.store_errors

    @property
    def inner(self) -> Store:
        """The store being measured."""
        return self._inner

    async def _timed(self, operation: str, call: Awaitable[_T]) -> _T:
        started = time.perf_counter()
        try:
            return await call
        except StoreUnavailable:
            self._errors[operation] += 1
            raise
        finally:
            self._seconds[operation].observe(time.perf_counter() - started)

    async def start(self) -> None:
        await self._inner.start()

    async def close(self) -> None:
        await self._inner.close()

    async def ping(self) -> None:
        await self._timed("ping", self._inner.ping())

    async def ensure_user(self, email: str) -> User:
        return await self._timed("ensure_user", self._inner.ensure_user(email))

    async def find_user(self, email: str) -> User | None:
        return await self._timed("find_user", self._inner.find_user(email))

    async def send(self, sender: str, conn: str, drafts: Sequence[Draft]) -> list[Outcome]:
        return await self._timed("send", self._inner.send(sender, conn, drafts))

    async def find_inbox(self, owner: str, ids: Sequence[str]) -> list[Message]:
        return await self._timed("find_inbox", self._inner.find_inbox(owner, ids))

    async def backlog(
        self, owner: str, since: Position | None, after: Position | None, limit: int
    ) -> list[Message]:
        return await self._timed("backlog", self._inner.backlog(owner, since, after, limit))

    async def record(self, transitions: Sequence[Transition]) -> None:
        await self._timed("record", self._inner.record(transitions))

    async def states_since(self, sender: str, since: datetime) -> list[StateChanged]:
        return await self._timed("states_since", self._inner.states_since(sender, since))
