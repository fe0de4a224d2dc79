"""The hub's routing of typed feed events, with fake subscribers and a fake feed.

A stored message goes to its recipient's sessions; a state change to its
sender's sessions, except ``stored`` to the connection that sent the message;
a resync to the sessions of the user it names, or to every session. The feed is
told by e-mail which users have a session here.
"""

from __future__ import annotations

import logging
from datetime import datetime

import pytest

from tests.fakes import ALICE, BOB, CAROL, FakeFeed, FakeSubscriber, at, message
from tidings.hub import Hub
from tidings.models import Message, Resync, StateChanged, Stored
from tidings.states import MessageState


def make() -> tuple[Hub, FakeFeed]:
    feed = FakeFeed()
    return Hub(feed), feed


def state(
    value: MessageState, mid: str = "m1", sender: str = ALICE, origin: str | None = None
) -> StateChanged:
    return StateChanged(sender, mid, value, at(5), origin)


def frame(value: MessageState, mid: str = "m1") -> dict[str, str]:
    return {"type": "state", "id": mid, "state": value.value, "at": "2026-01-02T03:04:05.567Z"}


# --- attach / detach --------------------------------------------------------------------


def test_attach_reports_the_first_session_and_watches_once() -> None:
    hub, feed = make()
    one, two = FakeSubscriber("c1"), FakeSubscriber("c2")
    assert hub.attach(ALICE, one) is True
    assert hub.attach(ALICE, two) is False
    assert hub.attach(ALICE, two) is False
    assert hub.attach(BOB, FakeSubscriber("c3")) is True
    assert feed.watched == [ALICE, BOB]
    assert sorted(hub.online()) == [ALICE, BOB]


def test_detach_reports_the_last_session_and_unwatches_once() -> None:
    hub, feed = make()
    one, two = FakeSubscriber("c1"), FakeSubscriber("c2")
    hub.attach(ALICE, one)
    hub.attach(ALICE, two)
    assert hub.detach(ALICE, one) is False
    assert feed.unwatched == []
    assert hub.online() == [ALICE]
    assert hub.detach(ALICE, two) is True
    assert feed.unwatched == [ALICE]
    assert hub.online() == []


def test_detach_of_unknown_sessions_is_a_no_op() -> None:
    hub, feed = make()
    one, stranger = FakeSubscriber("c1"), FakeSubscriber("c9")
    assert hub.detach(ALICE, one) is False
    hub.attach(ALICE, one)
    assert hub.detach(ALICE, stranger) is False
    assert hub.detach(BOB, one) is False
    assert hub.online() == [ALICE]
    assert feed.unwatched == []
    assert hub.detach(ALICE, one) is True
    assert hub.detach(ALICE, one) is False
    assert feed.unwatched == [ALICE]


def test_reattach_after_last_detach_watches_again() -> None:
    hub, feed = make()
    one = FakeSubscriber("c1")
    hub.attach(ALICE, one)
    hub.detach(ALICE, one)
    assert hub.attach(ALICE, one) is True
    assert feed.watched == [ALICE, ALICE]
    assert feed.unwatched == [ALICE]


async def test_ready_asks_the_feed_about_that_user() -> None:
    hub, feed = make()
    await hub.ready(BOB)
    await hub.ready(ALICE)
    assert feed.readied == [BOB, ALICE]


# --- stored -----------------------------------------------------------------------------


def test_a_stored_message_is_delivered_to_the_recipients_sessions_only() -> None:
    hub, _ = make()
    bob1, bob2, alice, carol = (FakeSubscriber(c) for c in ("b1", "b2", "a1", "c1"))
    hub.attach(BOB, bob1)
    hub.attach(BOB, bob2)
    hub.attach(ALICE, alice)
    hub.attach(CAROL, carol)
    sent = message(mid="m1", sender=ALICE, recipient=BOB, position=3)
    hub.dispatch(Stored(sent))
    assert bob1.delivered == [sent]
    assert bob2.delivered == [sent]
    assert bob1.delivered[0] is sent
    assert alice.delivered == carol.delivered == []
    for sub in (bob1, bob2, alice, carol):
        assert sub.pushed == []
        assert sub.resyncs == 0


def test_a_stored_message_for_a_user_not_here_is_dropped() -> None:
    hub, _ = make()
    alice = FakeSubscriber("a1")
    hub.attach(ALICE, alice)
    hub.dispatch(Stored(message(recipient=CAROL)))
    assert alice.delivered == []
    assert alice.pushed == []


def test_messages_are_delivered_in_the_order_they_were_dispatched() -> None:
    hub, _ = make()
    bob = FakeSubscriber("b1")
    hub.attach(BOB, bob)
    sent = [message(mid=f"m{n}", position=n) for n in (1, 2, 3)]
    for one in sent:
        hub.dispatch(Stored(one))
    assert bob.delivered == sent


# --- state changes ----------------------------------------------------------------------


def test_a_state_change_is_pushed_to_the_senders_sessions() -> None:
    hub, _ = make()
    alice1, alice2, bob = FakeSubscriber("a1"), FakeSubscriber("a2"), FakeSubscriber("b1")
    hub.attach(ALICE, alice1)
    hub.attach(ALICE, alice2)
    hub.attach(BOB, bob)
    hub.dispatch(state(MessageState.DELIVERED))
    assert alice1.pushed == [frame(MessageState.DELIVERED)]
    assert alice2.pushed == [frame(MessageState.DELIVERED)]
    assert bob.pushed == []
    assert alice1.delivered == bob.delivered == []


def test_a_state_change_for_a_sender_not_here_is_dropped() -> None:
    hub, _ = make()
    bob = FakeSubscriber("b1")
    hub.attach(BOB, bob)
    hub.dispatch(state(MessageState.READ, sender=CAROL))
    assert bob.pushed == []


def test_stored_skips_the_origin_connection_only() -> None:
    hub, _ = make()
    origin, other = FakeSubscriber("a1"), FakeSubscriber("a2")
    hub.attach(ALICE, origin)
    hub.attach(ALICE, other)
    hub.dispatch(state(MessageState.STORED, origin="a1"))
    assert origin.pushed == []
    assert other.pushed == [frame(MessageState.STORED)]


def test_stored_without_an_origin_reaches_every_session() -> None:
    hub, _ = make()
    one, two = FakeSubscriber("a1"), FakeSubscriber("a2")
    hub.attach(ALICE, one)
    hub.attach(ALICE, two)
    hub.dispatch(state(MessageState.STORED))
    assert one.pushed == two.pushed == [frame(MessageState.STORED)]


def test_every_state_after_stored_reaches_the_origin() -> None:
    hub, _ = make()
    origin = FakeSubscriber("a1")
    hub.attach(ALICE, origin)
    for value in (MessageState.SENT, MessageState.DELIVERED, MessageState.READ):
        # An origin on a later state is not the hub's business: it is ignored.
        hub.dispatch(state(value, origin="a1"))
    assert origin.pushed == [
        frame(MessageState.SENT),
        frame(MessageState.DELIVERED),
        frame(MessageState.READ),
    ]


def test_a_failed_state_carries_a_code_and_reason() -> None:
    hub, _ = make()
    alice = FakeSubscriber("a1")
    hub.attach(ALICE, alice)
    hub.dispatch(state(MessageState.FAILED, mid="m7"))
    [pushed] = alice.pushed
    assert pushed["type"] == "state"
    assert pushed["id"] == "m7"
    assert pushed["state"] == "failed"
    assert pushed["code"]
    assert pushed["reason"]


# --- resync -----------------------------------------------------------------------------


def test_a_resync_for_everyone_reaches_every_session(caplog: pytest.LogCaptureFixture) -> None:
    hub, _ = make()
    subs = [FakeSubscriber(f"c{i}") for i in range(4)]
    hub.attach(ALICE, subs[0])
    hub.attach(ALICE, subs[1])
    hub.attach(BOB, subs[2])
    hub.attach(CAROL, subs[3])
    hub.dispatch(Resync("change stream invalidated"))
    assert [s.resyncs for s in subs] == [1, 1, 1, 1]
    assert all(s.delivered == [] and s.pushed == [] for s in subs)
    [record] = [r for r in caplog.records if r.getMessage() == "resync"]
    assert record.levelno == logging.WARNING
    assert record.__dict__["reason"] == "change stream invalidated"
    assert record.__dict__["email"] is None


def test_a_resync_for_one_user_reaches_that_users_sessions_only() -> None:
    hub, _ = make()
    bob1, bob2, alice = FakeSubscriber("b1"), FakeSubscriber("b2"), FakeSubscriber("a1")
    hub.attach(BOB, bob1)
    hub.attach(BOB, bob2)
    hub.attach(ALICE, alice)
    hub.dispatch(Resync("a message without a position (schema 1)", BOB))
    assert (bob1.resyncs, bob2.resyncs, alice.resyncs) == (1, 1, 0)
    hub.dispatch(Resync("history lost", CAROL))  # nobody here
    assert (bob1.resyncs, bob2.resyncs, alice.resyncs) == (1, 1, 0)
    hub.dispatch(Resync("stream restarted", ALICE, at(5)))
    assert (bob1.resynced_since, alice.resynced_since) == ([None], [at(5)])


# --- re-entrancy ------------------------------------------------------------------------


def test_a_subscriber_may_detach_while_being_resynced() -> None:
    hub, feed = make()

    class Leaving(FakeSubscriber):
        def resync(self, since: datetime | None) -> None:
            super().resync(since)
            hub.detach(ALICE, self)

    leaving, staying, last = Leaving("c1"), FakeSubscriber("c2"), Leaving("c3")
    hub.attach(ALICE, leaving)
    hub.attach(ALICE, staying)
    hub.dispatch(Resync("x"))
    assert (leaving.resyncs, staying.resyncs) == (1, 1)
    assert hub.online() == [ALICE]
    hub.detach(ALICE, staying)
    hub.attach(ALICE, last)
    hub.attach(BOB, FakeSubscriber("b1"))
    hub.dispatch(Resync("y"))  # the last of Alice's sessions leaves mid-iteration
    assert last.resyncs == 1
    assert hub.online() == [BOB]
    assert feed.unwatched == [ALICE, ALICE]


def test_a_subscriber_may_detach_while_being_delivered_to() -> None:
    hub, _ = make()

    class Leaving(FakeSubscriber):
        def deliver(self, message: Message) -> None:
            super().deliver(message)
            hub.detach(BOB, self)

    leaving, staying = Leaving("b1"), FakeSubscriber("b2")
    hub.attach(BOB, leaving)
    hub.attach(BOB, staying)
    sent = message()
    hub.dispatch(Stored(sent))
    assert leaving.delivered == staying.delivered == [sent]
    assert hub.online() == [BOB]
