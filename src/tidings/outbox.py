"""A connection's outgoing side: one queue of frames, drained by one writer task."""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from tidings.errors import ConnectionGone
from tidings.metrics import Histogram, Metrics
from tidings.models import Message, Transition
from tidings.server_frames import encode, message_frame
from tidings.states import RECORDED, MessageState

# Frames waiting in an outbox from which on a ``received`` gives way to its ``stored``.
BURST = 16

# Message ids whose furthest state an outbox remembers, to keep states forward.
TOLD = 1024
# The recorded states' order, by the value a state frame carries: the path of
# every state frame, so no enum is made for it.
_RECORDED = {state.value: rank for rank, state in enumerate(RECORDED)}

# Starts a coroutine function as a task of the outbox's owner, which cancels it on stop.
Spawn = Callable[[Callable[[], Coroutine[Any, Any, None]]], asyncio.Task[None]]


class Transport(Protocol):
    """The socket, as a session sees it; the endpoint adapts the real one."""

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
    # A ``received`` frame, which a burst lets go (see ``Outbox``).
    received: bool = False
    superseded: bool = False
    kind: str = "message"  # the frame's type, counted once written
    latency: Histogram | None = None  # a message's first delivery's, observed once written


class Outbox:
    """Every frame for one client, written in the order it was queued.

    The queue is bounded softly at ``queue_size``: ``full`` tells the session
    to drop live messages (they are durable and read again), ``room`` makes the
    endpoint wait before it reads more of the client's frames, and frames are
    always taken up to eight times the bound, beyond which the client is cut
    (``on_stuck``). A state frame replaces an earlier one for the same message
    that is still queued, but only once half the bound waits: a client that
    keeps up sees every state. The one exception is ``received``, which is
    never recorded: in a burst (``BURST`` frames waiting, as when a client
    sends many messages at once) ``stored`` replaces it, sparing a frame a
    message each way. A message sent on its own is still answered with both.
    The writer never waits on the database: a
    message written as ``stored`` is handed to ``record`` as ``sent``.

    An idle outbox holds no task: the writer is started by ``spawn`` (so that
    its owner cancels it on stop) when a frame arrives and ends when the queue
    is empty. One watchdog a run of the writer calls ``on_stuck`` when the
    client takes no frame for ``write_timeout``. ``on_progress`` runs after a
    frame leaves the queue with at most half the bound waiting, and when the
    queue empties: the moments the session may read again what it dropped.
    With ``metrics`` it counts frames written, error frames taken and delivery latencies.
    """

    __slots__ = (
        "_closed",
        "_idle",
        "_metrics",
        "_on_progress",
        "_on_stuck",
        "_queue",
        "_queue_size",
        "_queued_states",
        "_record",
        "_room",
        "_sending_since",
        "_spawn",
        "_told",
        "_transport",
        "_watchdog",
        "_write_timeout",
        "_writer",
    )

    def __init__(
        self,
        transport: Transport,
        record: Callable[[Transition], None],
        *,
        queue_size: int,
        write_timeout: float,
        spawn: Spawn,
        on_progress: Callable[[], None],
        on_stuck: Callable[[str], None],
        metrics: Metrics | None = None,
    ) -> None:
        self._transport = transport
        self._metrics = metrics
        self._record = record
        self._queue_size = queue_size
        self._write_timeout = write_timeout
        self._spawn = spawn
        self._on_progress = on_progress
        self._on_stuck = on_stuck
        self._queue: deque[_Out] = deque()
        self._queued_states: dict[str, _Out] = {}
        # The furthest state queued per message id, most recent ids last.
        self._told: OrderedDict[str, int] = OrderedDict()
        self._writer: asyncio.Task[None] | None = None
        # When the frame being written was handed to the socket; None between frames.
        self._sending_since: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        # Futures made only while someone waits: for room in the queue, for it to empty.
        self._room: asyncio.Future[None] | None = None
        self._idle: asyncio.Future[None] | None = None
        self._closed = False  # no frame is taken or queued any more

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def closed(self) -> bool:
        """Whether frames are no longer taken: closed, or the peer has gone."""
        return self._closed

    @property
    def full(self) -> bool:
        """Whether the queue holds ``queue_size`` frames or more."""
        return len(self._queue) >= self._queue_size

    @property
    def writing(self) -> bool:
        """Whether the writer runs: frames wait, or one is being written."""
        return self._writer is not None

    def close(self) -> None:
        """Take no frame any more; the writer stops before its next frame."""
        self._closed = True

    def wake(self) -> None:
        """Wake whoever waits for room or for the queue to empty (after ``close``)."""
        _resolve(self._room)
        _resolve(self._idle)

    def push(self, frame: dict[str, Any]) -> None:
        """Queue a frame that is not a message, such as a reply or a state.

        A state behind one already queued for the same message is dropped:
        states reach a connection by two paths (answers to its own frames,
        and the feed, which may lag), and the client must see them forward
        only. A repeated state is kept: it may be the answer to a resend.
        """
        kind = frame["type"]
        state_of = frame["id"] if kind == "state" else None
        if state_of is not None and self._behind_told(state_of, frame["state"]):
            return
        if state_of is not None and (earlier := self._queued_states.get(state_of)):
            # Only a client that falls behind misses states; others see every one.
            waiting = len(self._queue)
            if waiting >= self._queue_size // 2 or (earlier.received and waiting >= BURST):
                earlier.superseded = True
        if kind == "error" and self._metrics is not None:
            self._metrics.error_frames[frame["code"]] += 1
        out = _Out(
            encode(frame),
            state_of=state_of,
            received=state_of is not None and frame["state"] == MessageState.RECEIVED,
            kind=kind,
        )
        if state_of is not None:
            self._queued_states[state_of] = out
        self._append(out)
        if len(self._queue) > self._queue_size * 8:
            self._on_stuck("too many frames waiting to be sent")

    def _behind_told(self, message_id: str, state: str) -> bool:
        """Whether ``state`` is behind what was queued for the message; else remember it."""
        # received (the answer to a frame, a resend's included) and failed are never behind.
        rank = _RECORDED.get(state)
        if rank is None:
            return False
        told = self._told.get(message_id)
        if told is not None and told > rank:
            return True
        self._told[message_id] = rank
        self._told.move_to_end(message_id)
        if len(self._told) > TOLD:
            self._told.popitem(last=False)
        return False

    def push_message(self, message: Message, *, backlog: bool = False) -> None:
        """Queue a message, full queue or not (the caller decides); ``backlog``: not live."""
        latency = None
        if self._metrics is not None and message.state is MessageState.STORED:
            latency = self._metrics.delivery[backlog]
        self._append(_Out(encode(message_frame(message)), message, latency=latency))

    async def room(self) -> None:
        """Wait until the queue is not full (or the outbox is closed)."""
        if self.full and not self._closed:
            if self._room is None:
                self._room = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._room)

    async def flush(self, within: float) -> None:
        """Wait until the writer has written what is queued, at most ``within`` seconds."""
        if self._writer is not None:
            if self._idle is None:
                self._idle = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await asyncio.shield(self._idle)

    def _append(self, out: _Out) -> None:
        if self._closed:
            return  # Stored messages are redelivered on the next connection.
        self._queue.append(out)
        if self._writer is None:
            self._writer = self._spawn(self._write)

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        written = self._metrics.frames_out if self._metrics is not None else None
        # One watchdog a run of the writer, not a timeout a frame: a timeout
        # costs a timer of its own, and this is the path of every frame.
        self._watchdog = loop.call_later(self._write_timeout, self._watch)
        try:
            # Checked as well as cancellation, which a database call racing its
            # own timeout can lose on Python 3.11 (see the change-stream feed).
            while self._queue and not self._closed:
                out = self._queue.popleft()
                if len(self._queue) < self._queue_size:
                    _resolve(self._room)
                    self._room = None
                if len(self._queue) <= self._queue_size // 2:
                    self._on_progress()
                if out.state_of is not None and self._queued_states.get(out.state_of) is out:
                    del self._queued_states[out.state_of]
                if out.superseded:
                    continue
                self._sending_since = loop.time()
                try:
                    await self._transport.send_text(out.text)
                except ConnectionGone:
                    self._closed = True  # Nobody is listening: queue nothing more.
                    return
                self._sending_since = None
                if written is not None:
                    written[out.kind] += 1
                if out.message is not None and out.message.state is MessageState.STORED:
                    self._record(Transition.of(out.message, MessageState.SENT))
                    if out.latency is not None:
                        out.latency.since(out.message.sent_at)
            if not self._closed:
                self._on_progress()
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._writer = None
            self._sending_since = None
            _resolve(self._idle)
            self._idle = None

    def _watch(self) -> None:
        """Report a client that took no frame for ``write_timeout``; else look again later."""
        loop = asyncio.get_running_loop()
        stuck = 0.0 if self._sending_since is None else loop.time() - self._sending_since
        if stuck >= self._write_timeout:
            self._on_stuck(f"no frame taken for {self._write_timeout:g} seconds")
        else:
            self._watchdog = loop.call_later(self._write_timeout - stuck, self._watch)


def _resolve(future: asyncio.Future[None] | None) -> None:
    """Wake whoever waits on ``future``; the next wait makes a new one."""
    if future is not None and not future.done():
        future.set_result(None)
