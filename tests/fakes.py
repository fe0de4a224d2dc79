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
from bson import ObjectId
from mongomock_motor import AsyncMongoMockClient
from pymongo.asynchronous.database import AsyncDatabase

from tidings.errors import StoreUnavailable
from tidings.feed import MemoryFeed, Sink
from tidings.hub import Hub
from tidings.models import INBOX, OUTBOX, Change, Message, Outcome, User
from tidings.protocol import MessageState
from tidings.session import ConnectionGone, Session
from tidings.store import Document, MongoStore, Store

# Only to keep a broken test from hanging the suite; never a timing assertion.
TIMEOUT = 10.0

ALICE = "alice@example.com"
BOB = "bob@example.com"
CAROL = "carol@example.com"


def mock_db(name: str = "tidings") -> AsyncDatabase[Document]:
    """A fresh in-memory database, built as ``tidings.app`` builds the embedded store's."""
    return cast("AsyncDatabase[Document]", AsyncMongoMockClient(tz_aware=True)[name])


def memory_store(feed: MemoryFeed | None = None) -> MongoStore:
    """The real ``MongoStore`` on a fresh mongomock database, reporting to ``feed``."""
    return MongoStore(mock_db(), on_change=feed.publish if feed is not None else None)


def at(second: int = 0) -> datetime:
    """A fixed, aware moment; ``second`` tells moments apart."""
    return datetime(2026, 1, 2, 3, 4, second, 567000, tzinfo=UTC)


def message(
    mid: str = "m1",
    sender: str = ALICE,
    recipient: str = BOB,
    content: str = "hello",
    state: MessageState = MessageState.STORED,
    oid: ObjectId | None = None,
) -> Message:
    """A ``Message`` as the store would read it."""
    return Message(
        oid=oid or ObjectId(),
        id=mid,
        sender=sender,
        recipient=recipient,
        content=content,
        sent_at=at(0),
        state=state,
        state_at=at(1),
    )


def inbox_doc(mid: str = "m1", sender: str = ALICE, recipient: str = BOB) -> Document:
    """An inbox document as the store inserts it."""
    return {
        "_id": ObjectId(),
        "k": INBOX,
        "mid": mid,
        "from": sender,
        "to": recipient,
        "content": "hello",
        "sent_at": at(0),
        "state": MessageState.STORED.value,
        "at": {MessageState.STORED.value: at(0)},
    }


def receipt_doc(
    state: MessageState,
    mid: str = "m1",
    sender: str = ALICE,
    recipient: str = BOB,
    conn: str = "c0",
) -> Document:
    """An outbox receipt as it is after a transition to ``state``."""
    return {
        "_id": ObjectId(),
        "k": OUTBOX,
        "mid": mid,
        "from": sender,
        "to": recipient,
        "sent_at": at(0),
        "state": state.value,
        "conn": conn,
        "at": {state.value: at(5)},
    }


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
    """A ``ChangeFeed`` that records ``watch`` / ``unwatch`` calls."""

    def __init__(self, running: bool = True) -> None:
        self.watched: list[str] = []
        self.unwatched: list[str] = []
        self.readied: list[str] = []
        self._running = running

    @property
    def running(self) -> bool:
        return self._running

    async def run(self, sink: Sink) -> None:
        await asyncio.Event().wait()

    def watch(self, collection: str) -> None:
        self.watched.append(collection)

    def unwatch(self, collection: str) -> None:
        self.unwatched.append(collection)

    async def ready(self, collection: str) -> None:
        self.readied.append(collection)


class FakeSubscriber:
    """A hub ``Subscriber`` that records what the hub handed it."""

    def __init__(self, conn_id: str) -> None:
        self._conn_id = conn_id
        self.delivered: list[Message] = []
        self.notified: list[dict[str, Any]] = []
        self.resyncs = 0

    @property
    def conn_id(self) -> str:
        return self._conn_id

    def deliver(self, message: Message) -> None:
        self.delivered.append(message)

    def notify(self, frame: dict[str, Any]) -> None:
        self.notified.append(frame)

    def resync(self) -> None:
        self.resyncs += 1


class Identity:
    """An ``Identity`` that allows exactly the e-mails it was given (``None``: anyone)."""

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

    async def ping(self) -> None:
        await self._enter("ping")
        await self.inner.ping()

    async def ensure_user(self, email: str) -> User:
        await self._enter("ensure_user")
        return await self.inner.ensure_user(email)

    async def find_user(self, email: str, presence: bool = True) -> User | None:
        await self._enter("find_user")
        return await self.inner.find_user(email, presence)

    async def set_presence(self, email: str, online: bool) -> None:
        await self._enter("set_presence")
        await self.inner.set_presence(email, online)

    async def refresh_presence(self, emails: Sequence[str]) -> None:
        await self._enter("refresh_presence")
        await self.inner.refresh_presence(emails)

    async def send(
        self, sender: str, recipient: User, message_id: str, content: str, conn: str
    ) -> Outcome:
        await self._enter("send")
        return await self.inner.send(sender, recipient, message_id, content, conn)

    async def confirm(self, message: Message) -> None:
        await self._enter("confirm")
        await self.inner.confirm(message)

    async def find_inbox(self, owner: str, message_id: str, sender: str | None) -> list[Message]:
        await self._enter("find_inbox")
        return await self.inner.find_inbox(owner, message_id, sender)

    async def backlog(
        self, owner: str, since: ObjectId | None, after: ObjectId | None, limit: int
    ) -> list[Message]:
        await self._enter("backlog")
        return await self.inner.backlog(owner, since, after, limit)

    async def advance(self, message: Message, state: MessageState) -> bool:
        await self._enter("advance")
        return await self.inner.advance(message, state)


class World:
    """A store, feed and hub wired as the app wires them, with the feed running."""

    def __init__(self, store: FlakyStore, feed: MemoryFeed, hub: Hub) -> None:
        self.store = store
        self.feed = feed
        self.hub = hub
        self.sessions: list[Session] = []

    def session(
        self,
        conn_id: str | None = None,
        transport: FakeTransport | None = None,
        queue_size: int = 64,
        backlog_batch: int = 3,
        store: Store | None = None,
    ) -> tuple[Session, FakeTransport]:
        """A started session on a fake transport."""
        transport = transport or FakeTransport()
        session = Session(
            conn_id or f"c{len(self.sessions) + 1}",
            transport,
            store or self.store,
            self.hub,
            queue_size,
            backlog_batch,
        )
        session.start(identify_timeout=60.0)
        self.sessions.append(session)
        return session, transport


@asynccontextmanager
async def running_world() -> AsyncIterator[World]:
    """A ``World`` on the real ``MongoStore`` (behind a ``FlakyStore`` with every switch
    off), its feed running; every session it made is stopped afterwards."""
    feed = MemoryFeed()
    hub = Hub(feed)
    world = World(FlakyStore(memory_store(feed)), feed, hub)
    task = asyncio.create_task(feed.run(hub.dispatch))
    try:
        yield world
    finally:
        await spin()  # let every task that was spawned take its first step
        for session in world.sessions:
            await asyncio.wait_for(session.stop(), TIMEOUT)
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


def change(operation: str, doc: Document) -> Change:
    """A ``Change`` with a checked operation."""
    assert operation in ("insert", "update")
    return Change("insert" if operation == "insert" else "update", doc)
