"""End to end: one order for one recipient when two processes write to its inbox.

Two ``tidings serve`` processes share one nx-27017 database. Alice sends
through one and Carol through the other, both at once, to Bob. Whatever the
interleaving, Bob's live stream, his backlog on the next identification and
his ``since`` replay must agree on one order, and each sender's messages must
keep the order they were sent in.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from pathlib import Path

import pytest

from tests.helpers import Client, client
from tests.mongo import NxServer
from tests.processes import tidings_serve

pytestmark = pytest.mark.e2e

ALICE = "alice@example.com"
BOB = "bob@example.com"
CAROL = "carol@example.com"
EACH = 30

Key = tuple[str, str]


async def send_all(url: str, sender: str, prefix: str) -> None:
    """``EACH`` messages from ``sender`` to Bob, each once the one before is stored.

    One at a time, so that the two senders' writes alternate: pipelined, one
    group commit took all of a sender's messages before the other process's.
    """
    async with client(url) as connection:
        await connection.identify(sender)
        for n in range(EACH):
            mid = f"{prefix}{n:02d}"
            await connection.send_message(BOB, f"{prefix}{n}", id=mid)
            await connection.states(mid, until="stored")


async def take(bob: Client, count: int) -> list[Key]:
    """The next ``count`` frames, each a message: (from, id)."""
    keys = []
    for _ in range(count):
        frame = await bob.recv()
        assert frame["type"] == "message", frame
        keys.append((frame["from"], frame["id"]))
    return keys


async def test_two_processes_writing_to_one_inbox_agree_on_one_order(
    own_nx: NxServer, tmp_path: Path
) -> None:
    database = f"order_{uuid.uuid4().hex[:8]}"
    async with (
        tidings_serve(own_nx.uri, database, tmp_path) as first,
        tidings_serve(own_nx.uri, database, tmp_path) as second,
    ):
        async with client(first) as bob:
            await bob.identify(BOB)
            receiving = asyncio.create_task(take(bob, 2 * EACH))
            await asyncio.gather(send_all(first, ALICE, "a"), send_all(second, CAROL, "c"))
            live = await receiving
        assert sorted(live) == sorted(
            [(ALICE, f"a{n:02d}") for n in range(EACH)]
            + [(CAROL, f"c{n:02d}") for n in range(EACH)]
        )
        # Each sender's messages in the order it sent them.
        for sender in (ALICE, CAROL):
            mine = [mid for who, mid in live if who == sender]
            assert mine == sorted(mine)
        # The writes did interleave: both processes took positions in turn.
        senders = [who for who, _ in live]
        turns = sum(1 for one, other in itertools.pairwise(senders) if one != other)
        assert turns > 1, senders
        # Nothing was acknowledged: the backlog holds every message, in the same order,
        # through the other process.
        async with client(second) as bob:
            await bob.identify(BOB)
            assert await take(bob, 2 * EACH) == live
        # And `since` the first message replays the rest in that order.
        async with client(first) as bob:
            await bob.identify(BOB, since=live[0][1])
            assert await take(bob, 2 * EACH) == live
