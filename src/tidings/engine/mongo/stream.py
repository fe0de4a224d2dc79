"""One change stream as the feed follows it: what it watches, where it stands, why it stopped.

The feed (``feed.py``) runs one ``Follower`` per stream; the protocols say
what of PyMongo's ``AsyncChangeStream`` and ``watch`` it uses, so that the
tests can stand a fake behind them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from tidings.models import utcnow

# Errors after which a resume token cannot be used again (MongoDB error codes):
# ChangeStreamFatalError, InvalidResumeToken, ChangeStreamHistoryLost.
RESTART_CODES = frozenset({280, 260, 286})
WATCHED_OPERATIONS = ["insert", "update", "replace", "invalidate"]
ENDING_OPERATIONS = frozenset({"invalidate", "drop", "dropDatabase", "rename"})
# Receipt times are other processes' clocks, written a moment after they were
# taken: a resync re-reads states from this long before the stream's last answer.
RESYNC_MARGIN = timedelta(seconds=60)


class ChangeStream(Protocol):
    """The part of PyMongo's ``AsyncChangeStream`` the feed uses."""

    @property
    def alive(self) -> bool: ...

    @property
    def resume_token(self) -> Mapping[str, Any] | None: ...

    async def try_next(self) -> Mapping[str, Any] | None: ...

    async def close(self) -> None: ...


class Watchable(Protocol):
    """A database or collection: what ``watch`` is called on."""

    async def watch(
        self,
        pipeline: list[dict[str, Any]],
        *,
        full_document: str,
        resume_after: Mapping[str, Any] | None,
        max_await_time_ms: int,
    ) -> ChangeStream: ...


@dataclass(eq=False)
class Follower:
    """One stream's task and what sessions wait on before reading their backlog."""

    name: str | None  # the collection, or None for the database stream
    email: str | None = None  # whose collection it is
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    healthy: bool = False
    task: asyncio.Task[None] | None = None
    # Where to resume; None starts from now.
    token: Mapping[str, Any] | None = None
    # Failed attempts in a row, for the backoff.
    failures: int = 0
    # Why the stream restarted from now, until the sessions are told to resync.
    resync: str | None = None
    # The last error that stopped the stream, while it is not open: for /readyz.
    error: str | None = None
    # When the stream last answered: every change before then was delivered.
    last_answer: datetime = field(default_factory=utcnow)
    # Where a restart from now left off, until the sessions are told to resync.
    gap_since: datetime | None = None
    # Set when no session needs this stream any more. Cancellation alone is not
    # enough: on Python 3.11 asyncio.wait_for, which PyMongo uses for socket
    # timeouts, can lose a cancellation that races a completed read, and a
    # follower that lived on would deliver every change twice.
    stopped: bool = False

    @property
    def label(self) -> str:
        """How logs name this stream."""
        return self.name or "*"
