"""Handlers: what each client frame does, with a real store and sessions on fake transports."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest

from tests.fakes import ALICE, BOB, CAROL, FakeTransport, Identity, World, spin
from tidings.errors import ClientError, ErrorCode
from tidings.handlers import Handlers
from tidings.protocol import parse_frame
from tidings.session import Session

ANYONE = Identity()
LIMIT = 50


@pytest.fixture
def handlers(world: World) -> Handlers:
    return Handlers(world.store, max_content_chars=LIMIT)


async def handle(
    handlers: Handlers, session: Session, frame: dict[str, Any], identity: Identity = ANYONE
) -> None:
    await handlers.handle(session, identity, parse_frame(orjson.dumps(frame).decode()))


async def refused(
    handlers: Handlers, session: Session, frame: dict[str, Any], identity: Identity = ANYONE
) -> ClientError:
    with pytest.raises(ClientError) as info:
        await handle(handlers, session, frame, identity)
    return info.value


async def connect(
    world: World, handlers: Handlers, email: str | None
) -> tuple[Session, FakeTransport]:
    """A session, identified as ``email`` unless it is ``None``; its ``#email`` reply read."""
    session, transport = world.session()
    if email is not None:
        await handle(handlers, session, {"type": "#email", "email": email})
        assert (await transport.recv())["type"] == "#email"
    return session, transport


async def states(transport: FakeTransport, message_id: str, until: str) -> list[dict[str, Any]]:
    frames = await transport.recv_until(
        lambda f: f["type"] == "state" and f["id"] == message_id and f["state"] == until
    )
    return [f for f in frames if f["type"] == "state" and f["id"] == message_id]


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
    identity = Identity()
    await handle(handlers, session, {"type": "#email", "email": " Bob@Example.com"}, identity)
    reply = await transport.recv()
    user = await world.store.inner.find_user(BOB)
    assert user is not None
    assert reply == {"type": "#email", "email": BOB, "user": {**user.public(), "online": True}}
    assert identity.asked == [BOB]
    assert session.user is not None
    assert session.user.email == BOB
    assert world.hub.online() == [BOB]


async def test_email_streams_the_backlog_after_the_reply(world: World, handlers: Handlers) -> None:
    alice, _ = await connect(world, handlers, ALICE)
    await world.store.inner.ensure_user(BOB)
    await handle(handlers, alice, {"type": "message", "to": BOB, "content": "hi", "id": "m1"})
    bob, transport = world.session()
    await handle(handlers, bob, {"type": "#email", "email": BOB})
    assert (await transport.recv())["type"] == "#email"
    message = await transport.recv()
    assert (message["type"], message["id"], message["from"]) == ("message", "m1", ALICE)


async def test_email_forbidden_when_the_identity_refuses(world: World, handlers: Handlers) -> None:
    session, transport = world.session()
    only_alice = Identity({ALICE})
    error = await refused(handlers, session, {"type": "#email", "email": BOB}, only_alice)
    assert error.code is ErrorCode.FORBIDDEN
    assert error.ref == "#email"
    assert session.user is None
    assert world.hub.online() == []
    assert await world.store.inner.find_user(BOB) is None  # no record for a refused e-mail
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


async def test_email_since_unknown_is_not_found(world: World, handlers: Handlers) -> None:
    session, _ = world.session()
    error = await refused(handlers, session, {"type": "#email", "email": BOB, "since": "nope"})
    assert error.code is ErrorCode.NOT_FOUND
    assert error.ref == "nope"
    assert session.user is None


async def test_email_since_streams_what_came_after(world: World, handlers: Handlers) -> None:
    alice, _ = await connect(world, handlers, ALICE)
    bob, bob_transport = await connect(world, handlers, BOB)
    for mid in ("m1", "m2", "m3"):
        await handle(handlers, alice, {"type": "message", "to": BOB, "content": mid, "id": mid})
    for mid in ("m1", "m2", "m3"):
        assert (await bob_transport.recv())["id"] == mid
        await handle(handlers, bob, {"type": "read", "id": mid})
    again, transport = world.session()
    await handle(handlers, again, {"type": "#email", "email": BOB, "since": "m1"})
    assert (await transport.recv())["type"] == "#email"
    frames = [await transport.recv() for _ in range(2)]
    assert [(f["id"], f["state"]) for f in frames] == [("m2", "read"), ("m3", "read")]


# --- #user ------------------------------------------------------------------------------


async def test_user_lookup(world: World, handlers: Handlers) -> None:
    session, transport = await connect(world, handlers, ALICE)
    await connect(world, handlers, BOB)
    await handle(handlers, session, {"type": "#user", "email": "BOB@example.com"})
    reply = await transport.recv()
    assert reply["type"] == "#user"
    assert reply["user"]["email"] == BOB
    assert reply["user"]["online"] is True
    assert re.fullmatch(r"m_[0-9a-f]{64}", reply["user"]["collection"])


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


# --- message ----------------------------------------------------------------------------


async def test_message_is_received_stored_and_delivered(world: World, handlers: Handlers) -> None:
    alice, alice_transport = await connect(world, handlers, ALICE)
    _, bob_transport = await connect(world, handlers, BOB)
    await handle(handlers, alice, {"type": "message", "to": BOB, "content": "hello", "id": "m1"})
    assert [f["state"] for f in await states(alice_transport, "m1", "sent")] == [
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


async def test_a_message_without_id_gets_one(world: World, handlers: Handlers) -> None:
    alice, transport = await connect(world, handlers, ALICE)
    await connect(world, handlers, BOB)
    await handle(handlers, alice, {"type": "message", "to": BOB, "content": "hi"})
    received = await transport.recv()
    assert received["state"] == "received"
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", received["id"])
    stored = await transport.recv()
    assert (stored["id"], stored["state"]) == (received["id"], "stored")


async def test_other_connections_of_the_sender_hear_stored(
    world: World, handlers: Handlers
) -> None:
    alice, _ = await connect(world, handlers, ALICE)
    _, other = await connect(world, handlers, ALICE)
    await world.store.inner.ensure_user(BOB)
    await handle(handlers, alice, {"type": "message", "to": BOB, "content": "x", "id": "m1"})
    assert [f["state"] for f in await states(other, "m1", "stored")] == ["stored"]


async def test_message_needs_identification(world: World, handlers: Handlers) -> None:
    session, transport = world.session()
    error = await refused(handlers, session, {"type": "message", "to": BOB, "content": "x"})
    assert error.code is ErrorCode.NOT_IDENTIFIED
    assert error.ref == "message"
    error = await refused(
        handlers, session, {"type": "message", "to": BOB, "content": "x", "id": "m1"}
    )
    assert error.ref == "m1"
    await spin()
    assert transport.sent == []


async def test_message_to_an_unknown_user_fails_not_found(world: World, handlers: Handlers) -> None:
    alice, transport = await connect(world, handlers, ALICE)
    await handle(handlers, alice, {"type": "message", "to": CAROL, "content": "x", "id": "m1"})
    frames = await states(transport, "m1", "failed")
    assert [f["state"] for f in frames] == ["received", "failed"]
    assert frames[-1]["code"] == "not_found"
    assert CAROL in frames[-1]["reason"]
    assert "send" not in world.store.calls


async def test_store_unavailable_during_send_fails_internal(
    world: World, handlers: Handlers
) -> None:
    alice, transport = await connect(world, handlers, ALICE)
    await world.store.inner.ensure_user(BOB)
    world.store.fail.add("send")
    await handle(handlers, alice, {"type": "message", "to": BOB, "content": "x", "id": "m1"})
    frames = await states(transport, "m1", "failed")
    assert [f["state"] for f in frames] == ["received", "failed"]
    assert frames[-1]["code"] == "internal"
    assert "same id" in frames[-1]["reason"]
    # Sent again with the same id once the store is back, it is stored.
    world.store.fail.clear()
    await handle(handlers, alice, {"type": "message", "to": BOB, "content": "x", "id": "m1"})
    assert [f["state"] for f in await states(transport, "m1", "stored")] == [
        "received",
        "stored",
    ]


async def test_store_unavailable_while_finding_the_recipient_fails_internal(
    world: World, handlers: Handlers
) -> None:
    alice, transport = await connect(world, handlers, ALICE)
    world.store.fail.add("find_user")
    await handle(handlers, alice, {"type": "message", "to": BOB, "content": "x", "id": "m1"})
    frames = await states(transport, "m1", "failed")
    assert frames[-1]["code"] == "internal"


async def test_a_failed_confirm_still_answers_stored(world: World, handlers: Handlers) -> None:
    alice, transport = await connect(world, handlers, ALICE)
    await world.store.inner.ensure_user(BOB)
    world.store.fail.add("confirm")
    await handle(handlers, alice, {"type": "message", "to": BOB, "content": "x", "id": "m1"})
    assert [f["state"] for f in await states(transport, "m1", "stored")] == [
        "received",
        "stored",
    ]


async def test_too_large_content_is_refused_before_anything_is_stored(
    world: World, handlers: Handlers
) -> None:
    alice, transport = await connect(world, handlers, ALICE)
    await world.store.inner.ensure_user(BOB)
    error = await refused(
        handlers, alice, {"type": "message", "to": BOB, "content": "x" * (LIMIT + 1), "id": "big"}
    )
    assert error.code is ErrorCode.TOO_LARGE
    assert error.ref == "big"
    assert str(LIMIT) in error.message
    assert "send" not in world.store.calls
    # Exactly the limit is fine.
    await handle(handlers, alice, {"type": "message", "to": BOB, "content": "x" * LIMIT})
    assert (await transport.recv())["state"] == "received"


async def test_a_duplicate_id_returns_the_current_state(world: World, handlers: Handlers) -> None:
    alice, alice_transport = await connect(world, handlers, ALICE)
    bob, bob_transport = await connect(world, handlers, BOB)
    await handle(handlers, alice, {"type": "message", "to": BOB, "content": "hi", "id": "m1"})
    assert (await bob_transport.recv())["id"] == "m1"
    await handle(handlers, bob, {"type": "ack", "id": "m1"})
    await states(alice_transport, "m1", "delivered")
    await handle(handlers, alice, {"type": "message", "to": BOB, "content": "hi", "id": "m1"})
    frames = await states(alice_transport, "m1", "delivered")
    assert [f["state"] for f in frames] == ["received", "delivered"]
    found = await world.store.inner.find_inbox(BOB, "m1", None)
    assert len(found) == 1


# --- ack / read -------------------------------------------------------------------------


async def test_ack_then_read_tell_the_sender(world: World, handlers: Handlers) -> None:
    alice, alice_transport = await connect(world, handlers, ALICE)
    bob, bob_transport = await connect(world, handlers, BOB)
    await handle(handlers, alice, {"type": "message", "to": BOB, "content": "hi", "id": "m1"})
    await bob_transport.recv()
    await states(alice_transport, "m1", "sent")
    await handle(handlers, bob, {"type": "ack", "id": "m1"})
    assert [f["state"] for f in await states(alice_transport, "m1", "delivered")] == ["delivered"]
    await handle(handlers, bob, {"type": "read", "id": "m1", "from": ALICE})
    assert [f["state"] for f in await states(alice_transport, "m1", "read")] == ["read"]
    found = await world.store.inner.find_inbox(BOB, "m1", ALICE)
    assert found[0].state.value == "read"


async def test_a_stale_ack_changes_nothing(world: World, handlers: Handlers) -> None:
    alice, _ = await connect(world, handlers, ALICE)
    bob, bob_transport = await connect(world, handlers, BOB)
    await handle(handlers, alice, {"type": "message", "to": BOB, "content": "hi", "id": "m1"})
    await bob_transport.recv()
    await handle(handlers, bob, {"type": "read", "id": "m1"})
    advances = world.store.calls.count("advance")
    await handle(handlers, bob, {"type": "ack", "id": "m1"})
    assert world.store.calls.count("advance") == advances + 1
    found = await world.store.inner.find_inbox(BOB, "m1", None)
    assert found[0].state.value == "read"


async def test_ack_needs_identification(world: World, handlers: Handlers) -> None:
    session, _ = world.session()
    error = await refused(handlers, session, {"type": "ack", "id": "m1"})
    assert error.code is ErrorCode.NOT_IDENTIFIED
    assert error.ref == "m1"


async def test_ack_of_an_unknown_id_is_not_found(world: World, handlers: Handlers) -> None:
    bob, _ = await connect(world, handlers, BOB)
    error = await refused(handlers, bob, {"type": "read", "id": "nope"})
    assert error.code is ErrorCode.NOT_FOUND
    assert error.ref == "nope"


async def test_nobody_acks_a_message_of_someone_else(world: World, handlers: Handlers) -> None:
    alice, _ = await connect(world, handlers, ALICE)
    carol, _ = await connect(world, handlers, CAROL)
    await world.store.inner.ensure_user(BOB)
    await handle(handlers, alice, {"type": "message", "to": BOB, "content": "x", "id": "m1"})
    for session in (alice, carol):  # the sender and a third party
        error = await refused(handlers, session, {"type": "ack", "id": "m1", "from": ALICE})
        assert error.code is ErrorCode.NOT_FOUND
    found = await world.store.inner.find_inbox(BOB, "m1", None)
    assert found[0].state.value in ("stored", "sent")


async def test_an_ambiguous_ack_without_from_is_invalid(world: World, handlers: Handlers) -> None:
    alice, _ = await connect(world, handlers, ALICE)
    carol, _ = await connect(world, handlers, CAROL)
    bob, bob_transport = await connect(world, handlers, BOB)
    for sender in (alice, carol):
        await handle(handlers, sender, {"type": "message", "to": BOB, "content": "x", "id": "m1"})
    await bob_transport.recv()
    await bob_transport.recv()
    error = await refused(handlers, bob, {"type": "ack", "id": "m1"})
    assert error.code is ErrorCode.INVALID
    assert "'from'" in error.message
    assert error.ref == "m1"
    await handle(handlers, bob, {"type": "ack", "id": "m1", "from": CAROL})
    found = {m.sender: m.state.value for m in await world.store.inner.find_inbox(BOB, "m1", None)}
    assert found[CAROL] == "delivered"
    assert found[ALICE] != "delivered"
