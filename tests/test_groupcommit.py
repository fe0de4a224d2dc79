"""Group commit: batching, order, duplicates and failures, on a fake collection."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pymongo.errors import AutoReconnect, BulkWriteError, PyMongoError

from tidings.groupcommit import GroupCommit

Document = dict[str, Any]


class FakeCollection:
    """Records each insert_many; enforces a unique ``key`` like an ordered MongoDB write."""

    def __init__(self, name: str = "m_fake") -> None:
        self.name = name
        self.batches: list[list[Any]] = []
        self.keys: list[Any] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_with: Exception | None = None

    async def insert_many(self, documents: list[Document], *, ordered: bool) -> None:
        assert ordered, "group commit must keep the order"
        self.batches.append([doc["key"] for doc in documents])
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        for index, doc in enumerate(documents):
            if doc["key"] in self.keys:
                details = {
                    "writeErrors": [{"index": index, "code": 11000, "errmsg": "E11000"}],
                    "nInserted": index,
                }
                raise BulkWriteError(details)
            self.keys.append(doc["key"])


async def test_a_lone_insert_is_written_at_once() -> None:
    group, coll = GroupCommit(), FakeCollection()
    assert await group.insert(coll, {"key": 1}) is True
    assert coll.batches == [[1]]


async def test_inserts_arriving_during_a_write_share_the_next_one() -> None:
    group, coll = GroupCommit(), FakeCollection()
    coll.gate.clear()
    first = asyncio.create_task(group.insert(coll, {"key": 0}))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    rest = [asyncio.create_task(group.insert(coll, {"key": n})) for n in range(1, 6)]
    await asyncio.sleep(0)
    coll.gate.set()
    assert await asyncio.gather(first, *rest) == [True] * 6
    assert coll.batches == [[0], [1, 2, 3, 4, 5]]
    assert coll.keys == [0, 1, 2, 3, 4, 5]


async def test_a_duplicate_fails_only_itself_and_the_rest_is_written_in_order() -> None:
    group, coll = GroupCommit(), FakeCollection()
    coll.keys.append(2)
    coll.gate.clear()
    tasks = [asyncio.create_task(group.insert(coll, {"key": n})) for n in range(5)]
    await asyncio.sleep(0)
    coll.gate.set()
    assert await asyncio.gather(*tasks) == [True, True, False, True, True]
    assert coll.keys == [2, 0, 1, 3, 4]


async def test_batches_are_capped() -> None:
    group, coll = GroupCommit(max_batch=2), FakeCollection()
    tasks = [asyncio.create_task(group.insert(coll, {"key": n})) for n in range(5)]
    assert await asyncio.gather(*tasks) == [True] * 5
    assert all(len(batch) <= 2 for batch in coll.batches)
    assert coll.keys == [0, 1, 2, 3, 4]


async def test_collections_are_batched_separately() -> None:
    group, one, two = GroupCommit(), FakeCollection("m_one"), FakeCollection("m_two")
    await asyncio.gather(group.insert(one, {"key": 1}), group.insert(two, {"key": 1}))
    assert (one.keys, two.keys) == ([1], [1])


async def test_a_database_error_reaches_every_waiter_of_the_batch() -> None:
    group, coll = GroupCommit(), FakeCollection()
    coll.fail_with = AutoReconnect("connection closed")
    results = await asyncio.gather(
        group.insert(coll, {"key": 1}), group.insert(coll, {"key": 2}), return_exceptions=True
    )
    assert all(isinstance(result, AutoReconnect) for result in results)
    coll.fail_with = None
    assert await group.insert(coll, {"key": 3}) is True


async def test_a_bulk_error_that_is_no_duplicate_fails_the_batch() -> None:
    group, coll = GroupCommit(), FakeCollection()
    coll.fail_with = BulkWriteError({"writeErrors": [{"index": 0, "code": 121}], "nInserted": 0})
    with pytest.raises(BulkWriteError):
        await group.insert(coll, {"key": 1})


async def test_a_caller_that_stops_waiting_does_not_stop_the_write() -> None:
    group, coll = GroupCommit(), FakeCollection()
    coll.gate.clear()
    waiter = asyncio.create_task(group.insert(coll, {"key": 1}))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    coll.gate.set()
    assert await group.insert(coll, {"key": 2}) is True
    assert coll.keys == [1, 2]


async def test_close_fails_inserts_still_waiting() -> None:
    group, coll = GroupCommit(), FakeCollection()
    coll.gate.clear()
    waiting = [asyncio.create_task(group.insert(coll, {"key": n})) for n in range(3)]
    await asyncio.sleep(0)
    await group.close()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(result, PyMongoError) for result in results)
    assert "closing" in str(results[0])
