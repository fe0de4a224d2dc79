"""One session per connection: who it is, and its message stream joined from backlog and feed."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

from tidings.engine import Presence, Store
from tidings.errors import CloseCode, StoreUnavailable
from tidings.hub import Hub
from tidings.metrics import Metrics
from tidings.models import Message, Position, StateChanged, User
from tidings.outbox import Outbox, Transport
from tidings.recorder import Recorder
from tidings.server_frames import change_frame

log = logging.getLogger("tidings.session")


class Session:
    """A connection's server side.

    Every frame for the client goes through the session's ``Outbox``, which
    writes them in order and never waits on the database or on a slow client.
    The session decides what goes in: the backlog, read from the store at the
    pace the client reads, then the live stream the hub brings, joined to it
    without a gap or a duplicate. Live messages that find the outbox full are
    dropped from memory, since they are durable, and read again from the
    store once the client has caught up. Only a client that takes no frame
    for ``write_timeout`` while frames wait, or lets eight times the queue
    pile up, is cut as a slow consumer.

    An idle session holds no task: the outbox's writer runs while frames wait,
    and the clocks (identification, token expiry) are timer handles. Every
    task, the writer's too, is the session's own, and ``stop`` ends them all.
    """

    __slots__ = (
        "_backlog_batch",
        "_behind",
        "_closed",
        "_conn_id",
        "_hub",
        "_joining",
        "_last",
        "_metrics",
        "_outbox",
        "_pending",
        "_presence",
        "_queue_size",
        "_since",
        "_store",
        "_stream",
        "_tasks",
        "_timers",
        "_transport",
        "user",
    )

    def __init__(
        self,
        conn_id: str,
        transport: Transport,
        store: Store,
        presence: Presence,
        hub: Hub,
        recorder: Recorder,
        *,
        queue_size: int,
        backlog_batch: int,
        write_timeout: float,
        metrics: Metrics | None = None,
    ) -> None:
        self._conn_id = conn_id
        self._metrics = metrics
        self._transport = transport
        self._store = store
        self._presence = presence
        self._hub = hub
        self._queue_size = queue_size
        self._backlog_batch = backlog_batch
        self._outbox = Outbox(
            transport,
            recorder.record,
            queue_size=queue_size,
            write_timeout=write_timeout,
            spawn=self._spawn,
            on_progress=self._progress,
            on_stuck=self._cut,
            metrics=metrics,
        )
        self.user: User | None = None
        self._since: Position | None = None
        # The position of the last message queued: the live stream comes in
        # position order, so anything at or before it was queued already.
        self._last: Position | None = None
        # While the backlog is read, live messages wait here to be joined to it.
        self._joining = False
        self._pending: list[Message] = []
        # Live messages were dropped; they are read again from the store.
        self._behind = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._stream: asyncio.Task[None] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._closed: asyncio.Event | None = None

    @property
    def queued(self) -> int:
        """Frames waiting to be written to the client."""
        return len(self._outbox)

    @property
    def conn_id(self) -> str:
        """The connection's id, as logs and message receipts name it."""
        return self._conn_id

    @property
    def closed(self) -> asyncio.Event:
        """Set once every task of the session has ended."""
        if self._closed is None:
            self._closed = asyncio.Event()
        return self._closed

    @property
    def log_fields(self) -> dict[str, Any]:
        """What every log line about this session carries."""
        return {"conn": self._conn_id, "email": self.user.email if self.user else None}

    def start(self, identify_timeout: float) -> None:
        """Start the clock for a connection that never identifies."""
        reason = f"identify with #email within {identify_timeout:g} seconds"
        self._later(identify_timeout, reason, unless_identified=True)

    def expire(self, seconds: float) -> None:
        """Close the connection when its credentials expire, ``seconds`` from now."""
        self._later(seconds, "token expired; reconnect with a new one")

    def _later(self, seconds: float, reason: str, unless_identified: bool = False) -> None:
        def fire() -> None:
            if not (unless_identified and self.user is not None):
                close = functools.partial(self.close, CloseCode.POLICY_VIOLATION, reason)
                self._spawn(close)

        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(max(0.0, seconds), fire))

    def push(self, frame: dict[str, Any]) -> None:
        """Queue a frame for the client without waiting."""
        self._outbox.push(frame)

    def changed(self, change: StateChanged) -> None:
        """Tell the client that a message it sent moved to a new state."""
        self._outbox.push(change_frame(change))

    def deliver(self, message: Message) -> None:
        """Queue a live message the hub brings, or keep it to be joined to the backlog."""
        if self._joining:
            if len(self._pending) < self._queue_size * 4:
                self._pending.append(message)
            else:
                self._behind = True
        elif not self._behind:
            self._offer(message)

    async def room(self) -> None:
        """Wait until the outbox has room: the endpoint reads no frame before."""
        await self._outbox.room()

    async def identify(self, user: User, since: Position | None) -> None:
        """Become ``user``'s session: join the backlog to the live stream."""
        self.user = user
        self._since = since
        # Joining starts before anything is awaited, so that a message the hub
        # brings from now on waits in ``_pending`` to be joined to the backlog.
        first = self._hub.attach(user.email, self)
        self._begin_stream(None)
        if first:
            await self._set_presence(True)

    def resync(self, since: datetime | None) -> None:
        """Re-read the backlog, and states moved from ``since``: the feed may have missed them."""
        if self.user is not None and not self._outbox.closed:
            self._begin_stream(None)
            if since is not None:
                self._spawn(functools.partial(self._restate, self.user.email, since))

    async def _restate(self, email: str, since: datetime) -> None:
        for change in await self._store.states_since(email, since):
            self.changed(change)

    async def close(self, code: int, reason: str) -> None:
        """Close the connection with ``code`` and ``reason`` and stop the session."""
        if not self._outbox.closed:
            self._outbox.close()
            await self._shut(code, reason)

    async def _shut(self, code: int, reason: str) -> None:
        log.info("connection_closing", extra={**self.log_fields, "code": code, "reason": reason})
        # Stop writing first: the close frame must not wait behind frames that a
        # slow client will never take.
        await self.stop()
        await self._transport.close(code, reason)

    async def finish(self, code: int, reason: str, flush_timeout: float) -> None:
        """Close after writing what is already queued, waiting at most ``flush_timeout``."""
        await self._outbox.flush(flush_timeout)
        await self.close(code, reason)

    async def stop(self) -> None:
        """End every task of this session and leave the hub. Idempotent."""
        self._outbox.close()
        for timer in self._timers:
            timer.cancel()
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._outbox.wake()
        if self.user is not None and self._hub.detach(self.user.email, self):
            await self._set_presence(False)
        self.closed.set()

    async def _set_presence(self, online: bool) -> None:
        assert self.user is not None
        try:
            await self._presence.set(self.user.email, online)
        except StoreUnavailable as exc:
            # Others see this user's presence late until the next refresh; nothing else suffers.
            log.warning("presence_failed", extra={**self.log_fields, "error": str(exc)})

    def _begin_stream(self, after: Position | None) -> None:
        # Subscribed first (the hub is attached), then the backlog is read, so a
        # message stored meanwhile is either in the backlog or in ``_pending``.
        if self._stream is not None:
            self._stream.cancel()
        self._joining, self._behind, self._last = True, False, after
        self._pending.clear()
        self._stream = self._spawn(functools.partial(self._join, after))

    async def _join(self, after: Position | None) -> None:
        assert self.user is not None
        email = self.user.email
        await self._hub.ready(email)
        count = 0
        while not self._outbox.closed:
            page = await self._store.backlog(email, self._since, after, self._backlog_batch)
            for message in page:
                await self._outbox.room()  # The backlog goes at the pace the client reads.
                self._outbox.push_message(message, backlog=True)
                self._last = message.position
            count += len(page)
            if len(page) < self._backlog_batch:
                break
            after = page[-1].position
        log.info("messages_found" if count else "no_messages_found", extra=self.log_fields)
        # No await from here on: the live stream takes over exactly where the backlog ends.
        behind, self._behind = self._behind, False
        for message in self._pending:
            self._offer(message)
        self._behind = self._behind or behind
        self._pending.clear()
        self._joining = False
        if self._behind and not self._outbox.writing:
            self._begin_stream(self._last)  # Dropped while joining, nothing queued: read again.

    def _offer(self, message: Message) -> None:
        if self._last is not None and message.position <= self._last:
            return  # The backlog had it already.
        if self._outbox.full:
            # Durable, so it is read again once the client has caught up.
            self._behind = True
            return
        self._outbox.push_message(message)
        self._last = message.position

    def _progress(self) -> None:
        """The outbox has emptied to half or less: read again what was dropped."""
        if self._behind and not self._joining:
            self._begin_stream(self._last)

    def _cut(self, why: str) -> None:
        """Close a client the outbox found stuck, from a task of its own."""
        if self._outbox.closed:
            return
        self._outbox.close()
        if self._metrics is not None:
            self._metrics.slow_consumers += 1
        log.warning("slow_consumer", extra={**self.log_fields, "queued": len(self._outbox)})
        reason = f"slow consumer: {why}"
        self._spawn(functools.partial(self._shut, CloseCode.POLICY_VIOLATION, reason))

    def _spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task[None]:
        # Takes a function, not a coroutine, so that a task cancelled before it
        # starts leaves no never-awaited coroutine behind.
        task = asyncio.create_task(self._guard(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guard(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except StoreUnavailable as exc:
            log.warning("session_task_failed", extra={**self.log_fields, "error": str(exc)})
            await self.close(CloseCode.TRY_AGAIN_LATER, "service unavailable, reconnect later")
        except Exception:
            log.exception("session_task_crashed", extra=self.log_fields)
            await self.close(CloseCode.INTERNAL_ERROR, "internal error")
