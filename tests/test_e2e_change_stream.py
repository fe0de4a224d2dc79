"""End to end over the wire-level MongoDB fake: a change stream that loses its history.

A real Tidings server (real hub, real sessions, the real PyMongo) on
``tests.wire``, in the production default ``database`` scope and in
``collection`` scope. While the stream's getMore is held, Bob reads a
message (Alice's receipt changes) and Alice sends another (Bob's inbox
grows); then the oplog rolls over, the getMore answers 286, and the feed
restarts from now. Both must still learn what happened in the gap, on the
connections they have.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import pytest

from tests.helpers import TIMEOUT, Client, client, serve
from tests.wire import WireMongo
from tidings.config import Settings
from tidings.models import collection_for

pytestmark = pytest.mark.e2e

ALICE = "alice@example.com"
BOB = "bob@example.com"
DATABASE = "tidings"


def is_message(message_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda frame: frame["type"] == "message" and frame["id"] == message_id


async def send_and_deliver(alice: Client, bob: Client, message_id: str) -> None:
    """Alice sends; Bob receives and acks; Alice sees it delivered."""
    await alice.send_message(BOB, f"content of {message_id}", id=message_id)
    await bob.next_is(is_message(message_id), message_id)
    await bob.send({"type": "ack", "id": message_id})
    assert (await alice.states(message_id, until="delivered"))[-1] == "delivered"


def receipt_state(mongo: WireMongo, message_id: str) -> str | None:
    """The state of Alice's receipt of ``message_id``, as stored in the fake."""
    receipts = mongo.crud.client[DATABASE][collection_for(ALICE)]
    doc = receipts.find_one({"k": "out", "mid": message_id})
    return None if doc is None else str(doc["state"])


@pytest.mark.parametrize("scope", ["database", "collection"])
async def test_an_insert_and_a_receipt_update_in_a_286_gap_reach_both_without_a_reconnect(
    scope: Literal["database", "collection"],
) -> None:
    streams = 1 if scope == "database" else 2  # collection scope: Alice's and Bob's
    async with WireMongo() as mongo:
        settings = Settings(
            dev=True,
            mongodb_uri=mongo.uri,
            database=DATABASE,
            change_stream_scope=scope,
            # A held getMore must not time out on the client while the test writes.
            mongodb_timeout=TIMEOUT * 3,
            drain_deadline=TIMEOUT * 10,  # must fit the budget above twice
        )
        async with serve(settings) as url, client(url) as alice, client(url) as bob:
            await alice.identify(ALICE)
            await bob.identify(BOB)
            await send_and_deliver(alice, bob, "m1")
            await send_and_deliver(alice, bob, "m2")
            opened = len(mongo.watches)

            # The gap: no getMore answers while both writes are made and stored.
            mongo.hold()
            await mongo.until(lambda: mongo.held == streams)
            await bob.send({"type": "read", "id": "m1"})
            await alice.send_message(BOB, "in the gap", id="m3")
            assert await alice.states("m3", until="stored") == ["received", "stored"]
            await mongo.until(lambda: receipt_state(mongo, "m1") == "read")
            # The oplog rolls over past the streams' tokens: each held getMore answers 286.
            mongo.forget()
            mongo.release()

            # Bob: the message written in the gap, from his backlog re-read; then the
            # sentinel, a later message from Alice: nothing came twice, nothing else came.
            await bob.next_is(is_message("m3"), "m3, re-read after the restart")
            await alice.send_message(BOB, "after the gap", id="m4")
            await bob.next_is(is_message("m4"), "m4, the sentinel")
            # Alice: the read receipt written in the gap, re-read from her receipts.
            frames = await alice.recv_until(
                lambda f: f["type"] == "state" and f["id"] == "m1" and f["state"] == "read"
            )
            assert all(f["type"] == "state" for f in frames), frames
            # And the stream runs on: Bob's ack of m3 reaches Alice as it happens.
            await bob.send({"type": "ack", "id": "m3"})
            assert (await alice.states("m3", until="delivered"))[-1] == "delivered"

        # Every stream restarted from now (no token) once, after its 286.
        restarts = mongo.watches[opened:]
        assert len(restarts) == streams
        assert all("resumeAfter" not in w and "startAfter" not in w for w in restarts)
