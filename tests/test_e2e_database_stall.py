"""End to end on nx-27017: a busy database and a frozen one fail requests, never hang them.

Both run on a server of their own. Every wait is bounded by a generous
timeout that only keeps a broken run from hanging; nothing here asserts a time.
"""

from __future__ import annotations

import asyncio

import pytest
from websockets.exceptions import ConnectionClosed

from tests.helpers import TIMEOUT, Client, client, serve
from tests.mongo import NxServer
from tests.test_e2e_mongo import wait_for_readiness
from tidings.config import Settings

pytestmark = pytest.mark.e2e

PAIRS = 20
MESSAGES = 25


def busy_settings(nx: NxServer, budget: float = 5.0) -> Settings:
    """The app on ``nx`` with a database budget, per-connection rate limits out of the way."""
    return Settings(
        dev=True,
        mongodb_uri=nx.uri,
        change_stream_scope="collection",
        rate_limit=1e6,
        rate_burst=1_000_000,
        mongodb_timeout=budget,
        ready_timeout=budget,
    )


async def send_until_delivered(alice: Client, to: str, pair: int) -> dict[str, list[str]]:
    """Send MESSAGES pipelined, resend whatever is answered ``unavailable``; states by id."""
    ids = [f"p{pair}m{n:03d}" for n in range(MESSAGES)]
    for mid in ids:
        await alice.send_message(to, f"{pair}:{mid}", id=mid)
    states: dict[str, list[str]] = {mid: [] for mid in ids}
    delivered: set[str] = set()
    while len(delivered) < len(ids):
        frame = await alice.recv(within=TIMEOUT * 6)
        if frame["type"] == "error":
            assert frame["code"] == "unavailable", frame
            await alice.send_message(to, f"{pair}:{frame['ref']}", id=frame["ref"])
        elif frame["type"] == "state":
            assert frame["state"] != "failed", frame
            states[frame["id"]].append(frame["state"])
            if frame["state"] == "delivered":
                delivered.add(frame["id"])
    return states


async def receive_and_ack(bob: Client, done: asyncio.Event) -> list[str]:
    """Acknowledge every message until the sender saw them all delivered; ids in order.

    An acknowledgement answered ``unavailable`` is sent again, so Bob reads on
    until the sender is done, not only until he has every message.
    """
    seen: list[str] = []
    while not done.is_set():
        try:
            frame = await bob.recv(within=0.2)
        except TimeoutError:
            continue
        if frame["type"] == "error":
            # The ack's outcome is unknown: acknowledging again is safe.
            assert frame["code"] == "unavailable", frame
            await bob.send({"type": "ack", "id": frame["ref"]})
            continue
        assert frame["type"] == "message", frame
        seen.append(frame["id"])
        await bob.send({"type": "ack", "id": frame["id"]})
    return seen


async def test_twenty_busy_pairs_all_deliver_and_nobody_is_dropped(own_nx: NxServer) -> None:
    async with serve(busy_settings(own_nx)) as url:

        async def pair(n: int) -> tuple[dict[str, list[str]], list[str]]:
            async with client(url) as alice, client(url) as bob:
                await alice.identify(f"sender{n}@example.com")
                await bob.identify(f"recipient{n}@example.com")
                done = asyncio.Event()

                async def send() -> dict[str, list[str]]:
                    try:
                        return await send_until_delivered(alice, f"recipient{n}@example.com", n)
                    finally:
                        done.set()

                try:
                    return await asyncio.gather(send(), receive_and_ack(bob, done))
                except ConnectionClosed as closed:
                    # A keepalive timeout (1011) here is the stall this test is for.
                    raise AssertionError(f"pair {n} was disconnected: {closed}") from closed

        results = await asyncio.gather(*(pair(n) for n in range(PAIRS)))

    for n, (states, received) in enumerate(results):
        for mid, seen in states.items():
            # stored reached the sender before delivered; states forward only.
            assert "stored" in seen, (mid, seen)
            assert seen.index("stored") < seen.index("delivered"), (mid, seen)
        ids = [f"p{n}m{i:03d}" for i in range(MESSAGES)]
        # One connection each: every message once, in the order it was sent.
        assert received == ids


async def test_a_frozen_database_answers_unavailable_and_delivery_resumes(
    own_nx: NxServer,
) -> None:
    settings = busy_settings(own_nx, budget=1.0)
    async with serve(settings) as url, client(url) as alice, client(url) as bob:
        base = url.replace("ws://", "http://").removesuffix("/ws")
        await alice.identify("alice@example.com")
        await bob.identify("bob@example.com")
        await alice.send_message("bob@example.com", "before", id="before")
        assert (await bob.recv())["id"] == "before"

        own_nx.freeze()
        try:
            await alice.send_message("bob@example.com", "while frozen", id="frozen")
            answer = await alice.recv_until(lambda f: f["type"] == "error", within=TIMEOUT * 3)
            # Answered while the database is still frozen: bounded by the budget.
            assert own_nx.frozen
            assert (answer[-1]["code"], answer[-1]["ref"]) == ("unavailable", "frozen")
            down = await wait_for_readiness(base, 503)
            assert own_nx.frozen
            assert "database" in down["reason"] or "feed" in down["reason"]
            # Pings and pongs keep flowing: the app-level one is answered too.
            await alice.send({"type": "#ping", "ts": "frozen"})
            await alice.recv_until(lambda f: f == {"type": "#pong", "ts": "frozen"})
        finally:
            own_nx.thaw()

        await wait_for_readiness(base, 200)
        await alice.send_message("bob@example.com", "while frozen", id="frozen")
        await alice.states("frozen", until="stored")
        await alice.send_message("bob@example.com", "after", id="after")
        received = [(await bob.recv(within=TIMEOUT * 3))["id"] for _ in range(2)]
        assert received == ["frozen", "after"]
