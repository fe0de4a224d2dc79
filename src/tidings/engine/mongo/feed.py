"""The MongoDB change-stream feed: one stream per process, resumed across failures.

``database`` scope follows one database-level stream filtered to the message
collections, whatever the number of users. ``collection`` scope, for servers
that cannot watch a database, follows one stream per message collection that
has a session on this process.

Each stream keeps its latest resume token, from the moment it opens (the
opening aggregate's ``postBatchResumeToken``). A resumable error, or any other
exception, reopens it from that token after a capped, jittered exponential
backoff, so nothing is missed; meanwhile ``problem`` names the stream and the
error, and ``/readyz`` says 503. An event that cannot be decoded is logged,
counted and skipped: retried, it would fail the same way for ever.
When the token is no good any more (history lost, invalidate) the stream starts
again from now and a ``Resync`` makes the affected sessions re-read their
backlog from the store, and their sent messages' states from where the stream
last answered (``Store.states_since``), so nothing is lost either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

from pymongo.errors import OperationFailure, PyMongoError

from tidings.engine.base import FeedHealth, Sink
from tidings.engine.mongo.documents import event_of
from tidings.engine.mongo.errors import StreamClosed, reason
from tidings.engine.mongo.stream import (
    ENDING_OPERATIONS,
    RESTART_CODES,
    RESYNC_MARGIN,
    WATCHED_OPERATIONS,
    ChangeStream,
    Follower,
    Watchable,
)
from tidings.models import FeedEvent, Resync, collection_for, utcnow

log = logging.getLogger("tidings.changestream")


class MongoChangeFeed:
    """``Feed`` on MongoDB change streams."""

    def __init__(
        self,
        db: Watchable,
        collection: Callable[[str], Watchable],
        scope: Literal["database", "collection"],
        *,
        max_await_ms: int = 1000,
        idle_pause: float = 0.05,
        backoff_base: float = 0.1,
        backoff_cap: float = 10.0,
        jitter: Callable[[float], float] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._db = db
        self._collection = collection
        self._scope = scope
        self._max_await_ms = max_await_ms
        self._idle_pause = idle_pause
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        # Full jitter: a uniformly random wait up to the capped exponential one.
        self._jitter = jitter or (lambda ceiling: random.uniform(0, ceiling))  # noqa: S311
        self._clock = clock
        self._sink: Sink | None = None
        self._followers: dict[str | None, Follower] = {}
        # Every follower task, current or stopping, so that run() ends them all.
        self._tasks: set[asyncio.Task[None]] = set()
        if scope == "database":
            self._followers[None] = Follower(None, last_answer=clock())
        self._active = False
        # Read by /metrics at scrape time: the engine knows no metrics library.
        self._poison = 0
        self._resumes = 0
        self._restarts = 0
        self._interruptions = 0

    @property
    def running(self) -> bool:
        return self._active and all(f.healthy for f in self._followers.values())

    @property
    def problem(self) -> str | None:
        if not self._active:
            return "the change feed is not running"
        down = [f for f in self._followers.values() if not f.healthy]
        if not down:
            return None
        problem = f"change stream not open: {', '.join(f.label for f in down[:3])}"
        errors = [f.error for f in down if f.error]
        return f"{problem} ({errors[0]})" if errors else problem

    def health(self) -> FeedHealth:
        """Its counts since start, and the lag of the stalest stream."""
        # An open stream answers every max_await_ms, idle or not: the lag grows
        # only while one is stuck. Every change before it was delivered.
        oldest = min((f.last_answer for f in self._followers.values()), default=None)
        lag = 0.0 if oldest is None else max(0.0, (self._clock() - oldest).total_seconds())
        return FeedHealth(
            lag_seconds=lag,
            resumes=self._resumes,  # reopened from their token after an interruption
            restarts=self._restarts,  # started again from now: token unusable, stream ended
            interruptions=self._interruptions,  # errors that stopped a stream, each backed off
            skipped_events=self._poison,  # change events that could not be decoded
        )

    async def run(self, sink: Sink) -> None:
        self._sink = sink
        self._active = True
        try:
            for follower in list(self._followers.values()):
                self._start(follower)
            await asyncio.Event().wait()  # The followers do the work until cancelled.
        finally:
            self._active = False
            for follower in self._followers.values():
                follower.stopped = True
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def watch(self, email: str) -> None:
        collection = collection_for(email)
        if self._scope == "collection" and collection not in self._followers:
            follower = Follower(collection, email, last_answer=self._clock())
            self._followers[collection] = follower
            if self._active:
                self._start(follower)

    def unwatch(self, email: str) -> None:
        collection = collection_for(email)
        follower = self._followers.pop(collection, None) if self._scope == "collection" else None
        if follower is not None:
            follower.stopped = True
            if follower.task is not None:
                follower.task.cancel()

    async def ready(self, email: str) -> None:
        """Wait until changes to ``email``'s collection made from now on will be delivered."""
        key = collection_for(email) if self._scope == "collection" else None
        follower = self._followers.get(key)
        if follower is not None:
            await follower.opened.wait()

    def _start(self, follower: Follower) -> None:
        task = asyncio.create_task(self._follow(follower), name=f"feed:{follower.label}")
        follower.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(self, follower: Follower) -> None:
        target = self._db if follower.name is None else self._collection(follower.name)
        while not follower.stopped:
            try:
                reason = await self._follow_once(target, follower)
            except OperationFailure as exc:
                # A restart from now that fails the same way again is backed off,
                # so a server that keeps refusing is not asked in a tight loop.
                if exc.code not in RESTART_CODES or follower.resync is not None or follower.stopped:
                    await self._back_off(follower, exc)
                    continue
                reason = f"resume token unusable: {exc.code} {exc}"
            except (PyMongoError, StreamClosed) as exc:
                await self._back_off(follower, exc)
                continue
            except Exception as exc:
                # A bug or a driver surprise: the stream is resumed from its
                # token like any interruption, and /readyz says why meanwhile.
                log.exception("feed_crashed", extra={"stream": follower.label})
                await self._back_off(follower, exc)
                continue
            if follower.stopped:
                return
            follower.healthy = False
            follower.token, follower.resync = None, reason
            if follower.gap_since is None:  # a restart that failed keeps the first gap
                follower.gap_since = follower.last_answer - RESYNC_MARGIN
            self._restarts += 1
            log.warning("feed_restarted", extra={"stream": follower.label, "reason": reason})

    async def _follow_once(self, target: Watchable, follower: Follower) -> str:
        """Open a stream and deliver its changes; why it ended, when it ends for good."""
        stream = await target.watch(
            self._pipeline(follower),
            full_document="updateLookup",
            resume_after=follower.token,
            max_await_time_ms=self._max_await_ms,
        )
        try:
            # PyMongo keeps the opening aggregate's postBatchResumeToken: a stream
            # that fails before its first event resumes from there, not from now.
            follower.token = stream.resume_token or follower.token
            follower.healthy, follower.error = True, None
            follower.opened.set()
            if follower.failures:
                self._resumes += 1
                log.info("feed_resumed", extra={"stream": follower.label})
            follower.failures = 0
            if follower.resync is not None:
                # Only now, with the new stream open, can a backlog read miss nothing.
                self._emit(Resync(follower.resync, follower.email, follower.gap_since))
                follower.resync, follower.gap_since = None, None
            return await self._drain(stream, follower)
        finally:
            await stream.close()

    async def _drain(self, stream: ChangeStream, follower: Follower) -> str:
        """Deliver changes, keeping the resume token, until the stream ends for good."""
        while True:
            if follower.stopped:
                return "stopped"
            change = await stream.try_next()
            # Updated after every getMore, idle ones included (postBatchResumeToken).
            follower.token = stream.resume_token or follower.token
            follower.last_answer = self._clock()
            if change is None:
                if not stream.alive:
                    # MongoDB closes a change stream only after an invalidate event,
                    # handled below; a cursor that vanished without one (nx-27017
                    # drops streams when the connection that opened them closes) is
                    # resumed from the token like any interruption.
                    raise StreamClosed("the change stream's cursor was closed")
                # Real servers already waited max_await_ms on the server; the pause
                # keeps a stand-in that answers at once (nx-27017) from busy-polling.
                await asyncio.sleep(self._idle_pause)
                continue
            operation = change.get("operationType")
            if operation in ENDING_OPERATIONS:
                return f"the change stream ended: {operation}"
            try:
                event = event_of(change)
            except Exception:
                # A poison event: retrying it would fail the same way for ever,
                # and on every process. Its token is already past it.
                self._poison += 1
                log.exception(
                    "feed_event_undecodable",
                    extra={"stream": follower.label, "token": str(follower.token)},
                )
                continue
            if event is not None and not follower.stopped:
                self._emit(event)
            # try_next() does not yield within a batch; let the writers drain.
            await asyncio.sleep(0)

    async def _back_off(self, follower: Follower, exc: Exception) -> None:
        follower.healthy = False
        why = reason(exc) if isinstance(exc, PyMongoError) else str(exc)
        follower.error = f"{type(exc).__name__}: {why}"
        exponent = min(follower.failures, 32)  # Beyond that the cap rules anyway.
        delay = self._jitter(min(self._backoff_cap, self._backoff_base * 2**exponent))
        follower.failures += 1
        self._interruptions += 1
        log.warning(
            "feed_interrupted",
            extra={"stream": follower.label, "error": why, "retry_in": round(delay, 3)},
        )
        await asyncio.sleep(delay)

    def _pipeline(self, follower: Follower) -> list[dict[str, Any]]:
        match: dict[str, Any] = {"operationType": {"$in": WATCHED_OPERATIONS}}
        if follower.name is None:
            match = {
                "$or": [{"operationType": "invalidate"}, {**match, "ns.coll": {"$regex": "^m_"}}]
            }
        return [{"$match": match}]

    def _emit(self, event: FeedEvent) -> None:
        assert self._sink is not None, "followers run only under run()"
        try:
            self._sink(event)
        except Exception:
            # One event the hub cannot route must not stop delivery of the rest.
            log.exception("feed_event_failed", extra={"event_type": type(event).__name__})
