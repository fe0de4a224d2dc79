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

from tidings.changestream import WATCHED_OPERATIONS, MongoChangeFeed, _typed, decode
from tidings.hub import Hub
from tidings.models import INBOX, Change, FeedEvent, Message, Resync, collection_for

TIMEOUT = 10.0
BOB = "bob@example.com"
CAROL = "carol@example.com"
OID = ObjectId("6a1b2c3d4e5f60718293a4b5")
SENT_AT = datetime(2026, 11, 26, 23, 20, 58, 770000, tzinfo=UTC)


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


Step = Mapping[str, Any] | Idle | End | BaseException | None


@dataclass
class Open:
    """What one ``watch()`` call does."""

    steps: list[Step] = field(default_factory=list)
    error: BaseException | None = None  # raised by watch() itself
    gate: asyncio.Event | None = None  # watch() waits for it first
    live: bool = False  # replay the target's history after resume_after


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
        self.waiting = False  # the script ran out: the stream waits for changes

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
        stream = FakeStream(steps, resume_after, self._monitor)
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

    def calls(self, name: str) -> int:
        """How many times ``name`` was watched."""
        return len(self.by_name[name].calls) if name in self.by_name else 0

    def waiting(self, name: str, streams: int = 1) -> bool:
        """``name`` has ``streams`` streams and the latest waits for changes."""
        return name in self.by_name and self.by_name[name].waiting(streams)


class Recorder:
    """The sink: keeps every event and how many streams ``target`` had opened by then."""

    def __init__(self, monitor: Monitor, target: FakeTarget | None = None) -> None:
        self._monitor = monitor
        self._target = target
        self.events: list[FeedEvent] = []
        self.streams_at: list[int] = []

    def __call__(self, event: FeedEvent) -> None:
        self.events.append(event)
        self.streams_at.append(len(self._target.streams) if self._target else 0)
        self._monitor.pulse()


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


def message_doc(n: int, **fields: Any) -> dict[str, Any]:
    return {
        "_id": ObjectId(f"{n:024x}"),
        "k": INBOX,
        "mid": f"m{n}",
        "from": CAROL,
        "to": BOB,
        "content": f"hello {n}",
        "sent_at": SENT_AT,
        "state": "stored",
        "at": {"stored": SENT_AT},
        **fields,
    }


def change(
    n: int,
    operation: str,
    coll: str = "m_bob",
    full: Mapping[str, Any] | None = None,
    updated: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A change event as MongoDB documents it."""
    event: dict[str, Any] = {
        "_id": tok(n),
        "operationType": operation,
        "ns": {"db": "tidings", "coll": coll},
        "documentKey": {"_id": ObjectId(f"{n:024x}")},
    }
    if full is not None:
        event["fullDocument"] = full
    if operation == "update":
        event["updateDescription"] = {
            "updatedFields": dict(updated or {}),
            "removedFields": [],
            "truncatedArrays": [],
        }
    return event


def insert(n: int, coll: str = "m_bob") -> dict[str, Any]:
    return change(n, "insert", coll, full=message_doc(n))


def inserted(n: int) -> Change:
    return Change("insert", message_doc(n))


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
    async with feeding(feed, Recorder(monitor)):
        feed.watch("m_alice")  # database scope: nothing more to open
        feed.watch("m_bob")
        await monitor.until(db.waiting)
        await asyncio.wait_for(feed.ready("m_alice"), TIMEOUT)
        assert feed.running
        feed.unwatch("m_alice")  # nor anything to close
        await settle()
        assert feed.running
        assert db.streams[0].closes == 0
    assert not feed.running
    assert collections.requested == []
    assert len(db.calls) == 1
    call = db.calls[0]
    assert call.full_document == "updateLookup"
    assert call.resume_after is None
    assert call.max_await_time_ms == 250
    pipeline = call.pipeline
    for operation in ("insert", "update", "replace"):
        assert admits(pipeline, change(1, operation, "m_" + "ab" * 32))
        assert not admits(pipeline, change(1, operation, "users"))
        assert not admits(pipeline, change(1, operation, "presence_m_x"))
    assert admits(pipeline, change(1, "invalidate", "m_bob"))
    assert admits(pipeline, {"_id": tok(1), "operationType": "invalidate"})
    for operation in ("delete", "drop", "rename", "createIndexes"):
        assert not admits(pipeline, change(1, operation, "m_bob"))


async def test_database_scope_delivers_inserts_and_updates_and_drops_the_rest() -> None:
    monitor = Monitor()
    later = message_doc(2, state="read", at={"stored": SENT_AT, "read": SENT_AT})
    script: list[Step] = [
        insert(1),
        change(2, "update", full=later, updated={"state": "delivered", "at.delivered": SENT_AT}),
        change(3, "update", full=message_doc(3, state="sent"), updated={"conn": "c1"}),
        change(4, "update", full=None, updated={"state": "read"}),  # gone by lookup time
        change(5, "delete"),
        change(6, "insert", full=None),
        change(7, "createIndexes"),
        None,  # an empty batch
        change(8, "replace", coll="m_carol", full=message_doc(8, state="read")),
        insert(9, coll="m_carol"),
    ]
    db = FakeDatabase(monitor, [Open(script)])
    sink = Recorder(monitor)
    async with feeding(make_feed(db, FakeCollections(monitor)), sink):
        await monitor.until(db.waiting)
    assert sink.events == [
        inserted(1),
        Change("update", {**later, "state": "delivered"}),
        Change("update", message_doc(3, state="sent")),
        Change("update", message_doc(8, state="read")),
        inserted(9),
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
    sink = Recorder(monitor)
    feed = make_feed(db, FakeCollections(monitor), jitter=jitter)
    async with feeding(feed, sink):
        await monitor.until(lambda: len(db.calls) == 2)  # reopening, held at the gate
        assert not feed.running
        assert db.streams[0].closes == 1
        assert sink.events == [inserted(1)]
        assert [extra(r, "stream") for r in records(caplog, "feed_interrupted")] == ["*"]
        assert extra(records(caplog, "feed_interrupted")[0], "error") == str(error)
        assert records(caplog, "feed_resumed") == []
        gate.set()
        await monitor.until(lambda: db.waiting(2))
        assert feed.running
    assert sink.events == [inserted(1), inserted(2)]
    assert jitter.ceilings == [0.001]
    assert db.calls[1].pipeline == db.calls[0].pipeline
    assert db.calls[1].full_document == "updateLookup"
    assert len(records(caplog, "feed_resumed")) == 1
    assert records(caplog, "feed_restarted") == []
    assert not any(isinstance(e, Resync) for e in sink.events)


@pytest.mark.parametrize("error", RESUMABLE)
@pytest.mark.parametrize("last", ["event", "postBatchResumeToken"])
async def test_resumable_error_resumes_after_the_last_token(error: PyMongoError, last: str) -> None:
    monitor = Monitor()
    # History: 1 insert m_bob, 2 delete (filtered out by the server), 3 insert m_bob,
    # 4 insert m_carol. The first stream saw 1, then either the event 3 or an empty
    # batch whose postBatchResumeToken is past 2, then the network failed.
    history = [insert(1), change(2, "delete"), insert(3), insert(4, coll="m_carol")]
    first: list[Step] = [insert(1), insert(3)] if last == "event" else [insert(1), Idle(tok(2))]
    db = FakeDatabase(monitor, [Open([*first, error]), Open(live=True)], history)
    sink = Recorder(monitor)
    async with feeding(make_feed(db, FakeCollections(monitor)), sink):
        await monitor.until(lambda: db.waiting(2))
    expected_token = tok(3) if last == "event" else tok(2)
    assert [c.resume_after for c in db.calls] == [None, expected_token]
    # Nothing lost, nothing twice.
    assert sink.events == [inserted(1), inserted(3), Change("insert", message_doc(4))]


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
    sink = Recorder(monitor)
    feed = make_feed(db, FakeCollections(monitor), jitter=jitter)
    async with feeding(feed, sink):
        await monitor.until(lambda: len(db.calls) == 3)
        ready = asyncio.create_task(feed.ready("m_bob"))
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
    db = FakeDatabase(monitor, [Open(error=AutoReconnect("down"))])
    feed = MongoChangeFeed(
        db, FakeCollections(monitor), "database", idle_pause=0, backoff_base=0.0001
    )
    async with feeding(feed, Recorder(monitor)):
        await monitor.until(db.waiting)
        assert feed.running
    [interrupted] = records(caplog, "feed_interrupted")
    assert 0 <= extra(interrupted, "retry_in") <= 0.0001


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
    sink = Recorder(monitor)
    async with feeding(feed, sink):
        await monitor.until(lambda: db.waiting(2))
    assert jitter.ceilings == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 1.0, 2.0, 4.0]
    assert sink.events == [inserted(1)]


async def test_a_long_outage_does_not_kill_the_follower(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="tidings.changestream")  # not 1100 warnings
    monitor = Monitor()
    failures = 1100
    db = FakeDatabase(monitor, [Open(error=AutoReconnect("down"))] * failures)
    feed = make_feed(db, FakeCollections(monitor))
    async with feeding(feed, Recorder(monitor)):
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
    sink = Recorder(monitor, db)
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
    assert resync.collection is None
    assert str(code) in resync.reason
    assert sink.streams_at[2] == 2  # emitted once the new stream was open
    assert sink.events[3:] == [inserted(3)]
    assert db.streams[0].closes == 1
    [restarted] = records(caplog, "feed_restarted")
    assert str(code) in extra(restarted, "reason")
    assert extra(restarted, "stream") == "*"


async def test_history_lost_at_open_restarts_from_now() -> None:
    """Resuming with a token older than the oplog fails in the aggregate itself."""
    monitor = Monitor()
    db = FakeDatabase(
        monitor,
        [Open([insert(1), AutoReconnect("reset")]), Open(error=restart_error(286)), Open()],
    )
    sink = Recorder(monitor, db)
    async with feeding(make_feed(db, FakeCollections(monitor)), sink):
        await monitor.until(lambda: db.waiting(2))
    assert len(db.calls) == 3
    assert db.calls[2].resume_after is None  # never again the token that failed
    assert sink.events[0] == inserted(1)
    assert [type(e) for e in sink.events] == [Change, Resync]
    assert sink.streams_at[1] == 2


async def test_repeated_restart_failures_back_off() -> None:
    monitor = Monitor()
    fatal = restart_error(280)
    db = FakeDatabase(monitor, [Open(error=fatal)] * 4)
    jitter = Jitter()
    sink = Recorder(monitor, db)
    async with feeding(make_feed(db, FakeCollections(monitor), jitter=jitter), sink):
        await monitor.until(db.waiting)
    assert [type(e) for e in sink.events] == [Resync]
    assert len(jitter.ceilings) >= 3  # the 2nd, 3rd and 4th opens from "now" failed too


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
    sink = Recorder(monitor, db)
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
    assert resync.collection is None
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
    sink = Recorder(monitor, db)
    feed = make_feed(db, FakeCollections(monitor), jitter=jitter)
    async with feeding(feed, sink):
        await monitor.until(lambda: db.waiting(2))
        assert feed.running
    assert db.streams[0].closes == 1
    assert [c.resume_after for c in db.calls] == [None, tok(1)]
    assert sink.events == [inserted(1), inserted(2)]
    assert not any(isinstance(event, Resync) for event in sink.events)
    assert records(caplog, "feed_restarted") == []
    assert len(records(caplog, "feed_interrupted")) == 1


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


async def test_collection_scope_follows_each_watched_collection() -> None:
    monitor = Monitor()
    db = FakeDatabase(monitor)
    gate = asyncio.Event()
    collections = FakeCollections(
        monitor,
        {
            "m_a": [Open([insert(1, "m_a")])],
            "m_b": [Open([insert(2, "m_b")], gate=gate)],
        },
    )
    sink = Recorder(monitor)
    feed = make_feed(db, collections, "collection", max_await_ms=500)
    feed.watch("m_a")
    feed.watch("m_a")  # a second session for the same user opens nothing more
    feed.watch("m_gone")
    feed.unwatch("m_gone")  # never started: nothing to cancel, never opened
    feed.unwatch("m_never_watched")
    assert not feed.running
    async with feeding(feed, sink):
        await monitor.until(lambda: collections.waiting("m_a"))
        await asyncio.wait_for(feed.ready("m_a"), TIMEOUT)
        assert feed.running
        feed.watch("m_b")
        ready_b = asyncio.create_task(feed.ready("m_b"))
        await monitor.until(lambda: collections.calls("m_b") == 1)
        await settle()
        assert not ready_b.done()
        assert not feed.running  # m_b is not open yet
        gate.set()
        await asyncio.wait_for(ready_b, TIMEOUT)
        await monitor.until(lambda: collections.waiting("m_b"))
        assert feed.running
        await asyncio.wait_for(feed.ready("m_unknown"), TIMEOUT)  # nothing to wait for
    assert db.calls == []
    assert collections.requested == ["m_a", "m_b"]
    assert sink.events == [
        Change("insert", message_doc(1)),
        Change("insert", message_doc(2)),
    ]
    call = collections.by_name["m_a"].calls[0]
    assert call.full_document == "updateLookup"
    assert call.resume_after is None
    assert call.max_await_time_ms == 500
    assert collections.by_name["m_b"].calls[0].pipeline == call.pipeline
    for operation in WATCHED_OPERATIONS:
        assert admits(call.pipeline, change(1, operation, "m_a"))
    for operation in ("delete", "drop", "rename"):
        assert not admits(call.pipeline, change(1, operation, "m_a"))


async def test_collection_scope_unwatch_cancels_that_stream_only() -> None:
    monitor = Monitor()
    collections = FakeCollections(monitor)
    feed = make_feed(FakeDatabase(monitor), collections, "collection")
    async with feeding(feed, Recorder(monitor)):
        feed.watch("m_a")
        feed.watch("m_b")
        await monitor.until(lambda: collections.waiting("m_a") and collections.waiting("m_b"))
        assert sorted(t.get_name() for t in feed_tasks()) == ["feed:m_a", "feed:m_b"]
        feed.unwatch("m_a")
        a = collections.by_name["m_a"].streams[0]
        await monitor.until(lambda: a.closes == 1)
        assert collections.by_name["m_b"].streams[0].closes == 0
        assert feed.running
        await settle()
        assert [t.get_name() for t in feed_tasks()] == ["feed:m_b"]
        feed.watch("m_a")  # the user came back: a new stream
        await monitor.until(lambda: collections.waiting("m_a", 2))
    assert len(collections.by_name["m_b"].calls) == 1


async def test_collection_scope_restart_resyncs_that_collection_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    monitor = Monitor()
    gate = asyncio.Event()
    collections = FakeCollections(
        monitor,
        {
            "m_a": [Open([insert(1, "m_a")])],
            "m_b": [
                Open([insert(2, "m_b"), restart_error(286)]),
                Open(error=NetworkTimeout("slow"), gate=gate),
                Open([insert(3, "m_b")]),
            ],
        },
    )
    sink = Recorder(monitor)
    feed = make_feed(FakeDatabase(monitor), collections, "collection")
    feed.watch("m_a")
    feed.watch("m_b")
    async with feeding(feed, sink):
        await monitor.until(lambda: collections.calls("m_b") == 2)
        await monitor.until(lambda: collections.waiting("m_a"))
        assert not feed.running  # m_a is fine, m_b is not
        gate.set()
        await monitor.until(lambda: collections.waiting("m_b", 2))
        assert feed.running
    resyncs = [e for e in sink.events if isinstance(e, Resync)]
    assert len(resyncs) == 1
    assert resyncs[0].collection == "m_b"
    assert "286" in resyncs[0].reason
    assert sorted(
        (e.doc["mid"] for e in sink.events if isinstance(e, Change)), key=lambda m: int(m[1:])
    ) == ["m1", "m2", "m3"]
    assert sink.events.index(resyncs[0]) > sink.events.index(Change("insert", message_doc(2)))
    assert len(collections.by_name["m_a"].calls) == 1  # m_a never restarted
    assert [c.resume_after for c in collections.by_name["m_b"].calls] == [None, None, None]
    assert [extra(r, "stream") for r in records(caplog, "feed_restarted")] == ["m_b"]
    assert [extra(r, "stream") for r in records(caplog, "feed_interrupted")] == ["m_b"]


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
        {"m_c": [Open(error=AutoReconnect("down")), Open(gate=never)]},  # stuck reopening
    )
    feed = make_feed(db, collections, scope)
    for name in ("m_a", "m_b", "m_c"):
        feed.watch(name)
    task = asyncio.create_task(feed.run(Recorder(monitor)))
    if scope == "database":
        await monitor.until(db.waiting)
        streams = [db.streams[0]]
    else:
        await monitor.until(
            lambda: (
                collections.waiting("m_a")
                and collections.waiting("m_b")
                and collections.calls("m_c") == 2
            )
        )
        streams = [collections.by_name[n].streams[0] for n in ("m_a", "m_b")]
    followers = feed_tasks()
    assert len(followers) == (1 if scope == "database" else 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT)
    assert all(f.cancelled() for f in followers)
    assert feed_tasks() == []
    assert [s.closes for s in streams] == [1] * len(streams)
    assert not feed.running


# ----------------------------------------------------------------- sink failures


async def test_a_failing_sink_does_not_silently_stop_the_feed() -> None:
    monitor = Monitor()
    db = FakeDatabase(monitor, [Open([insert(1), insert(2)])])
    delivered: list[FeedEvent] = []

    def sink(event: FeedEvent) -> None:
        if event == inserted(1):
            raise KeyError("mid")  # e.g. Message.from_doc on a malformed document
        delivered.append(event)
        monitor.pulse()

    feed = make_feed(db, FakeCollections(monitor))
    run = asyncio.create_task(feed.run(sink))
    try:
        await monitor.until(lambda: len(db.calls) == 1)
        [follower] = feed_tasks()
        follower.add_done_callback(lambda _: monitor.pulse())
        run.add_done_callback(lambda _: monitor.pulse())
        await monitor.until(lambda: bool(delivered) or follower.done() or run.done())
        # Either the feed carried on, or it stopped where readiness can see it.
        assert delivered == [inserted(2)] or not feed.running or run.done()
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError, KeyError):
            await asyncio.wait_for(run, TIMEOUT)


# --------------------------------------------------------------- decode / _typed


def nx(hex_id: str) -> dict[str, Any]:
    return {"__neosqlite_objectid__": True, "id": hex_id}


def test_typed_undoes_the_nx_encoding_at_every_depth() -> None:
    hex_id = "6a1b2c3d4e5f60718293a4b5"
    encoded = {
        "_id": nx(hex_id),
        "sent_at": {"$date": "2026-11-26T23:20:58.770000"},
        "at": {"stored": {"$date": "2026-11-26T23:20:58.770000+00:00"}},
        "refs": [nx("0" * 24), {"$date": "2026-11-26T23:20:58Z"}, [nx("f" * 24)], 7, "x"],
        "not_a_date": {"$date": "2026-11-26", "extra": 1},
        "numeric_date": {"$date": 1764199258770},
        "not_an_oid": {"__neosqlite_objectid__": False, "id": hex_id},
    }
    assert _typed(encoded) == {
        "_id": ObjectId(hex_id),
        "sent_at": datetime(2026, 11, 26, 23, 20, 58, 770000),
        "at": {"stored": SENT_AT},
        "refs": [
            ObjectId("0" * 24),
            datetime(2026, 11, 26, 23, 20, 58, tzinfo=UTC),
            [ObjectId("f" * 24)],
            7,
            "x",
        ],
        "not_a_date": {"$date": "2026-11-26", "extra": 1},
        "numeric_date": {"$date": 1764199258770},
        "not_an_oid": {"__neosqlite_objectid__": False, "id": hex_id},
    }
    assert isinstance(_typed(encoded)["_id"], ObjectId)


def test_typed_leaves_bson_documents_alone() -> None:
    doc = message_doc(1, tags=["a", {"b": OID}], nested={"when": SENT_AT, "n": None})
    assert _typed(doc) == doc
    assert _typed(doc)["_id"] is doc["_id"]
    assert _typed(doc)["sent_at"] is SENT_AT
    for scalar in (None, 3, 2.5, "s", True, OID, SENT_AT, b"raw"):
        assert _typed(scalar) is scalar


def test_decode_types_the_documents_of_nx() -> None:
    full = {
        "_id": nx(str(OID)),
        "mid": "m1",
        "state": "stored",
        "sent_at": {"$date": "2026-11-26T23:20:58.770000"},
    }
    event = decode(change(1, "insert", full=full))
    assert event == Change(
        "insert",
        {
            "_id": OID,
            "mid": "m1",
            "state": "stored",
            "sent_at": datetime(2026, 11, 26, 23, 20, 58, 770000),
        },
    )
    update = decode(change(2, "update", full={**full, "state": "sent"}))
    assert update == Change("update", {**(event.doc if event else {}), "state": "sent"})


def test_decode_prefers_the_state_this_update_set() -> None:
    later = message_doc(1, state="read")
    overridden = decode(change(1, "update", full=later, updated={"state": "delivered"}))
    assert overridden == Change("update", {**later, "state": "delivered"})
    assert later["state"] == "read"  # the event's document is not modified
    unchanged = decode(change(1, "update", full=later, updated={"content": "edited"}))
    assert unchanged == Change("update", later)
    no_description = {**change(1, "update", full=later), "updateDescription": None}
    assert decode(no_description) == Change("update", later)
    replaced = decode(change(1, "replace", full=later))
    assert replaced == Change("update", later)


@pytest.mark.parametrize(
    "event",
    [
        change(1, "delete"),
        change(1, "update", full=None, updated={"state": "read"}),
        change(1, "insert", full=None),
        change(1, "drop"),
        change(1, "invalidate"),
        {"_id": tok(1)},
    ],
)
def test_decode_drops_what_the_hub_cannot_use(event: Mapping[str, Any]) -> None:
    assert decode(event) is None


# ------------------------------------------------------------------ through the hub


class FakeSubscriber:
    """``Subscriber``: records what the hub hands it."""

    def __init__(self, conn_id: str, monitor: Monitor) -> None:
        self._conn_id = conn_id
        self._monitor = monitor
        self.delivered: list[Message] = []
        self.frames: list[dict[str, Any]] = []
        self.resyncs = 0

    @property
    def conn_id(self) -> str:
        return self._conn_id

    def deliver(self, message: Message) -> None:
        self.delivered.append(message)
        self._monitor.pulse()

    def notify(self, frame: dict[str, Any]) -> None:
        self.frames.append(frame)
        self._monitor.pulse()

    def resync(self) -> None:
        self.resyncs += 1
        self._monitor.pulse()


@pytest.mark.parametrize("scope", ["database", "collection"])
async def test_hub_delivers_stored_messages_and_resyncs(
    scope: Literal["database", "collection"],
) -> None:
    monitor = Monitor()
    bob_coll, carol_coll = collection_for(BOB), collection_for(CAROL)
    oid = "6a1b2c3d4e5f60718293a4b5"
    nx_message = {  # as nx-27017 sends it
        "_id": nx(oid),
        "k": INBOX,
        "mid": "hello-1",
        "from": CAROL,
        "to": BOB,
        "content": "hi Bob",
        "sent_at": {"$date": "2026-11-26T23:20:58.770000"},
        "state": "stored",
        "at": {"stored": {"$date": "2026-11-26T23:20:58.770000"}},
    }
    script: list[Step] = [change(1, "insert", bob_coll, full=nx_message), restart_error(286)]
    db = FakeDatabase(monitor, [Open(script)] if scope == "database" else [])
    collections = FakeCollections(monitor, {bob_coll: [Open(script)]})
    feed = make_feed(db, collections, scope)
    hub = Hub(feed)
    bob, carol = FakeSubscriber("c-bob", monitor), FakeSubscriber("c-carol", monitor)
    async with feeding(feed, hub.dispatch):
        assert hub.attach(BOB, bob)
        assert hub.attach(CAROL, carol)
        await asyncio.wait_for(hub.ready(BOB), TIMEOUT)
        await monitor.until(lambda: bob.resyncs == 1)
        target = db if scope == "database" else collections.by_name[bob_coll]
        await monitor.until(lambda: target.waiting(2))
    [message] = bob.delivered
    assert message.oid == ObjectId(oid)
    assert message.id == "hello-1"
    assert message.sender == CAROL
    assert message.frame()["sent_at"] == "2026-11-26T23:20:58.770Z"
    assert carol.delivered == []
    assert bob.frames == carol.frames == []
    # A database-wide Resync concerns everyone here; a collection's only its owner.
    assert carol.resyncs == (1 if scope == "database" else 0)
    if scope == "collection":
        assert sorted(collections.by_name) == sorted([bob_coll, carol_coll])
