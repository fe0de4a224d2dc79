"""A short soak: load and connection churn, then nothing left behind.

What a short run can show: once every client is gone, the server's asyncio
tasks and open file descriptors are back where they were before the first
one came. ``make soak`` runs load for minutes and reports the slopes of
memory and descriptors.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest

from tests.helpers import TIMEOUT, client, serve
from tidings.config import Settings

pytestmark = pytest.mark.e2e

ROUNDS = 5
PAIRS = 10
MESSAGES = 20


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settles(measure: Callable[[], int], baseline: int, what: str) -> None:
    """Wait until ``measure()`` is back at ``baseline``; fail with what is left after TIMEOUT."""
    try:
        async with asyncio.timeout(TIMEOUT):
            # Closing sockets and ending tasks report nowhere one could wait on.
            while measure() > baseline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"{what}: {measure()} left, {baseline} before") from None


async def pair(url: str, n: int, round_: int) -> None:
    """A sender and a recipient: messages sent, received and acked; a reader that leaves early."""
    sender, recipient = f"s{n}@example.com", f"r{n}@example.com"
    async with client(url) as bob, client(url) as alice:
        await bob.identify(recipient)
        await alice.identify(sender)
        for m in range(MESSAGES):
            await alice.send_message(recipient, "hi", id=f"r{round_}m{m}")
        for _ in range(MESSAGES):
            frame = await bob.recv_until(lambda f: f["type"] == "message")
            await bob.send({"type": "ack", "id": frame[-1]["id"]})
        await alice.states(f"r{round_}m{MESSAGES - 1}", until="delivered")
        # A third connection that identifies and leaves without a word.
        async with client(url) as carol:
            await carol.identify(f"c{n}@example.com")


async def test_tasks_and_descriptors_return_to_their_baseline_after_churn() -> None:
    async with serve(Settings(dev=True, rate_limit=10_000, rate_burst=10_000)) as url:
        tasks, descriptors = len(asyncio.all_tasks()), open_descriptors()
        for round_ in range(ROUNDS):
            await asyncio.gather(*(pair(url, n, round_) for n in range(PAIRS)))
        await settles(lambda: len(asyncio.all_tasks()), tasks, "asyncio tasks")
        await settles(open_descriptors, descriptors, "open descriptors")
