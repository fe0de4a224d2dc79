"""A recipient that stops reading is dropped, TCP connection and all; its sender is not."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from tests.helpers import TIMEOUT, client, serve
from tests.test_wsprotocol import RawClient, eventually, server_holds
from tidings.config import Settings

pytestmark = pytest.mark.e2e

CONTENT = "x" * 16000
BATCH = 16


def most_messages() -> int:
    """More messages than the server could ever buffer for one client.

    That is the kernel's send buffer, which grows up to tcp_wmem's maximum,
    plus uvicorn's 64 kB write buffer and a send queue of 16; twice the
    kernel's share covers them.
    """
    with open("/proc/sys/net/ipv4/tcp_wmem") as limits:
        kernel = int(limits.read().split()[2])
    return 2 * kernel // len(CONTENT) + 4 * BATCH


async def test_a_recipient_that_stops_reading_is_dropped() -> None:
    settings = Settings(
        dev=True,
        write_timeout=1.0,
        close_timeout=1.0,
        rate_limit=100000,
        rate_burst=100000,
        send_queue_size=16,
    )
    async with serve(settings) as url:
        server_port = urlsplit(url).port
        assert server_port is not None
        bob = await RawClient.connect(url)
        try:
            await bob.send_text('{"type":"#email","email":"bob@example.com"}')
            assert server_holds(server_port, bob.port)
            async with client(url) as alice:
                await alice.identify("alice@example.com")
                sent, most = 0, most_messages()
                while server_holds(server_port, bob.port) and sent < most:
                    # In batches: a message's round trip, not the server's rate, is the limit.
                    for _ in range(BATCH):
                        await alice.send_message("bob@example.com", CONTENT)
                    sent += BATCH
                    # Alice reads everything meant for her, so she is never slow herself.
                    # Pongs come one per ping, in order, so this one is hers.
                    await alice.send({"type": "#ping"})
                    await alice.recv_until(lambda f: f["type"] == "#pong")
                await eventually(
                    lambda: not server_holds(server_port, bob.port),
                    f"the server dropped bob after {sent} messages",
                )
                assert bob.unread() > 0
                await alice.send({"type": "#ping", "ts": "after"})
                frames = await alice.recv_until(lambda f: f["type"] == "#pong", within=TIMEOUT)
                assert frames[-1] == {"type": "#pong", "ts": "after"}
        finally:
            bob.close()
