"""The wire-level MongoDB fake (``tests.wire``) against PyMongo's own async client.

What the feed tests rely on: PyMongo resumes the fake's streams by itself
after the errors the change-streams specification calls resumable, and lets
the others through; tokens, pipelines, ``startAtOperationTime`` and
invalidates behave as MongoDB documents them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from bson import Timestamp
from pymongo import AsyncMongoClient
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from tests.helpers import TIMEOUT
from tests.wire import RESUMABLE, WireMongo
from tests.wire.changes import token

Doc = dict[str, Any]
Stream = AsyncChangeStream[Doc]


@pytest.fixture
async def mongo() -> AsyncIterator[WireMongo]:
    """A fake of the test's own."""
    async with WireMongo() as server:
        yield server


@pytest.fixture
async def db(mongo: WireMongo) -> AsyncIterator[AsyncDatabase[Doc]]:
    """Database ``t`` on the fake, through PyMongo's async client."""
    client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo.uri, tz_aware=True, timeoutMS=20_000)
    try:
        yield client["t"]
    finally:
        await client.close()


async def changes(stream: Stream, count: int) -> list[Doc]:
    """The next ``count`` changes; idle getMores are waited through, not timed."""
    found: list[Doc] = []
    async with asyncio.timeout(TIMEOUT):  # only keeps a broken test from hanging
        while len(found) < count:
            change = await stream.try_next()
            if change is not None:
                found.append(change)
            assert stream.alive or len(found) == count, f"the stream closed after {found}"
    return found


def ids(found: list[Doc]) -> list[Any]:
    """What the changes were to: the ``n`` of each inserted document, or the operation."""
    return [c["fullDocument"]["n"] if "fullDocument" in c else c["operationType"] for c in found]


def token_of(change: Mapping[str, Any]) -> Doc:
    token: Doc = change["_id"]
    return token


async def test_the_resume_token_is_set_at_open_before_any_event(
    mongo: WireMongo, db: AsyncDatabase[Doc]
) -> None:
    await db.c.insert_one({"n": 0})  # before the stream: never seen
    async with await db.c.watch(max_await_time_ms=100) as stream:
        opened = stream.resume_token
        assert opened is not None  # the aggregate's postBatchResumeToken
        await db.c.insert_one({"n": 1})
        [first] = await changes(stream, 1)
    assert ids([first]) == [1]
    assert token_of(first) != opened
    # The opening token stands before the first event: resuming from it finds it.
    async with await db.c.watch(resume_after=opened, max_await_time_ms=100) as again:
        assert ids(await changes(again, 1)) == [1]


RESUMABLE_FAULTS = [
    pytest.param({"code": 6, "labels": RESUMABLE}, id="HostUnreachable-labelled"),
    pytest.param({"code": 91, "labels": RESUMABLE}, id="ShutdownInProgress-labelled"),
    pytest.param({"code": 43}, id="CursorNotFound"),
    pytest.param({}, id="connection-closed"),
]


@pytest.mark.parametrize("fault", RESUMABLE_FAULTS)
@pytest.mark.parametrize("before_first_event", [False, True])
async def test_pymongo_resumes_a_resumable_error_by_itself(
    mongo: WireMongo, db: AsyncDatabase[Doc], fault: Doc, before_first_event: bool
) -> None:
    async with await db.c.watch(max_await_time_ms=100) as stream:
        seen = []
        if not before_first_event:
            await db.c.insert_one({"n": 1})
            seen = await changes(stream, 1)
        last = token_of(seen[-1]) if seen else stream.resume_token
        if fault:
            mongo.fail("getMore", **fault)
        else:
            mongo.disconnect("getMore")
        await db.c.insert_many([{"n": 2}, {"n": 3}])
        seen += await changes(stream, 2)
        assert stream.alive
    # Nothing lost, nothing twice, and no error: PyMongo resumed from the last token.
    assert ids(seen) == ([2, 3] if before_first_event else [1, 2, 3])
    assert [w.get("resumeAfter") for w in mongo.watches] == [None, last]
    assert mongo.faults == []


async def test_a_code_without_the_resumable_label_reaches_the_application(
    mongo: WireMongo, db: AsyncDatabase[Doc]
) -> None:
    """From wire version 9 on, PyMongo trusts the server's label, not a list of codes."""
    async with await db.c.watch(max_await_time_ms=100) as stream:
        mongo.fail("getMore", 6)
        with pytest.raises(OperationFailure) as raised:
            await changes(stream, 1)
    assert raised.value.code == 6
    assert len(mongo.watches) == 1


async def test_history_lost_reaches_the_application_and_closes_the_stream(
    mongo: WireMongo, db: AsyncDatabase[Doc]
) -> None:
    async with await db.c.watch(max_await_time_ms=100) as stream:
        await db.c.insert_one({"n": 1})
        await changes(stream, 1)
        mongo.forget()  # the oplog rolls over past the stream's position
        with pytest.raises(OperationFailure) as raised:
            await changes(stream, 1)
        assert raised.value.code == 286
        assert not stream.alive


async def test_history_lost_when_pymongo_resumes_reaches_the_application(
    mongo: WireMongo, db: AsyncDatabase[Doc]
) -> None:
    async with await db.c.watch(max_await_time_ms=100) as stream:
        last = stream.resume_token
        # Between two getMores: the oplog rolls over, and the next one loses its connection.
        mongo.forget()
        mongo.disconnect("getMore")
        with pytest.raises(OperationFailure) as raised:
            await changes(stream, 1)
    assert raised.value.code == 286
    assert [w.get("resumeAfter") for w in mongo.watches] == [None, last]


@pytest.mark.parametrize("code", [280, 260])
async def test_fatal_codes_reach_the_application(
    mongo: WireMongo, db: AsyncDatabase[Doc], code: int
) -> None:
    async with await db.c.watch(max_await_time_ms=100) as stream:
        mongo.fail("getMore", code)
        with pytest.raises(OperationFailure) as raised:
            await changes(stream, 1)
    assert raised.value.code == code


async def test_the_pipeline_is_applied_and_the_token_passes_filtered_events(
    mongo: WireMongo, db: AsyncDatabase[Doc]
) -> None:
    pipeline = [{"$match": {"operationType": "insert", "ns.coll": {"$regex": "^m_"}}}]
    async with await db.watch(pipeline, max_await_time_ms=100) as stream:
        await db.m_a.insert_one({"n": 1})
        await db.other.insert_one({"n": 2})
        await db.m_a.update_one({"n": 1}, {"$set": {"x": 1}})
        await db.m_b.insert_one({"n": 3})
        await db.m_b.delete_one({"n": 3})
        found = await changes(stream, 2)
        assert ids(found) == [1, 3]
        assert await stream.try_next() is None
        after = stream.resume_token
    # The token stands past the writes the pipeline filtered out, not at the last event.
    assert after == token(mongo.oplog.epoch, mongo.oplog.end) != token_of(found[-1])
    await db.m_a.insert_one({"n": 4})
    async with await db.watch(pipeline, resume_after=after, max_await_time_ms=100) as again:
        assert ids(await changes(again, 1)) == [4]


async def test_start_at_operation_time_includes_the_write_at_that_time(
    db: AsyncDatabase[Doc],
) -> None:
    async with await db.c.watch(max_await_time_ms=100) as stream:
        await db.c.insert_many([{"n": 1}, {"n": 2}, {"n": 3}])
        found = await changes(stream, 3)
    second: Timestamp = found[1]["clusterTime"]
    async with await db.c.watch(start_at_operation_time=second, max_await_time_ms=100) as again:
        assert ids(await changes(again, 2)) == [2, 3]


async def test_update_events_carry_the_fields_and_the_looked_up_document(
    db: AsyncDatabase[Doc],
) -> None:
    await db.c.insert_one({"_id": "r", "n": 1, "at": {"stored": 1}, "gone": True})
    async with await db.c.watch(full_document="updateLookup", max_await_time_ms=100) as stream:
        await db.c.update_one({"_id": "r"}, {"$set": {"at.sent": 2}, "$unset": {"gone": ""}})
        await db.c.update_one({"_id": "r"}, {"$set": {"n": 5}})
        first, _ = await changes(stream, 2)
    assert first["updateDescription"]["updatedFields"] == {"at.sent": 2}
    assert first["updateDescription"]["removedFields"] == ["gone"]
    # Looked up when read: the later write's version, as MongoDB's updateLookup.
    assert first["fullDocument"] == {"_id": "r", "n": 5, "at": {"stored": 1, "sent": 2}}


async def test_a_drop_invalidates_a_collection_stream_but_not_a_database_stream(
    mongo: WireMongo, db: AsyncDatabase[Doc]
) -> None:
    async with (
        await db.c.watch(max_await_time_ms=100) as on_c,
        await db.watch(max_await_time_ms=100) as on_db,
    ):
        await db.c.insert_one({"n": 1})
        await db.c.drop()
        await db.d.insert_one({"n": 2})
        collection_changes = await changes(on_c, 3)
        assert ids(collection_changes) == [1, "drop", "invalidate"]
        assert not on_c.alive
        assert ids(await changes(on_db, 3)) == [1, "drop", 2]
        assert on_db.alive
    invalidate = token_of(collection_changes[-1])
    with pytest.raises(OperationFailure) as raised:
        await db.c.watch(resume_after=invalidate)
    assert raised.value.code == 260
    await db.c.insert_one({"n": 3})  # the collection again, after its drop
    async with await db.c.watch(start_after=invalidate, max_await_time_ms=100) as after:
        assert ids(await changes(after, 1)) == [3]


async def test_a_database_drop_invalidates_a_database_stream(
    mongo: WireMongo, db: AsyncDatabase[Doc]
) -> None:
    await db.c.insert_one({"n": 1})
    async with await db.watch(max_await_time_ms=100) as stream:
        await db.client.drop_database("t")
        assert ids(await changes(stream, 3)) == ["drop", "dropDatabase", "invalidate"]
        assert not stream.alive
