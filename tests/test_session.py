"""Sessions: the bounded queue, the writer, the backlog joined to the live stream."""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings

import orjson
import pytest

from tests.fakes import (
    ALICE,
    BOB,
    FakeSubscriber,
    FakeTransport,
    GoneTransport,
    World,
    message,
    spin,
    until,
)
from tidings.errors import CloseCode
from tidings.models import Message, Resync, User
from tidings.protocol import MessageState
from tidings.session import Session

S = MessageState


async def store_messages(world: World, count: int, prefix: str = "m") -> list[Message]:
    """``count`` messages from Alice to Bob, stored, and their changes through the feed
    (so that none of them reaches a session that attaches afterwards as a live message)."""
    await world.store.inner.ensure_user(ALICE)
    bob = await world.store.inner.ensure_user(BOB)
    witness = FakeSubscriber("witness")
    world.hub.attach(BOB, witness)
    stored = []
    for i in range(count):
        outcome = await world.store.inner.send(ALICE, bob, f"{prefix}{i}", f"text {i}", "c0")
        assert outcome.stored is not None
        await world.store.inner.confirm(outcome.stored)
        stored.append(outcome.stored)
    await until(lambda: len(witness.delivered) == count)
    world.hub.detach(BOB, witness)
    return stored


async def identified(
    world: World, email: str = BOB, queue_size: int = 64, backlog_batch: int = 3
) -> tuple[Session, FakeTransport, User]:
    session, transport = world.session(queue_size=queue_size, backlog_batch=backlog_batch)
    user = await world.store.inner.ensure_user(email)
    await session.identify(user, None)
    return session, transport, user


def ids(frames: list[dict[str, object]]) -> list[object]:
    return [f["id"] for f in frames if f["type"] == "message"]


# --- the queue and the writer -----------------------------------------------------------


async def test_pushed_frames_leave_in_order(world: World) -> None:
    session, transport = world.session()
    for n in range(20):
        session.push({"type": "#pong", "ts": n})
    frames = [await transport.recv() for _ in range(20)]
    assert [f["ts"] for f in frames] == list(range(20))
    assert session.conn_id == "c1"
    assert session.log_fields == {"conn": "c1", "email": None}


async def test_notify_is_a_push(world: World) -> None:
    session, transport = world.session()
    session.notify({"type": "state", "id": "m1", "state": "sent"})
    assert await transport.recv() == {"type": "state", "id": "m1", "state": "sent"}


async def test_a_live_stored_message_is_marked_sent_after_it_is_written(world: World) -> None:
    alice, alice_transport, _ = await identified(world, ALICE)
    bob, bob_transport, _ = await identified(world, BOB)
    (stored,) = await store_messages(world, 1)
    frame = await bob_transport.recv()
    assert frame["id"] == stored.id
    assert frame["state"] == "stored"
    # The writer advanced it to ``sent`` and the feed told the sender.
    states = await alice_transport.recv_until(lambda f: f.get("state") == "sent")
    assert [(f["type"], f["id"], f["state"]) for f in states] == [
        ("state", stored.id, "stored"),  # stored by another connection than this one
        ("state", stored.id, "sent"),
    ]
    found = await world.store.inner.find_inbox(BOB, stored.id, ALICE)
    assert found[0].state is S.SENT
    assert bob.user is not None
    assert alice.user is not None


async def test_messages_already_sent_are_not_marked_again(world: World) -> None:
    session, transport = world.session()
    session.deliver(message("m1", state=S.SENT))
    assert (await transport.recv())["id"] == "m1"
    session.push({"type": "#pong"})
    await transport.recv()
    assert "advance" not in world.store.calls


async def test_a_store_failure_while_marking_sent_is_logged_and_the_writer_goes_on(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.store.fail.add("advance")
    session, transport = world.session()
    session.deliver(message("m1", state=S.STORED))
    session.push({"type": "#pong", "ts": 1})
    assert (await transport.recv())["id"] == "m1"
    assert await transport.recv() == {"type": "#pong", "ts": 1}
    assert world.store.calls.count("advance") == 1
    failures = [r for r in caplog.records if r.getMessage() == "mark_sent_failed"]
    assert len(failures) == 1
    assert failures[0].levelno == logging.WARNING
    assert failures[0].__dict__["message_id"] == "m1"
    assert "database error" in failures[0].__dict__["error"]
    assert transport.closes == []


async def test_connection_gone_ends_the_writer_quietly(world: World) -> None:
    transport = GoneTransport()
    session, _ = world.session(transport=transport)
    session.push({"type": "#pong", "ts": 1})
    await until(lambda: transport.attempts == 1)
    session.push({"type": "#pong", "ts": 2})
    await spin()
    assert transport.attempts == 1  # the writer has ended: nothing more is written
    assert transport.closes == []
    assert not session.closed.is_set()


async def test_an_unexpected_writer_exception_closes_with_1011(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    session, transport = world.session()
    transport.fail_with = RuntimeError("boom")
    session.push({"type": "#pong"})
    assert await transport.wait_closed() == (CloseCode.INTERNAL_ERROR, "internal error")
    await asyncio.wait_for(session.closed.wait(), 10)
    assert any(r.getMessage() == "session_task_crashed" for r in caplog.records)


async def test_a_store_failure_while_streaming_closes_with_1013(world: World) -> None:
    world.store.fail.add("backlog")
    session, transport, _ = await identified(world)
    code, reason = await transport.wait_closed()
    assert code == CloseCode.TRY_AGAIN_LATER
    assert "reconnect later" in reason
    await asyncio.wait_for(session.closed.wait(), 10)
    assert world.hub.online() == []


async def test_an_unexpected_exception_while_streaming_closes_with_1011(world: World) -> None:
    world.store.fail.add("backlog")
    world.store.errors["backlog"] = KeyError("surprise")
    _, transport, _ = await identified(world)
    assert await transport.wait_closed() == (CloseCode.INTERNAL_ERROR, "internal error")


# --- identification, backlog and live stream -------------------------------------------


async def test_identify_attaches_sets_presence_and_streams_the_backlog(world: World) -> None:
    stored = await store_messages(world, 5)
    session, transport, user = await identified(world, backlog_batch=2)
    frames = [await transport.recv() for _ in range(5)]
    assert ids(frames) == [m.id for m in stored]
    assert frames[0] == stored[0].frame()
    assert world.hub.online() == [BOB]
    found = await world.store.inner.find_user(BOB)
    assert found is not None
    assert found.online is True
    assert session.user == user
    assert session.log_fields == {"conn": "c1", "email": BOB}
    # Three pages of two: the last one is short.
    assert world.store.calls.count("backlog") == 3


async def test_backlog_since(world: World) -> None:
    stored = await store_messages(world, 4)
    for m in stored:
        assert await world.store.inner.advance(m, S.READ)
    session, transport = world.session()
    user = await world.store.inner.ensure_user(BOB)
    await session.identify(user, stored[1].oid)
    frames = [await transport.recv() for _ in range(2)]
    assert ids(frames) == ["m2", "m3"]
    assert [f["state"] for f in frames] == ["read", "read"]


async def test_no_backlog_is_logged(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tidings")
    await identified(world)
    await until(lambda: any(r.getMessage() == "no_messages_found" for r in caplog.records))
    record = next(r for r in caplog.records if r.getMessage() == "no_messages_found")
    assert record.__dict__["count"] == 0
    assert record.__dict__["email"] == BOB


async def test_live_messages_during_the_backlog_are_joined_without_gap_or_duplicate(
    world: World,
) -> None:
    stored = await store_messages(world, 5, prefix="old")
    spy = FakeSubscriber("spy")
    world.hub.attach(BOB, spy)
    bob = await world.store.inner.ensure_user(BOB)
    live: list[Message] = []

    async def while_reading_page_two() -> None:
        if world.store.calls.count("backlog") != 2:
            return
        # Stored now: it is in this page read *and* reaches the session live.
        new = await world.store.inner.send(ALICE, bob, "new1", "live", "c0")
        assert new.stored is not None
        live.append(new.stored)
        await until(lambda: any(m.id == "new1" for m in spy.delivered))
        # Delivered live, but already in the first page: must not be sent twice.
        world.sessions[0].deliver(stored[0])
        # Only live, never stored where the backlog can see it.
        ghost = message("ghost", sender=ALICE, recipient=BOB, state=S.SENT)
        world.sessions[0].deliver(ghost)
        live.append(ghost)

    world.store.before["backlog"] = while_reading_page_two
    _, transport, _ = await identified(world, backlog_batch=3)
    frames = await transport.recv_until(lambda f: f.get("id") == "ghost")
    assert ids(frames) == ["old0", "old1", "old2", "old3", "old4", "new1", "ghost"]
    session = world.sessions[0]
    session.push({"type": "#pong", "ts": "end"})
    rest = await transport.recv_until(lambda f: f.get("ts") == "end")
    assert ids(rest) == []
    assert live[0].id == "new1"


async def test_a_message_stored_while_identifying_arrives_once(world: World) -> None:
    stored = await store_messages(world, 2, prefix="old")
    spy = FakeSubscriber("spy")
    world.hub.attach(BOB, spy)
    bob = await world.store.inner.ensure_user(BOB)

    async def store_one_more() -> None:
        if world.store.calls.count("backlog") == 1:
            await world.store.inner.send(ALICE, bob, "during", "x", "c0")
            await until(lambda: any(m.id == "during" for m in spy.delivered))

    world.store.before["backlog"] = store_one_more
    _, transport, _ = await identified(world, backlog_batch=10)
    frames = await transport.recv_until(lambda f: f.get("id") == "during")
    transport_ids = ids(frames)
    assert transport_ids == [stored[0].id, stored[1].id, "during"]
    world.sessions[0].push({"type": "#pong", "ts": "end"})
    assert ids(await transport.recv_until(lambda f: f.get("ts") == "end")) == []


async def test_a_message_arriving_while_presence_is_recorded_keeps_its_order(
    world: World,
) -> None:
    await store_messages(world, 1, prefix="old")
    spy = FakeSubscriber("spy")
    world.hub.attach(BOB, spy)
    bob = await world.store.inner.ensure_user(BOB)

    async def store_during_presence() -> None:
        await world.store.inner.send(ALICE, bob, "new", "x", "c0")
        await until(lambda: any(m.id == "new" for m in spy.delivered))

    world.store.before["set_presence"] = store_during_presence
    session, transport, _ = await identified(world)
    await until(lambda: "backlog" in world.store.calls)
    await spin()  # the join is done
    session.push({"type": "#pong", "ts": "end"})
    frames = await transport.recv_until(lambda f: f.get("ts") == "end")
    assert ids(frames) == ["old0", "new"]


async def test_resync_reads_the_backlog_again(world: World) -> None:
    stored = await store_messages(world, 2)
    session, transport, _ = await identified(world)
    first = [await transport.recv() for _ in range(2)]
    assert ids(first) == ["m0", "m1"]
    reads = world.store.calls.count("backlog")
    session.resync()
    again = [await transport.recv() for _ in range(2)]
    # Still undelivered, so sent again; now marked ``sent``.
    assert ids(again) == [m.id for m in stored]
    assert world.store.calls.count("backlog") == reads + 1
    assert {f["state"] for f in again} <= {"stored", "sent"}


async def test_resync_before_identification_or_after_close_does_nothing(world: World) -> None:
    await store_messages(world, 1)
    session, transport = world.session()
    session.resync()
    await spin()
    assert "backlog" not in world.store.calls
    user = await world.store.inner.ensure_user(BOB)
    await session.identify(user, None)
    assert (await transport.recv())["id"] == "m0"
    await session.close(CloseCode.NORMAL, "bye")
    reads = world.store.calls.count("backlog")
    session.resync()
    await spin()
    assert world.store.calls.count("backlog") == reads


async def test_a_hub_resync_restarts_a_running_backlog_read(world: World) -> None:
    await store_messages(world, 3)
    gate = asyncio.Event()

    async def first_read_waits() -> None:
        if world.store.calls.count("backlog") == 1:
            await gate.wait()

    world.store.before["backlog"] = first_read_waits
    _, transport, _ = await identified(world, backlog_batch=10)
    await until(lambda: world.store.calls.count("backlog") == 1)
    world.hub.dispatch(Resync("test"))
    frames = [await transport.recv() for _ in range(3)]
    assert ids(frames) == ["m0", "m1", "m2"]
    gate.set()  # the first read was cancelled; releasing it sends nothing more
    world.sessions[0].push({"type": "#pong", "ts": "end"})
    assert ids(await transport.recv_until(lambda f: f.get("ts") == "end")) == []


# --- overload ---------------------------------------------------------------------------


async def test_overflow_closes_with_1008_slow_consumer(world: World) -> None:
    session, transport, _ = await identified(world, queue_size=2)
    transport.flowing.clear()  # the client stops reading
    for n in range(10):
        session.push({"type": "#pong", "ts": n})
    code, reason = await transport.wait_closed()
    assert code == CloseCode.POLICY_VIOLATION
    assert "slow consumer" in reason
    await asyncio.wait_for(session.closed.wait(), 10)
    assert world.hub.online() == []


async def test_overflow_stops_queueing_and_logs_slow_consumer(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    session, transport = world.session(queue_size=2)
    transport.flowing.clear()
    for n in range(10):
        session.push({"type": "#pong", "ts": n})
    assert any(r.getMessage() == "slow_consumer" for r in caplog.records)
    transport.flowing.set()
    session.push({"type": "#pong", "ts": "after"})
    await spin()
    # At most the frame in the writer's hands and the two queued ones; the rest were refused.
    sent = [f["ts"] for f in transport.frames()]
    assert sent == [0, 1, 2][: len(sent)]


async def test_pending_overflow_during_join_closes_with_1008(world: World) -> None:
    await store_messages(world, 1)
    gate = asyncio.Event()

    async def backlog_waits() -> None:
        await gate.wait()

    world.store.before["backlog"] = backlog_waits
    session, transport, _ = await identified(world, queue_size=1)
    await until(lambda: "backlog" in world.store.calls)
    for n in range(5):  # the pending limit is four times the queue size
        session.deliver(message(f"live{n}"))
    code, reason = await transport.wait_closed()
    assert code == CloseCode.POLICY_VIOLATION
    assert "slow consumer" in reason


async def test_pending_overflow_during_join_is_detected(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    gate = asyncio.Event()

    async def backlog_waits() -> None:
        await gate.wait()

    world.store.before["backlog"] = backlog_waits
    session, transport, _ = await identified(world, queue_size=1)
    await until(lambda: "backlog" in world.store.calls)
    for n in range(4):
        session.deliver(message(f"live{n}"))
    assert not any(r.getMessage() == "slow_consumer" for r in caplog.records)
    session.deliver(message("live4"))
    assert any(r.getMessage() == "slow_consumer" for r in caplog.records)
    gate.set()
    await spin()
    assert ids(transport.frames()) == []  # a closing session queues nothing more


async def test_the_backlog_waits_for_room_instead_of_overflowing(world: World) -> None:
    await store_messages(world, 6)
    session, transport, _ = await identified(world, queue_size=1, backlog_batch=2)
    frames = [await transport.recv() for _ in range(6)]
    assert ids(frames) == [f"m{i}" for i in range(6)]
    assert transport.closes == []
    assert session.user is not None


# --- stop and close ---------------------------------------------------------------------


async def test_stop_cancels_tasks_detaches_and_is_idempotent(world: World) -> None:
    session, transport, _ = await identified(world)
    transport.flowing.clear()
    session.push({"type": "#pong", "ts": 1})
    await until(lambda: transport.attempts == 1)  # the writer is blocked in a send
    await asyncio.wait_for(session.stop(), 10)
    assert session.closed.is_set()
    assert world.hub.online() == []
    user = await world.store.inner.find_user(BOB)
    assert user is not None
    assert user.online is False
    await asyncio.wait_for(session.stop(), 10)
    assert session.closed.is_set()
    transport.flowing.set()
    session.push({"type": "#pong", "ts": 2})
    await spin()
    assert transport.sent == []  # the cancelled writer sent nothing, and nobody drains now
    assert transport.closes == []  # stop() alone never closes the socket


async def test_stop_of_one_session_keeps_the_user_online_with_another(world: World) -> None:
    one, _, _ = await identified(world)
    await identified(world)
    await spin()
    await one.stop()
    assert world.hub.online() == [BOB]
    user = await world.store.inner.find_user(BOB)
    assert user is not None
    assert user.online is True


async def test_stop_survives_a_store_failure_while_going_offline(world: World) -> None:
    session, _, _ = await identified(world)
    await spin()
    world.store.fail.add("set_presence")
    await asyncio.wait_for(session.stop(), 10)
    assert session.closed.is_set()
    assert world.hub.online() == []


async def test_close_sends_the_close_once_then_stops(world: World) -> None:
    session, transport, _ = await identified(world)
    await spin()
    await session.close(CloseCode.TRY_AGAIN_LATER, "server restart")
    await session.close(CloseCode.NORMAL, "again")
    assert transport.closes == [(CloseCode.TRY_AGAIN_LATER, "server restart")]
    assert session.closed.is_set()
    assert world.hub.online() == []
    session.deliver(message("late"))
    session.push({"type": "#pong"})
    await spin()
    assert ids(transport.frames()) == []


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
    finishing = asyncio.create_task(session.finish(1012, "server restarting; reconnect", 10.0))
    await spin()
    assert transport.closes == []
    transport.flowing.set()
    await asyncio.wait_for(finishing, 10)
    assert [orjson.loads(text)["ts"] for text in transport.sent] == [0, 1, 2]
    assert transport.closes == [(1012, "server restarting; reconnect")]


async def test_finish_closes_anyway_when_the_queue_does_not_drain_in_time(world: World) -> None:
    session, transport = world.session()
    transport.flowing.clear()  # a client that never reads
    session.push({"type": "#pong", "ts": 0})
    await asyncio.wait_for(session.finish(1012, "server restarting; reconnect", 0.05), 10)
    assert transport.closes == [(1012, "server restarting; reconnect")]
