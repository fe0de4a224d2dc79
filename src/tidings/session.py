"""One session per connection: its outgoing queue, its writer, and its message stream."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from bson import ObjectId

from tidings.errors import CloseCode, TidingsError
from tidings.hub import Hub
from tidings.models import Message, User
from tidings.protocol import MessageState, encode
from tidings.store import Store

log = logging.getLogger("tidings.session")


class ConnectionGone(Exception):
    """The peer is no longer there to write to."""


class Transport(Protocol):
    """The socket, as the session sees it; the endpoint adapts the real one."""

    async def send_text(self, text: str) -> None:
        """Write one text frame; raise ``ConnectionGone`` when the peer has gone."""

    async def close(self, code: int, reason: str) -> None:
        """Close with a code and reason; never raises."""


# A frame waiting to be written, and the message it carries if it is one.
Outgoing = tuple[str, Message | None]


class Session:
    """A connection's server side.

    Every frame for the client goes through one bounded queue, drained by one
    writer task (the seed's ``streamWorker``), so frames leave in the order
    they were queued. Live frames are offered without waiting: a client that
    lets the queue fill cannot keep up and is disconnected, and nobody else
    waits for it. Only the backlog waits for room, since it is read at the
    pace the client takes it.
    """

    def __init__(
        self,
        conn_id: str,
        transport: Transport,
        store: Store,
        hub: Hub,
        queue_size: int,
        backlog_batch: int,
    ) -> None:
        self._conn_id = conn_id
        self._transport = transport
        self._store = store
        self._hub = hub
        self._backlog_batch = backlog_batch
        self._queue: asyncio.Queue[Outgoing] = asyncio.Queue(maxsize=queue_size)
        self.user: User | None = None
        self._since: ObjectId | None = None
        # While the backlog is read, live messages wait here to be joined to it.
        self._joining = False
        self._pending: list[Message] = []
        # What the backlog sent: the feed may still bring some of it afterwards,
        # since it was stored after the subscription opened but before the read.
        self._streamed: set[tuple[str, str]] = set()
        self._pending_limit = queue_size * 4
        self._tasks: set[asyncio.Task[None]] = set()
        self._stream: asyncio.Task[None] | None = None
        # Set once the session stops taking frames; ``_closed`` once close() ran.
        self._closing = False
        self._closed = False
        self.closed = asyncio.Event()

    @property
    def conn_id(self) -> str:
        return self._conn_id

    @property
    def log_fields(self) -> dict[str, Any]:
        """What every log line about this session carries."""
        return {"conn": self._conn_id, "email": self.user.email if self.user else None}

    def start(self, identify_timeout: float) -> None:
        """Start the writer, and the clock for a connection that never identifies."""
        self._spawn(self._write)
        self._spawn(functools.partial(self._expect_identity, identify_timeout))

    def expire(self, seconds: float) -> None:
        """Close the connection when its credentials expire, ``seconds`` from now."""
        self._spawn(functools.partial(self._expire, seconds))

    async def _expire(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
        await self.close(CloseCode.POLICY_VIOLATION, "token expired; reconnect with a new one")

    async def _expect_identity(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if self.user is None:
            reason = f"identify with #email within {seconds:g} seconds"
            await self.close(CloseCode.POLICY_VIOLATION, reason)

    def push(self, frame: dict[str, Any]) -> None:
        """Queue a frame for the client without waiting."""
        self._offer((encode(frame), None))

    def deliver(self, message: Message) -> None:
        if self._joining:
            if len(self._pending) >= self._pending_limit:
                self._overflow()
            else:
                self._pending.append(message)
            return
        if message.key in self._streamed:
            self._streamed.discard(message.key)  # It comes once more at most.
            return
        self._offer((encode(message.frame()), message))

    def notify(self, frame: dict[str, Any]) -> None:
        self.push(frame)

    async def identify(self, user: User, since: ObjectId | None) -> None:
        """Become ``user``'s session: join the backlog to the live stream."""
        self.user = user
        self._since = since
        # Joining starts before anything is awaited, so that a message the hub
        # brings from now on waits in ``_pending`` to be joined to the backlog.
        self._hub.attach(user.email, self)
        self._begin_stream()
        try:
            await self._store.set_presence(user.email, True)
        except TidingsError as exc:
            # Others see this user offline until the next refresh; nothing else suffers.
            log.warning("presence_failed", extra={**self.log_fields, "error": str(exc)})

    def resync(self) -> None:
        if self.user is not None and not self._closing:
            self._begin_stream()

    async def close(self, code: int, reason: str) -> None:
        """Close the connection with ``code`` and ``reason`` and stop the session."""
        if self._closed:
            return
        self._closed = self._closing = True
        log.info("connection_closing", extra={**self.log_fields, "code": code, "reason": reason})
        # Stop writing first: the close frame must not wait behind frames that a
        # slow client will never take.
        await self.stop()
        await self._transport.close(code, reason)

    async def finish(self, code: int, reason: str, flush_timeout: float) -> None:
        """Close after writing what is already queued, waiting at most ``flush_timeout``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(flush_timeout):
                await self._queue.join()
        await self.close(code, reason)

    async def stop(self) -> None:
        """End every task of this session and leave the hub. Idempotent."""
        self._closing = True
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.user is not None and self._hub.detach(self.user.email, self):
            with contextlib.suppress(TidingsError):
                await self._store.set_presence(self.user.email, False)
        self.closed.set()

    def _begin_stream(self) -> None:
        # Subscribed first (the hub is attached), then the backlog is read, so a
        # message stored meanwhile is either in the backlog or in ``_pending``.
        if self._stream is not None:
            self._stream.cancel()
        self._joining = True
        self._pending.clear()
        self._stream = self._spawn(self._join)

    async def _join(self) -> None:
        assert self.user is not None
        email = self.user.email
        await self._hub.ready(email)
        self._streamed = streamed = set()
        after: ObjectId | None = None
        while not self._closing:
            page = await self._store.backlog(email, self._since, after, self._backlog_batch)
            for message in page:
                await self._queue.put((encode(message.frame()), message))
                streamed.add(message.key)
            if len(page) < self._backlog_batch:
                break
            after = page[-1].oid
        event = "messages_found" if streamed else "no_messages_found"
        log.info(event, extra={**self.log_fields, "count": len(streamed)})
        # No await from here on: the live stream takes over exactly where the backlog ends.
        for message in self._pending:
            if message.key in streamed:
                streamed.discard(message.key)
            else:
                self._offer((encode(message.frame()), message))
        self._pending.clear()
        self._joining = False

    async def _write(self) -> None:
        try:
            # Checked as well as cancellation, which a database call racing its
            # own timeout can lose on Python 3.11 (see changestream._Follower).
            while not self._closing:
                text, message = await self._queue.get()
                try:
                    await self._transport.send_text(text)
                    if message is not None and message.state is MessageState.STORED:
                        await self._mark_sent(message)
                finally:
                    self._queue.task_done()
        except ConnectionGone:
            return

    async def _mark_sent(self, message: Message) -> None:
        try:
            await self._store.advance(message, MessageState.SENT)
        except TidingsError as exc:
            # The message stays ``stored`` and is redelivered; only the sender's
            # ``sent`` notice is lost.
            log.warning(
                "mark_sent_failed",
                extra={**self.log_fields, "message_id": message.id, "error": str(exc)},
            )

    def _offer(self, item: Outgoing) -> None:
        if self._closing:
            return  # Stored messages are redelivered on the next connection.
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._overflow()

    def _overflow(self) -> None:
        log.warning("slow_consumer", extra={**self.log_fields, "queued": self._queue.qsize()})
        self._closing = True
        reason = "slow consumer: too many frames waiting to be sent"
        self._spawn(functools.partial(self.close, CloseCode.POLICY_VIOLATION, reason))

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
        except TidingsError as exc:
            log.warning("session_task_failed", extra={**self.log_fields, "error": str(exc)})
            await self.close(CloseCode.TRY_AGAIN_LATER, "service unavailable, reconnect later")
        except Exception:
            log.exception("session_task_crashed", extra=self.log_fields)
            await self.close(CloseCode.INTERNAL_ERROR, "internal error")
