"""How the MongoDB engine reads its documents back: ``event_of``, ``message_of``, ``state_of``.

Also the nx-27017 differences of ``compat``: change-stream documents in NeoSQLite's
JSON encoding (``typed``) and datetimes that ``$set`` turned into strings
(``as_datetime``). Change events are built as MongoDB documents them; the
nx-27017 ones as that server sends them.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from bson import ObjectId

from tests.fakes import ALICE, BOB, at
from tests.mongo import change_event, nx_oid
from tidings.engine.mongo.compat import as_datetime, typed
from tidings.engine.mongo.documents import (
    INBOX,
    RECEIPT,
    SCHEMA,
    Document,
    event_of,
    inbox_doc,
    message_of,
    receipt_doc,
    state_of,
)
from tidings.engine.mongo.schema import SCHEMA_MARKER
from tidings.models import (
    Draft,
    Message,
    Position,
    Resync,
    StateChanged,
    Stored,
    collection_for,
)
from tidings.states import MessageState

OID = ObjectId("6a1b2c3d4e5f60718293a4b5")
SENT_AT = datetime(2026, 11, 26, 23, 20, 58, 770000, tzinfo=UTC)


def inbox(mid: str = "m1", seq: int | None = 4, **fields: Any) -> Document:
    """Alice's message to Bob, as its inbox document; ``seq=None`` is schema 1."""
    doc = {**inbox_doc(ALICE, Draft(mid, BOB, "hello"), at(0)), "_id": OID, **fields}
    if seq is not None:
        doc["seq"] = seq
    else:
        del doc["v"]
    return doc


def receipt(state: MessageState, conn: str = "c1", mid: str = "m1", **times: datetime) -> Document:
    """Alice's receipt of her message to Bob, moved to ``state`` at the ``times`` given."""
    doc = receipt_doc(ALICE, Draft(mid, BOB, "hello"), conn, at(0))
    return {**doc, "_id": OID, "state": state.value, "at": dict(times)}


def change(
    operation: str,
    full: Mapping[str, Any] | None,
    updated: Mapping[str, Any] | None = None,
    owner: str = BOB,
) -> dict[str, Any]:
    """A change event as MongoDB documents it, in ``owner``'s collection."""
    return change_event(
        operation,
        token={"_data": "00000001"},
        collection=collection_for(owner),
        doc_id=OID,
        full=full,
        updated=updated,
    )


# ------------------------------------------------------------------- inbox inserts


def test_an_inbox_insert_is_a_stored_message_at_its_seq() -> None:
    event = event_of(change("insert", inbox(mid="m9", seq=17)))
    assert event == Stored(
        Message(
            position=Position(17),
            id="m9",
            sender=ALICE,
            recipient=BOB,
            content="hello",
            sent_at=at(0),
            state=MessageState.STORED,
        )
    )


def test_a_schema_1_inbox_insert_resyncs_its_recipient() -> None:
    doc = inbox(seq=None)
    assert "seq" not in doc
    assert "v" not in doc
    event = event_of(change("insert", doc))
    assert event == Resync("a message without a position (schema 1)", BOB)


# ---------------------------------------------------------------- receipt updates


def test_a_receipt_update_is_a_state_change_for_its_sender() -> None:
    doc = receipt(MessageState.SENT, stored=at(1), sent=at(2))
    event = event_of(change("update", doc, {"state": "sent", "at.sent": at(2)}, owner=ALICE))
    assert event == StateChanged(ALICE, "m1", MessageState.SENT, at(2), None)


def test_origin_is_named_only_for_stored() -> None:
    stored = receipt(MessageState.STORED, conn="c7", stored=at(1))
    assert event_of(change("update", stored, {"state": "stored"})) == StateChanged(
        ALICE, "m1", MessageState.STORED, at(1), "c7"
    )
    for state in (MessageState.SENT, MessageState.DELIVERED, MessageState.READ):
        later = {**receipt(state, conn="c7"), "at": {state.value: at(5)}}
        event = event_of(change("update", later, {"state": state.value}))
        assert isinstance(event, StateChanged)
        assert event.state is state
        assert event.origin is None


def test_the_state_this_update_set_wins_over_a_later_full_document() -> None:
    # updateLookup read the receipt after a later write had moved it to read.
    later = receipt(MessageState.READ, stored=at(1), delivered=at(3), read=at(4))
    update = change("update", later, {"state": "delivered", "at.delivered": at(3)})
    assert event_of(update) == StateChanged(ALICE, "m1", MessageState.DELIVERED, at(3))
    assert later["state"] == "read"  # the event's document is not modified
    assert update["fullDocument"]["state"] == "read"


def test_without_state_in_updated_fields_the_full_document_says() -> None:
    doc = receipt(MessageState.DELIVERED, stored=at(1), delivered=at(3))
    expected = StateChanged(ALICE, "m1", MessageState.DELIVERED, at(3))
    assert event_of(change("update", doc, {"conn": "c2"})) == expected
    # nx-27017 sends no updateDescription: its fullDocument is this write's.
    no_description = change("update", doc)
    del no_description["updateDescription"]
    assert event_of(no_description) == expected
    assert event_of({**no_description, "updateDescription": None}) == expected
    empty = {**no_description, "updateDescription": {"updatedFields": None}}
    assert event_of(empty) == expected


def test_a_replaced_receipt_is_a_state_change_too() -> None:
    doc = receipt(MessageState.READ, read=at(6))
    assert event_of(change("replace", doc)) == StateChanged(ALICE, "m1", MessageState.READ, at(6))


def test_a_state_without_its_time_falls_back_to_sent_at() -> None:
    doc = receipt(MessageState.SENT)  # ``at`` holds no ``sent``
    assert event_of(change("update", doc, {"state": "sent"})) == StateChanged(
        ALICE, "m1", MessageState.SENT, at(0)
    )


# ---------------------------------------------------------------------- ignored


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(
            change("insert", receipt_doc(ALICE, Draft("m1", BOB, "x"), "c1", at(0))),
            id="receipt-insert",
        ),
        pytest.param(change("update", inbox(state="sent"), {"state": "sent"}), id="inbox-update"),
        pytest.param(change("replace", inbox()), id="inbox-replace"),
        pytest.param(change("update", inbox(), {"seq": 4, "v": SCHEMA}), id="inbox-numbered"),
        pytest.param(change("insert", {"_id": SCHEMA_MARKER, "v": SCHEMA}), id="marker-insert"),
        pytest.param(
            change("update", {"_id": SCHEMA_MARKER, "v": SCHEMA}, {"v": SCHEMA}),
            id="marker-update",
        ),
        pytest.param(change("delete", None), id="delete"),
        pytest.param(change("delete", inbox()), id="delete-with-document"),
        pytest.param(change("update", None, {"state": "read"}), id="gone-by-lookup"),
        pytest.param(change("insert", None), id="insert-without-document"),
        pytest.param(change("drop", None), id="drop"),
        pytest.param(change("invalidate", None), id="invalidate"),
        pytest.param(change("createIndexes", None), id="createIndexes"),
        pytest.param({"_id": {"_data": "00000001"}}, id="no-operation"),
    ],
)
def test_writes_nobody_needs_to_hear_of_are_ignored(event: Mapping[str, Any]) -> None:
    assert event_of(event) is None


# ---------------------------------------------------------------------- nx-27017


def test_an_nx_encoded_inbox_insert_is_decoded() -> None:
    full = {
        "_id": nx_oid(str(OID)),
        "v": SCHEMA,
        "k": INBOX,
        "seq": 3,
        "mid": "m1",
        "from": ALICE,
        "to": BOB,
        "content": "hi",
        "sent_at": {"$date": "2026-11-26T23:20:58.770000+00:00"},
        "state": "stored",
        "at": {"stored": {"$date": "2026-11-26T23:20:58.770000+00:00"}},
    }
    event = event_of(change("insert", full))
    assert event == Stored(
        Message(Position(3), "m1", ALICE, BOB, "hi", SENT_AT, MessageState.STORED)
    )
    assert full["sent_at"] == {"$date": "2026-11-26T23:20:58.770000+00:00"}  # not modified


def test_an_nx_encoded_receipt_update_is_decoded() -> None:
    full = {
        "_id": nx_oid(str(OID)),
        "v": SCHEMA,
        "k": RECEIPT,
        "mid": "m1",
        "from": ALICE,
        "to": BOB,
        "sent_at": {"$date": "2026-11-26T23:20:58.770000+00:00"},
        "state": "stored",
        "conn": "c1",
        # A datetime written with $set comes back as an ISO string.
        "at": {"stored": "2026-11-26T23:21:00.001000+00:00"},
    }
    event = {"_id": {"_data": "1"}, "operationType": "update", "fullDocument": full}
    expected_at = datetime(2026, 11, 26, 23, 21, 0, 1000, tzinfo=UTC)
    assert event_of(event) == StateChanged(ALICE, "m1", MessageState.STORED, expected_at, "c1")


def test_typed_undoes_the_nx_encoding_at_every_depth() -> None:
    hex_id = "6a1b2c3d4e5f60718293a4b5"
    encoded = {
        "_id": nx_oid(hex_id),
        "sent_at": {"$date": "2026-11-26T23:20:58.770000"},
        "at": {"stored": {"$date": "2026-11-26T23:20:58.770000+00:00"}},
        "refs": [nx_oid("0" * 24), {"$date": "2026-11-26T23:20:58Z"}, [nx_oid("f" * 24)], 7, "x"],
        "not_a_date": {"$date": "2026-11-26", "extra": 1},
        "numeric_date": {"$date": 1764199258770},
        "not_an_oid": {"__neosqlite_objectid__": False, "id": hex_id},
    }
    decoded = typed(encoded)
    assert decoded == {
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
    assert isinstance(decoded["_id"], ObjectId)
    assert isinstance(decoded["refs"][1], datetime)


def test_typed_leaves_bson_documents_alone() -> None:
    doc = {**inbox(), "tags": ["a", {"b": OID}], "nested": {"when": SENT_AT, "n": None}}
    assert typed(doc) == doc
    assert typed(doc)["_id"] is doc["_id"]
    assert typed(doc)["sent_at"] is doc["sent_at"]
    for scalar in (None, 3, 2.5, "s", True, OID, SENT_AT, b"raw"):
        assert typed(scalar) is scalar


def test_as_datetime_reads_iso_strings_and_passes_datetimes_through() -> None:
    assert as_datetime(SENT_AT) is SENT_AT
    assert as_datetime("2026-11-26T23:20:58.770000+00:00") == SENT_AT
    assert as_datetime("2026-11-26T23:20:58.770Z") == SENT_AT
    # nx-27017's strings carry no offset; the time in them is UTC, as in every BSON date.
    naive = as_datetime("2026-11-26T23:20:58.770000")
    assert naive == SENT_AT
    assert naive.tzinfo is not None
    plus_two = as_datetime("2026-11-27T01:20:58.770+02:00")
    assert plus_two == SENT_AT
    assert plus_two.utcoffset() == timedelta(hours=2)
    assert plus_two.tzinfo == timezone(timedelta(hours=2))


# ------------------------------------------------------------ message_of / state_of


def test_message_of_reads_an_inbox_document() -> None:
    doc = {**inbox(mid="m2", seq=9), "state": "delivered"}
    assert message_of(doc) == Message(
        Position(9), "m2", ALICE, BOB, "hello", at(0), MessageState.DELIVERED
    )


def test_message_of_reads_a_sent_at_that_is_a_string() -> None:
    doc = {**inbox(), "sent_at": "2026-11-26T23:20:58.770000+00:00"}
    assert message_of(doc).sent_at == SENT_AT


def test_state_of_is_the_state_and_when_it_was_reached() -> None:
    doc = {**inbox(), "state": "delivered", "at": {"stored": at(0), "delivered": at(9)}}
    assert state_of(doc) == (MessageState.DELIVERED, at(9))


def test_state_of_reads_times_that_are_strings() -> None:
    doc = {**inbox(), "state": "read", "at": {"read": "2026-11-26T23:20:58.770000+00:00"}}
    assert state_of(doc) == (MessageState.READ, SENT_AT)
    doc = {**inbox(), "state": "read", "at": {"read": "2026-11-26T23:20:58.770000"}}
    assert state_of(doc) == (MessageState.READ, SENT_AT)
    doc = {**inbox(), "state": "sent", "sent_at": "2026-11-26T23:20:58.770000+00:00", "at": {}}
    assert state_of(doc) == (MessageState.SENT, SENT_AT)


def test_state_of_falls_back_to_sent_at() -> None:
    doc = inbox()
    del doc["at"]
    assert state_of(doc) == (MessageState.STORED, at(0))
    doc = {**inbox(), "state": "sent", "at": {"stored": at(3)}}
    assert state_of(doc) == (MessageState.SENT, at(0))
    fresh = receipt_doc(ALICE, Draft("m1", BOB, "x"), "c1", at(0))
    assert "at" not in fresh
    assert state_of(fresh) == (MessageState.RECEIVED, at(0))


def test_documents_round_trip_through_message_of() -> None:
    doc = {**inbox_doc(ALICE, Draft("m5", BOB, "round"), SENT_AT), "seq": 5}
    assert doc["v"] == SCHEMA
    assert doc["k"] == INBOX
    assert message_of(doc) == Message(
        Position(5), "m5", ALICE, BOB, "round", SENT_AT, MessageState.STORED
    )
    assert state_of(doc) == (MessageState.STORED, SENT_AT)
