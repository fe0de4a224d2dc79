"""The memory engine's own parts: its feed, its presence, and what its indexes promise.

The semantics every engine keeps (send, backlog, record) are checked for all
engines by the storage contract suite; here are only what is particular to the
memory engine: the in-process ``MemoryFeed`` and what the store reports to it,
``MemoryPresence``, and the pending index behind the backlog, which must stay
correct as it compacts (white-box: ``_Inbox.pending`` is looked at directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from tests.fakes import ALICE, BOB, CAROL, TIMEOUT, message, until
from tidings.engine.base import Sink
from tidings.engine.memory import MemoryFeed, MemoryPresence, MemoryStore, memory_engine
from tidings.models import (
    Draft,
    FeedEvent,
    Message,
    Position,
    Resync,
    StateChanged,
    Stored,
    Transition,
)
from tidings.states import PENDING, MessageState


@contextlib.asynccontextmanager
async def running(feed: MemoryFeed, sink: Sink) -> AsyncIterator[None]:
    """Run the feed for the block; cancel it and wait for it afterwards."""
    task = asyncio.create_task(feed.run(sink))
    try:
        await until(lambda: feed.running)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, TIMEOUT)


def stored(n: int) -> Stored:
    return Stored(message(mid=f"m{n}", position=n))


# --------------------------------------------------------------------------- feed


async def test_the_feed_delivers_in_publish_order_before_and_while_running() -> None:
    feed = MemoryFeed()
    early = [stored(n) for n in range(1, 6)]
    for event in early:
        feed.publish(event)
    seen: list[FeedEvent] = []
    assert not feed.running
    assert feed.problem == "the in-process feed is not running"
    async with running(feed, seen.append):
        await until(lambda: len(seen) == 5)
        assert seen == early
        assert feed.problem is None
        later: list[FeedEvent] = [
            Resync("why not"),
            StateChanged(ALICE, "m1", MessageState.READ, message().sent_at),
            stored(6),
        ]
        for event in later:
            feed.publish(event)
        await until(lambda: len(seen) == 8)
        assert seen == [*early, *later]
    assert not feed.running
    assert feed.problem == "the in-process feed is not running"


async def test_a_sink_that_raises_on_one_event_does_not_stop_the_feed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    feed = MemoryFeed()
    seen: list[FeedEvent] = []

    def sink(event: FeedEvent) -> None:
        if event == stored(2):
            raise RuntimeError("the hub could not route this one")
        seen.append(event)

    for n in (1, 2, 3):
        feed.publish(stored(n))
    async with running(feed, sink):
        await until(lambda: len(seen) == 2)
        assert feed.running
        feed.publish(stored(4))
        await until(lambda: len(seen) == 3)
        assert feed.running
    assert seen == [stored(1), stored(3), stored(4)]
    failed = [r for r in caplog.records if r.getMessage() == "feed_event_failed"]
    assert len(failed) == 1
    assert failed[0].levelno == logging.ERROR
    assert failed[0].__dict__["event_type"] == "Stored"
    assert failed[0].exc_info is not None


async def test_the_feed_yields_between_events() -> None:
    """A burst of events does not starve other tasks until it is delivered."""
    feed = MemoryFeed()
    seen: list[FeedEvent] = []
    for n in range(1, 101):
        feed.publish(stored(n))
    async with running(feed, seen.append):
        # The feed delivered part of the burst when this task ran again.
        await asyncio.sleep(0)
        assert 0 < len(seen) < 100
        await until(lambda: len(seen) == 100)
    assert seen == [stored(n) for n in range(1, 101)]


async def test_watch_unwatch_and_ready_need_nothing() -> None:
    feed = MemoryFeed()
    feed.watch(ALICE)
    feed.unwatch(ALICE)
    feed.unwatch(BOB)  # never watched
    await asyncio.wait_for(feed.ready(ALICE), TIMEOUT)
    await asyncio.wait_for(feed.ready(CAROL), TIMEOUT)
    assert not feed.running


# --------------------------------------------------------- what the store reports


async def test_the_store_reports_every_write_to_its_feed_in_order() -> None:
    engine = memory_engine()
    assert engine.name == "memory"
    seen: list[FeedEvent] = []
    assert isinstance(engine.feed, MemoryFeed)
    async with running(engine.feed, seen.append):
        first, second = await engine.store.send(
            ALICE, "c-alice", [Draft("m1", BOB, "one"), Draft("m2", CAROL, "two")]
        )
        assert first.stored is not None
        assert second.stored is not None
        await engine.store.send(ALICE, "c-alice", [Draft("m1", BOB, "one")])  # a resend
        await engine.store.record([Transition.of(first.stored, MessageState.DELIVERED)])
        stale = [
            Transition.of(first.stored, MessageState.SENT),  # behind delivered
            Transition("nobody@example.com", BOB, "m1", MessageState.READ),  # no such message
            Transition(ALICE, "dave@example.com", "m1", MessageState.READ),  # no such inbox
        ]
        await engine.store.record(stale)
        await engine.store.record([Transition.of(second.stored, MessageState.READ)])
        await until(lambda: len(seen) == 6)
    [delivered_at] = [
        e.at for e in seen if isinstance(e, StateChanged) and e.state is MessageState.DELIVERED
    ]
    [read_at] = [e.at for e in seen if isinstance(e, StateChanged) and e.state is MessageState.READ]
    assert seen == [
        Stored(first.stored),
        StateChanged(ALICE, "m1", MessageState.STORED, first.at, "c-alice"),
        Stored(second.stored),
        StateChanged(ALICE, "m2", MessageState.STORED, second.at, "c-alice"),
        StateChanged(ALICE, "m1", MessageState.DELIVERED, delivered_at),
        StateChanged(ALICE, "m2", MessageState.READ, read_at),
    ]
    assert first.stored.position == second.stored.position == Position(1)  # one per inbox


# ------------------------------------------------------------------------ presence


async def test_presence_within_one_process() -> None:
    presence = MemoryPresence()
    assert not await presence.is_online(ALICE)
    await presence.set(ALICE, True)
    await presence.set(BOB, True)
    assert await presence.is_online(ALICE)
    assert await presence.is_online(BOB)
    assert not await presence.is_online(CAROL)
    await presence.set(ALICE, False)
    assert not await presence.is_online(ALICE)
    assert await presence.is_online(BOB)
    await presence.set(ALICE, False)  # already offline: still offline
    assert not await presence.is_online(ALICE)
    await presence.refresh([BOB, CAROL])
    assert await presence.is_online(BOB)
    assert await presence.is_online(CAROL)
    await presence.refresh([])
    assert await presence.is_online(CAROL)


# ------------------------------------------------------------------ pending index


async def fill(store: MemoryStore, count: int, recipient: str = BOB) -> list[Message]:
    """``count`` messages from Alice to ``recipient``, in one send."""
    drafts = [Draft(f"m{n}", recipient, f"hello {n}") for n in range(1, count + 1)]
    outcomes = await store.send(ALICE, "c0", drafts)
    messages = [o.stored for o in outcomes if o.stored is not None]
    assert len(messages) == count
    return messages


async def move(store: MemoryStore, messages: Sequence[Message], state: MessageState) -> None:
    for one in messages:  # one at a time, as acknowledgements come
        await store.record([Transition.of(one, state)])


async def everything(
    store: MemoryStore, owner: str, since: Position | None, limit: int
) -> list[Message]:
    """Every page of ``owner``'s backlog, read as sessions read it."""
    found: list[Message] = []
    after: Position | None = None
    while True:
        page = await store.backlog(owner, since, after, limit)
        assert len(page) <= limit
        if not page:
            return found
        found.extend(page)
        after = page[-1].position


def positions(messages: Sequence[Message]) -> list[int]:
    return [m.position for m in messages]


async def test_the_pending_index_compacts_and_the_backlog_stays_exact() -> None:
    store = MemoryStore(MemoryFeed())
    sent = await fill(store, 200)
    inbox = store._inboxes[BOB]
    assert inbox.pending == list(range(1, 201))

    await move(store, sent, MessageState.SENT)  # still pending: nothing leaves the index
    assert len(inbox.pending) == 200
    assert inbox.gone == 0

    await move(store, sent[:150], MessageState.DELIVERED)
    # Entries of delivered messages are dropped once they are half the index, so it
    # holds the 50 pending ones and at most 64 stale entries, not 200.
    assert len(inbox.pending) <= 50 + 64
    assert inbox.pending == sorted(inbox.pending)
    assert set(range(151, 201)) <= set(inbox.pending)
    gone = inbox.gone
    await move(store, sent[:150], MessageState.READ)  # delivered to read: not counted again
    assert inbox.gone == gone
    for limit in (1, 7, 50, 500):
        assert positions(await everything(store, BOB, None, limit)) == list(range(151, 201))

    await move(store, sent[150:], MessageState.READ)
    assert len(inbox.pending) <= 64
    assert await store.backlog(BOB, None, None, 10) == []

    resent = await store.send(ALICE, "c0", [Draft(f"m{n}", BOB, "x") for n in (1, 2, 3)])
    assert [(o.state, o.stored) for o in resent] == [(MessageState.READ, None)] * 3
    later = await store.send(ALICE, "c0", [Draft(f"n{n}", BOB, "x") for n in range(1, 4)])
    assert positions(await everything(store, BOB, None, 2)) == [201, 202, 203]
    assert [o.stored.position for o in later if o.stored] == [201, 202, 203]


async def test_the_index_keeps_order_when_messages_leave_it_out_of_order() -> None:
    store = MemoryStore(MemoryFeed())
    sent = await fill(store, 300)
    inbox = store._inboxes[BOB]
    # Every message but each fifth is delivered, last first.
    leaving = [m for m in reversed(sent) if m.position % 5]
    await move(store, leaving, MessageState.DELIVERED)
    pending = list(range(5, 301, 5))
    assert len(inbox.pending) <= len(pending) + 64
    assert inbox.pending == sorted(inbox.pending)
    for limit in (1, 3, 60, 61):
        backlog = await everything(store, BOB, None, limit)
        assert positions(backlog) == pending
        assert all(m.state in PENDING for m in backlog)


async def test_backlog_since_mixes_pending_before_it_with_everything_after_it() -> None:
    store = MemoryStore(MemoryFeed())
    sent = await fill(store, 12)
    # Up to and including position 6, only 3 and 6 are still pending; after it, some
    # messages are delivered or read too, and ``since`` returns them all the same.
    await move(store, [sent[i - 1] for i in (1, 2, 4, 5, 8)], MessageState.DELIVERED)
    await move(store, [sent[i - 1] for i in (7, 11)], MessageState.READ)
    since = Position(6)
    expected = [3, 6, 7, 8, 9, 10, 11, 12]
    for limit in range(1, 10):
        backlog = await everything(store, BOB, since, limit)
        assert positions(backlog) == expected, limit
    first = await store.backlog(BOB, since, None, 3)
    assert positions(first) == [3, 6, 7]  # a page that spans ``since``
    assert [m.state for m in first] == [
        MessageState.STORED,
        MessageState.STORED,
        MessageState.READ,
    ]
    assert positions(await store.backlog(BOB, since, Position(3), 2)) == [6, 7]
    assert positions(await store.backlog(BOB, since, Position(9), 10)) == [10, 11, 12]
    # A ``since`` before the first message is everything; one past the last, only pending.
    assert positions(await everything(store, BOB, Position(0), 4)) == list(range(1, 13))
    assert positions(await everything(store, BOB, Position(12), 4)) == [3, 6, 9, 10, 12]
    assert positions(await everything(store, BOB, Position(99), 4)) == [3, 6, 9, 10, 12]
    assert await store.backlog(CAROL, since, None, 5) == []


async def test_backlog_since_after_compaction() -> None:
    store = MemoryStore(MemoryFeed())
    sent = await fill(store, 200)
    inbox = store._inboxes[BOB]
    await move(store, [m for m in sent if m.position not in (10, 150)], MessageState.DELIVERED)
    assert len(inbox.pending) <= 2 + 64
    since = Position(190)
    expected = [10, 150, *range(191, 201)]
    for limit in (1, 2, 5, 12, 13):
        assert positions(await everything(store, BOB, since, limit)) == expected


# ------------------------------------------------------------------ retention


class Clock:
    """A clock moved by hand."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 2, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_no_retention_no_purge() -> None:
    store = MemoryStore(MemoryFeed())
    await store.start()
    assert store._purging is None
    sent = await store.send(ALICE, "c", [Draft("m1", BOB, "x")])
    await store.record([Transition(ALICE, BOB, "m1", MessageState.READ)])
    assert store.purge() == 0
    assert [o.id for o in sent] == [m.id for m in await store.find_inbox(BOB, ["m1"])]
    await store.close()


async def test_a_purge_pass_costs_what_it_removes() -> None:
    clock = Clock()
    store = MemoryStore(MemoryFeed(), 60.0, clock)
    outcomes = await store.send(ALICE, "c", [Draft(f"m{i}", BOB, "x") for i in range(300)])
    owed = {f"m{i}" for i in range(0, 300, 30)}
    await store.record(
        [Transition(ALICE, BOB, o.id, MessageState.DELIVERED) for o in outcomes if o.id not in owed]
    )
    # Only finished messages wait to expire: the owed ones are never looked at.
    assert len(store._finished) == 300 - len(owed)
    clock.now += timedelta(seconds=59)
    assert store.purge() == 0
    clock.now += timedelta(seconds=1)
    assert store.purge() == 300 - len(owed)
    assert store._finished == []
    inbox = store._inboxes[BOB]
    # The ordered positions were compacted as messages left: reading from a
    # position on does not walk the holes.
    assert len(inbox.order) <= len(owed) + 64
    assert {m.id for m in await store.backlog(BOB, Position(0), None, 1000)} == owed
    assert store._moves[ALICE].keys() == {(BOB, mid) for mid in owed}


async def test_the_purge_runs_from_start_until_close() -> None:
    clock = Clock()
    engine = memory_engine(retention=0.01, clock=clock)
    store = engine.store
    assert isinstance(store, MemoryStore)
    await store.start()
    task = store._purging
    assert task is not None
    try:
        await store.send(ALICE, "c", [Draft("m1", BOB, "x")])
        await store.record([Transition(ALICE, BOB, "m1", MessageState.DELIVERED)])
        clock.now += timedelta(seconds=1)
        # No purge() here: the store's own task lets the message go.
        await until(lambda: not store._inboxes[BOB].messages)
    finally:
        await store.close()
    assert task.done()
    assert store._purging is None
