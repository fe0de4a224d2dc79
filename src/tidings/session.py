"""One session per connection: its outgoing queue, its writer, and its message stream."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from tidings.engine import Presence, Store
from tidings.errors import CloseCode, ConnectionGone, StoreUnavailable
from tidings.hub import Hub
from tidings.models import Message, Position, Transition, User
from tidings.protocol import MessageState, encode
from tidings.recorder import Recorder

log = logging.getLogger("tidings.session")


class Transport(Protocol):
    """The socket, as the session sees it; the endpoint adapts the real one."""

    async def send_text(self, text: str) -> None:
        """Write one text frame; raise ``ConnectionGone`` when the peer has gone."""

    async def close(self, code: int, reason: str) -> None:
        """Close with a code and reason; never raises."""


@dataclass(slots=True)
class _Out:
    text: str
    # A message frame: marked ``sent`` once written.
    message: Message | None = None
    # A state frame: the id of its message, so that a later state replaces it.
    state_of: str | None = None
    superseded: bool = False


class Session:
    """A connection's server side.

    Every frame for the client goes through one queue, drained by one writer
    task (the seed's ``streamWorker``), so frames leave in the order they were
    queued, and the writer never waits on the database: ``sent`` goes to the
    recorder. Nobody waits for a slow client either. Live messages that find
    the queue full are dropped from memory, since they are durable, and read
    again from the store once the client has caught up; a state frame
    replaces an earlier one for the same message that is still queued (a state
    may be skipped once a later one is recorded). Replies to the client's own
    frames are always queued, and the endpoint reads its next frames only when
    there is room. Only a client that takes no frame for ``write_timeout``
    while frames wait is cut as a slow consumer.

    An idle session holds no task: the writer runs while frames wait, and the
    clocks (identification, token expiry) are timer handles.
    """

    __slots__ = (
        "_backlog_batch",
        "_behind",
        "_closed",
        "_closing",
        "_conn_id",
        "_hub",
        "_idle",
        "_joining",
        "_last",
        "_pending",
        "_presence",
        "_queue",
        "_queue_size",
        "_queued_states",
        "_recorder",
        "_room",
        "_sending_since",
        "_since",
        "_store",
        "_stream",
        "_tasks",
        "_timers",
        "_transport",
        "_watchdog",
        "_write_timeout",
        "_writer",
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
    ) -> None:
        self._conn_id = conn_id
        self._transport = transport
        self._store = store
        self._presence = presence
        self._hub = hub
        self._recorder = recorder
        self._queue_size = queue_size
        self._backlog_batch = backlog_batch
        self._write_timeout = write_timeout
        self._queue: deque[_Out] = deque()
        self._queued_states: dict[str, _Out] = {}
        self._writer: asyncio.Task[None] | None = None
        # When the frame being written was handed to the socket; None between frames.
        self._sending_since: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        # Futures made only while someone waits: for room in the queue, for it to empty.
        self._room: asyncio.Future[None] | None = None
        self._idle: asyncio.Future[None] | None = None
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
        self._closing = False  # no frame is taken or queued any more
        self._closed: asyncio.Event | None = None

    @property
    def conn_id(self) -> str:
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
        state_of = frame["id"] if frame["type"] == "state" else None
        # Only a client that falls behind misses states; others see every one.
        behind = len(self._queue) >= self._queue_size // 2
        if state_of is not None and behind and (earlier := self._queued_states.get(state_of)):
            earlier.superseded = True
        out = _Out(encode(frame), state_of=state_of)
        if state_of is not None:
            self._queued_states[state_of] = out
        self._append(out)
        if len(self._queue) > self._queue_size * 8:
            self._cut("too many frames waiting to be sent")

    def deliver(self, message: Message) -> None:
        if self._joining:
            if len(self._pending) < self._queue_size * 4:
                self._pending.append(message)
            else:
                self._behind = True
        elif not self._behind:
            self._offer(message)

    async def room(self) -> None:
        """Wait until the queue has room: the endpoint reads no frame before."""
        if len(self._queue) >= self._queue_size and not self._closing:
            if self._room is None:
                self._room = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._room)

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

    def resync(self) -> None:
        if self.user is not None and not self._closing:
            self._begin_stream(None)

    async def close(self, code: int, reason: str) -> None:
        """Close the connection with ``code`` and ``reason`` and stop the session."""
        if not self._closing:
            self._closing = True
            await self._shut(code, reason)

    async def _shut(self, code: int, reason: str) -> None:
        log.info("connection_closing", extra={**self.log_fields, "code": code, "reason": reason})
        # Stop writing first: the close frame must not wait behind frames that a
        # slow client will never take.
        await self.stop()
        await self._transport.close(code, reason)

    async def finish(self, code: int, reason: str, flush_timeout: float) -> None:
        """Close after writing what is already queued, waiting at most ``flush_timeout``."""
        if self._writer is not None:
            if self._idle is None:
                self._idle = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(flush_timeout):
                    await asyncio.shield(self._idle)
        await self.close(code, reason)

    async def stop(self) -> None:
        """End every task of this session and leave the hub. Idempotent."""
        self._closing = True
        for timer in self._timers:
            timer.cancel()
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        _resolve(self._room)
        _resolve(self._idle)
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
        while not self._closing:
            page = await self._store.backlog(email, self._since, after, self._backlog_batch)
            for message in page:
                await self.room()  # The backlog goes at the pace the client reads.
                self._append(_Out(encode(message.frame()), message))
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
        if self._behind and self._writer is None:
            self._begin_stream(self._last)  # Dropped while joining, nothing queued: read again.

    def _offer(self, message: Message) -> None:
        if self._last is not None and message.position <= self._last:
            return  # The backlog had it already.
        if len(self._queue) >= self._queue_size:
            # Durable, so it is read again once the client has caught up.
            self._behind = True
            return
        self._append(_Out(encode(message.frame()), message))
        self._last = message.position

    def _append(self, out: _Out) -> None:
        if self._closing:
            return  # Stored messages are redelivered on the next connection.
        self._queue.append(out)
        if self._writer is None:
            self._writer = self._spawn(self._write)

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        # One watchdog a run of the writer, not a timeout a frame: a timeout
        # costs a timer of its own, and this is the path of every frame.
        self._watchdog = loop.call_later(self._write_timeout, self._watch)
        try:
            # Checked as well as cancellation, which a database call racing its
            # own timeout can lose on Python 3.11 (see the change-stream feed).
            while self._queue and not self._closing:
                out = self._queue.popleft()
                if len(self._queue) < self._queue_size:
                    _resolve(self._room)
                    self._room = None
                if self._behind and not self._joining and len(self._queue) <= self._queue_size // 2:
                    self._begin_stream(self._last)  # Caught up enough: read what was dropped.
                if out.state_of is not None and self._queued_states.get(out.state_of) is out:
                    del self._queued_states[out.state_of]
                if out.superseded:
                    continue
                self._sending_since = loop.time()
                try:
                    await self._transport.send_text(out.text)
                except ConnectionGone:
                    self._closing = True  # Nobody is listening: queue nothing more.
                    return
                self._sending_since = None
                if out.message is not None and out.message.state is MessageState.STORED:
                    self._recorder.record(Transition.of(out.message, MessageState.SENT))
            if self._behind and not self._joining and not self._closing:
                self._begin_stream(self._last)  # Emptied while behind: read what was dropped.
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._writer = None
            self._sending_since = None
            _resolve(self._idle)
            self._idle = None

    def _watch(self) -> None:
        """Cut a client that took no frame for ``write_timeout``; else look again later."""
        stuck = 0.0
        if self._sending_since is not None:
            stuck = asyncio.get_running_loop().time() - self._sending_since
        if stuck >= self._write_timeout:
            self._cut(f"no frame taken for {self._write_timeout:g} seconds")
        else:
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_later(self._write_timeout - stuck, self._watch)

    def _cut(self, why: str) -> None:
        if self._closing:
            return
        self._closing = True
        log.warning("slow_consumer", extra={**self.log_fields, "queued": len(self._queue)})
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


def _resolve(future: asyncio.Future[None] | None) -> None:
    """Wake whoever waits on ``future``; the next wait makes a new one."""
    if future is not None and not future.done():
        future.set_result(None)
