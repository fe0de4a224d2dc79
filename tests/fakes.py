"""Small fakes for the unit tests: each satisfies one of Tidings' Protocols and records calls.

No mocks: every fake is a plain class whose behaviour can be read in a few lines.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, cast

import orjson
import pytest
from mongomock.collection import BulkOperationBuilder
from mongomock_motor import AsyncMongoMockClient
from pymongo.asynchronous.database import AsyncDatabase

from tidings.engine import Engine, FeedHealth, Sink, Store
from tidings.engine.memory import memory_engine
from tidings.engine.mongo.documents import Document
from tidings.errors import ConnectionGone, StoreUnavailable
from tidings.hub import Hub
from tidings.models import Draft, Message, Outcome, Position, StateChanged, Transition, User
from tidings.recorder import Recorder
from tidings.server_frames import change_frame
from tidings.session import Session
from tidings.states import MessageState

# Only to keep a broken test from hanging the suite; never a timing assertion.
TIMEOUT = 10.0

ALICE = "alice@example.com"
BOB = "bob@example.com"
CAROL = "carol@example.com"


def mock_db(name: str = "tidings") -> AsyncDatabase[Document]:
    """A fresh mongomock database behind PyMongo's async API (a test double, not an engine)."""
    return cast("AsyncDatabase[Document]", AsyncMongoMockClient(tz_aware=True)[name])


def teach_mongomock_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let mongomock take the ``sort`` PyMongo >= 4.11 hands every ``UpdateOne``.

    Its bulk builder predates the option and refuses the keyword, so every
    ``bulk_write`` of MongoStore would fail on the test double, not on MongoDB.
    An update with an actual sort would still be refused.
    """
    original: Callable[..., Any] = BulkOperationBuilder.add_update

    def add_update(
        self: Any, selector: Any, doc: Any, *args: Any, sort: Any = None, **kw: Any
    ) -> Any:
        assert sort is None, "mongomock cannot sort an update"
        return original(self, selector, doc, *args, **kw)

    monkeypatch.setattr(BulkOperationBuilder, "add_update", add_update)


def at(second: int = 0) -> datetime:
    """A fixed, aware moment; ``second`` tells moments apart."""
    return datetime(2026, 1, 2, 3, 4, second, 567000, tzinfo=UTC)


def message(
    mid: str = "m1",
    sender: str = ALICE,
    recipient: str = BOB,
    content: str = "hello",
    state: MessageState = MessageState.STORED,
    position: int = 1,
) -> Message:
    """A ``Message`` as a store would read it."""
    return Message(
        position=Position(position),
        id=mid,
        sender=sender,
        recipient=recipient,
        content=content,
        sent_at=at(0),
        state=state,
    )


class FakeTransport:
    """A ``Transport`` that records what it was asked to send and how it was closed."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.attempts = 0
        self.closes: list[tuple[int, str]] = []
        self._frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closed = asyncio.Event()
        # When set, ``send_text`` raises it instead of sending.
        self.fail_with: BaseException | None = None
        # When cleared, ``send_text`` waits: a client that does not read.
        self.flowing = asyncio.Event()
        self.flowing.set()

    async def send_text(self, text: str) -> None:
        self.attempts += 1
        await self.flowing.wait()
        if self.fail_with is not None:
            raise self.fail_with
        self.sent.append(text)
        self._frames.put_nowait(orjson.loads(text))

    async def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))
        self.closed.set()

    async def recv(self) -> dict[str, Any]:
        """The next frame written, decoded."""
        return await asyncio.wait_for(self._frames.get(), TIMEOUT)

    async def recv_until(self, accept: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Frames written up to and including the first ``accept`` takes."""
        frames: list[dict[str, Any]] = []
        while True:
            frames.append(await self.recv())
            if accept(frames[-1]):
                return frames

    async def wait_closed(self) -> tuple[int, str]:
        """The code and reason of the first close."""
        await asyncio.wait_for(self.closed.wait(), TIMEOUT)
        return self.closes[0]

    def frames(self) -> list[dict[str, Any]]:
        """Everything written so far, decoded."""
        return [orjson.loads(text) for text in self.sent]


class GoneTransport(FakeTransport):
    """A peer that has vanished: every write raises ``ConnectionGone``."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_with = ConnectionGone()


class FakeFeed:
    """A ``Feed`` that records ``watch`` / ``unwatch`` / ``ready`` calls."""

    def __init__(self, running: bool = True) -> None:
        self.watched: list[str] = []
        self.unwatched: list[str] = []
        self.readied: list[str] = []
        self._running = running
        # What ``health`` reports; a test sets it to see it scraped.
        self.reported = FeedHealth()

    @property
    def running(self) -> bool:
        return self._running

    @property
    def problem(self) -> str | None:
        return None if self._running else "fake feed stopped"

    def health(self) -> FeedHealth:
        return self.reported

    async def run(self, sink: Sink) -> None:
        await asyncio.Event().wait()

    def watch(self, email: str) -> None:
        self.watched.append(email)

    def unwatch(self, email: str) -> None:
        self.unwatched.append(email)

    async def ready(self, email: str) -> None:
        self.readied.append(email)


class FakeSubscriber:
    """A hub ``Subscriber`` that records what the hub handed it."""

    def __init__(self, conn_id: str) -> None:
        self._conn_id = conn_id
        self.delivered: list[Message] = []
        self.changes: list[StateChanged] = []
        self.pushed: list[dict[str, Any]] = []
        self.resyncs = 0
        self.resynced_since: list[datetime | None] = []

    @property
    def conn_id(self) -> str:
        return self._conn_id

    def deliver(self, message: Message) -> None:
        self.delivered.append(message)

    def changed(self, change: StateChanged) -> None:
        # Kept as the frame the session would queue, so tests compare what the client sees.
        self.changes.append(change)
        self.pushed.append(change_frame(change))

    def resync(self, since: datetime | None) -> None:
        self.resyncs += 1
        self.resynced_since.append(since)


class Principal:
    """A principal that allows exactly the e-mails it was given (``None``: anyone)."""

    def __init__(self, allowed: set[str] | None = None) -> None:
        self.allowed = allowed
        self.asked: list[str] = []

    def may_identify(self, email: str) -> bool:
        self.asked.append(email)
        return self.allowed is None or email in self.allowed


Hook = Callable[[], Awaitable[None]]


class FlakyStore:
    """A ``Store`` that delegates to a real one, with switches to make calls fail or pause.

    ``fail`` names the methods that raise; ``errors`` says what they raise
    (``StoreUnavailable`` unless told). ``before`` runs a hook before a method
    does its work, to interleave other events with it.
    """

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.fail: set[str] = set()
        self.errors: dict[str, BaseException] = {}
        self.before: dict[str, Hook] = {}
        self.calls: list[str] = []

    async def _enter(self, name: str) -> None:
        self.calls.append(name)
        hook = self.before.get(name)
        if hook is not None:
            await hook()
        if name in self.fail:
            raise self.errors.get(name, StoreUnavailable(f"{name}: database error: down"))

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def ping(self) -> None:
        await self._enter("ping")
        await self.inner.ping()

    async def ensure_user(self, email: str) -> User:
        await self._enter("ensure_user")
        return await self.inner.ensure_user(email)

    async def find_user(self, email: str) -> User | None:
        await self._enter("find_user")
        return await self.inner.find_user(email)

    async def send(self, sender: str, conn: str, drafts: Sequence[Draft]) -> list[Outcome]:
        await self._enter("send")
        return await self.inner.send(sender, conn, drafts)

    async def find_inbox(self, owner: str, ids: Sequence[str]) -> list[Message]:
        await self._enter("find_inbox")
        return await self.inner.find_inbox(owner, ids)

    async def backlog(
        self, owner: str, since: Position | None, after: Position | None, limit: int
    ) -> list[Message]:
        await self._enter("backlog")
        return await self.inner.backlog(owner, since, after, limit)

    async def record(self, transitions: Sequence[Transition]) -> None:
        await self._enter("record")
        await self.inner.record(transitions)

    async def states_since(self, sender: str, since: datetime) -> list[StateChanged]:
        await self._enter("states_since")
        return await self.inner.states_since(sender, since)


class World:
    """The memory engine, hub and recorder wired as the app wires them, all running."""

    def __init__(self, engine: Engine, store: FlakyStore, hub: Hub, recorder: Recorder) -> None:
        self.engine = engine
        self.store = store
        self.feed = engine.feed
        self.presence = engine.presence
        self.hub = hub
        self.recorder = recorder
        self.sessions: list[Session] = []

    def session(
        self,
        conn_id: str | None = None,
        transport: FakeTransport | None = None,
        queue_size: int = 64,
        backlog_batch: int = 3,
        store: Store | None = None,
        write_timeout: float = TIMEOUT,
    ) -> tuple[Session, FakeTransport]:
        """A started session on a fake transport."""
        transport = transport or FakeTransport()
        session = Session(
            conn_id or f"c{len(self.sessions) + 1}",
            transport,
            store or self.store,
            self.presence,
            self.hub,
            self.recorder,
            queue_size=queue_size,
            backlog_batch=backlog_batch,
            write_timeout=write_timeout,
        )
        session.start(identify_timeout=60.0)
        self.sessions.append(session)
        return session, transport

    async def send(self, sender: str, recipient: str, mid: str, content: str = "hi") -> Outcome:
        """Store one message through the (flaky) store, as the handlers would."""
        (outcome,) = await self.store.send(sender, "c0", [Draft(mid, recipient, content)])
        return outcome


@asynccontextmanager
async def running_world() -> AsyncIterator[World]:
    """A ``World`` on the memory engine (behind a ``FlakyStore`` with every switch off),
    its feed and recorder running; every session it made is stopped afterwards."""
    engine = memory_engine()
    store = FlakyStore(engine.store)
    hub = Hub(engine.feed)
    recorder = Recorder(store)
    world = World(engine, store, hub, recorder)
    tasks = [
        asyncio.create_task(engine.feed.run(hub.dispatch)),
        asyncio.create_task(recorder.run()),
    ]
    try:
        yield world
    finally:
        await spin()  # let every task that was spawned take its first step
        for session in world.sessions:
            await asyncio.wait_for(session.stop(), TIMEOUT)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def spin(rounds: int = 50) -> None:
    """Let every ready task run a few steps; no time passes, nothing is timed."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool], rounds: int = 100_000) -> None:
    """Yield to other tasks until ``condition`` holds; bounded in steps, not in time."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"condition still false after {rounds} rounds of the event loop")
