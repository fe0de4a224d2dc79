"""The in-process feed of the embedded store."""

from __future__ import annotations

import asyncio
import contextlib

from tests.fakes import TIMEOUT, inbox_doc, until
from tidings.feed import MemoryFeed
from tidings.models import Change, FeedEvent


async def test_publish_before_run_is_delivered_in_order_once_running() -> None:
    feed = MemoryFeed()
    changes = [Change("insert", inbox_doc(mid=f"m{i}")) for i in range(5)]
    for change in changes:
        feed.publish(change)
    seen: list[FeedEvent] = []
    assert feed.running is False
    task = asyncio.create_task(feed.run(seen.append))
    try:
        await until(lambda: len(seen) == 5)
        assert seen == changes
        assert feed.running is True
        later = Change("update", inbox_doc(mid="later"))
        feed.publish(later)
        await until(lambda: len(seen) == 6)
        assert seen[-1] is later
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, TIMEOUT)
    assert feed.running is False


async def test_a_failing_sink_stops_the_feed_and_it_reports_not_running() -> None:
    feed = MemoryFeed()

    def sink(event: FeedEvent) -> None:
        raise RuntimeError("sink broke")

    feed.publish(Change("insert", inbox_doc()))
    task = asyncio.create_task(feed.run(sink))
    done, _ = await asyncio.wait({task}, timeout=TIMEOUT)
    assert task in done
    assert isinstance(task.exception(), RuntimeError)
    assert feed.running is False


async def test_watch_unwatch_and_ready_need_nothing() -> None:
    feed = MemoryFeed()
    feed.watch("m_x")
    feed.unwatch("m_x")
    feed.unwatch("never-watched")
    await asyncio.wait_for(feed.ready("m_x"), TIMEOUT)
    assert feed.running is False
