"""``MongoChangeFeed`` against a scripted fake of MongoDB's change streams.

No server here can watch a database, so the feed runs on small fakes that follow the
documented semantics of MongoDB change streams and PyMongo's ``AsyncChangeStream``:

- ``watch()`` opens a stream (or fails at open, as the ``aggregate`` would);
- ``try_next()`` returns the next change, whose ``_id`` becomes ``resume_token``, or
  ``None`` when nothing is available, when ``resume_token`` may advance to the batch's
  ``postBatchResumeToken``; it raises what the server or the network raised;
- an ``invalidate`` event closes the stream: ``alive`` is False afterwards.

Resume tokens are ``{"_data": "%08d"}`` positions in a database's history, so a stream
opened with ``live=True`` replays what a server would after ``resume_after`` (and, from
no token, starts at "now": nothing already written).

The feed is keyed by e-mail (``watch``, ``unwatch``, ``ready``); the collections it
watches in ``collection`` scope are named by ``collection_for``. Its sink receives
typed events (``Stored``, ``StateChanged``, ``Resync``).

Nothing here waits on time: a ``Monitor`` wakes the test when the fakes reach the state
it waits for; ``TIMEOUT`` only keeps a broken test from hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import pytest
from bson import ObjectId
from pymongo.errors import (
    AutoReconnect,
    NetworkTimeout,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)

from tests.fakes import ALICE, BOB, CAROL, TIMEOUT
from tests.fakes import FakeSubscriber as BaseSubscriber
from tests.mongo import change_event, nx_oid
from tidings.engine.mongo.documents import INBOX, RECEIPT, SCHEMA
from tidings.engine.mongo.feed import MongoChangeFeed
from tidings.engine.mongo.stream import RESYNC_MARGIN, WATCHED_OPERATIONS
from tidings.hub import Hub
from tidings.models import (
    FeedEvent,
    Message,
    Position,
    Resync,
    StateChanged,
    Stored,
    collection_for,
)
from tidings.server_frames import message_frame
from tidings.states import MessageState

DAN = "dan@example.com"
ERIN = "erin@example.com"
OID = ObjectId("6a1b2c3d4e5f60718293a4b5")
SENT_AT = datetime(2026, 11, 26, 23, 20, 58, 770000, tzinfo=UTC)
LATER = datetime(2026, 11, 26, 23, 21, 3, 125000, tzinfo=UTC)
LATEST = datetime(2026, 11, 26, 23, 22, 0, 0, tzinfo=UTC)


def coll(email: str) -> str:
    """The collection the feed watches for ``email``."""
    return collection_for(email)


# --------------------------------------------------------------------------- sync


class Monitor:
    """Wakes waiters when the fakes change; the test says what it waits for."""

    def __init__(self) -> None:
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    def pulse(self) -> None:
        for predicate, future in list(self._waiters):
            if not future.done() and predicate():
                future.set_result(None)

    async def until(self, predicate: Callable[[], bool]) -> None:
        if predicate():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (predicate, future)
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(future, TIMEOUT)
        finally:
            self._waiters.remove(waiter)


async def settle() -> None:
    """Let every runnable task run a few steps (a yield, not a timed wait)."""
    for _ in range(20):
        await asyncio.sleep(0)


def feed_tasks() -> list[asyncio.Task[Any]]:
    """The follower tasks; ``_start`` names them ``feed:<collection>`` (``feed:*``)."""
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("feed:")]


# --------------------------------------------------------------------------- fakes


@dataclass(frozen=True)
class Idle:
    """An empty batch: ``try_next`` returns None and ``resume_token`` becomes ``token``."""

    token: dict[str, Any]


@dataclass(frozen=True)
class End:
    """The server closed the cursor: ``try_next`` returns None and ``alive`` turns False."""


@dataclass(frozen=True)
class Lost:
    """``try_next`` waits for ``gate``, swallowing a cancellation, then returns ``change``.

    What Python 3.11's ``asyncio.wait_for`` (inside PyMongo) can do when a
    cancellation races a read that has just completed.
    """

    change: Mapping[str, Any]
    gate: asyncio.Event


Step = Mapping[str, Any] | Idle | End | Lost | BaseException | None


@dataclass
class Open:
    """What one ``watch()`` call does."""

    steps: list[Step] = field(default_factory=list)
    error: BaseException | None = None  # raised by watch() itself
    gate: asyncio.Event | None = None  # watch() waits for it first
    live: bool = False  # replay the target's history after resume_after
    # The aggregate's postBatchResumeToken, which PyMongo's resume_token gives at
    # once; None plays a server that sends none.
    token: dict[str, Any] | None = None


@dataclass(frozen=True)
class WatchCall:
    pipeline: list[dict[str, Any]]
    full_document: str
    resume_after: Mapping[str, Any] | None
    max_await_time_ms: int


class FakeStream:
    """``ChangeStream``, driven by a script of steps; blocks when the script runs out."""

    def __init__(
        self, steps: Sequence[Step], resume_after: Mapping[str, Any] | None, monitor: Monitor
    ) -> None:
        self._steps = list(steps)
        self._token = resume_after
        self._alive = True
        self._monitor = monitor
        self.closes = 0
        self.waiting = False  # the script ran out, or a Lost step waits at its gate

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def resume_token(self) -> Mapping[str, Any] | None:
        return self._token

    async def try_next(self) -> Mapping[str, Any] | None:
        assert self.closes == 0, "try_next on a closed stream"
        await asyncio.sleep(0)  # the driver awaits the server
        if not self._alive:
            return None
        if not self._steps:
            self.waiting = True
            self._monitor.pulse()
            await asyncio.get_running_loop().create_future()  # until cancelled
        step = self._steps.pop(0)
        self._monitor.pulse()
        if isinstance(step, Lost):
            self.waiting = True
            self._monitor.pulse()
            with contextlib.suppress(asyncio.CancelledError):
                await step.gate.wait()
            self.waiting = False
            step = step.change
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, Idle):
            self._token = step.token
            return None
        if isinstance(step, End):
            self._alive = False
            return None
        if step is None:
            return None
        self._token = step["_id"]
        if step["operationType"] == "invalidate":
            self._alive = False
        return step

    async def close(self) -> None:
        self.closes += 1
        self._alive = False
        self._monitor.pulse()


class FakeTarget:
    """``Watchable``: records every ``watch`` call and opens streams from its script."""

    def __init__(
        self,
        monitor: Monitor,
        openings: Sequence[Open] = (),
        history: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self._monitor = monitor
        self.openings = list(openings)
        self.history = list(history)
        self.calls: list[WatchCall] = []
        self.streams: list[FakeStream] = []

    async def watch(
        self,
        pipeline: list[dict[str, Any]],
        *,
        full_document: str,
        resume_after: Mapping[str, Any] | None,
        max_await_time_ms: int,
    ) -> FakeStream:
        self.calls.append(
            WatchCall(copy.deepcopy(pipeline), full_document, resume_after, max_await_time_ms)
        )
        self._monitor.pulse()
        await asyncio.sleep(0)  # the aggregate goes to the server
        opening = self.openings.pop(0) if self.openings else Open()
        if opening.gate is not None:
            await opening.gate.wait()
        if opening.error is not None:
            self._monitor.pulse()
            raise opening.error
        steps: list[Step] = list(opening.steps)
        if opening.live and resume_after is not None:
            after = resume_after["_data"]
            steps = [change for change in self.history if change["_id"]["_data"] > after]
        stream = FakeStream(steps, opening.token or resume_after, self._monitor)
        self.streams.append(stream)
        self._monitor.pulse()
        return stream

    def waiting(self, streams: int = 1) -> bool:
        """``streams`` streams were opened and the latest one waits for changes."""
        return len(self.streams) == streams and self.streams[-1].waiting


class FakeDatabase(FakeTarget):
    """The database: what ``database`` scope watches."""


class FakeCollection(FakeTarget):
    """One collection: what ``collection`` scope watches."""


class FakeCollections:
    """``db.get_collection``: hands out one ``FakeCollection`` per name, scripted per name."""

    def __init__(
        self, monitor: Monitor, openings: Mapping[str, Sequence[Open]] | None = None
    ) -> None:
        self._monitor = monitor
        self._openings = dict(openings or {})
        self.requested: list[str] = []
        self.by_name: dict[str, FakeCollection] = {}

    def __call__(self, name: str) -> FakeCollection:
        self.requested.append(name)
        if name not in self.by_name:
            self.by_name[name] = FakeCollection(self._monitor, self._openings.get(name, ()))
        return self.by_name[name]

    def of(self, email: str) -> FakeCollection:
        """``email``'s collection, which the feed must have asked for."""
        return self.by_name[coll(email)]

    def calls(self, email: str) -> int:
        """How many times ``email``'s collection was watched."""
        name = coll(email)
        return len(self.by_name[name].calls) if name in self.by_name else 0

    def waiting(self, email: str, streams: int = 1) -> bool:
        """``email``'s collection has ``streams`` streams and the latest waits for changes."""
        name = coll(email)
        return name in self.by_name and self.by_name[name].waiting(streams)

    def opened(self, email: str) -> int:
        """How many streams ``email``'s collection has opened so far."""
        name = coll(email)
        return len(self.by_name[name].streams) if name in self.by_name else 0


class Events:
    """The sink: keeps every event and how many streams had been opened by then."""

    def __init__(self, monitor: Monitor, opened: Callable[[], int] | None = None) -> None:
        self._monitor = monitor
        self._opened = opened
        self.events: list[FeedEvent] = []
        self.streams_at: list[int] = []

    def __call__(self, event: FeedEvent) -> None:
        self.events.append(event)
        self.streams_at.append(self._opened() if self._opened else 0)
        self._monitor.pulse()

    def resyncs(self) -> list[Resync]:
        return [e for e in self.events if isinstance(e, Resync)]


class Jitter:
    """A deterministic jitter: records every ceiling and waits not at all."""

    def __init__(self) -> None:
        self.ceilings: list[float] = []

    def __call__(self, ceiling: float) -> float:
        self.ceilings.append(ceiling)
        return 0.0


@contextlib.asynccontextmanager
async def feeding(feed: MongoChangeFeed, sink: Callable[[FeedEvent], None]) -> AsyncIterator[None]:
    """Run the feed for the block; cancel it and wait for it afterwards."""
    task = asyncio.create_task(feed.run(sink))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, TIMEOUT)


def make_feed(
    db: FakeTarget,
    collections: FakeCollections,
    scope: Literal["database", "collection"] = "database",
    jitter: Callable[[float], float] | None = None,
    **kwargs: Any,
) -> MongoChangeFeed:
    kwargs.setdefault("clock", lambda: LATEST)
    return MongoChangeFeed(
        db,
        collections,
        scope,
        idle_pause=0,
        backoff_base=0.001,
        jitter=jitter or Jitter(),
        **kwargs,
    )


# ---------------------------------------------------------------------- documents


def tok(n: int) -> dict[str, Any]:
    """The resume token of the n-th write in a database's history."""
    return {"_data": f"{n:08d}"}


def message_doc(n: int, to: str = BOB, **fields: Any) -> dict[str, Any]:
    """Carol's n-th message to ``to``, as its inbox document (schema 2, position ``n``)."""
    return {
        "_id": ObjectId(f"{n:024x}"),
        "v": SCHEMA,
        "k": INBOX,
        "seq": n,
        "mid": f"m{n}",
        "from": CAROL,
        "to": to,
        "content": f"hello {n}",
        "sent_at": SENT_AT,
        "state": "stored",
        "at": {"stored": SENT_AT},
        **fields,
    }


# When a receipt reached each state, in the order states are reached.
TIMES = {"stored": SENT_AT, "sent": SENT_AT, "delivered": LATER, "read": LATEST}


def receipt_doc(n: int, state: str, sender: str = BOB) -> dict[str, Any]:
    """The receipt of ``sender``'s n-th message to Carol, in ``state``."""
    doc: dict[str, Any] = {
        "_id": ObjectId(f"{n + 1000:024x}"),
        "v": SCHEMA,
        "k": RECEIPT,
        "mid": f"m{n}",
        "from": sender,
        "to": CAROL,
        "sent_at": SENT_AT,
        "state": state,
        "conn": "c-bob",
    }
    if state != "received":  # a receipt still ``received`` has no times yet
        reached = list(TIMES)[: list(TIMES).index(state) + 1]
        doc["at"] = {s: TIMES[s] for s in reached}
    return doc


def change(
    n: int,
    operation: str,
    collection: str | None = None,
    full: Mapping[str, Any] | None = None,
    updated: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A change event as MongoDB documents it; in Bob's collection unless told."""
    return change_event(
        operation,
        token=tok(n),
        collection=collection or coll(BOB),
        doc_id=ObjectId(f"{n:024x}"),
        full=full,
        updated=updated,
    )


def insert(n: int, to: str = BOB) -> dict[str, Any]:
    """The insert of Carol's n-th message into ``to``'s collection."""
    return change(n, "insert", coll(to), full=message_doc(n, to))


def inserted(n: int, to: str = BOB) -> Stored:
    """What the feed makes of ``insert(n, to)``; built by hand, not by ``message_of``."""
    return Stored(
        Message(
            position=Position(n),
            id=f"m{n}",
            sender=CAROL,
            recipient=to,
            content=f"hello {n}",
            sent_at=SENT_AT,
            state=MessageState.STORED,
        )
    )


def restart_error(code: int) -> OperationFailure:
    return OperationFailure(f"resume failed ({code})", code=code)


def records(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == event]


def extra(record: logging.LogRecord, key: str) -> Any:
    """A field the log call passed in ``extra``."""
    return record.__dict__[key]


# A tiny $match evaluator: enough of MongoDB's query language for the feed's pipelines.
_MISSING = object()


def _field(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(doc, Mapping) or part not in doc:
            return _MISSING
        doc = doc[part]
    return doc


def _matches(doc: Mapping[str, Any], query: Mapping[str, Any]) -> bool:
    for key, condition in query.items():
        if key == "$or":
            if not any(_matches(doc, branch) for branch in condition):
                return False
            continue
        if key == "$and":
            if not all(_matches(doc, branch) for branch in condition):
                return False
            continue
        value = _field(doc, key)
        if isinstance(condition, Mapping) and all(op.startswith("$") for op in condition):
            for op, arg in condition.items():
                if op == "$in":
                    ok = value in arg
                elif op == "$regex":
                    ok = isinstance(value, str) and re.search(arg, value) is not None
                elif op == "$eq":
                    ok = value == arg
                else:
                    raise AssertionError(f"operator {op} not understood by the test")
                if not ok:
                    return False
        elif value != condition:
            return False
    return True


def admits(pipeline: list[dict[str, Any]], event: Mapping[str, Any]) -> bool:
    assert all(set(stage) == {"$match"} for stage in pipeline), pipeline
    return all(_matches(event, stage["$match"]) for stage in pipeline)


# ------------------------------------------------------------------ database scope


async def test_database_scope_follows_one_filtered_stream() -> None:
    monitor = Monitor()
    db = FakeDatabase(monitor)
    collections = FakeCollections(monitor)
    feed = make_feed(db, collections, max_await_ms=250)
    assert not feed.running  # not before run()
    async with feeding(feed, Events(monitor)):
        feed.watch(ALICE)  # database scope: nothing more to open
        feed.watch(BOB)
        await monitor.until(db.waiting)
        await asyncio.wait_for(feed.ready(ALICE), TIMEOUT)
        await asyncio.wait_for(feed.ready(DAN), TIMEOUT)  # never watched: the same stream
        assert feed.running
        feed.unwatch(ALICE)  # nor anything to close
        await settle()
        assert feed.running
        assert db.streams[0].closes == 0
        assert [t.get_name() for t in feed_tasks()] == ["feed:*"]
    assert not feed.running
    assert collections.requested == []
    assert len(db.calls) == 1
    call = db.calls[0]
    assert call.full_document == "updateLookup"
    assert call.resume_after is None
    assert call.max_await_time_ms == 250
    pipeline = call.pipeline
    for operation in ("insert", "update", "replace"):
        assert admits(pipeline, change(1, operation, coll(ALICE)))
        assert not admits(pipeline, change(1, operation, "users"))
        assert not admits(pipeline, change(1, operation, "presence_m_x"))
    assert admits(pipeline, change(1, "invalidate", coll(BOB)))
    assert admits(pipeline, {"_id": tok(1), "operationType": "invalidate"})
    for operation in ("delete", "drop", "rename", "createIndexes"):
        assert not admits(pipeline, change(1, operation, coll(BOB)))


async def test_database_scope_ready_waits_for_the_first_open() -> None:
    monitor = Monitor()
    gate = asyncio.Event()
    db = FakeDatabase(monitor, [Open(gate=gate)])
    feed = make_feed(db, FakeCollections(monitor))
    async with feeding(feed, Events(monitor)):
        ready = asyncio.create_task(feed.ready(BOB))
        await monitor.until(lambda: len(db.calls) == 1)
        await settle()
        assert not ready.done()
        assert not feed.running
        gate.set()
        await asyncio.wait_for(ready, TIMEOUT)
        assert feed.running


async def test_database_scope_delivers_typed_events_and_drops_the_rest() -> None:
    monitor = Monitor()
    # Bob's receipt of m2 is read by lookup time; this write moved it to delivered.
    later = receipt_doc(2, "read")
    schema_1 = {k: v for k, v in message_doc(10, to=DAN).items() if k not in ("seq", "v")}
    script: list[Step] = [
        insert(1),
        change(2, "update", full=later, updated={"state": "delivered", "at.delivered": LATER}),
        change(3, "update", full=receipt_doc(3, "sent"), updated={"conn": "c1"}),
        change(4, "update", full=None, updated={"state": "read"}),  # gone by lookup time
        change(5, "delete"),
        change(6, "insert", full=None),
        change(7, "createIndexes"),
        None,  # an empty batch
        change(8, "insert", full=receipt_doc(8, "received")),  # a receipt is written
        change(9, "update", full=message_doc(9, state="sent"), updated={"state": "sent"}),
        change(10, "insert", coll(DAN), full=schema_1),  # from a Tidings 0.1 process
        change(11, "insert", full={"_id": "schema", "v": SCHEMA}),  # the schema marker
        change(12, "replace", coll(ALICE), full=receipt_doc(12, "stored", sender=ALICE)),
        insert(13, to=CAROL),
    ]
    db = FakeDatabase(monitor, [Open(script)])
    sink = Events(monitor)
    async with feeding(make_feed(db, FakeCollections(monitor)), sink):
        await monitor.until(db.waiting)
    assert sink.events == [
        inserted(1),
        StateChanged(BOB, "m2", MessageState.DELIVERED, LATER),
        StateChanged(BOB, "m3", MessageState.SENT, SENT_AT),
        Resync("a message without a position (schema 1)", DAN),
        StateChanged(ALICE, "m12", MessageState.STORED, SENT_AT, "c-bob"),
        inserted(13, to=CAROL),
    ]
    assert len(db.calls) == 1  # nothing in that script ends or breaks the stream


# -------------------------------------------------------------- resumable errors


RESUMABLE = [
    pytest.param(AutoReconnect("connection reset"), id="AutoReconnect"),
    pytest.param(ServerSelectionTimeoutError("no primary"), id="ServerSelectionTimeout"),
    pytest.param(NetworkTimeout("timed out"), id="NetworkTimeout"),
    pytest.param(OperationFailure("cursor killed", code=237), id="OperationFailure-237"),
]


@pytest.mark.parametrize("error", RESUMABLE)
async def test_resumable_error_mid_stream_backs_off_and_reopens(
    error: PyMongoError, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tidings.changestream")
    monitor = Monitor()
    gate = asyncio.Event()
    db = FakeDatabase(monitor, [Open([insert(1), error]), Open([insert(2)], gate=gate)])
    jitter = Jitter()
    sink = Events(monitor)
    feed = make_feed(db, FakeCollections(monitor), jitter=jitter)
    async with feeding(feed, sink):
        await monitor.until(lambda: len(db.calls) == 2)  # reopening, held at the gate
        assert not feed.running
        assert feed.problem == f"change stream not open: * ({type(error).__name__}: {error})"
        assert db.streams[0].closes == 1
        assert sink.events == [inserted(1)]
        assert [extra(r, "stream") for r in records(caplog, "feed_interrupted")] == ["*"]
        assert extra(records(caplog, "feed_interrupted")[0], "error") == str(error)
        assert records(caplog, "feed_resumed") == []
        gate.set()
        await monitor.until(lambda: db.waiting(2))
        assert feed.running
        assert feed.problem is None
    assert sink.events == [inserted(1), inserted(2)]
    assert jitter.ceilings == [0.001]
    assert db.calls[1].pipeline == db.calls[0].pipeline
    assert db.calls[1].full_document == "updateLookup"
    assert len(records(caplog, "feed_resumed")) == 1
    assert records(caplog, "feed_restarted") == []
    assert sink.resyncs() == []
    assert (feed.health().interruptions, feed.health().resumes, feed.health().restarts) == (1, 1, 0)


@pytest.mark.parametrize("error", RESUMABLE)
@pytest.mark.parametrize("last", ["event", "postBatchResumeToken"])
async def test_resumable_error_resumes_after_the_last_token(error: PyMongoError, last: str) -> None:
    monitor = Monitor()
    # History: 1 insert for Bob, 2 delete (filtered out by the server), 3 insert for
    # Bob, 4 insert for Carol. The first stream saw 1, then either the event 3 or an
    # empty batch whose postBatchResumeToken is past 2, then the network failed.
    history = [insert(1), change(2, "delete"), insert(3), insert(4, to=CAROL)]
    first: list[Step] = [insert(1), insert(3)] if last == "event" else [insert(1), Idle(tok(2))]
    db = FakeDatabase(monitor, [Open([*first, error]), Open(live=True)], history)
    sink = Events(monitor)
    async with feeding(make_feed(db, FakeCollections(monitor)), sink):
        await monitor.until(lambda: db.waiting(2))
    expected_token = tok(3) if last == "event" else tok(2)
    assert [c.resume_after for c in db.calls] == [None, expected_token]
    # Nothing lost, nothing twice.
    assert sink.events == [inserted(1), inserted(3), inserted(4, to=CAROL)]


@pytest.mark.parametrize("error", RESUMABLE)
async def test_a_stream_that_fails_before_its_first_event_resumes_from_its_opening_token(
    error: PyMongoError,
) -> None:
    monitor = Monitor()
    # Opened from now at 5; 6 is written; the first getMore fails (after the
    # driver's own retry). Resuming from now would never deliver 6.
    history = [insert(n) for n in range(1, 7)]
    db = FakeDatabase(monitor, [Open([error], token=tok(5)), Open(live=True)], history)
    sink = Events(monitor)
    async with feeding(make_feed(db, FakeCollections(monitor)), sink):
        await monitor.until(lambda: db.waiting(2))
    assert [c.resume_after for c in db.calls] == [None, tok(5)]
    assert sink.events == [inserted(6)]
    assert sink.resyncs() == []


async def test_a_poison_event_is_logged_counted_and_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    monitor = Monitor()
    poison = insert(2)
    poison["fullDocument"]["sent_at"] = {"$date": "not a date"}
    db = FakeDatabase(monitor, [Open([insert(1), poison, insert(3)])])
    sink = Events(monitor)
    feed = make_feed(db, FakeCollections(monitor))
    async with feeding(feed, sink):
        await monitor.until(db.waiting)
        assert feed.running  # one bad event does not make the process unready
        assert feed.problem is None
    assert sink.events == [inserted(1), inserted(3)]
    assert feed.health().skipped_events == 1
    assert len(db.calls) == 1  # skipped, not retried by reopening
    [logged] = records(caplog, "feed_event_undecodable")
    assert logged.levelno == logging.ERROR
    assert logged.exc_info is not None
    assert extra(logged, "token") == str(tok(2))


async def test_an_unexpected_error_is_logged_unready_with_the_reason_then_resumed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    monitor = Monitor()
    gate = asyncio.Event()
    history = [insert(1), insert(2)]
    db = FakeDatabase(
        monitor,
        [Open([insert(1), RuntimeError("a driver surprise")]), Open(live=True, gate=gate)],
        history,
    )
    sink = Events(monitor)
    feed = make_feed(db, FakeCollections(monitor))
    async with feeding(feed, sink):
        await monitor.until(lambda: len(db.calls) == 2)
        assert not feed.running
        assert feed.problem == "change stream not open: * (RuntimeError: a driver surprise)"
        gate.set()
        await monitor.until(lambda: db.waiting(2))
        assert feed.running
        assert feed.problem is None
    assert [c.resume_after for c in db.calls] == [None, tok(1)]
    assert sink.events == [inserted(1), inserted(2)]
    [crashed] = records(caplog, "feed_crashed")
    assert crashed.exc_info is not None


async def test_error_at_open_backs_off_until_the_first_open_and_ready_waits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tidings.changestream")
    monitor = Monitor()
    gate = asyncio.Event()
    db = FakeDatabase(
        monitor,
        [
            Open(error=ServerSelectionTimeoutError("no servers")),
            Open(error=OperationFailure("not primary", code=10107)),
            Open([insert(1)], gate=gate),
        ],
    )
    jitter = Jitter()
    sink = Events(monitor)
    feed = make_feed(db, FakeCollections(monitor), jitter=jitter)
    async with feeding(feed, sink):
        await monitor.until(lambda: len(db.calls) == 3)
        ready = asyncio.create_task(feed.ready(BOB))
        await settle()
        assert not ready.done()
        assert not feed.running
        assert db.streams == []
        gate.set()
        await asyncio.wait_for(ready, TIMEOUT)
        await monitor.until(db.waiting)
        assert feed.running
    assert sink.events == [inserted(1)]
    assert jitter.ceilings == [0.001, 0.002]
    assert [c.resume_after for c in db.calls] == [None, None, None]
    assert len(records(caplog, "feed_interrupted")) == 2
    assert len(records(caplog, "feed_resumed")) == 1


async def test_default_jitter_waits_at_most_the_ceiling(caplog: pytest.LogCaptureFixture) -> None:
    monitor = Monitor()
    down = AutoReconnect("down")
    db = FakeDatabase(monitor, [Open(error=down)] * 3)
    feed = MongoChangeFeed(
        db,
        FakeCollections(monitor),
        "database",
        idle_pause=0,
        backoff_base=0.002,
        backoff_cap=0.002,
    )
    async with feeding(feed, Events(monitor)):
        await monitor.until(db.waiting)
        assert feed.running
    interrupted = records(caplog, "feed_interrupted")
    assert len(interrupted) == 3
    assert all(0 <= extra(r, "retry_in") <= 0.002 for r in interrupted)


async def test_backoff_ceilings_grow_exponentially_are_capped_and_reset_after_an_open() -> None:
    monitor = Monitor()
    down = AutoReconnect("down")
    openings = [Open(error=down)] * 6 + [Open([insert(1), down])] + [Open(error=down)] * 2
    db = FakeDatabase(monitor, openings)
    jitter = Jitter()
    feed = MongoChangeFeed(
        db,
        FakeCollections(monitor),
        "database",
        idle_pause=0,
        backoff_base=1.0,
        backoff_cap=5.0,
        jitter=jitter,
    )
    sink = Events(monitor)
    async with feeding(feed, sink):
        await monitor.until(lambda: db.waiting(2))
    assert jitter.ceilings == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 1.0, 2.0, 4.0]
    assert sink.events == [inserted(1)]


async def test_a_long_outage_does_not_kill_the_follower(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="tidings.changestream")  # not 1100 warnings
    monitor = Monitor()
    failures = 1100  # 2.0 ** 1100 would overflow a float: the exponent must be bounded
    db = FakeDatabase(monitor, [Open(error=AutoReconnect("down"))] * failures)
    feed = make_feed(db, FakeCollections(monitor))
    async with feeding(feed, Events(monitor)):
        await monitor.until(lambda: len(db.calls) >= 1000)
        [follower] = feed_tasks()
        follower.add_done_callback(lambda _: monitor.pulse())
        await monitor.until(lambda: db.waiting() or follower.done())
        assert not follower.done()
        assert len(db.calls) == failures + 1
        assert feed.running


# ----------------------------------------------------------------- restarts


@pytest.mark.parametrize("code", [286, 280, 260])
async def test_unusable_token_restarts_from_now_then_resyncs(
    code: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tidings.changestream")
    monitor = Monitor()
    gate = asyncio.Event()
    db = FakeDatabase(
        monitor,
        [
            Open([insert(1), insert(2), restart_error(code)]),
            Open(error=AutoReconnect("failover"), gate=gate),
            Open([insert(3)]),
        ],
    )
    jitter = Jitter()
    sink = Events(monitor, lambda: len(db.streams))
    feed = make_feed(db, FakeCollections(monitor), jitter=jitter)
    async with feeding(feed, sink):
        await monitor.until(lambda: len(db.calls) == 2)
        assert not feed.running
        assert sink.events == [inserted(1), inserted(2)]  # no Resync before a stream is open
        gate.set()
        await monitor.until(lambda: db.waiting(2))
        assert feed.running
    assert [c.resume_after for c in db.calls] == [None, None, None]
    assert jitter.ceilings == [0.001]  # the restart itself does not wait
    assert sink.events[:2] == [inserted(1), inserted(2)]
    resync = sink.events[2]
    assert isinstance(resync, Resync)
    assert resync.email is None  # the database stream: every user
    assert str(code) in resync.reason
    assert resync.since == LATEST - RESYNC_MARGIN
    assert sink.streams_at[2] == 2  # emitted once the new stream was open
    assert sink.events[3:] == [inserted(3)]
    assert db.streams[0].closes == 1
    [restarted] = records(caplog, "feed_restarted")
    assert str(code) in extra(restarted, "reason")
    assert extra(restarted, "stream") == "*"
    # The failover after the restart was an interruption, and the open after it a resume.
    health = feed.health()
    assert (health.restarts, health.interruptions, health.resumes) == (1, 1, 1)


async def test_lag_is_the_time_since_the_stalest_stream_last_answered() -> None:
    now = [LATER]
    monitor = Monitor()
    db = FakeDatabase(monitor, [Open([Idle(tok(1))])])
    feed = make_feed(db, FakeCollections(monitor), clock=lambda: now[0])
    now[0] = LATEST
    assert feed.health().lag_seconds == (LATEST - LATER).total_seconds()  # never answered yet
    async with feeding(feed, Events(monitor)):
        await monitor.until(lambda: db.waiting(1))  # the idle getMore answered at LATEST
        assert feed.health().lag_seconds == 0.0
    idle = make_feed(FakeDatabase(monitor), FakeCollections(monitor), scope="collection")
    assert idle.health().lag_seconds == 0.0  # no stream to follow: nothing can lag


async def test_history_lost_at_open_restarts_from_now() -> None:
    """Resuming with a token older than the oplog fails in the aggregate itself."""
    monitor = Monitor()
    db = FakeDatabase(
        monitor,
        [Open([insert(1), AutoReconnect("reset")]), Open(error=restart_error(286)), Open()],
    )
    sink = Events(monitor, lambda: len(db.streams))
    async with feeding(make_feed(db, FakeCollections(monitor)), sink):
        await monitor.until(lambda: db.waiting(2))
    assert len(db.calls) == 3
    assert db.calls[1].resume_after == tok(1)
    assert db.calls[2].resume_after is None  # never again the token that failed
    assert sink.events[0] == inserted(1)
    assert [type(e) for e in sink.events] == [Stored, Resync]
    assert sink.streams_at[1] == 2


async def test_repeated_restart_failures_back_off() -> None:
    monitor = Monitor()
    fatal = restart_error(280)
    db = FakeDatabase(monitor, [Open(error=fatal)] * 4)
    jitter = Jitter()
    sink = Events(monitor, lambda: len(db.streams))
    async with feeding(make_feed(db, FakeCollections(monitor), jitter=jitter), sink):
        await monitor.until(db.waiting)
    assert [type(e) for e in sink.events] == [Resync]
    assert sink.streams_at == [1]
    # The first failure restarts at once; the 2nd, 3rd and 4th opens from "now"
    # failed the same way and were backed off, not retried in a tight loop.
    assert jitter.ceilings == [0.001, 0.002, 0.004]
    assert [c.resume_after for c in db.calls] == [None] * 5


ENDINGS = [
    pytest.param({"_id": tok(2), "operationType": "invalidate"}, "invalidate", id="invalidate"),
    pytest.param(change(2, "drop"), "drop", id="drop"),
    pytest.param(change(2, "rename"), "rename", id="rename"),
    pytest.param({"_id": tok(2), "operationType": "dropDatabase"}, "dropDatabase", id="dropDb"),
]


@pytest.mark.parametrize(("ending", "word"), ENDINGS)
async def test_ending_event_restarts_from_now_then_resyncs(
    ending: Step, word: str, caplog: pytest.LogCaptureFixture
) -> None:
    monitor = Monitor()
    db = FakeDatabase(monitor, [Open([insert(1), ending, insert(99)]), Open([insert(3)])])
    jitter = Jitter()
    sink = Events(monitor, lambda: len(db.streams))
    feed = make_feed(db, FakeCollections(monitor), jitter=jitter)
    async with feeding(feed, sink):
        await monitor.until(lambda: db.waiting(2))
        assert feed.running
    first = db.streams[0]
    assert not first.alive
    assert first.closes == 1
    assert [c.resume_after for c in db.calls] == [None, None]
    assert jitter.ceilings == []
    assert sink.events[0] == inserted(1)
    resync = sink.events[1]
    assert isinstance(resync, Resync)
    assert resync.email is None
    assert word in resync.reason
    assert sink.streams_at[1] == 2
    assert sink.events[2:] == [inserted(3)]  # nothing read past the end of the first stream
    assert len(records(caplog, "feed_restarted")) == 1


async def test_a_cursor_closed_without_invalidate_is_resumed_not_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # MongoDB ends a change stream only with an invalidate event; a cursor that
    # vanishes without one (as nx-27017's do) is an interruption to resume from.
    monitor = Monitor()
    db = FakeDatabase(monitor, [Open([insert(1), End()]), Open([insert(2)])])
    jitter = Jitter()
    sink = Events(monitor, lambda: len(db.streams))
    feed = make_feed(db, FakeCollections(monitor), jitter=jitter)
    async with feeding(feed, sink):
        await monitor.until(lambda: db.waiting(2))
        assert feed.running
    assert db.streams[0].closes == 1
    assert [c.resume_after for c in db.calls] == [None, tok(1)]
    assert jitter.ceilings == [0.001]
    assert sink.events == [inserted(1), inserted(2)]
    assert records(caplog, "feed_restarted") == []
    [interrupted] = records(caplog, "feed_interrupted")
    assert "closed" in extra(interrupted, "error")


async def test_invalidate_leaves_the_fake_stream_dead() -> None:
    """The fake itself: an invalidate event closes the stream, as on MongoDB."""
    monitor = Monitor()
    stream = FakeStream([{"_id": tok(1), "operationType": "invalidate"}], None, monitor)
    assert stream.alive
    event = await stream.try_next()
    assert event is not None
    assert event["operationType"] == "invalidate"
    assert not stream.alive
    assert stream.resume_token == tok(1)
    assert await stream.try_next() is None


# ---------------------------------------------------------------- collection scope


async def test_collection_scope_follows_each_watched_users_collection() -> None:
    monitor = Monitor()
    db = FakeDatabase(monitor)
    gate = asyncio.Event()
    collections = FakeCollections(
        monitor,
        {
            coll(ALICE): [Open([insert(1, to=ALICE)])],
            coll(BOB): [Open([insert(2, to=BOB)], gate=gate)],
        },
    )
    sink = Events(monitor)
    feed = make_feed(db, collections, "collection", max_await_ms=500)
    feed.watch(ALICE)
    feed.watch(ALICE)  # a second session for the same user opens nothing more
    feed.watch(DAN)
    feed.unwatch(DAN)  # never started: nothing to cancel, never opened
    feed.unwatch(ERIN)  # never watched
    assert not feed.running
    async with feeding(feed, sink):
        await monitor.until(lambda: collections.waiting(ALICE))
        await asyncio.wait_for(feed.ready(ALICE), TIMEOUT)
        assert feed.running
        feed.watch(BOB)
        ready_bob = asyncio.create_task(feed.ready(BOB))
        await monitor.until(lambda: collections.calls(BOB) == 1)
        await settle()
        assert not ready_bob.done()
        assert not feed.running  # Bob's stream is not open yet
        gate.set()
        await asyncio.wait_for(ready_bob, TIMEOUT)
        await monitor.until(lambda: collections.waiting(BOB))
        assert feed.running
        await asyncio.wait_for(feed.ready(ERIN), TIMEOUT)  # nothing to wait for
    assert db.calls == []
    assert collections.requested == [coll(ALICE), coll(BOB)]
    assert sorted(collections.by_name) == sorted([coll(ALICE), coll(BOB)])
    assert sink.events == [inserted(1, to=ALICE), inserted(2, to=BOB)]
    call = collections.of(ALICE).calls[0]
    assert call.full_document == "updateLookup"
    assert call.resume_after is None
    assert call.max_await_time_ms == 500
    assert collections.of(BOB).calls[0].pipeline == call.pipeline
    for operation in WATCHED_OPERATIONS:
        assert admits(call.pipeline, change(1, operation, coll(ALICE)))
    for operation in ("delete", "drop", "rename"):
        assert not admits(call.pipeline, change(1, operation, coll(ALICE)))


async def test_collection_scope_unwatch_cancels_that_stream_only() -> None:
    monitor = Monitor()
    collections = FakeCollections(monitor)
    feed = make_feed(FakeDatabase(monitor), collections, "collection")
    async with feeding(feed, Events(monitor)):
        feed.watch(ALICE)
        feed.watch(BOB)
        await monitor.until(lambda: collections.waiting(ALICE) and collections.waiting(BOB))
        expected = sorted(f"feed:{coll(e)}" for e in (ALICE, BOB))
        assert sorted(t.get_name() for t in feed_tasks()) == expected
        feed.unwatch(ALICE)
        alice = collections.of(ALICE).streams[0]
        await monitor.until(lambda: alice.closes == 1)
        assert collections.of(BOB).streams[0].closes == 0
        assert feed.running
        await settle()
        assert [t.get_name() for t in feed_tasks()] == [f"feed:{coll(BOB)}"]
        feed.watch(ALICE)  # the user came back: a new stream
        await monitor.until(lambda: collections.waiting(ALICE, 2))
    assert len(collections.of(BOB).calls) == 1


async def test_unwatch_stops_a_follower_whose_cancellation_is_lost() -> None:
    """A change read as the stream is cancelled is not delivered, and the follower ends.

    Cancellation alone is not enough on Python 3.11 (see ``_Follower.stopped``): a
    follower that lived on would deliver every change twice once the user returns.
    """
    monitor = Monitor()
    gate = asyncio.Event()
    collections = FakeCollections(
        monitor, {coll(BOB): [Open([insert(1), Lost(insert(2), gate), insert(3)])]}
    )
    sink = Events(monitor)
    feed = make_feed(FakeDatabase(monitor), collections, "collection")
    feed.watch(BOB)
    async with feeding(feed, sink):
        await monitor.until(lambda: collections.waiting(BOB))  # held in the Lost step
        [follower] = feed_tasks()
        follower.add_done_callback(lambda _: monitor.pulse())
        feed.unwatch(BOB)  # cancels the follower, which swallows the cancellation
        await monitor.until(follower.done)
        assert not follower.cancelled()  # it ended of its own accord
        stream = collections.of(BOB).streams[0]
        assert stream.closes == 1
        assert feed_tasks() == []
        assert feed.running  # no follower left, none unhealthy
    assert sink.events == [inserted(1)]
    assert collections.calls(BOB) == 1


async def test_collection_scope_restart_resyncs_that_user_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    monitor = Monitor()
    gate = asyncio.Event()
    collections = FakeCollections(
        monitor,
        {
            coll(ALICE): [Open([insert(1, to=ALICE)])],
            coll(BOB): [
                Open([insert(2), restart_error(286)]),
                Open(error=NetworkTimeout("slow"), gate=gate),
                Open([insert(3)]),
            ],
        },
    )
    sink = Events(monitor, lambda: collections.opened(BOB))
    feed = make_feed(FakeDatabase(monitor), collections, "collection")
    feed.watch(ALICE)
    feed.watch(BOB)
    async with feeding(feed, sink):
        await monitor.until(lambda: collections.calls(BOB) == 2)
        await monitor.until(lambda: collections.waiting(ALICE))
        assert not feed.running  # Alice's stream is fine, Bob's is not
        assert feed.problem == f"change stream not open: {coll(BOB)}"
        gate.set()
        await monitor.until(lambda: collections.waiting(BOB, 2))
        assert feed.running
    [resync] = sink.resyncs()
    assert resync.email == BOB
    assert "286" in resync.reason
    assert sink.streams_at[sink.events.index(resync)] == 2  # once Bob's new stream was open
    stored = [e for e in sink.events if isinstance(e, Stored)]
    assert sorted(stored, key=lambda e: e.message.position) == [
        inserted(1, to=ALICE),
        inserted(2),
        inserted(3),
    ]
    assert sink.events.index(resync) > sink.events.index(inserted(2))
    assert sink.events.index(resync) < sink.events.index(inserted(3))
    assert len(collections.of(ALICE).calls) == 1  # Alice's stream never restarted
    assert [c.resume_after for c in collections.of(BOB).calls] == [None, None, None]
    assert [extra(r, "stream") for r in records(caplog, "feed_restarted")] == [coll(BOB)]
    assert [extra(r, "stream") for r in records(caplog, "feed_interrupted")] == [coll(BOB)]


async def test_collection_scope_ending_event_resyncs_that_user() -> None:
    monitor = Monitor()
    collections = FakeCollections(
        monitor, {coll(BOB): [Open([insert(1), change(2, "drop")]), Open([insert(3)])]}
    )
    sink = Events(monitor, lambda: collections.opened(BOB))
    feed = make_feed(FakeDatabase(monitor), collections, "collection")
    feed.watch(BOB)
    async with feeding(feed, sink):
        await monitor.until(lambda: collections.waiting(BOB, 2))
    assert sink.events == [
        inserted(1),
        Resync("the change stream ended: drop", BOB, LATEST - RESYNC_MARGIN),
        inserted(3),
    ]
    assert sink.streams_at[1] == 2


async def test_a_resync_rereads_states_from_the_streams_last_answer_less_a_margin() -> None:
    monitor = Monitor()
    db = FakeDatabase(monitor, [Open([insert(1), change(2, "invalidate")]), Open()])
    sink = Events(monitor)
    now = [SENT_AT]  # when the feed starts following
    feed = make_feed(db, FakeCollections(monitor), clock=lambda: now[0])
    now[0] = LATER  # when the stream answers, up to its end
    async with feeding(feed, sink):
        await monitor.until(lambda: db.waiting(2))
        now[0] = LATEST
    [resync] = sink.resyncs()
    # Not from the start (nothing was missed before the stream's last answer),
    # and early enough for receipts stamped by another process's clock.
    assert resync.since == LATER - RESYNC_MARGIN


# ----------------------------------------------------------------- problem


async def test_problem_names_the_streams_that_are_down() -> None:
    monitor = Monitor()
    never = asyncio.Event()
    emails = [ALICE, BOB, CAROL, DAN, ERIN]
    collections = FakeCollections(
        monitor, {coll(e): [Open(gate=never)] for e in emails if e != ERIN}
    )
    feed = make_feed(FakeDatabase(monitor), collections, "collection")
    assert feed.problem == "the change feed is not running"
    for email in emails:
        feed.watch(email)
    async with feeding(feed, Events(monitor)):
        await monitor.until(lambda: all(collections.calls(e) == 1 for e in emails))
        await monitor.until(lambda: collections.waiting(ERIN))
        problem = feed.problem
        assert problem is not None
        assert problem.startswith("change stream not open: ")
        named = problem.removeprefix("change stream not open: ").split(", ")
        assert len(named) == 3  # a few are enough to tell what is wrong
        assert set(named) < {coll(e) for e in emails if e != ERIN}
        for email in emails[:-1]:
            feed.unwatch(email)
        await settle()
        assert feed.problem is None
        assert feed.running
    assert feed.problem == "the change feed is not running"
    assert not feed.running


# ------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("scope", ["database", "collection"])
async def test_cancelling_run_cancels_every_follower_and_closes_streams(
    scope: Literal["database", "collection"],
) -> None:
    monitor = Monitor()
    db = FakeDatabase(monitor, [Open([insert(1)])])
    never = asyncio.Event()
    collections = FakeCollections(
        monitor,
        {coll(CAROL): [Open(error=AutoReconnect("down")), Open(gate=never)]},  # stuck reopening
    )
    feed = make_feed(db, collections, scope)
    for email in (ALICE, BOB, CAROL):
        feed.watch(email)
    task = asyncio.create_task(feed.run(Events(monitor)))
    if scope == "database":
        await monitor.until(db.waiting)
        streams = [db.streams[0]]
    else:
        await monitor.until(
            lambda: (
                collections.waiting(ALICE)
                and collections.waiting(BOB)
                and collections.calls(CAROL) == 2
            )
        )
        streams = [collections.of(e).streams[0] for e in (ALICE, BOB)]
    followers = feed_tasks()
    assert len(followers) == (1 if scope == "database" else 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT)
    assert all(f.cancelled() for f in followers)
    assert feed_tasks() == []
    assert [s.closes for s in streams] == [1] * len(streams)
    assert not feed.running
    assert feed.problem == "the change feed is not running"


# ----------------------------------------------------------------- sink failures


async def test_a_failing_sink_does_not_stop_the_feed(caplog: pytest.LogCaptureFixture) -> None:
    monitor = Monitor()
    db = FakeDatabase(monitor, [Open([insert(1), insert(2)])])
    delivered: list[FeedEvent] = []

    def sink(event: FeedEvent) -> None:
        if event == inserted(1):
            raise KeyError("mid")  # an event the hub cannot route
        delivered.append(event)
        monitor.pulse()

    feed = make_feed(db, FakeCollections(monitor))
    async with feeding(feed, sink):
        await monitor.until(db.waiting)
        assert feed.running
    assert delivered == [inserted(2)]
    assert len(db.calls) == 1  # the stream carried on; it was not reopened
    [failed] = records(caplog, "feed_event_failed")
    assert extra(failed, "event_type") == "Stored"
    assert failed.exc_info is not None


# ------------------------------------------------------------------ through the hub


class Subscriber(BaseSubscriber):
    """The fakes' subscriber, waking the monitor on every call."""

    def __init__(self, conn_id: str, monitor: Monitor) -> None:
        super().__init__(conn_id)
        self._monitor = monitor

    def deliver(self, message: Message) -> None:
        super().deliver(message)
        self._monitor.pulse()

    def changed(self, change: StateChanged) -> None:
        super().changed(change)
        self._monitor.pulse()

    def resync(self, since: datetime | None) -> None:
        super().resync(since)
        self._monitor.pulse()


@pytest.mark.parametrize("scope", ["database", "collection"])
async def test_hub_delivers_stored_messages_states_and_resyncs(
    scope: Literal["database", "collection"],
) -> None:
    monitor = Monitor()
    bob_coll, carol_coll = coll(BOB), coll(CAROL)
    message = {  # as nx-27017 sends it
        "_id": nx_oid(str(OID)),
        "v": SCHEMA,
        "k": INBOX,
        "seq": 7,
        "mid": "hello-1",
        "from": CAROL,
        "to": BOB,
        "content": "hi Bob",
        "sent_at": {"$date": "2026-11-26T23:20:58.770000"},
        "state": "stored",
        "at": {"stored": {"$date": "2026-11-26T23:20:58.770000"}},
    }
    receipt = {  # Bob's message to Carol was delivered
        "_id": nx_oid("0" * 24),
        "v": SCHEMA,
        "k": RECEIPT,
        "mid": "to-carol",
        "from": BOB,
        "to": CAROL,
        "sent_at": {"$date": "2026-11-26T23:20:58.770000+00:00"},
        "state": "delivered",
        "conn": "c-bob",
        "at": {"delivered": "2026-11-26T23:21:03.125000+00:00"},
    }
    script: list[Step] = [
        change(1, "insert", bob_coll, full=message),
        change(2, "update", bob_coll, full=receipt),
        restart_error(286),
    ]
    db = FakeDatabase(monitor, [Open(script)] if scope == "database" else [])
    collections = FakeCollections(monitor, {bob_coll: [Open(script)]})
    feed = make_feed(db, collections, scope)
    hub = Hub(feed)
    bob, carol = Subscriber("c-bob", monitor), Subscriber("c-carol", monitor)
    async with feeding(feed, hub.dispatch):
        assert hub.attach(BOB, bob)
        assert hub.attach(CAROL, carol)
        await asyncio.wait_for(hub.ready(BOB), TIMEOUT)
        await monitor.until(lambda: bob.resyncs == 1)
        target = db if scope == "database" else collections.of(BOB)
        await monitor.until(lambda: target.waiting(2))
    [delivered] = bob.delivered
    assert delivered.position == Position(7)
    assert delivered.id == "hello-1"
    assert delivered.sender == CAROL
    assert message_frame(delivered)["sent_at"] == "2026-11-26T23:20:58.770Z"
    assert bob.pushed == [
        {"type": "state", "id": "to-carol", "state": "delivered", "at": "2026-11-26T23:21:03.125Z"}
    ]
    assert carol.delivered == []
    assert carol.pushed == []
    # A database-wide Resync concerns everyone here; a collection's only its owner.
    assert carol.resyncs == (1 if scope == "database" else 0)
    if scope == "collection":
        assert sorted(collections.by_name) == sorted([bob_coll, carol_coll])
