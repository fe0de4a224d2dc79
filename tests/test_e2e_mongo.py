"""End to end on nx-27017: several app processes, and a database that crashes."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest

from tests.helpers import TIMEOUT, client, serve
from tests.mongo import NxServer
from tests.processes import tidings_serve
from tidings.config import Settings

pytestmark = pytest.mark.e2e

ALICE = "alice@example.com"
BOB = "bob@example.com"


async def wait_for_readiness(base: str, status: int) -> dict[str, str]:
    """Poll ``/readyz`` until it answers ``status``; its body."""
    async with httpx.AsyncClient(base_url=base) as http, asyncio.timeout(TIMEOUT * 3):
        while True:
            try:
                response = await http.get("/readyz")
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code == status:
                body: dict[str, str] = response.json()
                return body
            await asyncio.sleep(0.1)


async def test_messages_and_states_cross_app_processes(nx: NxServer, tmp_path: Path) -> None:
    database = f"t_{uuid.uuid4().hex[:12]}"
    async with (
        tidings_serve(nx.uri, database, tmp_path) as one,
        tidings_serve(nx.uri, database, tmp_path) as two,
        client(one) as alice,
        client(two) as bob,
    ):
        await alice.identify(ALICE)
        await bob.identify(BOB)
        await alice.send({"type": "#user", "email": BOB})
        assert (await alice.recv())["user"]["online"] is True

        await alice.send_message(BOB, "across processes", id="x1")
        message = await bob.recv()
        assert (message["id"], message["content"]) == ("x1", "across processes")
        assert await alice.states("x1", until="sent") == ["received", "stored", "sent"]
        await bob.send({"type": "ack", "id": "x1"})
        assert await alice.states("x1", until="delivered") == ["delivered"]
        await bob.send({"type": "read", "id": "x1"})
        assert await alice.states("x1", until="read") == ["read"]


async def test_a_database_crash_loses_nothing_and_live_delivery_resumes(
    own_nx: NxServer,
) -> None:
    settings = Settings(
        dev=True,
        mongodb_uri=own_nx.uri,
        change_stream_scope="collection",
        mongodb_timeout=1.0,
        ready_timeout=1.0,
    )
    async with serve(settings) as url, client(url) as alice, client(url) as bob:
        base = url.replace("ws://", "http://").removesuffix("/ws")
        await wait_for_readiness(base, 200)
        await alice.identify(ALICE)
        await bob.identify(BOB)
        await alice.send_message(BOB, "before the crash", id="before")
        assert (await bob.recv())["id"] == "before"
        assert await alice.states("before", until="sent") == ["received", "stored", "sent"]

        own_nx.kill()
        down = await wait_for_readiness(base, 503)
        assert "database" in down["reason"] or "feed" in down["reason"]
        await alice.send_message(BOB, "during the crash", id="during")
        # The outcome is unknown (never 'failed', which is final): send it again.
        answer = await alice.recv_until(lambda f: f["type"] == "error")
        assert (answer[-1]["code"], answer[-1]["ref"]) == ("unavailable", "during")
        assert all(f.get("state") != "failed" for f in answer)

        own_nx.start()
        await wait_for_readiness(base, 200)
        # The client sends again with the same id, as the error told it to.
        await alice.send_message(BOB, "during the crash", id="during")
        await alice.send_message(BOB, "after the crash", id="after")
        live = [await bob.recv(), await bob.recv()]
        assert [m["id"] for m in live] == ["during", "after"]
        assert await alice.states("after", until="sent") == ["received", "stored", "sent"]

    # Nothing stored was lost: a fresh connection gets every unacknowledged message.
    async with serve(settings) as url, client(url) as bob:
        await bob.identify(BOB)
        backlog = [(await bob.recv())["id"] for _ in range(3)]
        assert backlog == ["before", "during", "after"]
