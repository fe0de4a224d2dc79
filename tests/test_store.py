"""MongoStore on mongomock: users, presence, messages, the backlog and state changes."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any, cast

import pytest
from bson import ObjectId
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import AutoReconnect, DuplicateKeyError, ServerSelectionTimeoutError

from tests.fakes import ALICE, BOB, CAROL, mock_db
from tidings.errors import ClientError, ErrorCode, StoreUnavailable
from tidings.models import INBOX, OUTBOX, Change, Message, User, collection_for, utcnow
from tidings.presence import PRESENCE_TTL
from tidings.protocol import MessageState
from tidings.store import PRESENCE, USERS, Document, MongoStore

S = MessageState


class Recorder:
    """An ``on_change`` callback that keeps every change."""

    def __init__(self) -> None:
        self.changes: list[Change] = []

    def __call__(self, change: Change) -> None:
        self.changes.append(change)

    def kinds(self) -> list[tuple[str, str, str]]:
        return [(c.operation, c.doc["k"], c.doc["state"]) for c in self.changes]


@pytest.fixture
def db() -> AsyncDatabase[Document]:
    return mock_db()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def store(db: AsyncDatabase[Document], recorder: Recorder) -> MongoStore:
    store = MongoStore(db, on_change=recorder)
    await store.start()
    return store


async def users(store: MongoStore, *emails: str) -> list[User]:
    return [await store.ensure_user(email) for email in emails]


async def deliver(
    store: MongoStore, sender: str, recipient: User, mid: str, content: str = "x", conn: str = "c1"
) -> Message:
    """Send and confirm a new message, as the handlers do; the stored message."""
    outcome = await store.send(sender, recipient, mid, content, conn)
    assert outcome.stored is not None, "a new id is stored"
    await store.confirm(outcome.stored)
    return outcome.stored


# --- users and presence -----------------------------------------------------------------


async def test_start_indexes_presence_and_ping_answers(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    info = await db[PRESENCE].index_information()
    assert "expiry" in info
    assert "email" in info
    await store.ping()


async def test_ensure_user_creates_the_record(store: MongoStore) -> None:
    user = await store.ensure_user(ALICE)
    assert user.email == ALICE
    assert user.name == "alice"
    assert user.collection == collection_for(ALICE)
    assert user.online is False
    assert len(user.id) == 32


async def test_ensure_user_is_idempotent(store: MongoStore, db: AsyncDatabase[Document]) -> None:
    first = await store.ensure_user(ALICE)
    second = await store.ensure_user(ALICE)
    assert first == second
    assert await db[USERS].count_documents({}) == 1


async def test_ensure_user_indexes_the_message_collection(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    await store.ensure_user(ALICE)
    info = await db[collection_for(ALICE)].index_information()
    assert info["sender_id"]["unique"] is True
    assert "backlog" in info


async def test_ensure_user_recovers_from_a_lost_race(db: AsyncDatabase[Document]) -> None:
    class RacingUsers:
        """A users collection whose upsert loses to a concurrent first identification."""

        def __init__(self, real: Any) -> None:
            self.real = real

        async def update_one(self, *args: Any, **kwargs: Any) -> Document:
            raise DuplicateKeyError("E11000 duplicate key error")

        async def find_one_and_update(self, *args: Any, **kwargs: Any) -> Document:
            raise DuplicateKeyError("E11000 duplicate key error")

        async def find_one(self, query: Document) -> Document | None:
            found: Document | None = await self.real.find_one(query)
            return found

    class RacingDb:
        def __init__(self, real: AsyncDatabase[Document]) -> None:
            self.real = real

        def __getitem__(self, name: str) -> Any:
            return RacingUsers(self.real[name]) if name == USERS else self.real[name]

    winner = MongoStore(db)
    won = await winner.ensure_user(ALICE)
    loser = MongoStore(cast("AsyncDatabase[Document]", RacingDb(db)))
    assert await loser.ensure_user(ALICE) == won


async def test_find_user_unknown_is_none(store: MongoStore) -> None:
    assert await store.find_user(ALICE) is None


async def test_find_user_with_presence(store: MongoStore) -> None:
    created = await store.ensure_user(ALICE)
    offline = await store.find_user(ALICE)
    assert offline == created
    assert offline is not None
    assert offline.online is False

    await store.set_presence(ALICE, True)
    online = await store.find_user(ALICE)
    assert online is not None
    assert online.online is True
    assert online.id == created.id

    await store.set_presence(ALICE, False)
    again = await store.find_user(ALICE)
    assert again is not None
    assert again.online is False


async def test_find_user_without_presence_leaves_online_unset(store: MongoStore) -> None:
    await store.ensure_user(ALICE)
    await store.set_presence(ALICE, True)
    user = await store.find_user(ALICE, presence=False)
    assert user is not None
    assert (user.email, user.online) == (ALICE, False)
    assert (await store.find_user(ALICE)) == dataclasses.replace(user, online=True)


async def test_presence_is_per_process(db: AsyncDatabase[Document]) -> None:
    one, two = MongoStore(db), MongoStore(db)
    await one.ensure_user(ALICE)
    await one.set_presence(ALICE, True)
    await two.set_presence(ALICE, True)
    await one.set_presence(ALICE, False)
    # The other process still holds a connection.
    user = await one.find_user(ALICE)
    assert user is not None
    assert user.online is True


async def test_expired_presence_counts_as_offline(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    await store.ensure_user(ALICE)
    await store.set_presence(ALICE, True)
    # A crashed process stops refreshing; its record outlives its expiry until the TTL
    # monitor runs, and must already count as offline.
    await db[PRESENCE].update_many({}, {"$set": {"expires_at": utcnow() - timedelta(seconds=1)}})
    user = await store.find_user(ALICE)
    assert user is not None
    assert user.online is False


async def test_refresh_presence_extends_only_this_process_and_these_emails(
    db: AsyncDatabase[Document],
) -> None:
    mine, theirs = MongoStore(db), MongoStore(db)
    await mine.set_presence(ALICE, True)
    my_process = (await db[PRESENCE].find_one({"email": ALICE}) or {})["process"]
    await mine.set_presence(BOB, True)
    await theirs.set_presence(ALICE, True)
    stale = utcnow() - timedelta(seconds=1)
    await db[PRESENCE].update_many({}, {"$set": {"expires_at": stale}})

    await mine.refresh_presence([ALICE])

    docs = await db[PRESENCE].find({}).to_list(None)
    fresh = {(d["process"] == my_process, d["email"]) for d in docs if d["expires_at"] > stale}
    assert fresh == {(True, ALICE)}
    refreshed = next(d for d in docs if d["expires_at"] > stale)
    assert refreshed["expires_at"] > utcnow() + PRESENCE_TTL - timedelta(seconds=30)


async def test_refresh_presence_recreates_a_record_a_failed_write_left_out(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    await store.ensure_user(ALICE)
    await store.refresh_presence([ALICE])
    user = await store.find_user(ALICE)
    assert user is not None
    assert user.online is True


async def test_refresh_presence_of_nobody_writes_nothing(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    await store.refresh_presence([])
    assert await db[PRESENCE].count_documents({}) == 0


# --- send -------------------------------------------------------------------------------


async def test_send_creates_inbox_document_and_outbox_receipt(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    _, bob = await users(store, ALICE, BOB)
    outcome = await store.send(ALICE, bob, "m1", "hello", "conn1")
    assert (outcome.id, outcome.state) == ("m1", S.STORED)
    message = outcome.stored
    assert message is not None
    assert (message.id, message.sender, message.recipient) == ("m1", ALICE, BOB)
    assert message.content == "hello"
    assert message.state is S.STORED
    assert message.state_at == message.sent_at == outcome.at

    inbox = await db[collection_for(BOB)].find({}).to_list(None)
    assert len(inbox) == 1
    assert inbox[0]["k"] == INBOX
    assert inbox[0]["_id"] == message.oid
    assert inbox[0]["content"] == "hello"
    assert inbox[0]["state"] == "stored"

    outbox = await db[collection_for(ALICE)].find({}).to_list(None)
    assert len(outbox) == 1
    receipt = outbox[0]
    assert receipt["k"] == OUTBOX
    assert (receipt["mid"], receipt["from"], receipt["to"]) == ("m1", ALICE, BOB)
    assert receipt["conn"] == "conn1"
    assert "content" not in receipt
    # The receipt follows once the sending connection has been answered.
    assert receipt["state"] == "received"
    await store.confirm(message)
    confirmed = await db[collection_for(ALICE)].find_one({"k": OUTBOX})
    assert confirmed is not None
    assert confirmed["state"] == "stored"
    assert confirmed["at"]["stored"] == message.sent_at


async def test_send_is_idempotent_per_sender_and_id(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    _, bob = await users(store, ALICE, BOB)
    first = await deliver(store, ALICE, bob, "m1", "hello")
    again = await store.send(ALICE, bob, "m1", "something else", "c2")
    assert again.stored is None
    assert (again.id, again.state, again.at) == ("m1", S.STORED, first.state_at)
    assert await db[collection_for(BOB)].count_documents({}) == 1
    assert await db[collection_for(ALICE)].count_documents({}) == 1
    found = await store.find_inbox(BOB, "m1", ALICE)
    assert [m.content for m in found] == ["hello"]


async def test_a_resend_answers_the_current_state(store: MongoStore) -> None:
    _, bob = await users(store, ALICE, BOB)
    first = await deliver(store, ALICE, bob, "m1")
    assert await store.advance(first, S.DELIVERED)
    again = await store.send(ALICE, bob, "m1", "x", "c1")
    assert again.stored is None
    assert again.state is S.DELIVERED


async def test_same_id_from_two_senders_is_two_messages(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    _, bob, _ = await users(store, ALICE, BOB, CAROL)
    one = await deliver(store, ALICE, bob, "m1", "from alice")
    two = await deliver(store, CAROL, bob, "m1", "from carol")
    assert one.oid != two.oid
    assert await db[collection_for(BOB)].count_documents({"k": INBOX}) == 2


async def test_same_id_to_another_recipient_is_not_stored_twice(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    _, bob, carol = await users(store, ALICE, BOB, CAROL)
    first = await deliver(store, ALICE, bob, "m1", "for bob")
    again = await store.send(ALICE, carol, "m1", "for carol", "c1")
    assert again.stored is None
    assert (again.id, again.state, again.at) == ("m1", S.STORED, first.state_at)
    assert await db[collection_for(CAROL)].count_documents({"k": INBOX}) == 0


async def test_an_id_still_on_its_way_to_another_recipient_is_refused(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    _, _, carol = await users(store, ALICE, BOB, CAROL)
    await db[collection_for(ALICE)].insert_one(
        {"k": OUTBOX, "mid": "m1", "from": ALICE, "to": BOB, "state": "received", "conn": "c0"}
    )
    with pytest.raises(ClientError) as info:
        await store.send(ALICE, carol, "m1", "for carol", "c1")
    assert info.value.code is ErrorCode.INVALID
    assert info.value.ref == "m1"
    assert BOB in info.value.message
    assert await db[collection_for(CAROL)].count_documents({"k": INBOX}) == 0


async def test_send_to_self_keeps_inbox_and_receipt_apart(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    (alice,) = await users(store, ALICE)
    message = await deliver(store, ALICE, alice, "m1", "note to self")
    docs = await db[collection_for(ALICE)].find({}).sort("k", 1).to_list(None)
    assert [(d["k"], d["state"]) for d in docs] == [(INBOX, "stored"), (OUTBOX, "stored")]
    assert await store.advance(message, S.DELIVERED)
    docs = await db[collection_for(ALICE)].find({}).to_list(None)
    assert {d["state"] for d in docs} == {"delivered"}


async def test_send_completes_a_receipt_left_by_an_interrupted_send(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    _, bob = await users(store, ALICE, BOB)
    # The receipt is written first; a crash before the inbox insert leaves it ``received``.
    await db[collection_for(ALICE)].insert_one(
        {"k": OUTBOX, "mid": "m1", "from": ALICE, "to": BOB, "state": "received", "conn": "c0"}
    )
    outcome = await store.send(ALICE, bob, "m1", "hello", "c1")
    assert outcome.stored is not None
    assert await db[collection_for(BOB)].count_documents({"k": INBOX}) == 1


async def test_a_resend_repairs_a_receipt_left_behind(
    store: MongoStore, db: AsyncDatabase[Document]
) -> None:
    _, bob = await users(store, ALICE, BOB)
    outcome = await store.send(ALICE, bob, "m1", "hello", "c1")  # never confirmed
    assert outcome.stored is not None
    again = await store.send(ALICE, bob, "m1", "hello", "c1")
    assert again.stored is None
    receipt = await db[collection_for(ALICE)].find_one({"k": OUTBOX})
    assert receipt is not None
    assert receipt["state"] == "stored"


async def test_send_and_confirm_report_every_write(store: MongoStore, recorder: Recorder) -> None:
    _, bob = await users(store, ALICE, BOB)
    outcome = await store.send(ALICE, bob, "m1", "hello", "c1")
    assert recorder.kinds() == [("insert", OUTBOX, "received"), ("insert", INBOX, "stored")]
    assert outcome.stored is not None
    await store.confirm(outcome.stored)
    assert recorder.kinds()[2:] == [("update", OUTBOX, "stored")]
    assert recorder.changes[2].doc["at"]["stored"] == recorder.changes[1].doc["sent_at"]
    recorder.changes.clear()
    await store.send(ALICE, bob, "m1", "hello", "c1")
    assert recorder.changes == []  # a resend writes nothing


async def test_reported_docs_are_copies(store: MongoStore, recorder: Recorder) -> None:
    _, bob = await users(store, ALICE, BOB)
    message = await deliver(store, ALICE, bob, "m1", "hello")
    recorder.changes[1].doc.clear()  # type: ignore[attr-defined]
    found = await store.find_inbox(BOB, "m1", None)
    assert found == [message]


# --- find_inbox -------------------------------------------------------------------------


async def test_find_inbox(store: MongoStore) -> None:
    _, bob, _ = await users(store, ALICE, BOB, CAROL)
    from_alice = await deliver(store, ALICE, bob, "m1", "a")
    from_carol = await deliver(store, CAROL, bob, "m1", "c")
    assert await store.find_inbox(BOB, "m1", ALICE) == [from_alice]
    assert await store.find_inbox(BOB, "m1", CAROL) == [from_carol]
    # Without a sender, both; newest first.
    assert await store.find_inbox(BOB, "m1", None) == [from_carol, from_alice]
    assert await store.find_inbox(BOB, "m2", None) == []
    # Only the owner's inbox: the sender's receipt is no inbox document.
    assert await store.find_inbox(ALICE, "m1", None) == []


# --- backlog ----------------------------------------------------------------------------


async def send_many(store: MongoStore, count: int, to: str = BOB) -> list[Message]:
    recipient = await store.ensure_user(to)
    sent = []
    for i in range(count):
        sent.append(await deliver(store, ALICE, recipient, f"m{i}", f"content {i}"))
    return sent


async def test_backlog_is_oldest_first_and_pages(store: MongoStore) -> None:
    sent = await send_many(store, 7)
    first = await store.backlog(BOB, None, None, 3)
    assert [m.id for m in first] == ["m0", "m1", "m2"]
    second = await store.backlog(BOB, None, first[-1].oid, 3)
    assert [m.id for m in second] == ["m3", "m4", "m5"]
    third = await store.backlog(BOB, None, second[-1].oid, 3)
    assert [m.id for m in third] == ["m6"]
    assert first + second + third == sent


async def test_backlog_holds_only_undelivered_messages(store: MongoStore) -> None:
    sent = await send_many(store, 4)
    assert await store.advance(sent[0], S.SENT)
    assert await store.advance(sent[1], S.DELIVERED)
    assert await store.advance(sent[2], S.READ)
    backlog = await store.backlog(BOB, None, None, 100)
    assert [(m.id, m.state) for m in backlog] == [("m0", S.SENT), ("m3", S.STORED)]
    # Outbox receipts never show up in anyone's backlog.
    await store.ensure_user(ALICE)
    assert await store.backlog(ALICE, None, None, 100) == []


async def test_backlog_since_adds_everything_after_the_id(store: MongoStore) -> None:
    sent = await send_many(store, 5)
    for message in sent:
        assert await store.advance(message, S.READ)
    pending = await deliver(store, ALICE, await store.ensure_user(BOB), "p", "undelivered")
    since = sent[2].oid
    backlog = await store.backlog(BOB, since, None, 100)
    assert [m.id for m in backlog] == ["m3", "m4", "p"]
    assert backlog[-1] == pending


async def test_backlog_since_includes_pending_messages_before_it(store: MongoStore) -> None:
    sent = await send_many(store, 4)
    assert await store.advance(sent[1], S.DELIVERED)
    assert await store.advance(sent[2], S.DELIVERED)
    backlog = await store.backlog(BOB, sent[2].oid, None, 100)
    # m0 is still undelivered, m1 delivered and before ``since``, m3 after it.
    assert [m.id for m in backlog] == ["m0", "m3"]


async def test_backlog_since_with_after_pages(store: MongoStore) -> None:
    sent = await send_many(store, 6)
    for message in sent:
        assert await store.advance(message, S.DELIVERED)
    page = await store.backlog(BOB, sent[0].oid, None, 2)
    assert [m.id for m in page] == ["m1", "m2"]
    page = await store.backlog(BOB, sent[0].oid, page[-1].oid, 2)
    assert [m.id for m in page] == ["m3", "m4"]
    page = await store.backlog(BOB, sent[0].oid, page[-1].oid, 2)
    assert [m.id for m in page] == ["m5"]


async def test_backlog_of_unknown_user_is_empty(store: MongoStore) -> None:
    assert await store.backlog("nobody@example.com", None, None, 10) == []
    assert await store.backlog("nobody@example.com", ObjectId(), ObjectId(), 10) == []


# --- advance ----------------------------------------------------------------------------


async def test_advance_moves_forward_and_updates_the_receipt(
    store: MongoStore, db: AsyncDatabase[Document], recorder: Recorder
) -> None:
    (message,) = await send_many(store, 1)
    recorder.changes.clear()
    for state in (S.SENT, S.DELIVERED, S.READ):
        assert await store.advance(message, state) is True
        inbox = await db[collection_for(BOB)].find_one({"_id": message.oid})
        receipt = await db[collection_for(ALICE)].find_one({"k": OUTBOX, "mid": "m0"})
        assert inbox is not None
        assert receipt is not None
        assert inbox["state"] == receipt["state"] == state.value
        assert inbox["at"][state.value] == receipt["at"][state.value]
    assert recorder.kinds() == [
        ("update", INBOX, "sent"),
        ("update", OUTBOX, "sent"),
        ("update", INBOX, "delivered"),
        ("update", OUTBOX, "delivered"),
        ("update", INBOX, "read"),
        ("update", OUTBOX, "read"),
    ]


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
async def test_advance_never_moves_back(
    store: MongoStore,
    db: AsyncDatabase[Document],
    recorder: Recorder,
    reached: MessageState,
    stale: MessageState,
) -> None:
    (message,) = await send_many(store, 1)
    assert await store.advance(message, reached)
    recorder.changes.clear()
    assert await store.advance(message, stale) is False
    inbox = await db[collection_for(BOB)].find_one({"_id": message.oid})
    receipt = await db[collection_for(ALICE)].find_one({"k": OUTBOX})
    assert inbox is not None
    assert receipt is not None
    assert inbox["state"] == receipt["state"] == reached.value
    assert recorder.changes == []


async def test_advance_may_skip_states(store: MongoStore, db: AsyncDatabase[Document]) -> None:
    (message,) = await send_many(store, 1)
    assert await store.advance(message, S.READ)
    receipt = await db[collection_for(ALICE)].find_one({"k": OUTBOX})
    assert receipt is not None
    assert receipt["state"] == "read"
    assert set(receipt["at"]) == {"stored", "read"}


async def test_advance_of_a_message_that_is_gone_is_false(store: MongoStore) -> None:
    (message,) = await send_many(store, 1)
    ghost = Message(
        oid=ObjectId(),
        id="ghost",
        sender=message.sender,
        recipient=message.recipient,
        content="",
        sent_at=message.sent_at,
        state=S.STORED,
        state_at=message.sent_at,
    )
    assert await store.advance(ghost, S.SENT) is False


async def test_a_store_without_on_change_reports_nothing(db: AsyncDatabase[Document]) -> None:
    store = MongoStore(db)
    bob = await store.ensure_user(BOB)
    message = await deliver(store, ALICE, bob, "m1")
    assert await store.advance(message, S.SENT)
    receipt = await db[collection_for(ALICE)].find_one({"k": OUTBOX})
    assert receipt is not None
    assert receipt["state"] == "sent"


# --- a database that does not answer ----------------------------------------------------


class DownCollection:
    """Every operation fails as a driver fails when the primary is gone."""

    def __getattr__(self, name: str) -> Any:
        async def fail(*args: Any, **kwargs: Any) -> Any:
            raise AutoReconnect(f"{name}: connection refused")

        return fail


class DownDatabase:
    def __getitem__(self, name: str) -> DownCollection:
        return DownCollection()

    async def command(self, *args: Any, **kwargs: Any) -> Document:
        raise ServerSelectionTimeoutError("no primary available")


@pytest.fixture
def down() -> MongoStore:
    return MongoStore(cast("AsyncDatabase[Document]", DownDatabase()))


def sample_message() -> Message:
    now = utcnow()
    return Message(ObjectId(), "m1", ALICE, BOB, "x", now, S.STORED, now)


async def test_database_errors_surface_as_store_unavailable(down: MongoStore) -> None:
    bob = User(id="b", email=BOB, name="bob", collection=collection_for(BOB))
    calls = [
        down.start(),
        down.ping(),
        down.ensure_user(ALICE),
        down.find_user(ALICE),
        down.set_presence(ALICE, True),
        down.set_presence(ALICE, False),
        down.refresh_presence([ALICE]),
        down.send(ALICE, bob, "m1", "x", "c1"),
        down.confirm(sample_message()),
        down.find_inbox(BOB, "m1", None),
        down.backlog(BOB, None, None, 10),
        down.advance(sample_message(), S.SENT),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailable, match="database error"):
            await call


async def test_ping_error_names_the_cause(down: MongoStore) -> None:
    with pytest.raises(StoreUnavailable, match="no primary available") as info:
        await down.ping()
    assert isinstance(info.value.__cause__, ServerSelectionTimeoutError)


async def test_a_failed_index_build_is_retried(db: AsyncDatabase[Document]) -> None:
    class FlakyIndexes:
        """Fails ``create_indexes`` once, then behaves like the real database."""

        def __init__(self) -> None:
            self.failures = 1

        def __getitem__(self, name: str) -> Any:
            real = db[name]
            if name != collection_for(ALICE) or not self.failures:
                return real
            outer = self

            class Coll:
                async def create_indexes(self, *args: Any, **kwargs: Any) -> None:
                    outer.failures -= 1
                    raise AutoReconnect("index build interrupted")

            return Coll()

    store = MongoStore(cast("AsyncDatabase[Document]", FlakyIndexes()))
    with pytest.raises(StoreUnavailable):
        await store.ensure_user(ALICE)
    user = await store.ensure_user(ALICE)
    assert user.email == ALICE
    assert "sender_id" in await db[collection_for(ALICE)].index_information()
