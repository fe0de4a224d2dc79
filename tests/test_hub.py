"""The hub's routing rules, with fake subscribers and a fake feed."""

from __future__ import annotations

from tests.fakes import ALICE, BOB, CAROL, FakeFeed, FakeSubscriber, change, inbox_doc, receipt_doc
from tidings.hub import Hub
from tidings.models import Message, Resync, collection_for
from tidings.protocol import MessageState


def make() -> tuple[Hub, FakeFeed]:
    feed = FakeFeed()
    return Hub(feed), feed


# --- attach / detach --------------------------------------------------------------------


def test_attach_reports_the_first_session_and_watches_once() -> None:
    hub, feed = make()
    one, two = FakeSubscriber("c1"), FakeSubscriber("c2")
    assert hub.attach(ALICE, one) is True
    assert hub.attach(ALICE, two) is False
    assert hub.attach(ALICE, two) is False
    assert feed.watched == [collection_for(ALICE)]
    assert hub.online() == [ALICE]


def test_detach_reports_the_last_session_and_unwatches_once() -> None:
    hub, feed = make()
    one, two = FakeSubscriber("c1"), FakeSubscriber("c2")
    hub.attach(ALICE, one)
    hub.attach(ALICE, two)
    assert hub.detach(ALICE, one) is False
    assert feed.unwatched == []
    assert hub.online() == [ALICE]
    assert hub.detach(ALICE, two) is True
    assert feed.unwatched == [collection_for(ALICE)]
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
    assert feed.unwatched == [collection_for(ALICE)]


def test_reattach_after_last_detach_watches_again() -> None:
    hub, feed = make()
    one = FakeSubscriber("c1")
    hub.attach(ALICE, one)
    hub.detach(ALICE, one)
    assert hub.attach(ALICE, one) is True
    assert feed.watched == [collection_for(ALICE)] * 2


# --- routing ----------------------------------------------------------------------------


def test_inbox_insert_is_delivered_to_the_recipients_sessions_only() -> None:
    hub, _ = make()
    bob1, bob2, alice, carol = (FakeSubscriber(c) for c in ("b1", "b2", "a1", "c1"))
    hub.attach(BOB, bob1)
    hub.attach(BOB, bob2)
    hub.attach(ALICE, alice)
    hub.attach(CAROL, carol)
    doc = inbox_doc(mid="m1", sender=ALICE, recipient=BOB)
    hub.dispatch(change("insert", doc))
    assert bob1.delivered == [Message.from_doc(doc)]
    assert bob2.delivered == [Message.from_doc(doc)]
    assert alice.delivered == carol.delivered == []
    for sub in (bob1, bob2, alice, carol):
        assert sub.notified == []


def test_inbox_insert_for_a_user_not_here_is_dropped() -> None:
    hub, _ = make()
    alice = FakeSubscriber("a1")
    hub.attach(ALICE, alice)
    hub.dispatch(change("insert", inbox_doc(recipient=CAROL)))
    assert alice.delivered == []


def test_outbox_update_notifies_the_senders_sessions() -> None:
    hub, _ = make()
    alice1, alice2, bob = FakeSubscriber("a1"), FakeSubscriber("a2"), FakeSubscriber("b1")
    hub.attach(ALICE, alice1)
    hub.attach(ALICE, alice2)
    hub.attach(BOB, bob)
    hub.dispatch(change("update", receipt_doc(MessageState.DELIVERED, conn="a1")))
    expected = {"type": "state", "id": "m1", "state": "delivered", "at": "2026-01-02T03:04:05.567Z"}
    # Only ``stored`` skips the origin connection; later states go everywhere.
    assert alice1.notified == [expected]
    assert alice2.notified == [expected]
    assert bob.notified == []
    assert alice1.delivered == bob.delivered == []


def test_stored_skips_the_origin_connection_only() -> None:
    hub, _ = make()
    origin, other = FakeSubscriber("a1"), FakeSubscriber("a2")
    hub.attach(ALICE, origin)
    hub.attach(ALICE, other)
    hub.dispatch(change("update", receipt_doc(MessageState.STORED, conn="a1")))
    assert origin.notified == []
    assert [f["state"] for f in other.notified] == ["stored"]


def test_every_state_after_stored_reaches_the_origin() -> None:
    hub, _ = make()
    origin = FakeSubscriber("a1")
    hub.attach(ALICE, origin)
    for state in (MessageState.SENT, MessageState.DELIVERED, MessageState.READ):
        hub.dispatch(change("update", receipt_doc(state, conn="a1")))
    assert [f["state"] for f in origin.notified] == ["sent", "delivered", "read"]


def test_outbox_insert_and_inbox_update_are_ignored() -> None:
    hub, _ = make()
    alice, bob = FakeSubscriber("a1"), FakeSubscriber("b1")
    hub.attach(ALICE, alice)
    hub.attach(BOB, bob)
    hub.dispatch(change("insert", receipt_doc(MessageState.RECEIVED)))
    hub.dispatch(change("update", {**inbox_doc(), "state": "sent"}))
    hub.dispatch(change("insert", {"_id": 1, "something": "else"}))
    for sub in (alice, bob):
        assert sub.delivered == []
        assert sub.notified == []


def test_resync_reaches_every_session() -> None:
    hub, _ = make()
    subs = [FakeSubscriber(f"c{i}") for i in range(4)]
    hub.attach(ALICE, subs[0])
    hub.attach(ALICE, subs[1])
    hub.attach(BOB, subs[2])
    hub.attach(CAROL, subs[3])
    hub.dispatch(Resync("change stream invalidated"))
    assert [s.resyncs for s in subs] == [1, 1, 1, 1]
    assert all(s.delivered == [] and s.notified == [] for s in subs)


def test_a_subscriber_may_detach_while_being_dispatched_to() -> None:
    hub, _ = make()

    class Leaving(FakeSubscriber):
        def resync(self) -> None:
            super().resync()
            hub.detach(ALICE, self)

    leaving, staying = Leaving("c1"), FakeSubscriber("c2")
    hub.attach(ALICE, leaving)
    hub.attach(ALICE, staying)
    hub.dispatch(Resync("x"))
    assert (leaving.resyncs, staying.resyncs) == (1, 1)
    assert hub.online() == [ALICE]
