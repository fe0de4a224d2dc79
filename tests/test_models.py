"""The records that flow from the store to sessions."""

from __future__ import annotations

import re

from bson import ObjectId

from tests.fakes import ALICE, BOB, at, inbox_doc
from tidings.models import Change, Message, Resync, User, collection_for
from tidings.protocol import MessageState

# What MongoDB forbids in a collection name, and its namespace budget.
FORBIDDEN = re.compile(r"[$\x00]")


def test_collection_for_is_deterministic() -> None:
    assert collection_for(ALICE) == collection_for(ALICE)
    assert collection_for(ALICE) == collection_for("alice@example.com")


def test_collection_for_looks_like_a_valid_collection_name() -> None:
    for email in (ALICE, "weird$name\x00@exa.mple", "a" * 240 + "@b.io", "ünï@cödé.de"):
        name = collection_for(email)
        assert re.fullmatch(r"m_[0-9a-f]{64}", name), name
        assert not FORBIDDEN.search(name)
        assert not name.startswith("system.")


def test_collection_for_is_distinct_per_email() -> None:
    emails = [f"user{i}@example.com" for i in range(500)] + [ALICE, BOB, "Alice@example.com"]
    names = {collection_for(email) for email in emails}
    assert len(names) == len(emails)


def test_user_public_is_the_protocol_user_object() -> None:
    user = User(id="u1", email=ALICE, name="alice", collection=collection_for(ALICE))
    assert user.public() == {
        "id": "u1",
        "email": ALICE,
        "name": "alice",
        "collection": collection_for(ALICE),
        "online": False,
    }
    online = User(id="u1", email=ALICE, name="alice", collection="c", online=True)
    assert online.public()["online"] is True


def test_message_from_inbox_doc() -> None:
    doc = inbox_doc(mid="m9", sender=ALICE, recipient=BOB)
    message = Message.from_doc(doc)
    assert message.oid == doc["_id"]
    assert (message.id, message.sender, message.recipient) == ("m9", ALICE, BOB)
    assert message.content == "hello"
    assert message.sent_at == at(0)
    assert message.state is MessageState.STORED
    assert message.state_at == at(0)
    assert message.key == (ALICE, "m9")


def test_message_state_at_is_the_time_of_its_current_state() -> None:
    doc = {**inbox_doc(), "state": "delivered", "at": {"stored": at(0), "delivered": at(9)}}
    assert Message.from_doc(doc).state_at == at(9)


def test_message_state_at_falls_back_to_sent_at() -> None:
    doc = inbox_doc()
    del doc["at"]
    assert Message.from_doc(doc).state_at == at(0)
    doc["at"] = {"stored": at(3)}
    doc["state"] = "sent"
    assert Message.from_doc(doc).state_at == at(0)


def test_message_frame() -> None:
    doc = {**inbox_doc(mid="m2"), "state": "sent"}
    assert Message.from_doc(doc).frame() == {
        "type": "message",
        "id": "m2",
        "from": ALICE,
        "to": BOB,
        "content": "hello",
        "sent_at": "2026-01-02T03:04:00.567Z",
        "state": "sent",
    }


def test_keys_name_a_message_by_sender_and_id() -> None:
    one = Message.from_doc(inbox_doc(mid="x", sender=ALICE))
    other = Message.from_doc({**inbox_doc(mid="x", sender=BOB), "_id": ObjectId()})
    assert one.key != other.key
    assert one.key == Message.from_doc(inbox_doc(mid="x", sender=ALICE)).key


def test_feed_events_are_values() -> None:
    doc = inbox_doc()
    assert Change("insert", doc) == Change("insert", doc)
    assert Change("insert", doc) != Change("update", doc)
    assert Resync("lost") == Resync("lost")
    assert Resync("lost").reason == "lost"
