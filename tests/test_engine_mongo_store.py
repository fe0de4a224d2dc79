"""What only the MongoDB engine has to get right, beyond the contract every engine keeps.

Its documents (inbox copy and receipt), the error mapping at the
storage seam, the repair of attempts that stopped half way, the numbering of
inboxes written by Tidings 0.1 (schema 1), and shared presence. Cases whose
outcome depends on the server run on mongomock and on nx-27017.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any, cast

import pytest
from bson import ObjectId
from pymongo import ASCENDING, AsyncMongoClient, monitoring
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import AutoReconnect, DuplicateKeyError, PyMongoError

from tests.fakes import ALICE, BOB, CAROL, at, mock_db, teach_mongomock_sort
from tests.helpers import free_port
from tests.mongo import NxServer
from tidings.engine.mongo.documents import (
    INBOX,
    RECEIPT,
    SCHEMA,
    SENDER_ID_INDEX,
    Document,
    receipt_doc,
    state_of,
)
from tidings.engine.mongo.presence import PRESENCE_TTL, MongoPresence
from tidings.engine.mongo.schema import SCHEMA_1_BACKLOG_INDEX, SCHEMA_MARKER
from tidings.engine.mongo.store import MongoStore
from tidings.errors import StoreUnavailable
from tidings.models import Draft, Message, Outcome, Position, Transition, collection_for, utcnow
from tidings.states import MessageState

S = MessageState


@pytest.fixture
def mongomock_db(monkeypatch: pytest.MonkeyPatch) -> AsyncDatabase[Document]:
    teach_mongomock_sort(monkeypatch)
    return mock_db()


@pytest.fixture(params=["mongomock", "nx-27017"])
async def db(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[AsyncDatabase[Document]]:
    """A database of its own on mongomock or on nx-27017."""
    if request.param == "mongomock":
        teach_mongomock_sort(monkeypatch)
        yield mock_db()
        return
    nx: NxServer = request.getfixturevalue("nx")
    name = f"t_{uuid.uuid4().hex[:12]}"
    client: AsyncMongoClient[Document] = AsyncMongoClient(nx.uri, tz_aware=True)
    try:
        yield client[name]
        await client.drop_database(name)
    finally:
        await client.close()


@pytest.fixture
async def store(db: AsyncDatabase[Document]) -> AsyncIterator[MongoStore]:
    store = MongoStore(db)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


def on_nx(db: AsyncDatabase[Document]) -> bool:
    # mongomock's client is no AsyncMongoClient.
    return isinstance(db.client, AsyncMongoClient)


async def one(
    store: MongoStore, sender: str, recipient: str, mid: str, content: str = "x"
) -> Outcome:
    (outcome,) = await store.send(sender, "c1", [Draft(mid, recipient, content)])
    return outcome


async def receipt(db: AsyncDatabase[Document], sender: str, mid: str) -> Document:
    doc = await db[collection_for(sender)].find_one({"k": RECEIPT, "mid": mid})
    assert doc is not None, f"{sender} has a receipt of {mid}"
    return doc


async def inbox_docs(db: AsyncDatabase[Document], owner: str) -> list[Document]:
    return await db[collection_for(owner)].find({"k": INBOX}).sort("_id", ASCENDING).to_list()


# --- documents --------------------------------------------------------------------------


async def test_ensure_user_prepares_the_message_collection(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    await store.ensure_user(ALICE)
    # nx-27017 names indexes itself, so they are told apart by their keys.
    info = await db[collection_for(ALICE)].index_information()
    indexes = {tuple(spec["key"]): bool(spec.get("unique")) for spec in info.values()}
    assert indexes[(("k", 1), ("mid", 1), ("from", 1))] is True
    assert indexes[(("seq", 1),)] is True
    assert indexes[(("k", 1), ("state", 1), ("seq", 1))] is False
    marker = await db[collection_for(ALICE)].find_one({"_id": SCHEMA_MARKER})
    assert marker is not None
    assert marker["v"] == SCHEMA


async def test_send_writes_an_inbox_document_and_a_receipt(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    outcome = await one(store, ALICE, BOB, "m1", "hello")
    message = outcome.stored
    assert message is not None

    (inbox,) = await inbox_docs(db, BOB)
    assert (inbox["v"], inbox["k"], inbox["seq"]) == (SCHEMA, INBOX, message.position)
    assert (inbox["mid"], inbox["from"], inbox["to"]) == ("m1", ALICE, BOB)
    assert (inbox["content"], inbox["state"]) == ("hello", "stored")

    sent = await receipt(db, ALICE, "m1")
    assert (sent["v"], sent["to"], sent["conn"]) == (SCHEMA, BOB, "c1")
    assert "content" not in sent
    assert "seq" not in sent
    # The receipt reaches ``stored`` once the inbox document is written.
    assert state_of(sent) == (S.STORED, message.sent_at)
    assert await db[collection_for(BOB)].count_documents({"k": RECEIPT}) == 0


async def test_send_to_oneself_keeps_inbox_document_and_receipt_apart(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    message = (await one(store, ALICE, ALICE, "m1")).stored
    assert message is not None
    docs = await db[collection_for(ALICE)].find({"mid": "m1"}).sort("k", ASCENDING).to_list()
    assert [(d["k"], d["state"]) for d in docs] == [(INBOX, "stored"), (RECEIPT, "stored")]
    await store.record([Transition.of(message, S.DELIVERED)])
    docs = await db[collection_for(ALICE)].find({"mid": "m1"}).to_list()
    assert [d["state"] for d in docs] == ["delivered", "delivered"]


async def test_record_moves_the_inbox_and_the_receipt_together(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    message = (await one(store, ALICE, BOB, "m1")).stored
    assert message is not None
    for state in (S.SENT, S.DELIVERED, S.READ):
        await store.record([Transition.of(message, state)])
        (inbox,) = await inbox_docs(db, BOB)
        sent = await receipt(db, ALICE, "m1")
        assert state_of(inbox)[0] is state
        assert state_of(inbox) == state_of(sent)


async def test_a_skipped_state_is_never_written(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    message = (await one(store, ALICE, BOB, "m1")).stored
    assert message is not None
    await store.record([Transition.of(message, S.READ)])
    assert set((await receipt(db, ALICE, "m1"))["at"]) == {"stored", "read"}
    assert set((await inbox_docs(db, BOB))[0]["at"]) == {"stored", "read"}


# --- attempts that stopped half way -----------------------------------------------------


async def left_received(db: AsyncDatabase[Document], recipient: str = BOB) -> None:
    """ALICE's receipt of m1, as a send that stopped before the inbox insert left it."""
    doc = receipt_doc(ALICE, Draft("m1", recipient, "hello"), "c0", utcnow())
    await db[collection_for(ALICE)].insert_one(doc)


async def test_a_resend_stores_a_message_whose_first_attempt_stopped_half_way(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    await left_received(db)
    outcome = await one(store, ALICE, BOB, "m1", "hello")
    assert outcome.stored is not None
    assert outcome.state is S.STORED
    assert len(await inbox_docs(db, BOB)) == 1
    assert state_of(await receipt(db, ALICE, "m1")) == (S.STORED, outcome.at)


async def test_an_id_half_sent_to_another_recipient_is_refused(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    # Nobody knows yet whether BOB will get m1: it cannot go to CAROL instead.
    await left_received(db)
    outcome = await one(store, ALICE, CAROL, "m1", "for carol")
    assert (outcome.state, outcome.code, outcome.stored) == (S.FAILED, "invalid", None)
    assert outcome.reason is not None
    assert BOB in outcome.reason
    assert await inbox_docs(db, CAROL) == []
    assert await inbox_docs(db, BOB) == []
    assert (await receipt(db, ALICE, "m1"))["to"] == BOB


async def test_a_resend_repairs_a_receipt_left_behind(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    first = await one(store, ALICE, BOB, "m1")
    # As if the process stopped after the inbox insert, before the receipt's update.
    await db[collection_for(ALICE)].update_one(
        {"k": RECEIPT, "mid": "m1"}, {"$set": {"state": "received"}, "$unset": {"at": ""}}
    )
    again = await one(store, ALICE, BOB, "m1")
    assert (again.stored, again.state, again.at) == (None, S.STORED, first.at)
    assert state_of(await receipt(db, ALICE, "m1")) == (S.STORED, first.at)
    assert len(await inbox_docs(db, BOB)) == 1


# --- errors -----------------------------------------------------------------------------


@pytest.fixture
async def nowhere() -> AsyncIterator[AsyncDatabase[Document]]:
    """A database on a port nothing listens on, with a budget small enough to fail fast."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(
        f"mongodb://127.0.0.1:{free_port()}/?directConnection=true",
        tz_aware=True,
        timeoutMS=100,
        serverSelectionTimeoutMS=100,
        connectTimeoutMS=100,
    )
    try:
        yield client["tidings"]
    finally:
        await client.close()


async def test_every_store_method_reports_an_absent_database_as_unavailable(
    nowhere: AsyncDatabase[Document],
) -> None:
    store = MongoStore(nowhere)
    await store.start()
    message = Message(Position(1), "m1", ALICE, BOB, "x", utcnow(), S.STORED)
    calls = {
        "ping": store.ping(),
        "ensure_user": store.ensure_user(ALICE),
        "find_user": store.find_user(ALICE),
        "send": store.send(ALICE, "c1", [Draft("m1", BOB, "x")]),
        "find_inbox": store.find_inbox(BOB, ["m1"]),
        "backlog": store.backlog(BOB, None, None, 10),
        "backlog since": store.backlog(BOB, Position(1), Position(2), 10),
        "record": store.record([Transition.of(message, S.DELIVERED)]),
    }
    try:
        # All at once: each waits out the server selection timeout.
        results = await asyncio.gather(*calls.values(), return_exceptions=True)
    finally:
        await store.close()
    for name, result in zip(calls, results, strict=True):
        # Past the storage seam nobody sees a PyMongo type.
        assert isinstance(result, StoreUnavailable), (name, result)
        assert "database error" in str(result), name
        assert isinstance(result.__cause__, PyMongoError), name


async def test_presence_reports_an_absent_database_as_unavailable(
    nowhere: AsyncDatabase[Document],
) -> None:
    presence = MongoPresence(nowhere["presence"])
    results = await asyncio.gather(
        presence.is_online(ALICE),
        presence.set(ALICE, True),
        presence.set(ALICE, False),
        presence.refresh([ALICE]),
        return_exceptions=True,
    )
    for result in results:
        assert isinstance(result, StoreUnavailable), result
        assert isinstance(result.__cause__, PyMongoError)


class Breaking:
    """A database whose named collection methods fail, as many times as told, then work.

    Everything else goes to the real (mongomock) database.
    """

    def __init__(self, real: AsyncDatabase[Document]) -> None:
        self.real = real
        self.failures: dict[tuple[str, str], tuple[int, PyMongoError]] = {}

    def fail(self, collection: str, method: str, exc: PyMongoError, times: int = 1) -> None:
        self.failures[(collection, method)] = (times, exc)

    def __getitem__(self, name: str) -> Any:
        return _BreakingCollection(self, self.real[name], name)

    async def command(self, *args: Any, **kwargs: Any) -> Any:
        return await self.real.command(*args, **kwargs)


class _BreakingCollection:
    def __init__(self, db: Breaking, real: AsyncCollection[Document], name: str) -> None:
        self._db = db
        self._real = real
        self.name = name

    def __getattr__(self, method: str) -> Any:
        left, exc = self._db.failures.get((self.name, method), (0, AutoReconnect()))
        if not left:
            return getattr(self._real, method)
        self._db.failures[(self.name, method)] = (left - 1, exc)

        async def fail(*args: Any, **kwargs: Any) -> Any:
            raise exc

        return fail


def breaking_store(db: Breaking) -> MongoStore:
    return MongoStore(cast("AsyncDatabase[Document]", db))


async def test_a_failed_preparation_is_tried_again(
    mongomock_db: AsyncDatabase[Document],
) -> None:
    db = Breaking(mongomock_db)
    db.fail(collection_for(ALICE), "create_indexes", AutoReconnect("index build interrupted"))
    store = breaking_store(db)
    with pytest.raises(StoreUnavailable, match="index build interrupted"):
        await store.ensure_user(ALICE)
    # The failure is not remembered as the collection's state: the next use prepares it.
    user = await store.ensure_user(ALICE)
    assert user.email == ALICE
    info = await mongomock_db[collection_for(ALICE)].index_information()
    assert "sender_id" in info
    await store.close()


async def test_ensure_user_takes_the_record_of_a_race_it_lost(
    mongomock_db: AsyncDatabase[Document],
) -> None:
    winner = MongoStore(mongomock_db)
    won = await winner.ensure_user(ALICE)
    db = Breaking(mongomock_db)
    # Two first identifications raced: the other one's upsert got there first.
    db.fail("users", "update_one", DuplicateKeyError("E11000 duplicate key error"))
    loser = breaking_store(db)
    assert await loser.ensure_user(ALICE) == won
    await winner.close()
    await loser.close()


async def test_a_receipt_moves_only_once_its_inbox_is_written(
    mongomock_db: AsyncDatabase[Document],
) -> None:
    db = Breaking(mongomock_db)
    store = breaking_store(db)
    to_bob = (await one(store, ALICE, BOB, "m1")).stored
    to_carol = (await one(store, ALICE, CAROL, "m2")).stored
    assert to_bob is not None
    assert to_carol is not None
    db.fail(collection_for(CAROL), "bulk_write", AutoReconnect("primary stepped down"))
    with pytest.raises(StoreUnavailable, match="primary stepped down"):
        await store.record(
            [Transition.of(to_bob, S.DELIVERED), Transition.of(to_carol, S.DELIVERED)]
        )
    # BOB's inbox was written, so ALICE may hear of it; CAROL's was not, so she may not.
    assert (await receipt(mongomock_db, ALICE, "m1"))["state"] == "delivered"
    assert (await receipt(mongomock_db, ALICE, "m2"))["state"] == "stored"
    assert (await inbox_docs(mongomock_db, CAROL))[0]["state"] == "stored"
    await store.close()


# --- schema 1: inboxes written by Tidings 0.1 -------------------------------------------

# The order 0.1 stored BOB's messages in (their ObjectIds), and their states.
OLD = [("m0", "read"), ("m1", "delivered"), ("m2", "sent"), ("m3", "stored")]
# The order the documents are written in here: not the ObjectId order, so a
# numbering that followed the natural order would show.
WRITTEN = [2, 0, 3, 1]


def old_oid(i: int) -> ObjectId:
    return ObjectId.from_datetime(datetime(2025, 6, 1, 12, 0, i))


def old_inbox(i: int) -> Document:
    mid, state = OLD[i]
    stamps = {"stored": at(i), state: at(i + 10)}
    return {
        "_id": old_oid(i),
        "k": INBOX,
        "mid": mid,
        "from": ALICE,
        "to": BOB,
        "content": f"old {mid}",
        "sent_at": at(i),
        "state": state,
        "at": stamps,
    }


def old_receipt(i: int) -> Document:
    doc = old_inbox(i)
    del doc["content"]
    return {**doc, "_id": ObjectId(), "k": RECEIPT, "conn": "c0"}


async def write_schema_1(db: AsyncDatabase[Document]) -> None:
    """BOB's inbox and ALICE's receipts as Tidings 0.1 left them."""
    inbox, receipts = db[collection_for(BOB)], db[collection_for(ALICE)]
    for i in WRITTEN:
        await inbox.insert_one(old_inbox(i))
        await receipts.insert_one(old_receipt(i))
    # 0.1's backlog index; on nx-27017 it could not include _id.
    keys = [("k", ASCENDING), ("state", ASCENDING)]
    if not on_nx(db):
        keys.append(("_id", ASCENDING))
    await inbox.create_index(keys, name=SCHEMA_1_BACKLOG_INDEX)
    for coll in (inbox, receipts):
        await coll.create_indexes([SENDER_ID_INDEX])


async def test_a_schema_1_inbox_is_numbered_in_stored_order_on_first_use(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    await write_schema_1(db)

    backlog = await store.backlog(BOB, None, None, 10)
    assert [(m.id, m.position, m.state) for m in backlog] == [
        ("m2", 3, S.SENT),
        ("m3", 4, S.STORED),
    ]
    assert backlog[0].content == "old m2"
    docs = await inbox_docs(db, BOB)  # in ObjectId order
    assert [(d["mid"], d["seq"], d["v"]) for d in docs] == [
        ("m0", 1, SCHEMA),
        ("m1", 2, SCHEMA),
        ("m2", 3, SCHEMA),
        ("m3", 4, SCHEMA),
    ]
    marker = await db[collection_for(BOB)].find_one({"_id": SCHEMA_MARKER})
    assert marker is not None
    assert marker["v"] == SCHEMA
    if not on_nx(db):  # nx-27017 names indexes itself: there is no "backlog" to drop
        info = await db[collection_for(BOB)].index_information()
        assert SCHEMA_1_BACKLOG_INDEX not in info
        assert "stored_order" in info


async def test_a_numbered_schema_1_inbox_works_as_any_other(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    await write_schema_1(db)

    since = await store.backlog(BOB, Position(1), None, 10)
    assert [(m.id, m.state) for m in since] == [
        ("m1", S.DELIVERED),
        ("m2", S.SENT),
        ("m3", S.STORED),
    ]

    # An ack finds the old message by id and moves it, and its old receipt, on.
    (found,) = await store.find_inbox(BOB, ["m3"])
    await store.record([Transition.of(found, S.DELIVERED)])
    assert [m.id for m in await store.backlog(BOB, None, None, 10)] == ["m2"]
    assert (await receipt(db, ALICE, "m3"))["state"] == "delivered"

    # A resend of an old id answers its state and takes no position.
    again = await one(store, ALICE, BOB, "m0")
    assert (again.stored, again.state, again.at) == (None, S.READ, at(10))
    # New messages come after the old ones.
    new = (await one(store, CAROL, BOB, "n1")).stored
    assert new is not None
    assert new.position == 5
    assert [m.id for m in await store.backlog(BOB, None, None, 10)] == ["m2", "n1"]


async def test_a_second_store_does_not_number_a_collection_again(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    await write_schema_1(db)
    await store.backlog(BOB, None, None, 10)
    new = (await one(store, CAROL, BOB, "n1")).stored
    assert new is not None

    # Another process opens the inbox and sees every position as the first one left it.
    other = MongoStore(db)
    try:
        seen = await other.backlog(BOB, Position(0), None, 10)
        assert [(m.id, m.position) for m in seen] == [
            ("m0", 1),
            ("m1", 2),
            ("m2", 3),
            ("m3", 4),
            ("n1", 5),
        ]
        later = (await one(other, CAROL, BOB, "n2")).stored
        assert later is not None
        assert later.position == 6
    finally:
        await other.close()


class Commands(monitoring.CommandListener):
    """The names of the commands a client sent, with the collection each one named."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.sent.append((event.command_name, event.command.get(event.command_name)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_the_marker_spares_later_processes_the_numbering(nx: NxServer) -> None:
    # Every process opens every inbox it touches: after the first, that must
    # cost a look-up of the marker and no write to the messages.
    name = f"t_{uuid.uuid4().hex[:12]}"
    commands = Commands()
    first: AsyncMongoClient[Document] = AsyncMongoClient(nx.uri, tz_aware=True)
    second: AsyncMongoClient[Document] = AsyncMongoClient(
        nx.uri, tz_aware=True, event_listeners=[commands]
    )
    try:
        await write_schema_1(first[name])
        numbering = MongoStore(first[name])
        await numbering.backlog(BOB, None, None, 10)
        await numbering.close()

        later = MongoStore(second[name])
        assert len(await later.backlog(BOB, None, None, 10)) == 2
        await later.close()
        bob = collection_for(BOB)
        assert [c for c in commands.sent if c[1] == bob] == [
            ("find", bob),  # the marker
            ("createIndexes", bob),
            ("listIndexes", bob),  # no retention: is there a retention index to drop?
            ("find", bob),  # the backlog
        ]
        await first.drop_database(name)
    finally:
        await first.close()
        await second.close()


# --- presence ---------------------------------------------------------------------------


@pytest.fixture
def presence_records(mongomock_db: AsyncDatabase[Document]) -> AsyncCollection[Document]:
    return mongomock_db["presence"]


async def test_presence_start_makes_its_indexes(
    presence_records: AsyncCollection[Document],
) -> None:
    await MongoPresence(presence_records).start()
    info = await presence_records.index_information()
    assert info["expiry"]["expireAfterSeconds"] == 0
    assert "email" in info


async def test_presence_follows_set(presence_records: AsyncCollection[Document]) -> None:
    presence = MongoPresence(presence_records)
    assert await presence.is_online(ALICE) is False
    await presence.set(ALICE, True)
    assert await presence.is_online(ALICE) is True
    assert await presence.is_online(BOB) is False
    await presence.set(ALICE, False)
    assert await presence.is_online(ALICE) is False


async def test_presence_is_per_process(presence_records: AsyncCollection[Document]) -> None:
    one, two = MongoPresence(presence_records), MongoPresence(presence_records)
    await one.set(ALICE, True)
    await two.set(ALICE, True)
    await one.set(ALICE, False)
    # The other process still holds a connection.
    assert await one.is_online(ALICE) is True
    await two.set(ALICE, False)
    assert await one.is_online(ALICE) is False


async def test_an_expired_record_counts_as_offline(
    presence_records: AsyncCollection[Document],
) -> None:
    presence = MongoPresence(presence_records)
    await presence.set(ALICE, True)
    # A crashed process stops refreshing; its record outlives its expiry until
    # the TTL monitor runs, and must already count as offline.
    stale = utcnow() - timedelta(seconds=1)
    await presence_records.update_many({}, {"$set": {"expires_at": stale}})
    assert await presence.is_online(ALICE) is False


async def test_refresh_extends_only_this_process_and_these_emails(
    presence_records: AsyncCollection[Document],
) -> None:
    mine, theirs = MongoPresence(presence_records), MongoPresence(presence_records)
    await mine.set(ALICE, True)
    (my_record,) = await presence_records.find({}).to_list()
    await mine.set(BOB, True)
    await theirs.set(ALICE, True)
    stale = utcnow() - timedelta(seconds=1)
    await presence_records.update_many({}, {"$set": {"expires_at": stale}})

    await mine.refresh([ALICE])

    fresh = await presence_records.find({"expires_at": {"$gt": stale}}).to_list()
    assert [d["_id"] for d in fresh] == [my_record["_id"]]
    assert fresh[0]["expires_at"] > utcnow() + PRESENCE_TTL - timedelta(seconds=30)


async def test_refresh_recreates_a_record_a_failed_write_left_out(
    presence_records: AsyncCollection[Document],
) -> None:
    presence = MongoPresence(presence_records)
    await presence.refresh([ALICE])
    assert await presence.is_online(ALICE) is True


async def test_refresh_of_nobody_writes_nothing(
    presence_records: AsyncCollection[Document],
) -> None:
    await MongoPresence(presence_records).refresh([])
    assert await presence_records.count_documents({}) == 0
