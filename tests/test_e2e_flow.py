"""End to end: no gap and no duplicate under concurrency, and slow clients are cut off."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from tests.helpers import TIMEOUT, Client, client, serve
from tidings.config import Settings

pytestmark = pytest.mark.e2e

ALICE = "alice@example.com"
BOB = "bob@example.com"
CAROL = "carol@example.com"


async def drain(
    ws: Client,
    stop: asyncio.Event,
    wanted: dict[str, Any] | None = None,
    found: asyncio.Event | None = None,
) -> None:
    """Read frames until ``stop`` is set, so ``ws`` never falls behind.

    ``found`` is set once a frame that contains every field of ``wanted`` arrives.
    """
    while not stop.is_set():
        try:
            frame = await ws.recv(within=0.1)
        except TimeoutError:
            continue
        if found is not None and wanted is not None and wanted.items() <= frame.items():
            found.set()


async def test_a_recipient_reconnecting_mid_stream_gets_every_message_exactly_once(
    server: str,
) -> None:
    total = 150
    async with client(server) as bob:
        await bob.identify(BOB)

    async def alice_sends(all_stored: asyncio.Event) -> None:
        async with client(server) as alice:
            await alice.identify(ALICE)
            stop = asyncio.Event()
            for n in range(total):
                await alice.send_message(BOB, f"#{n}", id=f"s{n:04d}")
                if n % 10 == 0:
                    await asyncio.sleep(0.01)
            await alice.states(f"s{total - 1:04d}", until="stored")
            all_stored.set()
            stop.set()

    all_stored = asyncio.Event()
    sender = asyncio.create_task(alice_sends(all_stored))
    seen: list[str] = []
    async with client(server) as bob:
        await bob.identify(BOB)
        while len(seen) < total // 3:
            frame = await bob.recv()
            seen.append(frame["id"])
            await bob.send({"type": "ack", "id": frame["id"]})
        # Frames are handled in order: once the pong is back, every ack is stored.
        # (An ack still in flight at a reconnect means a redelivery, by design.)
        await bob.send({"type": "#ping", "ts": "acked"})
        await bob.recv_until(lambda f: f == {"type": "#pong", "ts": "acked"})
    # Bob reconnects mid-stream.
    first_connection = list(seen)
    async with client(server) as bob:
        await bob.identify(BOB)
        while len(seen) < total:
            frame = await bob.recv()
            seen.append(frame["id"])
            await bob.send({"type": "ack", "id": frame["id"]})
        await asyncio.wait_for(all_stored.wait(), TIMEOUT)
        await sender
        async with client(server) as alice:
            await alice.identify(ALICE)
            await alice.send_message(BOB, "last", id="sentinel")
            await bob.next_is(lambda f: f.get("id") == "sentinel", "the sentinel, no duplicate")

    counts = Counter(seen)
    assert [mid for mid, n in counts.items() if n > 1] == []
    assert sorted(seen) == [f"s{n:04d}" for n in range(total)]
    second_connection = seen[len(first_connection) :]
    assert first_connection == sorted(first_connection)
    assert second_connection == sorted(second_connection)


async def test_a_client_that_falls_behind_is_not_cut_and_loses_nothing() -> None:
    settings = Settings(
        dev=True,
        send_queue_size=8,
        max_frame_bytes=2**19,
        max_content_chars=2**18,
        # Longer than Bob's pause: he is behind, not gone.
        write_timeout=TIMEOUT * 3,
    )
    count = 128  # 32 MiB: far more than loopback socket buffers and the queue hold.
    async with (
        serve(settings) as url,
        client(url) as alice,
        client(url) as carol,
        client(url) as dave,
    ):
        await alice.identify(ALICE)
        await carol.identify(CAROL)
        await dave.identify("dave@example.com")
        # Bob's client library stops reading once its own one-frame buffer is full.
        async with client(url, max_queue=1, max_size=2**20) as bob:
            await bob.identify(BOB)
            stop = asyncio.Event()
            last_stored = asyncio.Event()
            last = {"type": "state", "id": f"big{count - 1}", "state": "stored"}
            readers = [
                asyncio.create_task(drain(alice, stop, last, last_stored)),
                asyncio.create_task(drain(dave, stop)),
            ]
            big = "x" * 2**18
            for n in range(count):
                await alice.send_message(BOB, big, id=f"big{n}")
                if n % 16 == 0:
                    # Meanwhile Carol still gets Dave's messages.
                    await dave.send_message(CAROL, f"ping {n}", id=f"d{n}")
                    assert (await carol.recv())["content"] == f"ping {n}"
            await asyncio.wait_for(last_stored.wait(), TIMEOUT)

            # Bob reads again: every message once, in order, though most of them
            # were dropped from memory while he was behind and read from the store.
            ids = [(await bob.recv())["id"] for _ in range(count)]
            assert ids == [f"big{n}" for n in range(count)]
            # Nothing more comes before a sentinel that travels the same path.
            await alice.send_message(BOB, "sentinel", id="sentinel")
            assert (await bob.recv())["id"] == "sentinel"
        # Alice was read all along: only Bob was behind.
        stop.set()
        await asyncio.gather(*readers)
