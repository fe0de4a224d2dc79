"""End to end: SIGTERM drains the server as the spec's Operations section says."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from pymongo import MongoClient
from pymongo.collection import Collection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.helpers import TIMEOUT, client
from tests.mongo import NxServer
from tests.processes import serving
from tests.test_e2e_mongo import wait_for_readiness
from tidings.models import collection_for
from tidings.server import EXIT_DEADLINE

pytestmark = pytest.mark.e2e


async def test_sigterm_turns_unready_refuses_new_clients_then_closes_with_1012(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path, dev="1", drain_delay="3", log_level="INFO") as served:
        url = served.url
        base = url.replace("ws://", "http://").removesuffix("/ws")
        async with client(url) as alice, client(url) as bob:
            await alice.identify("alice@example.com")
            await bob.identify("bob@example.com")
            served.process.send_signal(signal.SIGTERM)

            # Within the drain delay: not ready, new clients refused, old ones served.
            ready = await wait_for_readiness(base, 503)
            assert "draining" in ready["reason"]
            with pytest.raises(InvalidStatus) as refused:
                async with client(url):
                    pass
            assert refused.value.response.status_code == 503
            await alice.send_message("bob@example.com", "last words", id="last")
            assert (await bob.recv())["content"] == "last words"

            # Then every client is told to reconnect elsewhere.
            for ws in (alice, bob):
                close = await ws.close_frame()
                assert close.code == 1012
                assert "reconnect" in close.reason
        await asyncio.wait_for(served.process.wait(), TIMEOUT)  # on its own: exit 0 is checked
    # JSON lines, however the formatter spaces them; anything else (a traceback) is not an event.
    lines = served.log.splitlines()
    events = [orjson.loads(line).get("event") for line in lines if line.startswith("{")]
    assert "draining" in events


# --- a drain under load, on nx-27017 -----------------------------------------------------

SENDERS = 4
WINDOW = 8  # messages a sender has in flight


@dataclass
class Seen:
    """What one connection saw until the server closed it."""

    stored: set[str] = field(default_factory=set)
    received: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    close: int | None = None


async def keep_sending(url: str, n: int, recipient: str, seen: Seen, going: asyncio.Event) -> None:
    """Send pipelined, ``WINDOW`` in flight, until the server closes the connection."""
    serial = 0
    async with client(url) as ws:
        await ws.identify(f"sender{n}@example.com")
        window = asyncio.Semaphore(WINDOW)
        pending: set[str] = set()

        async def read() -> None:
            try:
                while True:
                    frame = await ws.recv(within=TIMEOUT * 3)
                    mid: str = frame.get("id") or frame.get("ref") or ""
                    if frame["type"] == "state":
                        seen.states.append(frame["state"])
                        if frame["state"] == "stored":
                            seen.stored.add(mid)
                    if frame["type"] == "error":
                        seen.errors.append(frame)
                    answered = frame["type"] == "error" or frame.get("state") == "stored"
                    if mid in pending and answered:
                        pending.discard(mid)
                        window.release()
                    if len(seen.stored) >= 5:
                        going.set()
            finally:
                for _ in range(WINDOW):  # the sending loop must not wait on a closed connection
                    window.release()

        reader = asyncio.create_task(read())
        try:
            while not reader.done():
                await window.acquire()
                mid = f"d{n}-{serial}"
                serial += 1
                pending.add(mid)
                await ws.send_message(recipient, "through the signal", id=mid)
            await reader
        except ConnectionClosed as closed:
            seen.close = closed.rcvd.code if closed.rcvd is not None else 1006
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await reader


async def keep_reading(url: str, email: str, seen: Seen, ready: asyncio.Event) -> None:
    """Read and acknowledge until the server closes the connection."""
    async with client(url) as ws:
        await ws.identify(email)
        ready.set()
        try:
            while True:
                frame = await ws.recv(within=TIMEOUT * 3)
                if frame["type"] == "message":
                    seen.received.append(frame["id"])
                    await ws.send({"type": "ack", "id": frame["id"]})
        except ConnectionClosed as closed:
            seen.close = closed.rcvd.code if closed.rcvd is not None else 1006


def stored_in(nx: NxServer, database: str, email: str) -> set[str]:
    """The ids of the messages in ``email``'s inbox, read from the database itself."""
    mongo: MongoClient[dict[str, Any]]
    with MongoClient(nx.uri, serverSelectionTimeoutMS=int(TIMEOUT * 1000)) as mongo:
        inbox: Collection[dict[str, Any]] = mongo[database][collection_for(email)]
        return {doc["mid"] for doc in inbox.find({"k": "in"}, {"mid": 1})}


@pytest.mark.parametrize("frozen", [False, True], ids=["database-healthy", "database-frozen"])
async def test_sigterm_under_load_finishes_what_it_started_and_exits_by_the_deadline(
    own_nx: NxServer, tmp_path: Path, frozen: bool
) -> None:
    database = f"drain_{uuid.uuid4().hex[:8]}"
    recipients = ["r0@example.com", "r1@example.com"]
    senders = [Seen() for _ in range(SENDERS)]
    readers = [Seen() for _ in recipients]
    async with serving(
        tmp_path,
        dev="1",
        mongodb_uri=own_nx.uri,
        database=database,
        change_stream_scope="collection",
        mongodb_timeout="1",
        drain_delay="0.5",
        drain_deadline="6",
        log_level="INFO",
    ) as served:
        if frozen:  # the deadline may have to end it: that is what it is for
            served.also_exits = (EXIT_DEADLINE,)
        ready = [asyncio.Event() for _ in recipients]
        going = [asyncio.Event() for _ in senders]
        reading = [
            asyncio.create_task(keep_reading(served.url, email, seen, up))
            for email, seen, up in zip(recipients, readers, ready, strict=True)
        ]
        for up in ready:
            await asyncio.wait_for(up.wait(), TIMEOUT)
        sending = [
            asyncio.create_task(keep_sending(served.url, n, recipients[n % 2], seen, go))
            for n, (seen, go) in enumerate(zip(senders, going, strict=True))
        ]
        for go in going:  # every sender has messages stored and more in flight
            await asyncio.wait_for(go.wait(), TIMEOUT * 2)
        if frozen:
            own_nx.freeze()
        try:
            served.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*sending, *reading), TIMEOUT * 3)
            # The server process itself is gone, by its deadline at the latest.
            await asyncio.wait_for(served.process.wait(), TIMEOUT * 3)
        finally:
            if frozen:
                own_nx.thaw()
    # A drain that the deadline had to end exits with a status of its own, not 0.
    assert served.process.returncode in (0, EXIT_DEADLINE)
    if not frozen:
        assert served.process.returncode == 0, served.log
    # Every client was told to reconnect elsewhere: a close frame, never 1006.
    assert [seen.close for seen in senders + readers] == [1012] * (SENDERS + len(recipients))
    for seen in senders:
        # The shutdown fails nothing: what was in hand was answered or left for a resend.
        assert "failed" not in seen.states
        assert {e["code"] for e in seen.errors} <= {"unavailable"}, seen.errors
    # Everything a sender saw stored is in the database.
    inboxes = set().union(*(stored_in(own_nx, database, email) for email in recipients))
    stored = set().union(*(seen.stored for seen in senders))
    assert stored
    assert stored <= inboxes
    if not frozen:
        assert "drained" in served.log


async def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    # A drain delay far longer than the test waits: only the second signal can end it.
    async with serving(
        tmp_path, dev="1", drain_delay="3600", drain_deadline="3700", log_level="INFO"
    ) as served:
        # uvicorn raises the signal again once it has stopped: the process dies of it.
        served.also_exits = (-signal.SIGTERM,)
        base = served.url.replace("ws://", "http://").removesuffix("/ws")
        async with client(served.url) as alice:
            await alice.identify("alice@example.com")
            served.process.send_signal(signal.SIGTERM)
            await wait_for_readiness(base, 503)
            served.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(served.process.wait(), TIMEOUT)
            # Even then the client hears a close frame, not a dropped connection.
            assert (await alice.close_frame()).code == 1012
    assert "stopping_now" in served.log
