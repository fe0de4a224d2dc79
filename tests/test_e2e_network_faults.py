"""Network faults between the app and its database, through a TCP proxy (``tests/proxy.py``).

The app runs in this process and reaches nx-27017 only through the proxy;
clients talk to the app directly and never reconnect. Whatever the network
does, the same guarantees must hold, checked on every frame as it arrives:

- nothing stored is lost: every message its sender saw ``stored`` reaches
  the recipient;
- no duplicate within one connection, and one order: the order it was stored in;
- a sender's states only move forward, and ``delivered`` only after the
  recipient acknowledged;
- nobody receives another user's message.

Every wait is bounded by a generous timeout that only keeps a broken run from
hanging; nothing here asserts a time.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.helpers import TIMEOUT, Client, client, serve
from tests.mongo import NxServer
from tests.proxy import Proxy
from tests.test_e2e_mongo import wait_for_readiness
from tests.test_model_based import RANK
from tidings.config import Settings

pytestmark = pytest.mark.e2e

# The sentinel: sent after everything else, it must be the next message to arrive.
LAST = "last"


def through(proxy: Proxy, budget: float = 1.0) -> Settings:
    """The app on nx-27017 through ``proxy``, in a database of its own."""
    return Settings(
        dev=True,
        mongodb_uri=proxy.uri,
        database=f"net_{uuid.uuid4().hex[:8]}",
        change_stream_scope="collection",
        rate_limit=1e6,
        rate_burst=1_000_000,
        mongodb_timeout=budget,
        ready_timeout=budget,
    )


@asynccontextmanager
async def app_behind_proxy(nx: NxServer, budget: float = 1.0) -> AsyncIterator[tuple[Proxy, str]]:
    """A proxy in front of ``nx`` and the app behind it, ready; the proxy and the ws URL."""
    async with Proxy(nx.port) as proxy, serve(through(proxy, budget)) as url:
        await wait_for_readiness(http_base(url), 200)
        yield proxy, url


def http_base(url: str) -> str:
    """The app's HTTP base URL, for ``/readyz``, from its ``ws://`` URL."""
    return url.replace("ws://", "http://").removesuffix("/ws")


@dataclass
class Recipient:
    """One connection of a recipient: every message it received, checked as it arrives."""

    conn: Client
    email: str
    sender: str
    received: list[str] = field(default_factory=list)
    acked: set[str] = field(default_factory=set)  # before the ack is sent: the cause

    def take(self, frame: dict[str, Any]) -> None:
        """Check one frame; an ``error`` may only be an ack whose outcome is unknown."""
        if frame["type"] == "message":
            # Nobody receives another user's message, nor one from a stranger.
            assert (frame["to"], frame["from"]) == (self.email, self.sender), frame
            self.received.append(frame["id"])
        else:
            assert (frame["type"], frame.get("code")) == ("error", "unavailable"), frame

    async def next_message(self) -> dict[str, Any]:
        """The next message frame; an ack answered ``unavailable`` is sent again meanwhile."""
        while True:
            frame = await self.conn.recv(within=TIMEOUT * 3)
            self.take(frame)
            if frame["type"] == "message":
                return frame
            await self.ack(frame["ref"])

    async def ack(self, mid: str) -> None:
        """Acknowledge ``mid`` (again, after ``unavailable``: that is safe)."""
        self.acked.add(mid)
        await self.conn.send({"type": "ack", "id": mid})

    def assert_exactly(self, ids: list[str]) -> None:
        """This connection received ``ids`` once each, in that order, and nothing else."""
        twice = [mid for mid, count in Counter(self.received).items() if count > 1]
        assert twice == [], f"{self.email} received these twice: {twice}"
        assert self.received == ids


@dataclass
class Sender:
    """One connection of a sender: the states of its messages, checked as they arrive."""

    conn: Client
    recipient: Recipient
    states: dict[str, str] = field(default_factory=dict)  # the latest, per id
    seen: dict[str, list[str]] = field(default_factory=dict)  # every state, per id
    unavailable: int = 0  # sends answered "outcome unknown"

    def take(self, frame: dict[str, Any]) -> str | None:
        """Check one frame; the id of a message answered ``unavailable``, to be sent again."""
        if frame["type"] == "error":
            assert frame["code"] == "unavailable", frame
            self.unavailable += 1
            mid: str = frame["ref"]
            return mid
        assert frame["type"] == "state", frame
        mid, state = frame["id"], frame["state"]
        # failed is final, and a fault must never produce it: only unavailable.
        assert state != "failed", frame
        self.seen.setdefault(mid, []).append(state)
        if state == "received":
            return None  # the answer to a frame (a resend is received again), not a state
        earlier = self.states.get(mid, "received")
        assert RANK[state] >= RANK[earlier], f"{mid} went back from {earlier} to {state}"
        if RANK[state] >= RANK["delivered"]:
            assert mid in self.recipient.acked, f"{mid} {state} before the recipient acked it"
        self.states[mid] = state
        return None

    def reached(self, mid: str, state: str) -> bool:
        """Whether ``mid`` is at ``state`` or later."""
        return RANK[self.states.get(mid, "received")] >= RANK[state]

    async def send(self, mid: str) -> None:
        """Send one message to the recipient, with its id as its content."""
        await self.conn.send_message(self.recipient.email, mid, id=mid)

    async def until(self, done: Callable[[], bool]) -> None:
        """Read and check frames until ``done()``; what is answered ``unavailable`` is sent
        again with the same id, as a client must."""
        while not done():
            resend = self.take(await self.conn.recv(within=TIMEOUT * 3))
            if resend is not None:
                await self.send(resend)


async def read_and_ack(bob: Recipient) -> None:
    """Acknowledge every message as it comes, until the sender's ``LAST``."""
    while (mid := (await bob.next_message())["id"]) != LAST:
        await bob.ack(mid)


async def all_delivered_then_last(alice: Sender, ids: list[str]) -> None:
    """Wait until every id is ``delivered``; then send ``LAST``, the sentinel that must come
    next to the recipient, after which nothing of ``ids`` may arrive."""
    await alice.until(lambda: all(alice.reached(mid, "delivered") for mid in ids))
    await alice.send(LAST)
    await alice.until(functools.partial(alice.reached, LAST, "stored"))


async def test_latency_delays_but_loses_and_reorders_nothing(nx: NxServer) -> None:
    pairs, total = 3, 20
    async with app_behind_proxy(nx, budget=5.0) as (proxy, url):
        proxy.latency(0.03)

        async def pair(n: int) -> None:
            alice_email, bob_email = f"sender{n}@example.com", f"recipient{n}@example.com"
            ids = [f"p{n}m{i:03d}" for i in range(total)]
            async with client(url) as alice_conn, client(url) as bob_conn:
                await alice_conn.identify(alice_email)
                await bob_conn.identify(bob_email)
                bob = Recipient(bob_conn, bob_email, alice_email)
                alice = Sender(alice_conn, bob)
                for mid in ids:  # pipelined: all on the wire before any answer
                    await alice.send(mid)
                await asyncio.gather(read_and_ack(bob), all_delivered_then_last(alice, ids))
            bob.assert_exactly([*ids, LAST])
            assert alice.unavailable == 0, "a 5 s budget is ample for 30 ms each way"
            for mid in ids:
                seen = alice.seen[mid]
                assert "stored" in seen, (mid, seen)
                assert seen.index("stored") < seen.index("delivered"), (mid, seen)

        await asyncio.gather(*(pair(n) for n in range(pairs)))


async def test_cut_connections_lose_nothing_and_the_feed_resumes(nx: NxServer) -> None:
    total, every = 28, 4
    async with app_behind_proxy(nx) as (proxy, url):
        async with client(url) as alice_conn, client(url) as bob_conn:
            await alice_conn.identify("alice@example.com")
            await bob_conn.identify("bob@example.com")
            bob = Recipient(bob_conn, "bob@example.com", "alice@example.com")
            alice = Sender(alice_conn, bob)
            ids = [f"c{i:03d}" for i in range(total)]
            cuts: list[int] = []

            async def send() -> None:
                # One at a time, each until stored, so that the stored order is the
                # send order. Cuts land mid-request (just after a send) and between
                # requests (the change streams' getMore is always in flight).
                for n, mid in enumerate(ids):
                    await alice.send(mid)
                    if n % every == 1:
                        cuts.append(proxy.cut())
                    await alice.until(functools.partial(alice.reached, mid, "stored"))
                    if n % every == 3:
                        cuts.append(proxy.cut())
                # The last cut came after the last message was stored: "delivered"
                # for it, and LAST after it, come through resumed change streams.
                await all_delivered_then_last(alice, ids)

            await asyncio.gather(read_and_ack(bob), send())
            assert all(cut > 0 for cut in cuts), cuts  # every cut hit open connections
            # Exactly once and in order, on the connection Bob kept throughout.
            bob.assert_exactly([*ids, LAST])
        await wait_for_readiness(http_base(url), 200)


async def test_a_black_holed_database_answers_unavailable_and_delivery_resumes(
    nx: NxServer,
) -> None:
    async with app_behind_proxy(nx) as (proxy, url):
        base = http_base(url)
        async with client(url) as alice_conn, client(url) as bob_conn:
            await alice_conn.identify("alice@example.com")
            await bob_conn.identify("bob@example.com")
            bob = Recipient(bob_conn, "bob@example.com", "alice@example.com")
            alice = Sender(alice_conn, bob)
            await alice.send("before")
            assert (await bob.next_message())["id"] == "before"
            await alice.until(lambda: alice.reached("before", "sent"))

            proxy.blackhole()
            try:
                await alice.send("dark")
                async with asyncio.timeout(TIMEOUT * 3):
                    while alice.unavailable == 0:
                        assert alice.take(await alice.conn.recv()) in (None, "dark")
                # Answered while the path is still dead: bounded by the budget alone.
                assert proxy.black_holing
                assert not alice.reached("dark", "stored")
                down = await wait_for_readiness(base, 503)
                assert proxy.black_holing
                assert "database" in down["reason"] or "feed" in down["reason"], down
                # Pings are answered throughout, on a connection that waits on nothing
                # and on the one whose message just failed.
                for conn, ts in ((bob.conn, "bob"), (alice.conn, "alice")):
                    await conn.send({"type": "#ping", "ts": ts})
                    assert await conn.recv() == {"type": "#pong", "ts": ts}
                assert proxy.black_holing
            finally:
                proxy.heal()

            await wait_for_readiness(base, 200)
            # The client sends again with the same id, as the error told it to; the
            # messages after it come live, on the same connections, in order.
            after = ["dark", "after1", "after2"]
            for mid in after:
                await alice.send(mid)
                await alice.until(functools.partial(alice.reached, mid, "stored"))
            await asyncio.gather(read_and_ack(bob), all_delivered_then_last(alice, after))
            bob.assert_exactly(["before", *after, LAST])
