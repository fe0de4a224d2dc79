"""Handlers: what each client frame does, on the memory engine, with sessions on fake transports.

Frames go through ``parse_frame`` as the endpoint's do; messages and
acknowledgements are handled in batches, as the endpoint hands them over.
The principal is the real ``tidings.auth.Principal``: ``email=None`` may
identify as anyone, as in dev mode.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson
import pytest

from tests.fakes import ALICE, BOB, CAROL, FakeTransport, World, spin
from tidings.auth import Principal
from tidings.client_frames import (
    AckFrame,
    ClientFrame,
    EmailFrame,
    PingFrame,
    SendFrame,
    UserFrame,
    parse_frame,
)
from tidings.errors import ErrorCode, FrameRefused, StoreUnavailable
from tidings.handlers import Handlers, KnownUsers
from tidings.models import Draft, Transition
from tidings.server_frames import user_record
from tidings.session import Session
from tidings.states import MessageState

S = MessageState
ANYONE = Principal(email=None)
LIMIT = 50
Frame = dict[str, Any]


@pytest.fixture
def handlers(world: World) -> Handlers:
    return Handlers(world.store, world.presence, world.recorder, max_content_chars=LIMIT)


def parse(raw: Frame) -> ClientFrame:
    return parse_frame(orjson.dumps(raw).decode())


async def handle(
    handlers: Handlers, session: Session, raw: Frame, principal: Principal = ANYONE
) -> None:
    frame = parse(raw)
    assert isinstance(frame, EmailFrame | PingFrame | UserFrame)
    await handlers.handle(session, principal, frame)


async def refused(
    handlers: Handlers, session: Session, raw: Frame, principal: Principal = ANYONE
) -> FrameRefused:
    with pytest.raises(FrameRefused) as info:
        await handle(handlers, session, raw, principal)
    return info.value


def draft(handlers: Handlers, session: Session, raw: Frame) -> Draft:
    frame = parse({"type": "message", "content": "hi", **raw})
    assert isinstance(frame, SendFrame)
    return handlers.draft(session, frame)


async def send(handlers: Handlers, session: Session, *raws: Frame) -> list[Draft]:
    """Draft each ``message`` frame, then send them as one batch; the drafts."""
    drafts = [draft(handlers, session, raw) for raw in raws]
    await handlers.send(session, drafts)
    return drafts


async def acknowledge(handlers: Handlers, session: Session, *raws: Frame) -> list[FrameRefused]:
    frames = [frame for frame in map(parse, raws) if isinstance(frame, AckFrame)]
    assert len(frames) == len(raws)
    return await handlers.acknowledge(session, frames)


async def connect(
    world: World, handlers: Handlers, email: str | None
) -> tuple[Session, FakeTransport]:
    """A session, identified as ``email`` unless it is ``None``; its ``#email`` reply read."""
    session, transport = world.session()
    if email is not None:
        await handle(handlers, session, {"type": "#email", "email": email})
        assert (await transport.recv())["type"] == "#email"
    return session, transport


async def states_of(transport: FakeTransport, mid: str, until: str) -> list[Frame]:
    """The state frames for ``mid`` up to the one in state ``until``; other frames skipped."""
    frames = await transport.recv_until(
        lambda f: f["type"] == "state" and f["id"] == mid and f["state"] == until
    )
    return [f for f in frames if f["type"] == "state" and f["id"] == mid]


async def state_frames(transport: FakeTransport, count: int) -> list[Frame]:
    """The next ``count`` state frames; other frames (messages to oneself) skipped."""
    frames: list[Frame] = []
    while len(frames) < count:
        frame = await transport.recv()
        if frame["type"] == "state":
            frames.append(frame)
    return frames


async def inbox(world: World, owner: str, *mids: str) -> dict[tuple[str, str], MessageState]:
    """``owner``'s messages with these ids, by (sender, id)."""
    return {(m.sender, m.id): m.state for m in await world.store.inner.find_inbox(owner, mids)}


# --- #ping ------------------------------------------------------------------------------


async def test_ping_is_answered_with_pong_even_before_identification(
    world: World, handlers: Handlers
) -> None:
    session, transport = await connect(world, handlers, None)
    await handle(handlers, session, {"type": "#ping", "ts": {"seq": 7}})
    await handle(handlers, session, {"type": "#ping"})
    assert await transport.recv() == {"type": "#pong", "ts": {"seq": 7}}
    assert await transport.recv() == {"type": "#pong", "ts": None}


# --- #email -----------------------------------------------------------------------------


async def test_email_identifies_and_replies_with_the_user(world: World, handlers: Handlers) -> None:
    session, transport = world.session()
    await handle(
        handlers, session, {"type": "#email", "email": " Bob@Example.com"}, Principal(email=BOB)
    )
    reply = await transport.recv()
    user = await world.store.inner.find_user(BOB)
    assert user is not None
    assert reply == {"type": "#email", "email": BOB, "user": user_record(user, online=True)}
    assert session.user == user
    assert world.hub.online() == [BOB]
    assert await world.presence.is_online(BOB)


async def test_email_streams_the_backlog_after_the_reply(world: World, handlers: Handlers) -> None:
    await world.store.inner.ensure_user(BOB)
    await world.send(ALICE, BOB, "m1")
    session, transport = world.session()
    await handle(handlers, session, {"type": "#email", "email": BOB})
    assert (await transport.recv())["type"] == "#email"
    message = await transport.recv()
    assert (message["type"], message["id"], message["from"]) == ("message", "m1", ALICE)


async def test_email_forbidden_when_the_principal_may_not(world: World, handlers: Handlers) -> None:
    session, transport = world.session()
    only_alice = Principal(email=ALICE)
    error = await refused(handlers, session, {"type": "#email", "email": BOB}, only_alice)
    assert error.code is ErrorCode.FORBIDDEN
    assert error.ref == "#email"
    assert session.user is None
    assert world.hub.online() == []
    assert "ensure_user" not in world.store.calls  # no record for a refused e-mail
    assert await world.store.inner.find_user(BOB) is None
    await handle(handlers, session, {"type": "#email", "email": ALICE}, only_alice)
    assert (await transport.recv())["email"] == ALICE


async def test_email_twice_is_invalid(world: World, handlers: Handlers) -> None:
    session, _ = await connect(world, handlers, ALICE)
    error = await refused(handlers, session, {"type": "#email", "email": BOB})
    assert error.code is ErrorCode.INVALID
    assert ALICE in error.message
    assert error.ref == "#email"
    assert session.user is not None
    assert session.user.email == ALICE
    error = await refused(handlers, session, {"type": "#email", "email": ALICE})
    assert error.code is ErrorCode.INVALID
    assert world.hub.online() == [ALICE]


async def test_email_since_an_unknown_id_is_not_found(world: World, handlers: Handlers) -> None:
    await world.store.inner.ensure_user(CAROL)
    await world.send(ALICE, CAROL, "theirs")  # somebody else's message is not yours
    session, _ = world.session()
    for since in ("nope", "theirs"):
        error = await refused(handlers, session, {"type": "#email", "email": BOB, "since": since})
        assert error.code is ErrorCode.NOT_FOUND
        assert error.ref == since
    assert session.user is None
    assert world.hub.online() == []


async def test_email_since_streams_every_message_after_it(world: World, handlers: Handlers) -> None:
    await world.store.inner.ensure_user(BOB)
    for mid in ("m1", "m2", "m3"):
        await world.send(ALICE, BOB, mid)
    found = await world.store.inner.find_inbox(BOB, ["m1", "m2", "m3"])
    await world.store.inner.record([Transition.of(m, S.READ) for m in found])
    session, transport = world.session()
    await handle(handlers, session, {"type": "#email", "email": BOB, "since": "m1"})
    assert (await transport.recv())["type"] == "#email"
    frames = [await transport.recv() for _ in range(2)]
    assert [(f["id"], f["state"]) for f in frames] == [("m2", "read"), ("m3", "read")]


# --- #user ------------------------------------------------------------------------------


async def test_user_lookup_says_who_is_online(world: World, handlers: Handlers) -> None:
    session, transport = await connect(world, handlers, ALICE)
    await connect(world, handlers, BOB)
    await world.store.inner.ensure_user(CAROL)
    await handle(handlers, session, {"type": "#user", "email": "BOB@example.com"})
    reply = await transport.recv()
    assert reply["type"] == "#user"
    assert reply["user"]["email"] == BOB
    assert reply["user"]["online"] is True
    assert re.fullmatch(r"m_[0-9a-f]{64}", reply["user"]["collection"])
    await handle(handlers, session, {"type": "#user", "email": CAROL})
    reply = await transport.recv()
    assert (reply["user"]["email"], reply["user"]["online"]) == (CAROL, False)


async def test_user_lookup_of_an_unknown_user_is_not_found(
    world: World, handlers: Handlers
) -> None:
    session, _ = await connect(world, handlers, ALICE)
    error = await refused(handlers, session, {"type": "#user", "email": CAROL})
    assert error.code is ErrorCode.NOT_FOUND
    assert CAROL in error.message
    assert error.ref == "#user"


async def test_user_lookup_needs_identification(world: World, handlers: Handlers) -> None:
    session, _ = world.session()
    error = await refused(handlers, session, {"type": "#user", "email": ALICE})
    assert error.code is ErrorCode.NOT_IDENTIFIED
    assert error.ref == "#user"
    assert "find_user" not in world.store.calls


# --- drafts -----------------------------------------------------------------------------


async def test_a_draft_is_answered_received(world: World, handlers: Handlers) -> None:
    alice, transport = await connect(world, handlers, ALICE)
    result = draft(handlers, alice, {"to": BOB, "content": "hello", "id": "m1"})
    assert result == Draft("m1", BOB, "hello")
    frame = await transport.recv()
    assert (frame["type"], frame["id"], frame["state"]) == ("state", "m1", "received")
    assert "send" not in world.store.calls  # nothing is stored by a draft


async def test_a_draft_without_id_gets_a_server_assigned_one(
    world: World, handlers: Handlers
) -> None:
    alice, transport = await connect(world, handlers, ALICE)
    first = draft(handlers, alice, {"to": BOB})
    second = draft(handlers, alice, {"to": BOB})
    for assigned in (first, second):
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", assigned.id)
        assert (await transport.recv())["id"] == assigned.id
    assert first.id != second.id


async def test_too_large_content_is_refused(world: World, handlers: Handlers) -> None:
    alice, transport = await connect(world, handlers, ALICE)
    with pytest.raises(FrameRefused) as info:
        draft(handlers, alice, {"to": BOB, "content": "x" * (LIMIT + 1), "id": "big"})
    assert info.value.code is ErrorCode.TOO_LARGE
    assert info.value.ref == "big"
    assert str(LIMIT) in info.value.message
    draft(handlers, alice, {"to": BOB, "content": "x" * LIMIT, "id": "fits"})
    assert (await transport.recv())["id"] == "fits"  # nothing was pushed for "big"


async def test_a_draft_needs_identification(world: World, handlers: Handlers) -> None:
    session, transport = world.session()
    for raw, ref in (({"to": BOB}, "message"), ({"to": BOB, "id": "m1"}, "m1")):
        with pytest.raises(FrameRefused) as info:
            draft(handlers, session, raw)
        assert info.value.code is ErrorCode.NOT_IDENTIFIED
        assert info.value.ref == ref
    await spin()
    assert transport.sent == []


# --- send -------------------------------------------------------------------------------


async def test_a_batch_is_answered_in_order_and_stored_in_one_call(
    world: World, handlers: Handlers
) -> None:
    alice, transport = await connect(world, handlers, ALICE)
    await world.store.inner.ensure_user(BOB)
    await send(
        handlers,
        alice,
        {"to": BOB, "id": "d1"},
        {"to": CAROL, "id": "d2"},  # nobody by that name
        {"to": BOB, "id": "d3"},
        {"to": ALICE, "id": "d4"},  # to oneself
    )
    frames = await state_frames(transport, 8)
    assert [(f["id"], f["state"]) for f in frames] == [
        ("d1", "received"),
        ("d2", "received"),
        ("d3", "received"),
        ("d4", "received"),
        ("d1", "stored"),
        ("d2", "failed"),
        ("d3", "stored"),
        ("d4", "stored"),
    ]
    assert frames[5]["code"] == "not_found"
    assert frames[5]["reason"] == f"no user {CAROL}"
    assert world.store.calls.count("send") == 1
    assert await inbox(world, BOB, "d1", "d2", "d3") == {
        (ALICE, "d1"): S.STORED,
        (ALICE, "d3"): S.STORED,
    }
    assert await inbox(world, CAROL, "d2") == {}


async def test_a_batch_to_unknown_users_only_does_not_touch_the_store(
    world: World, handlers: Handlers
) -> None:
    alice, transport = await connect(world, handlers, ALICE)
    await send(handlers, alice, {"to": CAROL, "id": "d1"}, {"to": BOB, "id": "d2"})
    frames = [await transport.recv() for _ in range(4)]
    assert [(f["id"], f["state"], f.get("code")) for f in frames[2:]] == [
        ("d1", "failed", "not_found"),
        ("d2", "failed", "not_found"),
    ]
    assert "send" not in world.store.calls


async def test_the_stored_state_reaches_the_senders_other_connections(
    world: World, handlers: Handlers
) -> None:
    alice, _ = await connect(world, handlers, ALICE)
    _, other = await connect(world, handlers, ALICE)
    await world.store.inner.ensure_user(BOB)
    await send(handlers, alice, {"to": BOB, "id": "m1"})
    assert [f["state"] for f in await states_of(other, "m1", "stored")] == ["stored"]


async def test_a_message_is_delivered_and_marked_sent(world: World, handlers: Handlers) -> None:
    alice, alice_transport = await connect(world, handlers, ALICE)
    _, bob_transport = await connect(world, handlers, BOB)
    await send(handlers, alice, {"to": BOB, "content": "hello", "id": "m1"})
    assert [f["state"] for f in await states_of(alice_transport, "m1", "sent")] == [
        "received",
        "stored",
        "sent",
    ]
    message = await bob_transport.recv()
    assert message == {
        "type": "message",
        "id": "m1",
        "from": ALICE,
        "to": BOB,
        "content": "hello",
        "sent_at": message["sent_at"],
        "state": "stored",
    }


async def test_sending_an_id_again_answers_its_current_state(
    world: World, handlers: Handlers
) -> None:
    alice, alice_transport = await connect(world, handlers, ALICE)
    bob, bob_transport = await connect(world, handlers, BOB)
    await send(handlers, alice, {"to": BOB, "id": "m1"})
    assert (await bob_transport.recv())["id"] == "m1"
    await acknowledge(handlers, bob, {"type": "ack", "id": "m1"})
    await states_of(alice_transport, "m1", "delivered")
    await send(handlers, alice, {"to": BOB, "content": "other words", "id": "m1"})
    frames = await states_of(alice_transport, "m1", "delivered")
    assert [f["state"] for f in frames] == ["received", "delivered"]
    assert await inbox(world, BOB, "m1") == {(ALICE, "m1"): S.DELIVERED}


async def test_an_id_reused_for_another_recipient_answers_about_the_first_message(
    world: World, handlers: Handlers
) -> None:
    alice, transport = await connect(world, handlers, ALICE)
    await world.store.inner.ensure_user(BOB)
    await world.store.inner.ensure_user(CAROL)
    await send(handlers, alice, {"to": BOB, "id": "r1"})
    await states_of(transport, "r1", "stored")
    await send(handlers, alice, {"to": CAROL, "content": "for carol", "id": "r1"})
    frames = [await transport.recv() for _ in range(2)]
    assert [(f["id"], f["state"]) for f in frames] == [("r1", "received"), ("r1", "stored")]
    assert await inbox(world, CAROL, "r1") == {}  # nothing stored for the new recipient
    assert await inbox(world, BOB, "r1") == {(ALICE, "r1"): S.STORED}


async def test_a_known_recipient_is_not_looked_up_again(world: World, handlers: Handlers) -> None:
    alice, _ = await connect(world, handlers, ALICE)
    await world.store.inner.ensure_user(BOB)
    await send(handlers, alice, {"to": BOB, "id": "m1"}, {"to": BOB, "id": "m2"})
    assert world.store.calls.count("find_user") == 1
    await send(handlers, alice, {"to": BOB, "id": "m3"})
    assert world.store.calls.count("find_user") == 1
    await send(handlers, alice, {"to": ALICE, "id": "m4"})  # oneself: identified, so known
    assert world.store.calls.count("find_user") == 1
    assert len(await inbox(world, BOB, "m1", "m2", "m3")) == 3


async def test_an_unknown_recipient_is_looked_up_every_time(
    world: World, handlers: Handlers
) -> None:
    alice, transport = await connect(world, handlers, ALICE)
    await send(handlers, alice, {"to": CAROL, "id": "m1"})
    assert (await states_of(transport, "m1", "failed"))[-1]["code"] == "not_found"
    await world.store.inner.ensure_user(CAROL)  # Carol identifies somewhere
    await send(handlers, alice, {"to": CAROL, "id": "m2"})
    assert [f["state"] for f in await states_of(transport, "m2", "stored")] == [
        "received",
        "stored",
    ]
    assert world.store.calls.count("find_user") == 2


async def test_store_unavailable_while_sending_propagates(world: World, handlers: Handlers) -> None:
    alice, _ = await connect(world, handlers, ALICE)
    await world.store.inner.ensure_user(BOB)
    world.store.fail.add("send")
    with pytest.raises(StoreUnavailable):
        await send(handlers, alice, {"to": BOB, "id": "m1"})
    world.store.fail = {"find_user"}
    with pytest.raises(StoreUnavailable):
        await send(handlers, alice, {"to": CAROL, "id": "m2"})
    world.store.fail.clear()
    # Sent again with the same id once the store is back, it is stored.
    await send(handlers, alice, {"to": BOB, "id": "m1"})
    assert await inbox(world, BOB, "m1") == {(ALICE, "m1"): S.STORED}


def test_known_users_forget_the_least_recently_used_beyond_capacity() -> None:
    known = KnownUsers(capacity=2)
    assert ALICE not in known
    known.add(ALICE)
    known.add(BOB)
    assert ALICE in known  # used: now Bob is the least recently used
    known.add(CAROL)
    assert ALICE in known
    assert CAROL in known
    assert BOB not in known
    known.add(CAROL)  # again: no duplicate, nothing forgotten
    assert ALICE in known
    assert 42 not in known


# --- ack / read -------------------------------------------------------------------------


async def test_a_batch_of_acks_is_recorded_before_it_returns(
    world: World, handlers: Handlers
) -> None:
    alice, alice_transport = await connect(world, handlers, ALICE)
    bob, _ = await connect(world, handlers, BOB)
    await send(handlers, alice, {"to": BOB, "id": "m1"}, {"to": BOB, "id": "m2"})
    refusals = await acknowledge(
        handlers,
        bob,
        {"type": "ack", "id": "m1"},
        {"type": "read", "id": "m2"},
        {"type": "ack", "id": "nope"},
    )
    assert [(r.code, r.ref) for r in refusals] == [(ErrorCode.NOT_FOUND, "nope")]
    assert "nope" in refusals[0].message
    # Written before acknowledge returned: no waiting here.
    assert await inbox(world, BOB, "m1", "m2") == {
        (ALICE, "m1"): S.DELIVERED,
        (ALICE, "m2"): S.READ,
    }
    # The sender hears of it through the feed (a frame that never comes times out).
    await states_of(alice_transport, "m1", "delivered")
    await states_of(alice_transport, "m2", "read")


async def test_batches_are_logged_one_line_each_at_debug_only(
    world: World, handlers: Handlers, caplog: pytest.LogCaptureFixture
) -> None:
    alice, _ = await connect(world, handlers, ALICE)
    bob, _ = await connect(world, handlers, BOB)
    with caplog.at_level(logging.INFO, logger="tidings.handlers"):
        await send(handlers, alice, {"to": BOB, "id": "quiet"})
    assert [r for r in caplog.records if r.getMessage().startswith("messages_")] == []
    with caplog.at_level(logging.DEBUG, logger="tidings.handlers"):
        await send(handlers, alice, {"to": BOB, "id": "m1"}, {"to": BOB, "id": "m2"})
        await send(handlers, alice, {"to": BOB, "id": "m1"})
        await acknowledge(handlers, bob, {"type": "ack", "id": "m1"}, {"type": "read", "id": "m2"})
    lines = [
        (r.getMessage(), r.__dict__["message_ids"], r.__dict__.get("state"))
        for r in caplog.records
        if r.getMessage().startswith("messages_")
    ]
    assert lines == [
        ("messages_stored", ["m1", "m2"], "stored"),
        ("messages_resent", ["m1"], None),
        ("messages_delivered", ["m1"], "delivered"),
        ("messages_read", ["m2"], "read"),
    ]


async def test_ack_then_read_reach_the_sender_in_order(world: World, handlers: Handlers) -> None:
    alice, alice_transport = await connect(world, handlers, ALICE)
    bob, bob_transport = await connect(world, handlers, BOB)
    await send(handlers, alice, {"to": BOB, "id": "m1"})
    await bob_transport.recv()
    await states_of(alice_transport, "m1", "sent")
    await acknowledge(handlers, bob, {"type": "ack", "id": "m1"})
    assert [f["state"] for f in await states_of(alice_transport, "m1", "delivered")] == [
        "delivered"
    ]
    await acknowledge(handlers, bob, {"type": "read", "id": "m1", "from": ALICE})
    assert [f["state"] for f in await states_of(alice_transport, "m1", "read")] == ["read"]


async def test_a_stale_ack_changes_nothing(world: World, handlers: Handlers) -> None:
    alice, _ = await connect(world, handlers, ALICE)
    bob, _ = await connect(world, handlers, BOB)
    await send(handlers, alice, {"to": BOB, "id": "m1"})
    assert await acknowledge(handlers, bob, {"type": "read", "id": "m1"}) == []
    assert await acknowledge(handlers, bob, {"type": "ack", "id": "m1"}) == []
    assert await inbox(world, BOB, "m1") == {(ALICE, "m1"): S.READ}


async def test_ack_needs_identification(world: World, handlers: Handlers) -> None:
    session, _ = world.session()
    with pytest.raises(FrameRefused) as info:
        await acknowledge(handlers, session, {"type": "ack", "id": "m1"})
    assert info.value.code is ErrorCode.NOT_IDENTIFIED
    assert info.value.ref == "m1"


async def test_nobody_acks_a_message_of_someone_else(world: World, handlers: Handlers) -> None:
    alice, _ = await connect(world, handlers, ALICE)
    carol, _ = await connect(world, handlers, CAROL)
    await world.store.inner.ensure_user(BOB)
    await send(handlers, alice, {"to": BOB, "id": "m1"})
    for session in (alice, carol):  # the sender and a third party
        (refusal,) = await acknowledge(
            handlers, session, {"type": "ack", "id": "m1", "from": ALICE}
        )
        assert refusal.code is ErrorCode.NOT_FOUND
    assert await inbox(world, BOB, "m1") == {(ALICE, "m1"): S.STORED}


async def test_an_id_used_by_two_senders_needs_from(world: World, handlers: Handlers) -> None:
    alice, _ = await connect(world, handlers, ALICE)
    carol, _ = await connect(world, handlers, CAROL)
    bob, _ = await connect(world, handlers, BOB)
    for sender in (alice, carol):
        await send(handlers, sender, {"to": BOB, "id": "m1"})
    (refusal,) = await acknowledge(handlers, bob, {"type": "ack", "id": "m1"})
    assert refusal.code is ErrorCode.INVALID
    assert "'from'" in refusal.message
    assert refusal.ref == "m1"
    assert await acknowledge(handlers, bob, {"type": "ack", "id": "m1", "from": CAROL}) == []
    found = await inbox(world, BOB, "m1")
    assert found[(CAROL, "m1")] is S.DELIVERED
    assert found[(ALICE, "m1")] is not S.DELIVERED


async def test_store_unavailable_from_the_recorder_propagates(
    world: World, handlers: Handlers
) -> None:
    alice, _ = await connect(world, handlers, ALICE)
    bob, _ = await connect(world, handlers, BOB)
    await send(handlers, alice, {"to": BOB, "id": "m1"})
    world.store.fail.add("record")
    with pytest.raises(StoreUnavailable):
        await acknowledge(handlers, bob, {"type": "ack", "id": "m1"})
    world.store.fail.clear()
    assert await acknowledge(handlers, bob, {"type": "ack", "id": "m1"}) == []
    assert await inbox(world, BOB, "m1") == {(ALICE, "m1"): S.DELIVERED}


async def test_store_unavailable_while_finding_the_messages_propagates(
    world: World, handlers: Handlers
) -> None:
    bob, _ = await connect(world, handlers, BOB)
    world.store.fail.add("find_inbox")
    with pytest.raises(StoreUnavailable):
        await acknowledge(handlers, bob, {"type": "ack", "id": "m1"})
