"""``MongoChangeFeed`` on the real PyMongo, over the wire-level fake (``tests.wire``).

``test_engine_mongo_feed`` scripts the driver's ``ChangeStream`` itself; here
the driver is real, so what PyMongo resumes by itself (the errors the
change-streams specification calls resumable) never reaches the feed, and
what it gives up on does. Both scopes run, ``database`` included, which no
server of the suite can otherwise watch.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from tests.fakes import BOB
from tests.test_engine_mongo_feed import (
    LATER,
    feeding,
    inserted,
    message_doc,
    receipt_doc,
    records,
)
from tests.wire import RESUMABLE, WireMongo
from tests.wire.changes import token
from tidings.engine.mongo.feed import MongoChangeFeed
from tidings.models import FeedEvent, Resync, StateChanged, collection_for
from tidings.states import MessageState

Scope = Literal["database", "collection"]
SCOPES = ["database", "collection"]


@dataclass
class Wired:
    """A feed on PyMongo on the fake, and what its sink received."""

    mongo: WireMongo
    db: AsyncDatabase[dict[str, Any]]
    feed: MongoChangeFeed
    events: list[FeedEvent] = field(default_factory=list)

    def sink(self, event: FeedEvent) -> None:
        self.events.append(event)
        self.mongo.oplog.notify()  # wakes ``until``

    async def until(self, predicate: Callable[[], bool]) -> None:
        await self.mongo.until(predicate)

    async def insert(self, doc: dict[str, Any], owner: str = BOB) -> None:
        await self.db[collection_for(owner)].insert_one(doc)

    async def gap(self, write: Callable[[], Any], fault: Callable[[], None]) -> None:
        """With the stream's getMore held, ``write``, then let the getMore meet ``fault``."""
        self.mongo.hold()
        await self.until(lambda: self.mongo.held == 1)
        await write()
        fault()
        self.mongo.release()


@asynccontextmanager
async def wired(scope: Scope, jitter: float = 0.0) -> AsyncIterator[Wired]:
    """The feed running on the fake, Bob watched and his changes ready to be delivered."""
    async with WireMongo() as mongo:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            mongo.uri, tz_aware=True, timeoutMS=30_000
        )
        try:
            db = client["tidings"]
            feed = MongoChangeFeed(
                db, db.get_collection, scope, max_await_ms=100, backoff_base=0.001,
                jitter=lambda ceiling: jitter,
            )  # fmt: skip
            world = Wired(mongo, db, feed)
            async with feeding(feed, world.sink):
                feed.watch(BOB)
                await world.until(lambda: feed.running and mongo.parked == 1)
                yield world
        finally:
            await client.close()


@pytest.mark.parametrize("scope", SCOPES)
async def test_messages_and_receipt_updates_arrive_typed(scope: Scope) -> None:
    async with wired(scope) as w:
        await w.insert(message_doc(1))
        await w.insert(receipt_doc(2, "sent"))  # a new receipt: nobody to tell
        receipts = w.db[collection_for(BOB)]
        await receipts.update_one(
            {"mid": "m2"}, {"$set": {"state": "delivered", "at.delivered": LATER}}
        )
        await w.until(lambda: len(w.events) == 2)
    assert w.events == [inserted(1), StateChanged(BOB, "m2", MessageState.DELIVERED, LATER)]


RESUMED_BY_PYMONGO = [
    pytest.param(lambda m: m.fail("getMore", 6, RESUMABLE), id="HostUnreachable-labelled"),
    pytest.param(lambda m: m.fail("getMore", 43), id="CursorNotFound"),
    pytest.param(lambda m: m.disconnect("getMore"), id="connection-closed"),
]


@pytest.mark.parametrize("inject", RESUMED_BY_PYMONGO)
@pytest.mark.parametrize("scope", SCOPES)
async def test_pymongo_resumes_inside_the_feed_and_nothing_is_lost(
    scope: Scope, inject: Callable[[WireMongo], None], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tidings.changestream")
    async with wired(scope) as w:
        await w.insert(message_doc(1))
        await w.until(lambda: len(w.events) == 1)
        position = w.mongo.oplog.end
        await w.gap(lambda: w.insert(message_doc(2)), lambda: inject(w.mongo))
        await w.insert(message_doc(3))
        await w.until(lambda: len(w.events) == 3)
        assert w.feed.running
    assert w.events == [inserted(1), inserted(2), inserted(3)]
    # PyMongo resumed after the first message; the feed never knew.
    assert w.mongo.watches[-1]["resumeAfter"] == token(w.mongo.oplog.epoch, position)
    assert records(caplog, "feed_interrupted") == []


@pytest.mark.parametrize("scope", SCOPES)
async def test_a_stream_the_driver_gives_up_on_before_its_first_event_resumes_from_its_opening(
    scope: Scope, caplog: pytest.LogCaptureFixture
) -> None:
    """No label, no resume by PyMongo: the feed reopens from the aggregate's token."""
    async with wired(scope) as w:
        opening = token(w.mongo.oplog.epoch, w.mongo.oplog.end)
        await w.gap(lambda: w.insert(message_doc(1)), lambda: w.mongo.fail("getMore", 6))
        await w.until(lambda: len(w.events) == 1)
    assert w.events == [inserted(1)]
    assert [watch.get("resumeAfter") for watch in w.mongo.watches] == [None, opening]
    assert len(records(caplog, "feed_interrupted")) == 1


def _history_lost(mongo: WireMongo) -> None:
    mongo.forget()  # the oplog rolled over: the held getMore answers 286


def _history_lost_at_resume(mongo: WireMongo) -> None:
    mongo.forget()
    mongo.disconnect("getMore")  # PyMongo resumes; its aggregate answers 286


UNUSABLE_TOKEN = [
    pytest.param(_history_lost, id="286-oplog-rolled-over"),
    pytest.param(_history_lost_at_resume, id="286-when-pymongo-resumes"),
    pytest.param(lambda m: m.fail("getMore", 280), id="280"),
    pytest.param(lambda m: m.fail("getMore", 260), id="260"),
]


@pytest.mark.parametrize("inject", UNUSABLE_TOKEN)
@pytest.mark.parametrize("scope", SCOPES)
async def test_an_unusable_token_restarts_from_now_and_resyncs(
    scope: Scope, inject: Callable[[WireMongo], None]
) -> None:
    async with wired(scope) as w:
        await w.gap(lambda: w.insert(message_doc(1)), lambda: inject(w.mongo))
        await w.until(lambda: len(w.events) == 1)
        # The sentinel: a later message on the same path, which must come next.
        await w.insert(message_doc(2))
        await w.until(lambda: len(w.events) == 2)
        assert w.feed.running
    resync, after = w.events
    assert isinstance(resync, Resync)
    assert resync.email == (None if scope == "database" else BOB)
    assert resync.since is not None
    assert after == inserted(2)  # the message in the gap is the resync's to re-read
    assert w.mongo.watches[-1].get("resumeAfter") is None  # restarted from now


async def test_a_poison_event_is_logged_counted_and_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with wired("database") as w:
        await w.insert(message_doc(1, state="no such state"))
        await w.insert(message_doc(2))
        await w.until(lambda: len(w.events) == 1)
        assert w.feed.running
    assert w.events == [inserted(2)]
    assert w.feed.health().skipped_events == 1
    assert len(records(caplog, "feed_event_undecodable")) == 1


async def test_the_problem_names_the_stream_and_the_error_until_the_server_answers() -> None:
    async with wired("database", jitter=0.01) as w:
        w.mongo.fail("aggregate", 2, times=10**6)
        w.mongo.disconnect("getMore")  # PyMongo's resume meets the refusals, then the feed's
        await w.until(lambda: "injected by the test (2)" in (w.feed.problem or ""))
        assert (w.feed.problem or "").startswith("change stream not open: * (OperationFailure: ")
        assert not w.feed.running
        w.mongo.faults.clear()
        await w.insert(message_doc(1))
        await w.until(lambda: len(w.events) == 1)
        assert w.feed.problem is None
    assert w.events == [inserted(1)]


@pytest.mark.parametrize("scope", SCOPES)
async def test_a_dropped_collection_restarts_only_a_collection_stream(scope: Scope) -> None:
    """MongoDB invalidates a collection's stream on its drop, never a database's."""
    async with wired(scope) as w:
        await w.insert(message_doc(1))
        await w.until(lambda: len(w.events) == 1)
        await w.db.drop_collection(collection_for(BOB))
        if scope == "collection":
            await w.until(lambda: len(w.events) == 2)
        await w.insert(message_doc(2))  # the sentinel
        await w.until(lambda: inserted(2) in w.events)
    resyncs = [e for e in w.events if isinstance(e, Resync)]
    assert [e for e in w.events if e not in resyncs] == [inserted(1), inserted(2)]
    if scope == "collection":
        assert [(r.email, "invalidate" in r.reason) for r in resyncs] == [(BOB, True)]
    else:
        assert resyncs == []
