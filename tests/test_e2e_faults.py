"""Faults on real processes: an app process killed under load, a client frozen mid-connection.

Each test checks the guarantees that must hold through the fault: nothing that
was ``stored`` is lost, and no message comes twice within one connection.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import uuid
from collections import Counter
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from tests.helpers import TIMEOUT, Client, client, serve
from tests.mongo import NxServer
from tests.processes import serve_process
from tests.test_wsprotocol import eventually, server_holds
from tidings.config import Settings

pytestmark = pytest.mark.e2e

ALICE = "alice@example.com"
BOB = "bob@example.com"
TOTAL = 60


class Recipient:
    """Bob: reads and acks everything, through whichever process is alive."""

    def __init__(self) -> None:
        self.connections: list[list[str]] = []  # the ids each connection received

    async def read(self, url: str, until: set[str] | None) -> None:
        """One connection to ``url``: read until every id of ``until`` came (``None``: until
        the server goes away)."""
        seen: list[str] = []
        self.connections.append(seen)
        async with client(url) as bob:
            await bob.identify(BOB)
            try:
                while until is None or not until <= set().union(*self.connections):
                    frame = await bob.recv(within=TIMEOUT * 4)
                    if frame["type"] == "message":
                        seen.append(frame["id"])
                        await bob.send({"type": "ack", "id": frame["id"]})
            except ConnectionClosed:
                if until is not None:
                    raise


async def send_until_gone(url: str, stored: set[str], start: int, gone: asyncio.Event) -> int:
    """Alice sends, one at a time, until her connection breaks; the next id to send."""
    n = start
    try:
        async with client(url) as alice:
            await alice.identify(ALICE)
            while n < TOTAL:
                mid = f"k{n:03d}"
                await alice.send_message(BOB, mid, id=mid)
                await alice.states(mid, until="stored")
                stored.add(mid)
                n += 1
                if n == TOTAL // 2:
                    gone.set()  # half way: the test kills this process now
    except ConnectionClosed:
        pass
    return n


async def test_killing_one_of_two_app_processes_loses_nothing_stored(
    own_nx: NxServer, tmp_path: Path
) -> None:
    database = f"faults_{uuid.uuid4().hex[:8]}"
    stored: set[str] = set()
    bob = Recipient()
    async with (
        serve_process(own_nx.uri, database, tmp_path) as doomed,
        serve_process(own_nx.uri, database, tmp_path) as survivor,
    ):
        half = asyncio.Event()
        reading = asyncio.create_task(bob.read(doomed.url, None))
        sending = asyncio.create_task(send_until_gone(doomed.url, stored, 0, half))
        await asyncio.wait_for(half.wait(), TIMEOUT)
        doomed.kill()
        async with asyncio.timeout(TIMEOUT):
            resume_at = await sending
            await reading
        assert TOTAL // 2 <= len(stored) == resume_at < TOTAL  # killed mid-way
        assert bob.connections[0]  # Bob was receiving through the process that died
        # Both reconnect to the survivor. Alice resends from the first id she
        # did not see stored (it may have been, which is safe) to the end.
        never_answered = asyncio.Event()
        await send_until_gone(survivor.url, stored, resume_at, never_answered)
        assert stored == {f"k{n:03d}" for n in range(TOTAL)}
        await asyncio.wait_for(bob.read(survivor.url, stored), TIMEOUT)
    # Nothing stored was lost; within one connection nothing came twice.
    assert stored <= set().union(*bob.connections)
    for seen in bob.connections:
        assert [mid for mid, count in Counter(seen).items() if count > 1] == []


FROZEN_CLIENT = textwrap.dedent(
    """
    import json, sys, time
    from websockets.sync.client import connect
    ws = connect(sys.argv[1])
    ws.send(json.dumps({"type": "#email", "email": sys.argv[2]}))
    ws.recv()
    print(ws.socket.getsockname()[1], flush=True)
    time.sleep(3600)
    """
)


async def test_a_frozen_client_is_freed_after_the_ping_interval_and_timeout() -> None:
    settings = Settings(dev=True, ping_interval=0.3, ping_timeout=0.3)
    async with serve(settings) as url:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FROZEN_CLIENT, url, BOB, stdout=asyncio.subprocess.PIPE
        )
        assert process.stdout is not None
        try:
            port = int(await asyncio.wait_for(process.stdout.readline(), TIMEOUT))
            server_port = int(url.rsplit(":", 1)[1].split("/")[0])
            # SIGSTOP: the socket stays open in the kernel, the client answers no ping.
            os.kill(process.pid, signal.SIGSTOP)
            assert server_holds(server_port, port)
            async with client(url) as alice:
                await alice.identify(ALICE)
                assert (await lookup(alice, BOB))["online"]
                # Bob's session ends when his connection is found dead, and he
                # goes offline: the lookup is what shows it, as any client sees it.
                async with asyncio.timeout(TIMEOUT):
                    while (await lookup(alice, BOB))["online"]:  # noqa: ASYNC110 (remote state)
                        await asyncio.sleep(0.1)
            await eventually(lambda: not server_holds(server_port, port), "the socket was freed")
        finally:
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()


async def lookup(alice: Client, email: str) -> dict[str, object]:
    await alice.send({"type": "#user", "email": email})
    reply = await alice.recv()
    assert reply["type"] == "#user", reply
    user: dict[str, object] = reply["user"]
    return user
