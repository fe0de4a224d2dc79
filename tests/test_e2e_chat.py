"""End to end: real uvicorn, real WebSocket clients, the whole v1 protocol."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import TIMEOUT, client

pytestmark = pytest.mark.e2e

ALICE = "alice@example.com"
BOB = "bob@example.com"


async def test_two_users_chat_and_the_sender_sees_every_state_in_order(server: str) -> None:
    async with client(server) as alice, client(server) as bob:
        await alice.identify(ALICE)
        await bob.identify(BOB)
        await alice.send_message(BOB, "hello bob", id="m1")

        message = await bob.recv()
        assert message == {
            "type": "message",
            "id": "m1",
            "from": ALICE,
            "to": BOB,
            "content": "hello bob",
            "sent_at": message["sent_at"],
            "state": "stored",
        }
        assert await alice.states("m1", until="sent") == ["received", "stored", "sent"]

        await bob.send({"type": "ack", "id": "m1"})
        assert await alice.states("m1", until="delivered") == ["delivered"]
        await bob.send({"type": "read", "id": "m1"})
        assert await alice.states("m1", until="read") == ["read"]


async def test_offline_recipient_gets_the_backlog_in_order_on_identification(server: str) -> None:
    async with client(server) as bob:
        await bob.identify(BOB)  # Bob exists from now on.
    async with client(server) as alice:
        await alice.identify(ALICE)
        for n in range(5):
            await alice.send_message(BOB, f"note {n}", id=f"n{n}")
            assert await alice.states(f"n{n}", until="stored") == ["received", "stored"]

    async with client(server) as bob:
        await bob.identify(BOB)
        backlog = [await bob.recv() for _ in range(5)]
        assert [m["id"] for m in backlog] == [f"n{n}" for n in range(5)]
        assert [m["content"] for m in backlog] == [f"note {n}" for n in range(5)]
        async with client(server) as alice:
            await alice.identify(ALICE)
            await alice.send_message(BOB, "after the backlog", id="after")
            await bob.next_is(lambda f: f.get("id") == "after", "the live message, no repeat")


async def test_unacknowledged_messages_are_redelivered_on_each_identification(server: str) -> None:
    async with client(server) as bob:
        await bob.identify(BOB)
        async with client(server) as alice:
            await alice.identify(ALICE)
            await alice.send_message(BOB, "first", id="r1")
            await alice.send_message(BOB, "second", id="r2")
            assert [(await bob.recv())["id"] for _ in range(2)] == ["r1", "r2"]
        await bob.send({"type": "ack", "id": "r1"})
        await bob.send({"type": "#ping", "ts": "sync"})  # Frames are handled in order.
        assert await bob.recv() == {"type": "#pong", "ts": "sync"}

    async with client(server) as bob:
        await bob.identify(BOB)
        redelivered = await bob.recv()
        assert (redelivered["id"], redelivered["state"]) == ("r2", "sent")
        async with client(server) as alice:
            await alice.identify(ALICE)
            await alice.send_message(BOB, "third", id="r3")
            await bob.next_is(lambda f: f.get("id") == "r3", "r3, not the acknowledged r1")


async def test_since_replays_messages_after_an_id_even_when_delivered(server: str) -> None:
    async with client(server) as bob, client(server) as alice:
        await bob.identify(BOB)
        await alice.identify(ALICE)
        for n in range(3):
            await alice.send_message(BOB, f"s{n}", id=f"s{n}")
            assert (await bob.recv())["id"] == f"s{n}"
            await bob.send({"type": "ack", "id": f"s{n}"})
        await bob.send({"type": "#ping"})
        assert (await bob.recv())["type"] == "#pong"

    async with client(server) as bob:
        await bob.identify(BOB, since="s0")
        replay = [await bob.recv() for _ in range(2)]
        assert [(m["id"], m["state"]) for m in replay] == [("s1", "delivered"), ("s2", "delivered")]


async def test_a_resent_id_is_stored_once_and_answered_with_its_state(server: str) -> None:
    async with client(server) as alice, client(server) as bob:
        await alice.identify(ALICE)
        await bob.identify(BOB)
        await alice.send_message(BOB, "once", id="dup")
        assert (await bob.recv())["id"] == "dup"
        assert await alice.states("dup", until="sent") == ["received", "stored", "sent"]

        await alice.send_message(BOB, "once", id="dup")
        assert await alice.states("dup", until="sent") == ["received", "sent"]
        # Stored after the resend was handled: a second copy would come first.
        await alice.send_message(BOB, "next", id="after-dup")
        await bob.next_is(lambda f: f.get("id") == "after-dup", "the next message, no copy")


async def test_a_message_without_id_gets_one_in_every_state_frame(server: str) -> None:
    async with client(server) as alice, client(server) as bob:
        await alice.identify(ALICE)
        await bob.identify(BOB)
        await alice.send_message(BOB, "no id")
        received = await alice.recv()
        assert received["state"] == "received"
        assigned = received["id"]
        assert 1 <= len(assigned) <= 64
        assert await alice.states(assigned, until="sent") == ["stored", "sent"]
        assert (await bob.recv())["id"] == assigned


async def test_sending_to_an_unknown_user_fails_with_not_found(server: str) -> None:
    async with client(server) as alice:
        await alice.identify(ALICE)
        await alice.send_message("nobody@example.com", "hello?", id="lost")
        assert (await alice.recv())["state"] == "received"
        failed = await alice.recv()
        assert failed["state"] == "failed"
        assert failed["code"] == "not_found"
        assert "nobody@example.com" in failed["reason"]


async def test_states_reach_every_connection_of_the_sender(server: str) -> None:
    async with (
        client(server) as phone,
        client(server) as laptop,
        client(server) as bob,
    ):
        await phone.identify(ALICE)
        await laptop.identify(ALICE)
        await bob.identify(BOB)
        await phone.send_message(BOB, "from my phone", id="multi")
        assert await phone.states("multi", until="sent") == ["received", "stored", "sent"]
        assert await laptop.states("multi", until="sent") == ["stored", "sent"]
        await bob.recv()
        await bob.send({"type": "read", "id": "multi"})
        assert await phone.states("multi", until="read") == ["read"]
        assert await laptop.states("multi", until="read") == ["read"]


async def test_user_lookup_reports_presence(server: str) -> None:
    async with client(server) as alice:
        await alice.identify(ALICE)
        async with client(server) as bob:
            await bob.identify(BOB)
            await alice.send({"type": "#user", "email": "BOB@example.com"})
            reply = await alice.recv()
            assert reply["user"]["email"] == BOB
            assert reply["user"]["online"] is True
        # The server notices Bob's close shortly after; poll for it, bounded.
        async with asyncio.timeout(TIMEOUT):
            while True:
                await alice.send({"type": "#user", "email": BOB})
                if (await alice.recv())["user"]["online"] is False:
                    break
                await asyncio.sleep(0.05)


async def test_an_id_reused_for_another_recipient_is_not_stored_again(server: str) -> None:
    async with client(server) as alice, client(server) as bob, client(server) as carol:
        await alice.identify(ALICE)
        await bob.identify(BOB)
        await carol.identify("carol@example.com")
        await alice.send_message(BOB, "for bob", id="same")
        assert await alice.states("same", until="sent") == ["received", "stored", "sent"]
        assert (await bob.recv())["content"] == "for bob"

        await alice.send_message("carol@example.com", "for carol", id="same")
        assert await alice.states("same", until="sent") == ["received", "sent"]
        await alice.send_message("carol@example.com", "for carol", id="other")
        await carol.next_is(lambda f: f.get("id") == "other", "the next message, not 'same'")
