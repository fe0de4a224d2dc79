"""Sessions: the backlog joined to the live stream, through the outbox, and their ends.

Everything runs on the memory engine behind a ``FlakyStore`` (``tests.fakes.World``),
with sessions on fake transports. A client that does not read is a transport
whose ``flowing`` is cleared; time bounds (``write_timeout``) are bounds, never
measured.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import pytest

from tests.fakes import (
    ALICE,
    BOB,
    TIMEOUT,
    FakeSubscriber,
    FakeTransport,
    FlakyStore,
    GoneTransport,
    Hook,
    World,
    message,
    spin,
    until,
)
from tests.test_recorder import Gate, Ledger
from tidings.engine import Presence
from tidings.errors import CloseCode, StoreUnavailable
from tidings.models import Draft, Message, Position, Resync, Transition
from tidings.server_frames import message_frame
from tidings.session import Session
from tidings.states import MessageState

S = MessageState
Frame = dict[str, Any]


@pytest.fixture(autouse=True)
def _session_logs(caplog: pytest.LogCaptureFixture) -> None:
    """The session's INFO records ("messages_found"...) say when a join is done."""
    caplog.set_level(logging.INFO, logger="tidings.session")


async def store_for_bob(world: World, count: int, prefix: str = "m") -> list[Message]:
    """``count`` messages from Alice to Bob, stored, their feed events already dispatched
    (so that none of them reaches a session that attaches afterwards as a live message)."""
    witness = FakeSubscriber("witness")
    world.hub.attach(BOB, witness)
    drafts = [Draft(f"{prefix}{i}", BOB, f"text {i}") for i in range(count)]
    outcomes = await world.store.inner.send(ALICE, "c0", drafts)
    await until(lambda: len(witness.delivered) == count)
    world.hub.detach(BOB, witness)
    found = [outcome.stored for outcome in outcomes]
    return [m for m in found if m is not None]


async def identified(
    world: World, email: str = BOB, since: Position | None = None, **options: Any
) -> tuple[Session, FakeTransport]:
    """A started session of ``world`` (``options`` go to ``World.session``), identified."""
    session, transport = world.session(**options)
    user = await world.store.inner.ensure_user(email)
    await session.identify(user, since)
    return session, transport


def joins(caplog: pytest.LogCaptureFixture) -> int:
    """How many backlog reads have been joined to the live stream."""
    done = ("messages_found", "no_messages_found")
    return sum(1 for r in caplog.records if r.getMessage() in done)


def ids(frames: Sequence[Frame]) -> list[str]:
    return [f["id"] for f in frames if f["type"] == "message"]


async def rest(session: Session, transport: FakeTransport, marker: str = "end") -> list[Frame]:
    """Every frame written from now up to a pong pushed now: what was still to come."""
    session.push({"type": "#pong", "ts": marker})
    return await transport.recv_until(lambda f: f.get("ts") == marker)


async def bob_states(world: World, *mids: str) -> dict[str, MessageState]:
    return {m.id: m.state for m in await world.store.inner.find_inbox(BOB, list(mids))}


def own_session(
    world: World,
    presence: Presence | None = None,
    identify_timeout: float = 60.0,
) -> tuple[Session, FakeTransport]:
    """A session built here rather than by the world (for its presence or its clock),
    stopped by the world's teardown all the same."""
    transport = FakeTransport()
    session = Session(
        f"own{len(world.sessions) + 1}",
        transport,
        world.store,
        presence or world.presence,
        world.hub,
        world.recorder,
        queue_size=64,
        backlog_batch=3,
        write_timeout=TIMEOUT,
    )
    session.start(identify_timeout)
    world.sessions.append(session)
    return session, transport


class ReadThenHook(FlakyStore):
    """A ``FlakyStore`` that can run a hook after a backlog page is read, before it is
    returned: a message stored then is not in the page, only in the live stream."""

    def __init__(self, inner: FlakyStore) -> None:
        super().__init__(inner.inner)
        self.after_backlog: dict[int, Hook] = {}  # by the number of the read

    async def backlog(
        self, owner: str, since: Position | None, after: Position | None, limit: int
    ) -> list[Message]:
        page = await super().backlog(owner, since, after, limit)
        hook = self.after_backlog.get(self.calls.count("backlog"))
        if hook is not None:
            await hook()
        return page


class DownPresence:
    """A ``Presence`` whose database does not answer."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, bool]] = []

    async def is_online(self, email: str) -> bool:
        raise StoreUnavailable("presence: database error: down")

    async def set(self, email: str, online: bool) -> None:
        self.attempts.append((email, online))
        raise StoreUnavailable("presence: database error: down")

    async def refresh(self, emails: Sequence[str]) -> None:
        raise StoreUnavailable("presence: database error: down")

    refresh_interval = None


# --- writing through the outbox: frames, and messages marked sent ----------------------


async def test_pushed_frames_leave_in_order_through_the_outbox(world: World) -> None:
    session, transport = world.session()
    for n in range(20):
        session.push({"type": "#pong", "ts": n})
    frames = [await transport.recv() for _ in range(20)]
    assert [f["ts"] for f in frames] == list(range(20))
    await asyncio.wait_for(session.room(), TIMEOUT)  # all taken: room at once
    assert session.conn_id == "c1"
    assert session.log_fields == {"conn": "c1", "email": None}


async def test_a_written_message_is_marked_sent_through_the_recorder(world: World) -> None:
    alice, alice_transport = await identified(world, ALICE)
    _, bob_transport = await identified(world, BOB)
    await world.send(ALICE, BOB, "m1")
    frame = await bob_transport.recv()
    assert (frame["type"], frame["id"], frame["state"]) == ("message", "m1", "stored")
    # Written, so marked ``sent``: the store records it and the feed tells the sender.
    states = await alice_transport.recv_until(lambda f: f.get("state") == "sent")
    assert [(f["type"], f["id"], f["state"]) for f in states] == [
        ("state", "m1", "stored"),  # stored by another connection than this one
        ("state", "m1", "sent"),
    ]
    assert await bob_states(world, "m1") == {"m1": S.SENT}
    assert "record" in world.store.calls
    assert alice.user is not None


async def until_states(world: World, mids: Sequence[str], state: MessageState) -> None:
    """Wait (in event-loop steps) until every one of Bob's ``mids`` is in ``state``."""
    for _ in range(1000):
        if set((await bob_states(world, *mids)).values()) == {state}:
            return
        await spin()
    raise AssertionError(f"{mids} never all reached {state}: {await bob_states(world, *mids)}")


async def test_the_writer_never_waits_for_the_database(world: World) -> None:
    await store_for_bob(world, 3)
    gate = Gate()
    world.store.before["record"] = gate  # the first write of ``sent`` hangs
    session, transport = await identified(world)
    assert ids([await transport.recv() for _ in range(3)]) == ["m0", "m1", "m2"]
    await asyncio.wait_for(gate.held.wait(), TIMEOUT)
    # Frames keep coming while the database does not answer: replies and live messages.
    assert [f["ts"] for f in await rest(session, transport)] == ["end"]
    await world.send(ALICE, BOB, "live")
    assert (await transport.recv())["id"] == "live"
    assert world.store.calls.count("record") == 1
    assert set((await bob_states(world, "m0", "m1", "m2", "live")).values()) == {S.STORED}
    gate.open()
    await until_states(world, ["m0", "m1", "m2", "live"], S.SENT)


async def test_only_messages_written_as_stored_are_marked_sent(world: World) -> None:
    ledger = Ledger(world.store.inner)
    world.store.inner = ledger
    stored = await store_for_bob(world, 3)
    await ledger.record([Transition.of(m, S.READ) for m in stored[:2]])
    ledger.batches.clear()
    # Since m0: m1 (already read) and m2 (stored) come; only m2 moves to ``sent``.
    session, transport = await identified(world, since=stored[0].position)
    frames = [await transport.recv() for _ in range(2)]
    assert [(f["id"], f["state"]) for f in frames] == [("m1", "read"), ("m2", "stored")]
    await until_states(world, ["m2"], S.SENT)
    session.deliver(message("m9", state=S.SENT, position=9))  # live, and sent already
    assert ids(await rest(session, transport)) == ["m9"]
    await spin()
    assert ledger.batches == [[Transition.of(stored[2], S.SENT)]]


async def test_a_failed_record_of_sent_is_logged_and_the_writer_goes_on(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.store.fail.add("record")
    session, transport = await identified(world)
    await until(lambda: joins(caplog) == 1)
    await world.send(ALICE, BOB, "m1")
    assert (await transport.recv())["id"] == "m1"
    await until(lambda: any(r.getMessage() == "record_failed" for r in caplog.records))
    assert [f["ts"] for f in await rest(session, transport)] == ["end"]
    assert transport.closes == []
    assert await bob_states(world, "m1") == {"m1": S.STORED}  # read again next time


async def test_connection_gone_ends_the_writer_quietly(world: World) -> None:
    transport = GoneTransport()
    session, _ = world.session(transport=transport)
    session.push({"type": "#pong", "ts": 1})
    await until(lambda: transport.attempts == 1)
    session.push({"type": "#pong", "ts": 2})
    await spin()
    assert transport.attempts == 1  # the writer has ended: nothing more is written
    assert transport.closes == []  # the endpoint sees the disconnect and stops the session
    assert not session.closed.is_set()


# --- errors in session tasks ------------------------------------------------------------


async def test_store_unavailable_in_a_session_task_closes_with_1013(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.store.fail.add("backlog")
    session, transport = await identified(world)
    code, reason = await transport.wait_closed()
    assert code == CloseCode.TRY_AGAIN_LATER
    assert "reconnect later" in reason
    await asyncio.wait_for(session.closed.wait(), TIMEOUT)
    assert world.hub.online() == []
    (record,) = [r for r in caplog.records if r.getMessage() == "session_task_failed"]
    assert record.levelno == logging.WARNING
    assert "database error" in record.__dict__["error"]


async def test_any_other_exception_in_the_stream_closes_with_1011_and_is_logged(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.store.fail.add("backlog")
    world.store.errors["backlog"] = KeyError("surprise")
    session, transport = await identified(world)
    assert await transport.wait_closed() == (CloseCode.INTERNAL_ERROR, "internal error")
    await asyncio.wait_for(session.closed.wait(), TIMEOUT)
    (record,) = [r for r in caplog.records if r.getMessage() == "session_task_crashed"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None  # with its traceback
    assert isinstance(record.exc_info[1], KeyError)
    assert record.__dict__["email"] == BOB


async def test_an_unexpected_writer_exception_closes_with_1011(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    session, transport = world.session()
    transport.fail_with = RuntimeError("boom")
    session.push({"type": "#pong"})
    assert await transport.wait_closed() == (CloseCode.INTERNAL_ERROR, "internal error")
    await asyncio.wait_for(session.closed.wait(), TIMEOUT)
    (record,) = [r for r in caplog.records if r.getMessage() == "session_task_crashed"]
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


# --- identification, backlog and live stream --------------------------------------------


async def test_identify_attaches_sets_presence_and_streams_the_backlog_in_pages(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    stored = await store_for_bob(world, 5)
    session, transport = await identified(world, backlog_batch=2)
    frames = [await transport.recv() for _ in range(5)]
    assert ids(frames) == [m.id for m in stored]
    assert frames[0] == message_frame(stored[0])
    assert world.hub.online() == [BOB]
    assert await world.presence.is_online(BOB)
    assert session.user is not None
    assert session.log_fields == {"conn": "c1", "email": BOB}
    await until(lambda: joins(caplog) == 1)
    # Pages of two: the third one is short, so it is the last.
    assert world.store.calls.count("backlog") == 3
    assert any(r.getMessage() == "messages_found" for r in caplog.records)


async def test_the_backlog_goes_at_the_pace_the_client_reads(world: World) -> None:
    await store_for_bob(world, 7)
    session, transport = await identified(world, queue_size=1, backlog_batch=2)
    transport.flowing.clear()
    await until(lambda: transport.attempts == 1)
    await spin()
    # The first page is queued as the client takes it, the second waits for room.
    assert world.store.calls.count("backlog") == 2
    transport.flowing.set()
    assert ids([await transport.recv() for _ in range(7)]) == [f"m{i}" for i in range(7)]
    assert ids(await rest(session, transport)) == []
    assert world.store.calls.count("backlog") == 4
    assert transport.closes == []


async def test_no_backlog_is_logged(world: World, caplog: pytest.LogCaptureFixture) -> None:
    await identified(world)
    await until(lambda: joins(caplog) == 1)
    (record,) = [r for r in caplog.records if r.getMessage() == "no_messages_found"]
    assert record.__dict__["email"] == BOB


async def test_backlog_since_adds_every_message_after_it(world: World) -> None:
    stored = await store_for_bob(world, 4)
    await world.store.inner.record([Transition.of(m, S.READ) for m in stored[1:]])
    session, transport = await identified(world, since=stored[1].position)
    frames = [await transport.recv() for _ in range(3)]
    # m0 is still undelivered; m1 is the anchor; m2 and m3 came after it, read or not.
    assert [(f["id"], f["state"]) for f in frames] == [
        ("m0", "stored"),
        ("m2", "read"),
        ("m3", "read"),
    ]
    assert ids(await rest(session, transport)) == []


async def test_backlog_then_live_without_gap_or_duplicate(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    await store_for_bob(world, 5, prefix="old")
    store = ReadThenHook(world.store)
    spy = FakeSubscriber("spy")
    world.hub.attach(BOB, spy)

    async def store_live(mid: str) -> None:
        await world.send(ALICE, BOB, mid)
        await until(lambda: any(m.id == mid for m in spy.delivered))

    async def during_first_read() -> None:
        if store.calls.count("backlog") == 1:
            # Stored before the page is read: in the backlog *and* in the live stream.
            await store_live("during")

    async def after_last_read() -> None:
        # Stored after the last page was read: only in the live stream.
        await store_live("after")

    store.before["backlog"] = during_first_read
    # Six messages in pages of three: the third read is the last (and empty).
    store.after_backlog[3] = after_last_read
    session, transport = await identified(world, store=store, backlog_batch=3)
    await until(lambda: joins(caplog) == 1)
    await store_live("live")
    frames = await transport.recv_until(lambda f: f.get("id") == "live")
    assert ids(frames) == ["old0", "old1", "old2", "old3", "old4", "during", "after", "live"]
    assert ids(await rest(session, transport)) == []


async def test_a_live_message_already_queued_from_the_backlog_is_not_sent_twice(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    stored = await store_for_bob(world, 2)
    session, transport = await identified(world)
    await until(lambda: joins(caplog) == 1)
    session.deliver(stored[0])  # the feed may bring what the backlog had
    session.deliver(stored[1])
    assert ids(await rest(session, transport)) == ["m0", "m1"]


async def test_a_message_stored_while_presence_is_recorded_keeps_its_order(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    await store_for_bob(world, 1, prefix="old")

    class SlowPresence:
        """Presence whose ``set`` lets a message be stored and routed meanwhile."""

        async def is_online(self, email: str) -> bool:
            return True

        async def set(self, email: str, online: bool) -> None:
            if online:
                await world.send(ALICE, BOB, "new")
                await spin()

        async def refresh(self, emails: Sequence[str]) -> None:
            pass

        refresh_interval = None

    session, transport = own_session(world, presence=SlowPresence())
    user = await world.store.inner.ensure_user(BOB)
    await session.identify(user, None)
    frames = await transport.recv_until(lambda f: f.get("id") == "new")
    assert ids(frames) == ["old0", "new"]
    assert ids(await rest(session, transport)) == []


async def test_live_messages_beyond_the_pending_limit_during_a_join_are_read_again(
    world: World,
) -> None:
    gate = Gate()
    world.store.before["backlog"] = gate  # the first read waits
    session, transport = await identified(world, queue_size=1, backlog_batch=3)
    await asyncio.wait_for(gate.held.wait(), TIMEOUT)
    spy = FakeSubscriber("spy")
    world.hub.attach(BOB, spy)
    for n in range(10):  # more than the four times the queue that may wait to be joined
        await world.send(ALICE, BOB, f"live{n}")
    await until(lambda: len(spy.delivered) == 10)
    gate.open()
    frames = await transport.recv_until(lambda f: f.get("id") == "live9")
    assert ids(frames) == [f"live{n}" for n in range(10)]
    await world.send(ALICE, BOB, "later")
    assert ids(await transport.recv_until(lambda f: f.get("id") == "later")) == ["later"]
    assert ids(await rest(session, transport)) == []
    assert transport.closes == []


async def test_after_a_join_that_dropped_live_messages_the_stream_goes_on(
    world: World,
) -> None:
    # The live messages dropped while joining were all in the backlog, and the
    # client had taken every frame before the join ended: nothing is queued, yet
    # the session is behind. A message stored afterwards must still arrive.
    spy = FakeSubscriber("spy")
    world.hub.attach(BOB, spy)
    session, transport = world.session(queue_size=1, backlog_batch=5)

    async def reads() -> None:
        calls = world.store.calls.count("backlog")
        if calls == 1:  # ten messages while the first page is read: beyond what may wait
            for n in range(10):
                await world.send(ALICE, BOB, f"m{n}")
            await until(lambda: len(spy.delivered) == 10)
        elif calls == 3:  # the last (empty) read takes a while: the client reads everything
            await until(lambda: len(ids(transport.frames())) == 10)

    world.store.before["backlog"] = reads
    user = await world.store.inner.ensure_user(BOB)
    await session.identify(user, None)
    frames = await transport.recv_until(lambda f: f.get("id") == "m9")
    assert ids(frames) == [f"m{n}" for n in range(10)]
    await until(lambda: world.store.calls.count("backlog") >= 3)
    await spin()
    await world.send(ALICE, BOB, "after")
    frames = await transport.recv_until(lambda f: f.get("id") == "after")
    assert ids(frames) == ["after"]


async def test_resync_reads_the_backlog_again(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    stored = await store_for_bob(world, 2)
    session, transport = await identified(world)
    assert ids([await transport.recv() for _ in range(2)]) == ["m0", "m1"]
    await until(lambda: joins(caplog) == 1)
    reads = world.store.calls.count("backlog")
    session.resync(None)
    again = [await transport.recv() for _ in range(2)]
    # Still undelivered (not acknowledged), so sent again.
    assert ids(again) == [m.id for m in stored]
    assert world.store.calls.count("backlog") == reads + 1


async def test_a_resync_with_since_tells_the_sender_the_states_it_may_have_missed(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    sent = await store_for_bob(world, 2)
    # Bob reads m1 while no session of Alice's is here to be told (as if the feed
    # had lost the change): the witness sees the event go by.
    witness = FakeSubscriber("witness")
    world.hub.attach(ALICE, witness)
    await world.store.inner.record([Transition.of(sent[1], MessageState.READ)])
    await until(lambda: len(witness.pushed) == 1)
    world.hub.detach(ALICE, witness)
    session, transport = await identified(world, email=ALICE)
    await until(lambda: joins(caplog) == 1)
    session.resync(sent[0].sent_at)
    frames = await transport.recv_until(lambda f: f.get("state") == "read")
    assert [(f["id"], f["state"]) for f in frames if f["type"] == "state"] == [
        ("m0", "stored"),
        ("m1", "read"),
    ]
    assert "states_since" in world.store.calls


async def test_resync_before_identification_or_after_close_does_nothing(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    await store_for_bob(world, 1)
    session, transport = world.session()
    session.resync(None)
    await spin()
    assert "backlog" not in world.store.calls
    user = await world.store.inner.ensure_user(BOB)
    await session.identify(user, None)
    assert (await transport.recv())["id"] == "m0"
    await until(lambda: joins(caplog) == 1)
    await session.close(CloseCode.NORMAL, "bye")
    reads = world.store.calls.count("backlog")
    session.resync(None)
    await spin()
    assert world.store.calls.count("backlog") == reads


async def test_a_hub_resync_restarts_a_running_backlog_read(world: World) -> None:
    await store_for_bob(world, 3)
    gate = Gate()
    world.store.before["backlog"] = gate
    session, transport = await identified(world, backlog_batch=10)
    await asyncio.wait_for(gate.held.wait(), TIMEOUT)
    world.hub.dispatch(Resync("test"))
    frames = [await transport.recv() for _ in range(3)]
    assert ids(frames) == ["m0", "m1", "m2"]
    gate.open()  # the first read was cancelled; releasing it sends nothing more
    assert ids(await rest(session, transport)) == []


# --- a client that reads slowly, or not at all --------------------------------------------


async def test_a_client_that_stops_reading_is_not_cut_while_merely_behind(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    session, transport = await identified(world, queue_size=4, backlog_batch=3)
    await until(lambda: joins(caplog) == 1)
    transport.flowing.clear()  # the client stops reading
    spy = FakeSubscriber("spy")
    world.hub.attach(BOB, spy)
    for n in range(40):  # far beyond the queue, and beyond eight times it
        await world.send(ALICE, BOB, f"m{n:02}")
    await until(lambda: len(spy.delivered) == 40)
    await spin()
    assert transport.closes == []
    assert not session.closed.is_set()
    assert transport.attempts == 1  # one frame in the writer's hands, the rest waits
    reads = world.store.calls.count("backlog")
    transport.flowing.set()  # it reads again; more messages come meanwhile
    for n in range(40, 50):
        await world.send(ALICE, BOB, f"m{n:02}")
    frames = await transport.recv_until(lambda f: f.get("id") == "m49")
    assert ids(frames) == [f"m{n:02}" for n in range(50)]  # each once, in order
    assert ids(await rest(session, transport)) == []
    # What did not fit was dropped from memory and read again from the store.
    assert world.store.calls.count("backlog") > reads
    assert transport.closes == []
    assert not any(r.getMessage() == "slow_consumer" for r in caplog.records)


async def test_a_client_that_takes_no_frame_for_write_timeout_is_cut_with_1008(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    session, transport = await identified(world, write_timeout=0.2)
    transport.flowing.clear()
    session.push({"type": "#pong", "ts": 1})
    code, reason = await transport.wait_closed()
    assert code == CloseCode.POLICY_VIOLATION
    assert reason == "slow consumer: no frame taken for 0.2 seconds"
    await asyncio.wait_for(session.closed.wait(), TIMEOUT)
    assert world.hub.online() == []
    assert not await world.presence.is_online(BOB)
    (record,) = [r for r in caplog.records if r.getMessage() == "slow_consumer"]
    assert record.levelno == logging.WARNING
    assert transport.sent == []


async def test_too_many_replies_waiting_cut_the_client_with_1008(world: World) -> None:
    session, transport = world.session(queue_size=2)
    transport.flowing.clear()
    for n in range(17):
        session.push({"type": "#pong", "ts": n})
    code, reason = await transport.wait_closed()
    assert code == CloseCode.POLICY_VIOLATION
    assert reason == "slow consumer: too many frames waiting to be sent"
    await asyncio.wait_for(session.closed.wait(), TIMEOUT)


# --- presence, close, finish and stop -----------------------------------------------------


class CountingPresence:
    """The world's presence, with every ``set`` it was asked for kept in order."""

    def __init__(self, inner: Presence) -> None:
        self.inner = inner
        self.sets: list[tuple[str, bool]] = []

    async def is_online(self, email: str) -> bool:
        return await self.inner.is_online(email)

    async def set(self, email: str, online: bool) -> None:
        self.sets.append((email, online))
        await self.inner.set(email, online)

    async def refresh(self, emails: Sequence[str]) -> None:
        await self.inner.refresh(emails)

    @property
    def refresh_interval(self) -> float | None:
        return self.inner.refresh_interval


async def test_presence_is_set_on_the_first_attach_and_cleared_on_the_last_detach(
    world: World,
) -> None:
    presence = CountingPresence(world.presence)
    user = await world.store.inner.ensure_user(BOB)
    (one, _), (two, _) = own_session(world, presence), own_session(world, presence)
    await one.identify(user, None)
    assert await world.presence.is_online(BOB)
    await two.identify(user, None)
    await one.stop()
    assert world.hub.online() == [BOB]
    assert await world.presence.is_online(BOB)
    assert presence.sets == [(BOB, True)]
    await two.stop()
    assert world.hub.online() == []
    assert not await world.presence.is_online(BOB)
    assert presence.sets == [(BOB, True), (BOB, False)]


async def test_presence_failures_are_logged_and_change_nothing_else(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    await store_for_bob(world, 1)
    presence = DownPresence()
    session, transport = own_session(world, presence=presence)
    user = await world.store.inner.ensure_user(BOB)
    await session.identify(user, None)
    assert (await transport.recv())["id"] == "m0"
    await asyncio.wait_for(session.stop(), TIMEOUT)
    assert session.closed.is_set()
    assert world.hub.online() == []
    assert presence.attempts == [(BOB, True), (BOB, False)]
    failures = [r for r in caplog.records if r.getMessage() == "presence_failed"]
    assert len(failures) == 2
    assert all(r.levelno == logging.WARNING for r in failures)


async def test_an_idle_session_holds_no_task(world: World) -> None:
    before = asyncio.all_tasks()
    session, transport = await identified(world)
    session.expire(3600)
    session.push({"type": "#pong", "ts": 1})
    assert (await transport.recv_until(lambda f: f["type"] == "#pong"))[-1]["ts"] == 1
    # Idle connections are what a server holds most of: each task would cost memory.
    await until(lambda: asyncio.all_tasks() - before == set())


async def test_stop_ends_every_task_detaches_and_is_idempotent(world: World) -> None:
    before = asyncio.all_tasks()
    gate = Gate()
    world.store.before["backlog"] = gate  # the join is in the middle of a read
    session, transport = await identified(world)
    session.expire(3600)
    transport.flowing.clear()
    session.push({"type": "#pong", "ts": 1})
    await until(lambda: transport.attempts == 1)  # the writer is blocked in a send
    await asyncio.wait_for(gate.held.wait(), TIMEOUT)
    # The writer and the join; the clocks (identification, expiry) are timers, not tasks.
    assert len(asyncio.all_tasks() - before) == 2
    await asyncio.wait_for(session.stop(), TIMEOUT)
    assert session.closed.is_set()
    assert asyncio.all_tasks() - before == set()
    assert world.hub.online() == []
    assert not await world.presence.is_online(BOB)
    await asyncio.wait_for(session.stop(), TIMEOUT)
    transport.flowing.set()
    session.push({"type": "#pong", "ts": 2})
    await spin()
    assert transport.sent == []  # the cancelled writer sent nothing, and nobody writes now
    assert transport.closes == []  # stop() alone never closes the socket


async def test_close_sends_the_close_once_then_stops(world: World) -> None:
    before = asyncio.all_tasks()
    session, transport = await identified(world)
    await session.close(CloseCode.TRY_AGAIN_LATER, "server restart")
    await session.close(CloseCode.NORMAL, "again")
    assert transport.closes == [(CloseCode.TRY_AGAIN_LATER, "server restart")]
    assert session.closed.is_set()
    assert asyncio.all_tasks() - before == set()
    assert world.hub.online() == []
    session.deliver(message("late", position=9))
    session.push({"type": "#pong"})
    await spin()
    assert transport.sent == []


async def test_stopping_before_the_tasks_ran_leaves_no_unawaited_coroutine(world: World) -> None:
    session, _ = world.session()
    user = await world.store.inner.ensure_user(BOB)
    unawaited: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await session.identify(user, None)
        await session.stop()  # neither the writer nor the join has taken a step yet
        world.sessions.clear()
        del session
        await spin()
        # A warning keeps its coroutine, and so the session, alive: collect until none is left.
        for _ in range(3):
            gc.collect()
            unawaited += [str(w.message) for w in caught if "never awaited" in str(w.message)]
            caught.clear()
    assert unawaited == []


async def test_finish_writes_what_is_queued_then_closes(world: World) -> None:
    session, transport = world.session()
    transport.flowing.clear()  # the frames wait in the queue
    for n in range(3):
        session.push({"type": "#pong", "ts": n})
    finishing = asyncio.create_task(session.finish(1012, "server restarting; reconnect", TIMEOUT))
    await spin()
    assert transport.closes == []
    transport.flowing.set()
    await asyncio.wait_for(finishing, TIMEOUT)
    assert [f["ts"] for f in transport.frames()] == [0, 1, 2]
    assert transport.closes == [(1012, "server restarting; reconnect")]
    assert session.closed.is_set()
    await session.finish(1012, "again", TIMEOUT)
    await session.close(CloseCode.NORMAL, "and again")
    assert transport.closes == [(1012, "server restarting; reconnect")]


async def test_finish_closes_anyway_when_the_queue_does_not_drain_in_time(world: World) -> None:
    session, transport = world.session()
    transport.flowing.clear()  # a client that never reads
    session.push({"type": "#pong", "ts": 0})
    await asyncio.wait_for(session.finish(1012, "server restarting; reconnect", 0.05), TIMEOUT)
    assert transport.closes == [(1012, "server restarting; reconnect")]
    assert session.closed.is_set()


# --- the identify clock and the token's expiry --------------------------------------------


async def test_a_connection_that_never_identifies_is_closed_with_1008(world: World) -> None:
    session, transport = own_session(world, identify_timeout=0.01)
    code, reason = await transport.wait_closed()
    assert (code, reason) == (
        CloseCode.POLICY_VIOLATION,
        "identify with #email within 0.01 seconds",
    )
    await asyncio.wait_for(session.closed.wait(), TIMEOUT)


async def test_a_connection_that_identified_in_time_stays_open(world: World) -> None:
    before = asyncio.all_tasks()
    session, transport = own_session(world, identify_timeout=0)
    user = await world.store.inner.ensure_user(BOB)
    await session.identify(user, None)
    # The clock runs out (its task ends) and finds the session identified.
    await until(lambda: len(asyncio.all_tasks() - before) == 1)  # the writer alone
    assert transport.closes == []
    assert not session.closed.is_set()


async def test_the_connection_closes_when_its_token_expires(world: World) -> None:
    session, transport = await identified(world)
    session.expire(0)
    assert await transport.wait_closed() == (
        CloseCode.POLICY_VIOLATION,
        "token expired; reconnect with a new one",
    )
    await asyncio.wait_for(session.closed.wait(), TIMEOUT)
    assert world.hub.online() == []


async def test_an_expiry_in_the_past_closes_at_once(world: World) -> None:
    session, transport = world.session()
    session.expire(-30)
    code, _ = await transport.wait_closed()
    assert code == CloseCode.POLICY_VIOLATION
