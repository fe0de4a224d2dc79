"""Retention on MongoDB: the TTL index, the field it reads, and changes of the setting.

MongoDB's TTL monitor runs once a minute, so nothing here waits for it: what
expiry does to the store is in the contract suite (a pass of the monitor
played by hand); here is what makes the server do it. Each case runs on
nx-27017 and, when TIDINGS_TEST_MONGODB_URI names one, on a real replica set.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, cast

import pytest
from pymongo import AsyncMongoClient, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from tests.fakes import ALICE, BOB
from tests.mongo import REAL_MONGODB_URI, NxServer
from tidings.engine.mongo import MongoStore
from tidings.engine.mongo.compat import as_datetime
from tidings.engine.mongo.documents import INBOX, RECEIPT, Document
from tidings.engine.mongo.retention import DONE, apply_retention
from tidings.models import Draft, Transition, collection_for, utcnow
from tidings.states import MessageState

S = MessageState


@pytest.fixture(params=["nx-27017", "mongodb"])
async def db(request: pytest.FixtureRequest) -> AsyncIterator[AsyncDatabase[Document]]:
    """A database of the test's own on each server."""
    if request.param == "nx-27017":
        nx: NxServer = request.getfixturevalue("nx")
        uri = nx.uri
    elif REAL_MONGODB_URI is None:
        pytest.skip("set TIDINGS_TEST_MONGODB_URI to a replica set to run against MongoDB")
    else:
        uri = REAL_MONGODB_URI
    client: AsyncMongoClient[Document] = AsyncMongoClient(uri, tz_aware=True)
    name = f"t_{uuid.uuid4().hex[:12]}"
    try:
        yield client[name]
        await client.drop_database(name)
    finally:
        await client.close()


async def ttl_on_done(db: AsyncDatabase[Document], email: str) -> list[int]:
    """The ``expireAfterSeconds`` of every index on ``done`` in ``email``'s collection."""
    indexes = await db[collection_for(email)].index_information()
    return [
        info["expireAfterSeconds"]
        for info in indexes.values()
        if list(info["key"]) == [(DONE, 1)] and "expireAfterSeconds" in info
    ]


async def open_with(db: AsyncDatabase[Document], retention: float | None) -> None:
    """What a process with this setting does when it first opens Bob's collection."""
    store = MongoStore(db, retention)
    await store.ensure_user(BOB)
    await store.close()


async def test_the_index_deletes_by_done_after_the_retention_rounded_up(
    db: AsyncDatabase[Document],
) -> None:
    await open_with(db, 90.5)
    assert await ttl_on_done(db, BOB) == [91]


async def test_done_is_set_on_delivered_and_read_only_on_both_sides(
    db: AsyncDatabase[Document],
) -> None:
    store = MongoStore(db, 3600.0)
    try:
        (outcome,) = await store.send(ALICE, "c1", [Draft("m1", BOB, "x")])
        message = outcome.stored
        assert message is not None

        async def done() -> list[object]:
            inbox = await db[collection_for(BOB)].find_one({"k": INBOX, "mid": "m1"})
            receipt = await db[collection_for(ALICE)].find_one({"k": RECEIPT, "mid": "m1"})
            assert inbox is not None
            assert receipt is not None
            return [inbox.get(DONE), receipt.get(DONE)]

        await store.record([Transition.of(message, S.SENT)])
        assert await done() == [None, None]  # still owed: nothing may expire it
        await store.record([Transition.of(message, S.DELIVERED)])
        delivered = [as_datetime(value) for value in await done()]  # type: ignore[arg-type]
        assert delivered[0] == delivered[1]
        assert abs(delivered[0] - utcnow()) < timedelta(minutes=1)
        await store.record([Transition.of(message, S.READ)])
        read = [as_datetime(value) for value in await done()]  # type: ignore[arg-type]
        assert read[0] == read[1] >= delivered[0]
    finally:
        await store.close()


async def test_a_changed_retention_applies_and_an_unset_one_drops_the_index(
    db: AsyncDatabase[Document],
) -> None:
    await open_with(db, 60)
    assert await ttl_on_done(db, BOB) == [60]
    await open_with(db, 60)  # the same setting again: nothing to do
    assert await ttl_on_done(db, BOB) == [60]
    await open_with(db, 120)  # collMod on MongoDB; compat.retime_ttl for nx-27017
    assert await ttl_on_done(db, BOB) == [120]
    await open_with(db, None)
    assert await ttl_on_done(db, BOB) == []
    await open_with(db, None)  # nothing to drop is no error
    assert await ttl_on_done(db, BOB) == []


async def test_a_resend_after_only_the_inbox_expired_reclaims_the_receipt(
    db: AsyncDatabase[Document],
) -> None:
    # The TTL monitor deletes the inbox document and the receipt in separate
    # collections, so for a moment one can be gone and not the other.
    store = MongoStore(db, 3600.0)
    try:
        (first,) = await store.send(ALICE, "c1", [Draft("m1", BOB, "x")])
        assert first.stored is not None
        await store.record([Transition.of(first.stored, S.DELIVERED)])
        await db[collection_for(BOB)].delete_one({"k": INBOX, "mid": "m1"})

        (again,) = await store.send(ALICE, "c2", [Draft("m1", BOB, "again")])
        assert again.stored is not None
        assert again.state is S.STORED
        receipt = await db[collection_for(ALICE)].find_one({"k": RECEIPT, "mid": "m1"})
        assert receipt is not None
        assert (receipt["state"], receipt["conn"], DONE in receipt) == ("stored", "c2", False)
        # Later states reach the sender's side again.
        await store.record([Transition.of(again.stored, S.SENT)])
        changes = await store.states_since(ALICE, again.at)
        assert [(c.id, c.state) for c in changes] == [("m1", S.SENT)]
    finally:
        await store.close()


# --- the collMod path, on a fake: nx-27017 never refuses a changed index ------------------


class RefusingCollection:
    """A collection whose TTL index exists with other options, refused as MongoDB does."""

    name = "m_fake"

    def __init__(self) -> None:
        self.database = self
        self.commands: list[dict[str, Any]] = []
        self.created: list[IndexModel] = []

    async def command(self, command: dict[str, Any]) -> dict[str, Any]:
        self.commands.append(command)
        return {"ok": 1}

    async def create_indexes(self, indexes: list[IndexModel]) -> list[str]:
        if not self.commands:
            raise OperationFailure("Index with name: retention already exists", code=85)
        self.created.extend(indexes)
        return ["retention"]

    async def index_information(self) -> dict[str, Any]:
        return {"retention": {"key": [(DONE, 1)], "expireAfterSeconds": 60}}


async def test_a_refused_index_is_changed_in_place_with_coll_mod() -> None:
    coll = RefusingCollection()
    await apply_retention(cast("AsyncCollection[Any]", coll), 120)
    assert coll.commands == [
        {"collMod": "m_fake", "index": {"name": "retention", "expireAfterSeconds": 120}}
    ]
