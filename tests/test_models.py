"""The records that flow between the storage engines, the hub and the sessions."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta

from tests.fakes import ALICE, BOB, at, message
from tidings.models import (
    Outcome,
    Resync,
    StateChanged,
    Stored,
    Transition,
    collection_for,
    utcnow,
)
from tidings.states import MessageState

# What MongoDB forbids in a collection name.
FORBIDDEN = re.compile(r"[$\x00]")


# --- collection_for ---------------------------------------------------------------------


def test_collection_for_is_deterministic() -> None:
    assert collection_for(ALICE) == collection_for("alice@example.com")
    # Collections outlive processes and versions: the name must never change.
    assert (
        collection_for(ALICE)
        == "m_" + "ff8d9819fc0e12bf0d24892e45987e249a28dce836a85cad60e28eaaa8c6d976"
    )


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


# --- utcnow -----------------------------------------------------------------------------


def test_utcnow_is_aware_utc_truncated_to_the_millisecond() -> None:
    for _ in range(50):
        before = datetime.now(UTC)
        now = utcnow()
        after = datetime.now(UTC)
        assert now.tzinfo is UTC
        assert now.microsecond % 1000 == 0
        # Truncated, never rounded up: within the millisecond that ``before`` began.
        assert before - timedelta(milliseconds=1) < now <= after


# --- Message ----------------------------------------------------------------------------


def test_keys_name_a_message_by_sender_and_id() -> None:
    one = message(mid="x", sender=ALICE, position=1)
    assert one.key == (ALICE, "x")
    # The same id from another sender is another message, wherever it lies.
    assert message(mid="x", sender=BOB, position=1).key != one.key
    # The same sender and id is the same message, whatever its position or state.
    again = message(mid="x", sender=ALICE, state=MessageState.READ, position=7)
    assert again.key == one.key


def test_messages_are_values() -> None:
    assert message(position=2) == message(position=2)
    assert message(position=2) != message(position=3)
    assert hash(message()) == hash(message())
    # Immutable to mypy (``record``), which `make test` runs over src and tests;
    # a changed copy is made with ``dataclasses.replace``.
    assert dataclasses.replace(message(), state=MessageState.READ).state is MessageState.READ
    # moved_to is that replace, built directly.
    assert message().moved_to(MessageState.READ) == dataclasses.replace(
        message(), state=MessageState.READ
    )


# --- Transition -------------------------------------------------------------------------


def test_transition_of_a_message() -> None:
    one = message(mid="m3", sender=ALICE, recipient=BOB, position=5)
    assert Transition.of(one, MessageState.DELIVERED) == Transition(
        sender=ALICE, recipient=BOB, id="m3", state=MessageState.DELIVERED
    )
    assert Transition.of(one, MessageState.READ).state is MessageState.READ


# --- feed events and outcomes -----------------------------------------------------------


def test_feed_events_are_values_with_defaults() -> None:
    assert Stored(message()) == Stored(message())
    assert Stored(message(position=1)) != Stored(message(position=2))
    changed = StateChanged(ALICE, "m1", MessageState.SENT, at(1))
    assert changed.origin is None
    assert changed == StateChanged(ALICE, "m1", MessageState.SENT, at(1), None)
    assert changed != StateChanged(ALICE, "m1", MessageState.SENT, at(1), "c1")
    lost = Resync("lost")
    assert lost.email is None
    assert lost == Resync("lost", None)
    assert lost != Resync("lost", BOB)


def test_an_outcome_without_a_refusal_has_no_code() -> None:
    stored = Outcome("m1", MessageState.STORED, at(0), message())
    assert (stored.code, stored.reason) == (None, None)
    assert stored.stored == message()
    assert Outcome("m1", MessageState.READ, at(1)).stored is None
