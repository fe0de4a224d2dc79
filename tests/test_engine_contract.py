"""The ``Store`` contract, run against every engine.

One suite of cases, each run on the memory engine, on ``MongoStore`` over
mongomock, on ``MongoStore`` over nx-27017 and, when TIDINGS_TEST_MONGODB_URI
names one, on a real replica set. Whatever an engine keeps internally, the core
relies on what is checked here: an id names one message per sender, states
only move forward, positions grow in stored order, and the backlog pages
through exactly the messages a session has to deliver.

Positions are only compared, never taken literally: the contract says they
grow, not where they start.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from tests.fakes import ALICE, BOB, CAROL, mock_db, teach_mongomock_sort, until
from tests.mongo import REAL_MONGODB_URI, NxServer
from tidings.engine import Store
from tidings.engine.memory import MemoryFeed, MemoryStore, memory_engine
from tidings.engine.mongo import MongoStore
from tidings.engine.mongo.compat import as_datetime
from tidings.engine.mongo.documents import Document
from tidings.models import (
    Draft,
    FeedEvent,
    Message,
    Outcome,
    Position,
    StateChanged,
    Stored,
    Transition,
    collection_for,
    utcnow,
)
from tidings.states import MessageState

S = MessageState

ENGINES = ["memory", "mongomock", "nx-27017", "mongodb"]


@pytest.fixture(params=ENGINES)
def engine_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def server_uri(engine_name: str, request: pytest.FixtureRequest) -> str | None:
    """The URI of the server an engine runs on; ``None`` for those in this process."""
    if engine_name == "nx-27017":
        nx: NxServer = request.getfixturevalue("nx")
        return nx.uri
    if engine_name == "mongodb":
        if REAL_MONGODB_URI is None:
            pytest.skip("set TIDINGS_TEST_MONGODB_URI to a replica set to run against MongoDB")
        return REAL_MONGODB_URI
    return None


@pytest.fixture
async def store(
    engine_name: str, server_uri: str | None, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Store]:
    """A started store of the engine under test, closed (writers stopped) afterwards."""
    if engine_name == "memory":
        engine = memory_engine()
        await engine.store.start()
        try:
            yield engine.store
        finally:
            await engine.store.close()
        return
    if server_uri is None:
        teach_mongomock_sort(monkeypatch)
        mongo = MongoStore(mock_db())
        await mongo.start()
        try:
            yield mongo
        finally:
            await mongo.close()
        return
    # A database of its own per test: cases never see each other's messages.
    database = f"t_{uuid.uuid4().hex[:12]}"
    client: AsyncMongoClient[Document] = AsyncMongoClient(server_uri, tz_aware=True)
    try:
        mongo = MongoStore(client[database])
        await mongo.start()
        try:
            yield mongo
        finally:
            await mongo.close()
            await client.drop_database(database)
    finally:
        await client.close()


# Seconds finished messages are kept by the stores of the retention cases.
RETENTION = 3600.0


class Clock:
    """A clock the test moves by hand; a retaining store stamps its writes with it."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Retaining:
    """A store with ``RETENTION``, its clock, and what its engine's expiry does by that clock."""

    store: Store
    clock: Clock
    expire: Callable[[], Awaitable[None]]

    async def age(self, seconds: float) -> None:
        """Let ``seconds`` pass, and the engine's expiry run once after them."""
        self.clock.now += timedelta(seconds=seconds)
        await self.expire()


async def ttl_monitor(db: AsyncDatabase[Document], now: datetime) -> None:
    """One pass of MongoDB's TTL monitor at ``now``, driven by the indexes as they are.

    The real one runs every 60 s by the server's clock; this one lets a test
    say when, so nothing waits. Documents without the field never expire.
    """
    for name in await db.list_collection_names():
        coll = db[name]
        for info in (await coll.index_information()).values():
            if "expireAfterSeconds" not in info:
                continue
            [(field, _)] = list(info["key"])
            cutoff = now - timedelta(seconds=info["expireAfterSeconds"])
            cursor = coll.find({field: {"$exists": True}})
            gone = [doc["_id"] async for doc in cursor if as_datetime(doc[field]) <= cutoff]
            if gone:
                await coll.delete_many({"_id": {"$in": gone}})


@pytest.fixture
async def retaining(
    engine_name: str, server_uri: str | None, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Retaining]:
    """A started store of the engine under test that keeps finished messages ``RETENTION``."""
    clock = Clock()
    if engine_name == "memory":
        memory = MemoryStore(MemoryFeed(), RETENTION, clock)
        await memory.start()

        async def purge() -> None:
            memory.purge()

        try:
            yield Retaining(memory, clock, purge)
        finally:
            await memory.close()
        return
    client: AsyncMongoClient[Document] | None = None
    if server_uri is None:
        teach_mongomock_sort(monkeypatch)
        db = mock_db()
    else:
        client = AsyncMongoClient(server_uri, tz_aware=True)
        db = client[f"t_{uuid.uuid4().hex[:12]}"]
    mongo = MongoStore(db, RETENTION, clock)
    await mongo.start()
    try:
        yield Retaining(mongo, clock, lambda: ttl_monitor(db, clock.now))
    finally:
        await mongo.close()
        if client is not None:
            await client.drop_database(db.name)
            await client.close()


async def send(
    store: Store,
    sender: str,
    recipient: str,
    mid: str,
    content: str = "x",
    conn: str = "c1",
) -> Outcome:
    """One draft through ``send``; its outcome."""
    outcomes = await store.send(sender, conn, [Draft(mid, recipient, content)])
    assert len(outcomes) == 1
    return outcomes[0]


async def stored(
    store: Store, sender: str, recipient: str, mid: str, content: str = "x"
) -> Message:
    """Send a new id; the message that send stored."""
    outcome = await send(store, sender, recipient, mid, content)
    assert outcome.stored is not None, f"{mid} is a new id of {sender}'s"
    return outcome.stored


async def send_many(store: Store, count: int, to: str = BOB) -> list[Message]:
    """``count`` messages from ALICE, one send call each."""
    return [await stored(store, ALICE, to, f"m{i}", f"content {i}") for i in range(count)]


async def state_in_inbox(store: Store, message: Message) -> MessageState:
    """The state the recipient's inbox holds for ``message`` now."""
    found = [
        m for m in await store.find_inbox(message.recipient, [message.id]) if m.key == message.key
    ]
    assert len(found) == 1
    return found[0].state


async def pages(
    store: Store, owner: str, since: Position | None, limit: int
) -> list[list[Message]]:
    """Every backlog page of ``owner``, read as a session reads them, up to the empty one."""
    result: list[list[Message]] = []
    after: Position | None = None
    for _ in range(1000):
        page = await store.backlog(owner, since, after, limit)
        if not page:
            return result
        assert len(page) <= limit
        result.append(page)
        after = page[-1].position
    raise AssertionError("the backlog never ran out")


def by_position(messages: Sequence[Message]) -> list[Message]:
    # find_inbox promises no order.
    return sorted(messages, key=lambda m: m.position)


def ids(messages: Sequence[Message]) -> list[str]:
    return [m.id for m in messages]


# --- users ------------------------------------------------------------------------------


async def test_ensure_user_creates_the_record_once(store: Store) -> None:
    first = await store.ensure_user(ALICE)
    assert (first.email, first.name, first.collection) == (ALICE, "alice", collection_for(ALICE))
    assert len(first.id) == 32
    assert await store.ensure_user(ALICE) == first
    other = await store.ensure_user(BOB)
    assert other.id != first.id


async def test_find_user(store: Store) -> None:
    assert await store.find_user(ALICE) is None
    created = await store.ensure_user(ALICE)
    found = await store.find_user(ALICE)
    assert found == created
    assert found is not None
    assert await store.find_user(BOB) is None


async def test_ping_answers(store: Store) -> None:
    await store.ping()


# --- send -------------------------------------------------------------------------------


async def test_send_stores_a_new_message(store: Store) -> None:
    outcome = await send(store, ALICE, BOB, "m1", "hello", conn="conn1")
    assert (outcome.id, outcome.state, outcome.code, outcome.reason) == ("m1", S.STORED, None, None)
    message = outcome.stored
    assert message is not None
    assert (message.id, message.sender, message.recipient) == ("m1", ALICE, BOB)
    assert (message.content, message.state) == ("hello", S.STORED)
    assert message.sent_at == outcome.at
    assert message.sent_at.tzinfo is not None
    assert await store.find_inbox(BOB, ["m1"]) == [message]
    assert await store.backlog(BOB, None, None, 10) == [message]


async def test_a_resend_stores_nothing_and_answers_the_current_state(store: Store) -> None:
    first = await send(store, ALICE, BOB, "m1", "hello")
    assert first.stored is not None
    again = await send(store, ALICE, BOB, "m1", "something else", conn="c2")
    assert again.stored is None
    assert (again.id, again.state, again.at) == ("m1", S.STORED, first.at)
    assert [m.content for m in await store.find_inbox(BOB, ["m1"])] == ["hello"]
    assert await store.backlog(BOB, None, None, 10) == [first.stored]

    await store.record([Transition.of(first.stored, S.DELIVERED)])
    later = await send(store, ALICE, BOB, "m1", "hello")
    assert (later.stored, later.state) == (None, S.DELIVERED)
    assert later.at.tzinfo is not None  # comparable with every other time the store answers


async def test_the_same_id_from_two_senders_is_two_messages(store: Store) -> None:
    one = await stored(store, ALICE, BOB, "m1", "from alice")
    two = await stored(store, CAROL, BOB, "m1", "from carol")
    assert one.key != two.key
    assert one.position != two.position
    assert by_position(await store.find_inbox(BOB, ["m1"])) == [one, two]


async def test_an_id_reused_for_another_recipient_answers_the_first_message(
    store: Store,
) -> None:
    first = await send(store, ALICE, BOB, "m1", "for bob")
    assert first.stored is not None
    again = await send(store, ALICE, CAROL, "m1", "for carol")
    assert again.stored is None
    assert (again.id, again.state, again.at) == ("m1", S.STORED, first.at)
    assert await store.find_inbox(CAROL, ["m1"]) == []
    assert await store.backlog(CAROL, None, None, 10) == []
    # The answer follows the first message as it moves on.
    await store.record([Transition.of(first.stored, S.READ)])
    assert (await send(store, ALICE, CAROL, "m1")).state is S.READ


async def test_drafts_of_one_call_are_stored_in_order(store: Store) -> None:
    drafts = [Draft(f"m{i}", BOB if i % 3 else CAROL, f"content {i}") for i in range(7)]
    outcomes = await store.send(ALICE, "c1", drafts)
    assert [o.id for o in outcomes] == [d.id for d in drafts]
    messages = [o.stored for o in outcomes]
    assert all(m is not None for m in messages)
    for owner in (BOB, CAROL):
        mine = [m for m in messages if m is not None and m.recipient == owner]
        positions = [m.position for m in mine]
        assert positions == sorted(set(positions)), "strictly increasing in draft order"
        assert await store.backlog(owner, None, None, 10) == mine


async def test_a_call_mixing_new_and_resent_ids(store: Store) -> None:
    earlier = await stored(store, ALICE, BOB, "m2")
    outcomes = await store.send(
        ALICE, "c1", [Draft("m1", BOB, "a"), Draft("m2", BOB, "b"), Draft("m3", BOB, "c")]
    )
    assert [(o.id, o.state, o.stored is not None) for o in outcomes] == [
        ("m1", S.STORED, True),
        ("m2", S.STORED, False),
        ("m3", S.STORED, True),
    ]
    assert outcomes[1].at == earlier.sent_at
    assert ids(await store.backlog(BOB, None, None, 10)) == ["m2", "m1", "m3"]


async def test_an_id_twice_in_one_call_is_stored_once(store: Store) -> None:
    outcomes = await store.send(ALICE, "c1", [Draft("m1", BOB, "a"), Draft("m1", BOB, "b")])
    assert [(o.state, o.stored is not None) for o in outcomes] == [
        (S.STORED, True),
        (S.STORED, False),
    ]
    assert [m.content for m in await store.find_inbox(BOB, ["m1"])] == ["a"]


async def test_positions_grow_across_calls(store: Store) -> None:
    sent = [
        await stored(store, ALICE, BOB, "m1"),
        await stored(store, CAROL, BOB, "m1"),
        await stored(store, ALICE, BOB, "m2"),
        await stored(store, BOB, BOB, "m3"),
    ]
    positions = [m.position for m in sent]
    assert positions == sorted(set(positions))


async def test_send_with_no_drafts_answers_nothing(store: Store) -> None:
    assert await store.send(ALICE, "c1", []) == []


async def test_send_to_oneself_keeps_inbox_and_sender_side_apart(store: Store) -> None:
    message = await stored(store, ALICE, ALICE, "m1", "note to self")
    assert await store.backlog(ALICE, None, None, 10) == [message]
    await store.record([Transition.of(message, S.DELIVERED)])
    assert await store.backlog(ALICE, None, None, 10) == []
    assert (await send(store, ALICE, ALICE, "m1")).state is S.DELIVERED


# --- find_inbox -------------------------------------------------------------------------


async def test_find_inbox_by_ids_from_any_sender(store: Store) -> None:
    from_alice = await stored(store, ALICE, BOB, "m1", "a")
    from_carol = await stored(store, CAROL, BOB, "m1", "c")
    other = await stored(store, ALICE, BOB, "m2", "a2")
    assert by_position(await store.find_inbox(BOB, ["m1"])) == [from_alice, from_carol]
    assert by_position(await store.find_inbox(BOB, ["m2", "m1"])) == [
        from_alice,
        from_carol,
        other,
    ]
    assert await store.find_inbox(BOB, ["m3"]) == []
    assert await store.find_inbox(BOB, []) == []
    # Only the owner's inbox: what a user sent is not in their own inbox.
    assert await store.find_inbox(ALICE, ["m1"]) == []


async def test_find_inbox_answers_an_id_asked_twice_once(store: Store) -> None:
    # An ack and a read of one message in one batch ask for its id twice; two
    # matches would read as "several senders used this id".
    message = await stored(store, ALICE, BOB, "m1")
    assert await store.find_inbox(BOB, ["m1", "m1"]) == [message]


async def test_an_empty_inbox(store: Store) -> None:
    nobody = "nobody@example.com"
    assert await store.backlog(nobody, None, None, 10) == []
    assert await store.backlog(nobody, Position(3), Position(5), 10) == []
    assert await store.find_inbox(nobody, ["m1"]) == []
    await store.ensure_user(nobody)  # identified, yet sent nothing
    assert await store.backlog(nobody, None, None, 10) == []
    assert await store.backlog(nobody, Position(1), None, 10) == []


# --- backlog ----------------------------------------------------------------------------


async def test_backlog_is_pending_oldest_first_and_pages_with_after(store: Store) -> None:
    sent = await send_many(store, 7)
    first = await store.backlog(BOB, None, None, 3)
    assert ids(first) == ["m0", "m1", "m2"]
    second = await store.backlog(BOB, None, first[-1].position, 3)
    assert ids(second) == ["m3", "m4", "m5"]
    third = await store.backlog(BOB, None, second[-1].position, 3)
    assert ids(third) == ["m6"]
    assert first + second + third == sent
    assert await store.backlog(BOB, None, third[-1].position, 3) == []


async def test_backlog_holds_only_pending_messages(store: Store) -> None:
    sent = await send_many(store, 4)
    await store.record(
        [
            Transition.of(sent[0], S.SENT),
            Transition.of(sent[1], S.DELIVERED),
            Transition.of(sent[2], S.READ),
        ]
    )
    backlog = await store.backlog(BOB, None, None, 100)
    assert [(m.id, m.state) for m in backlog] == [("m0", S.SENT), ("m3", S.STORED)]
    # What a user sent never shows up in their own backlog.
    assert await store.backlog(ALICE, None, None, 100) == []


async def test_a_delivered_message_leaves_the_backlog(store: Store) -> None:
    (message,) = await send_many(store, 1)
    await store.record([Transition.of(message, S.SENT)])
    assert ids(await store.backlog(BOB, None, None, 10)) == ["m0"]
    await store.record([Transition.of(message, S.DELIVERED)])
    assert await store.backlog(BOB, None, None, 10) == []


async def test_backlog_since_adds_every_message_after_it(store: Store) -> None:
    sent = await send_many(store, 5)
    await store.record(
        [Transition.of(sent[3], S.DELIVERED)] + [Transition.of(m, S.READ) for m in sent[:3]]
    )
    await store.record([Transition.of(sent[4], S.READ)])
    pending = await stored(store, ALICE, BOB, "p", "undelivered")
    backlog = await store.backlog(BOB, sent[2].position, None, 100)
    assert [(m.id, m.state) for m in backlog] == [
        ("m3", S.DELIVERED),
        ("m4", S.READ),
        ("p", S.STORED),
    ]
    assert backlog[-1] == pending


async def test_backlog_since_keeps_pending_messages_before_it(store: Store) -> None:
    sent = await send_many(store, 4)
    await store.record([Transition.of(sent[1], S.DELIVERED), Transition.of(sent[2], S.DELIVERED)])
    backlog = await store.backlog(BOB, sent[2].position, None, 100)
    # m0 is still pending, m1 was delivered before ``since``, m3 comes after it.
    assert ids(backlog) == ["m0", "m3"]


async def test_backlog_since_pages_with_after(store: Store) -> None:
    sent = await send_many(store, 6)
    await store.record([Transition.of(m, S.DELIVERED) for m in sent])
    found = await pages(store, BOB, sent[0].position, 2)
    assert [ids(page) for page in found] == [["m1", "m2"], ["m3", "m4"], ["m5"]]


@pytest.mark.parametrize("limit", [1, 2, 3, 4, 6])
async def test_backlog_since_pages_across_pending_and_later_messages(
    store: Store, limit: int
) -> None:
    # Pages that end before ``since``, on it, and after it must join without a
    # gap or a repeat, whatever the page size.
    sent = await send_many(store, 6)
    await store.record([Transition.of(sent[i], S.DELIVERED) for i in (1, 3, 4, 5)])
    found = await pages(store, BOB, sent[2].position, limit)
    assert [(m.id, m.state) for page in found for m in page] == [
        ("m0", S.STORED),
        ("m2", S.STORED),
        ("m3", S.DELIVERED),
        ("m4", S.DELIVERED),
        ("m5", S.DELIVERED),
    ]


async def test_backlog_stays_right_after_many_deliveries(store: Store) -> None:
    # Enough deliveries for an engine to tidy its record of what is pending.
    count = 200
    outcomes = await store.send(ALICE, "c1", [Draft(f"m{i}", BOB, "x") for i in range(count)])
    sent = [o.stored for o in outcomes if o.stored is not None]
    assert len(sent) == count
    await store.record([Transition.of(m, S.DELIVERED) for m in sent if int(m.id[1:]) % 4])
    expected = [m.id for m in sent if int(m.id[1:]) % 4 == 0]
    found = await pages(store, BOB, None, 16)
    assert [m.id for page in found for m in page] == expected
    since = sent[count // 2].position
    after_since = [m.id for m in sent if int(m.id[1:]) % 4 == 0 or m.position > since]
    found = await pages(store, BOB, since, 16)
    assert [m.id for page in found for m in page] == after_since


# --- record -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reached", "stale"),
    [
        (S.SENT, S.SENT),
        (S.DELIVERED, S.SENT),
        (S.DELIVERED, S.DELIVERED),
        (S.READ, S.DELIVERED),
        (S.READ, S.SENT),
        (S.READ, S.READ),
        (S.SENT, S.STORED),
        (S.SENT, S.RECEIVED),
        (S.SENT, S.FAILED),
    ],
)
async def test_record_never_moves_back(
    store: Store, reached: MessageState, stale: MessageState
) -> None:
    (message,) = await send_many(store, 1)
    await store.record([Transition.of(message, reached)])
    await store.record([Transition.of(message, stale)])
    assert await state_in_inbox(store, message) is reached
    # The sender's side did not move back either: a resend answers it.
    assert (await send(store, ALICE, BOB, message.id)).state is reached


async def test_record_moves_forward_one_state_at_a_time(store: Store) -> None:
    (message,) = await send_many(store, 1)
    for state in (S.SENT, S.DELIVERED, S.READ):
        await store.record([Transition.of(message, state)])
        assert await state_in_inbox(store, message) is state
        assert (await send(store, ALICE, BOB, message.id)).state is state


async def test_record_may_skip_states(store: Store) -> None:
    (message,) = await send_many(store, 1)
    await store.record([Transition.of(message, S.READ)])
    assert await state_in_inbox(store, message) is S.READ
    assert (await send(store, ALICE, BOB, message.id)).state is S.READ
    await store.record([Transition.of(message, S.DELIVERED)])  # arrives after the read
    assert await state_in_inbox(store, message) is S.READ


async def test_record_of_several_inboxes_and_senders_in_one_call(store: Store) -> None:
    to_bob = await stored(store, ALICE, BOB, "m1")
    to_carol = await stored(store, ALICE, CAROL, "m1b")
    from_carol = await stored(store, CAROL, BOB, "m1")
    await store.record(
        [
            Transition.of(to_bob, S.DELIVERED),
            Transition.of(to_carol, S.READ),
            Transition.of(from_carol, S.SENT),
        ]
    )
    assert await state_in_inbox(store, to_bob) is S.DELIVERED
    assert await state_in_inbox(store, to_carol) is S.READ
    assert await state_in_inbox(store, from_carol) is S.SENT


async def test_record_ignores_unknown_messages(store: Store) -> None:
    (message,) = await send_many(store, 1)
    await store.record(
        [
            Transition(ALICE, BOB, "ghost", S.DELIVERED),
            Transition(CAROL, BOB, message.id, S.DELIVERED),  # same id, another sender
            Transition(ALICE, "nobody@example.com", message.id, S.DELIVERED),
            Transition.of(message, S.SENT),
        ]
    )
    assert await state_in_inbox(store, message) is S.SENT
    assert await store.find_inbox(BOB, ["ghost"]) == []
    await store.record([])  # nothing to write is no error either
    assert await state_in_inbox(store, message) is S.SENT


# --- states_since -----------------------------------------------------------------------


async def next_millisecond() -> datetime:
    """The first moment after now at the stores' precision: later writes are stamped after it."""
    now = utcnow()
    while (later := utcnow()) <= now:  # noqa: ASYNC110 (the clock offers nothing to wait on)
        await asyncio.sleep(0.001)
    return later


async def test_states_since_answers_the_senders_messages_that_moved_from_then(
    store: Store,
) -> None:
    still, moved, twice = await send_many(store, 3)
    other = await stored(store, CAROL, BOB, "c0")
    since = await next_millisecond()
    await store.record([Transition.of(twice, S.SENT)])
    await next_millisecond()
    await store.record([Transition.of(moved, S.DELIVERED), Transition.of(other, S.READ)])
    await next_millisecond()
    await store.record([Transition.of(twice, S.READ)])
    found = await store.states_since(ALICE, since)
    # Each once, in its current state, in the order of its last move; nothing
    # of Carol's, nothing that did not move.
    assert [(c.sender, c.id, c.state) for c in found] == [
        (ALICE, moved.id, S.DELIVERED),
        (ALICE, twice.id, S.READ),
    ]
    assert all(c.at >= since for c in found)
    assert still.id not in ids_of(found)
    # A message stored from then on moved too: to stored.
    await next_millisecond()
    new = await stored(store, ALICE, CAROL, "n0")
    found = await store.states_since(ALICE, since)
    assert [(c.id, c.state) for c in found][-1] == (new.id, S.STORED)
    assert await store.states_since(ALICE, await next_millisecond()) == []
    assert await store.states_since("nobody@example.com", since) == []


def ids_of(changes: Sequence[StateChanged]) -> list[str]:
    return [c.id for c in changes]


# --- retention ----------------------------------------------------------------------------


async def inbox_ids(store: Store, owner: str, wanted: Sequence[str]) -> list[str]:
    return ids(by_position(await store.find_inbox(owner, wanted)))


async def test_a_finished_message_expires_after_the_retention_an_owed_one_never(
    retaining: Retaining,
) -> None:
    store = retaining.store
    sent = await send_many(store, 4)
    await store.record(
        [
            Transition.of(sent[0], S.DELIVERED),
            Transition.of(sent[1], S.READ),
            Transition.of(sent[2], S.SENT),
        ]
    )
    await retaining.age(RETENTION - 60)
    assert await inbox_ids(store, BOB, ids(sent)) == ["m0", "m1", "m2", "m3"]
    await retaining.age(61)
    # The delivered and the read one are gone; the sent and the stored one are
    # still owed to Bob, and stay however long he takes.
    assert await inbox_ids(store, BOB, ids(sent)) == ["m2", "m3"]
    await retaining.age(100 * RETENTION)
    assert await inbox_ids(store, BOB, ids(sent)) == ["m2", "m3"]
    assert ids(await store.backlog(BOB, None, None, 10)) == ["m2", "m3"]


async def test_the_retention_counts_from_the_latest_finished_state(
    retaining: Retaining,
) -> None:
    store = retaining.store
    (message,) = await send_many(store, 1)
    await store.record([Transition.of(message, S.DELIVERED)])
    await retaining.age(RETENTION / 2)
    await store.record([Transition.of(message, S.READ)])
    await retaining.age(RETENTION / 2 + 60)
    assert await state_in_inbox(store, message) is S.READ
    await retaining.age(RETENTION / 2)
    assert await store.find_inbox(BOB, [message.id]) == []


async def test_since_and_the_backlog_after_expiry(retaining: Retaining) -> None:
    store = retaining.store
    sent = await send_many(store, 5)
    await store.record([Transition.of(sent[i], S.DELIVERED) for i in (0, 1, 3)])
    await retaining.age(RETENTION + 1)
    later = await stored(store, ALICE, BOB, "m5")
    await store.record([Transition.of(later, S.DELIVERED)])
    # A ``since`` naming an expired message finds nothing to anchor to (the
    # protocol answers not_found); one naming a message still held replays
    # what is left after it, across the holes, page by page.
    assert await store.find_inbox(BOB, ["m1"]) == []
    for limit in (1, 2, 10):
        found = await pages(store, BOB, sent[2].position, limit)
        assert [m.id for page in found for m in page] == ["m2", "m4", "m5"]
    assert ids(await store.backlog(BOB, None, None, 10)) == ["m2", "m4"]


async def test_states_since_after_expiry(retaining: Retaining) -> None:
    store = retaining.store
    since = retaining.clock.now
    finished, owed = await send_many(store, 2)
    await store.record([Transition.of(finished, S.READ), Transition.of(owed, S.SENT)])
    assert ids_of(await store.states_since(ALICE, since)) == ["m0", "m1"]
    await retaining.age(RETENTION + 1)
    assert [(c.id, c.state) for c in await store.states_since(ALICE, since)] == [("m1", S.SENT)]


async def test_a_resend_of_an_expired_id_is_a_new_message(retaining: Retaining) -> None:
    store = retaining.store
    (first,) = await send_many(store, 1)
    await store.record([Transition.of(first, S.DELIVERED)])
    await retaining.age(RETENTION - 60)
    again = await send(store, ALICE, BOB, first.id, "again")
    assert (again.stored, again.state) == (None, S.DELIVERED)  # within the retention: the same
    await retaining.age(61)
    # Past it, the id is free: sent again, it is a new message, stored and owed.
    later = await send(store, ALICE, BOB, first.id, "again")
    assert later.state is S.STORED
    assert later.stored is not None
    assert later.stored.position > first.position
    assert await store.backlog(BOB, None, None, 10) == [later.stored]
    assert await store.find_inbox(BOB, [first.id]) == [later.stored]
    await store.record([Transition.of(later.stored, S.READ)])
    assert (await send(store, ALICE, BOB, first.id)).state is S.READ


# --- the memory engine's feed -----------------------------------------------------------


async def test_memory_engine_reports_every_write_to_its_feed() -> None:
    # MongoDB's feed is a change stream, tested with the feed; the memory
    # engine's store is what publishes, so its events belong to the contract.
    engine = memory_engine()
    events: list[FeedEvent] = []
    task = asyncio.create_task(engine.feed.run(events.append))
    try:
        (outcome,) = await engine.store.send(ALICE, "conn-a", [Draft("m1", BOB, "hi")])
        message = outcome.stored
        assert message is not None
        await until(lambda: len(events) >= 2)
        assert events == [
            Stored(message),
            StateChanged(ALICE, "m1", S.STORED, outcome.at, "conn-a"),
        ]

        # A resend and a stale transition publish nothing: the next event is
        # the one of the transition after them.
        await engine.store.send(ALICE, "conn-b", [Draft("m1", BOB, "hi")])
        await engine.store.record([Transition.of(message, S.DELIVERED)])
        await engine.store.record([Transition.of(message, S.SENT)])
        await engine.store.record([Transition(ALICE, BOB, "ghost", S.READ)])
        await engine.store.record([Transition.of(message, S.READ)])
        await until(lambda: len(events) >= 4)
        changes = [e for e in events[2:4] if isinstance(e, StateChanged)]
        assert [(e.sender, e.id, e.state, e.origin) for e in changes] == [
            (ALICE, "m1", S.DELIVERED, None),
            (ALICE, "m1", S.READ, None),
        ]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
