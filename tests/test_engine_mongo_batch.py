"""Group commit and sequenced commit: batching, order, duplicates, positions and failures.

Most cases run on ``FakeInbox``, a small ``Insertable`` that behaves like an
ordered ``insert_many`` into a collection with MongoDB's unique indexes on
(k, mid, from) and on seq, and whose writes can be held at a gate. Where what
matters is how a real server reports duplicates and interleaves two writers,
the cases run on nx-27017.

Nothing here waits on time: a writer inside ``insert_many`` is recognised by
the batch it recorded, and ``until`` only turns the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import AutoReconnect, BulkWriteError, PyMongoError

from tests.fakes import ALICE, CAROL, until
from tests.mongo import NxServer
from tidings.engine.mongo.batch import DUPLICATE_KEY, GroupCommit, SequencedCommit
from tidings.engine.mongo.documents import INBOX, MESSAGE_INDEXES, Document


def doc(mid: str, sender: str = ALICE) -> Document:
    """An inbox document as far as commit cares: its unique key."""
    return {"k": INBOX, "mid": mid, "from": sender}


class FakeInbox:
    """An ``Insertable`` with MongoDB's ordered-insert semantics and unique keys.

    ``batches`` records the ids of every ``insert_many`` as it arrives; the
    write then waits for ``gate``. ``fail_with`` fails the whole write.
    ``intrude`` commits another writer's document just before the document at
    the given index of the next write, as a second process would.
    """

    def __init__(self, name: str = "m_fake") -> None:
        self.name = name
        self.docs: list[Document] = []
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_with: Exception | None = None
        self.intrude: tuple[int, Document] | None = None

    async def insert_many(self, documents: list[Document], *, ordered: bool) -> None:
        assert ordered, "commit must keep the order"
        self.batches.append([d["mid"] for d in documents])
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        intrude, self.intrude = self.intrude, None
        for index, document in enumerate(documents):
            if intrude is not None and intrude[0] == index:
                self.docs.append(intrude[1])
            if any(self._clash(document, old) for old in self.docs):
                raise BulkWriteError(
                    {
                        "writeErrors": [
                            {"index": index, "code": DUPLICATE_KEY, "errmsg": "E11000"}
                        ],
                        "nInserted": index,
                    }
                )
            self.docs.append(dict(document))

    async def find_one(self, filter: Document, *args: Any, **kwargs: Any) -> Document | None:
        if "seq" in filter:  # the highest position taken
            assert kwargs.get("sort") == [("seq", -1)]
            taken = [d["seq"] for d in self.docs if "seq" in d]
            return {"seq": max(taken)} if taken else None
        assert set(filter) == {"k", "mid", "from"}, f"an unexpected query: {filter}"
        return next((d for d in self.docs if self._same_key(d, filter)), None)

    @staticmethod
    def _same_key(one: Document, other: Document) -> bool:
        return all(one.get(key) == other.get(key) for key in ("k", "mid", "from"))

    def _clash(self, new: Document, old: Document) -> bool:
        same_position = "seq" in new and new.get("seq") == old.get("seq")
        return same_position or self._same_key(new, old)

    def mids(self) -> list[str]:
        return [d["mid"] for d in self.docs]

    def positions(self) -> dict[str, int]:
        return {d["mid"]: d["seq"] for d in self.docs}


async def in_flight(coll: FakeInbox, writes: int = 1) -> None:
    """Until ``writes`` inserts have reached the collection (and wait at its gate)."""
    await until(lambda: len(coll.batches) >= writes)


# --- group commit -----------------------------------------------------------------------


async def test_a_lone_insert_is_written_at_once() -> None:
    group, coll = GroupCommit(), FakeInbox()
    assert await group.submit(coll, doc("m1")) is True
    assert coll.batches == [["m1"]]


async def test_submit_queues_at_once_in_submit_order() -> None:
    # Synchronous: what a caller submits one after another is written in that
    # order, before any of them was awaited.
    group, coll = GroupCommit(), FakeInbox()
    futures = [group.submit(coll, doc(f"m{n}")) for n in range(4)]
    assert await asyncio.gather(*futures) == [True] * 4
    assert coll.mids() == ["m0", "m1", "m2", "m3"]
    assert coll.batches == [["m0", "m1", "m2", "m3"]]


async def test_inserts_arriving_during_a_write_share_the_next_one() -> None:
    group, coll = GroupCommit(), FakeInbox()
    coll.gate.clear()
    first = group.submit(coll, doc("m0"))
    await in_flight(coll)
    rest = [group.submit(coll, doc(f"m{n}")) for n in range(1, 6)]
    coll.gate.set()
    assert await asyncio.gather(first, *rest) == [True] * 6
    assert coll.batches == [["m0"], ["m1", "m2", "m3", "m4", "m5"]]
    assert coll.mids() == ["m0", "m1", "m2", "m3", "m4", "m5"]


async def test_a_duplicate_fails_only_itself_and_the_rest_is_written_in_order() -> None:
    group, coll = GroupCommit(), FakeInbox()
    coll.docs.append(doc("m2"))
    futures = [group.submit(coll, doc(f"m{n}")) for n in range(5)]
    assert await asyncio.gather(*futures) == [True, True, False, True, True]
    assert coll.mids() == ["m2", "m0", "m1", "m3", "m4"]
    # The ordered write stopped at the duplicate; the rest went in a write of its own.
    assert coll.batches == [["m0", "m1", "m2", "m3", "m4"], ["m3", "m4"]]


async def test_batches_are_capped() -> None:
    group, coll = GroupCommit(max_batch=2), FakeInbox()
    futures = [group.submit(coll, doc(f"m{n}")) for n in range(5)]
    assert await asyncio.gather(*futures) == [True] * 5
    assert coll.batches == [["m0", "m1"], ["m2", "m3"], ["m4"]]


async def test_collections_are_batched_separately() -> None:
    group, one, two = GroupCommit(), FakeInbox("m_one"), FakeInbox("m_two")
    one.gate.clear()
    held = group.submit(one, doc("m1"))
    await in_flight(one)
    # A write held up in one collection does not hold up another's.
    assert await group.submit(two, doc("m1")) is True
    one.gate.set()
    assert await held is True
    assert (one.mids(), two.mids()) == (["m1"], ["m1"])


async def test_a_database_error_reaches_every_waiter_of_the_batch() -> None:
    group, coll = GroupCommit(), FakeInbox()
    coll.fail_with = AutoReconnect("connection closed")
    futures = [group.submit(coll, doc("m1")), group.submit(coll, doc("m2"))]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(result, AutoReconnect) for result in results)
    coll.fail_with = None
    assert await group.submit(coll, doc("m3")) is True
    assert coll.mids() == ["m3"]


async def test_a_bulk_error_that_is_no_duplicate_fails_the_batch() -> None:
    group, coll = GroupCommit(), FakeInbox()
    coll.fail_with = BulkWriteError(
        {"writeErrors": [{"index": 0, "code": 121, "errmsg": "validation"}], "nInserted": 0}
    )
    futures = [group.submit(coll, doc("m1")), group.submit(coll, doc("m2"))]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(result, BulkWriteError) for result in results)


async def test_a_caller_that_stops_waiting_does_not_stop_the_write() -> None:
    group, coll = GroupCommit(), FakeInbox()
    coll.gate.clear()
    future = group.submit(coll, doc("m1"))

    async def wait() -> bool:
        return await future

    waiter = asyncio.create_task(wait())
    await in_flight(coll)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    coll.gate.set()
    assert await group.submit(coll, doc("m2")) is True
    assert coll.mids() == ["m1", "m2"]


async def test_an_outcome_nobody_awaited_is_not_reported_as_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A sender that went away leaves its future behind; a failure in it must
    # not be logged as "exception was never retrieved" when it is collected.
    group, coll = GroupCommit(), FakeInbox()
    coll.fail_with = AutoReconnect("connection closed")
    future = group.submit(coll, doc("m1"))
    await until(future.done)
    # Drop every reference, the fake's to the error included, so that the
    # collector finalises the future now.
    coll.fail_with = None
    del future
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_close_fails_inserts_still_waiting() -> None:
    group, coll = GroupCommit(), FakeInbox()
    coll.gate.clear()
    writing = group.submit(coll, doc("m0"))
    await in_flight(coll)
    queued = [group.submit(coll, doc(f"m{n}")) for n in range(1, 3)]
    await group.close()
    results = await asyncio.gather(writing, *queued, return_exceptions=True)
    assert all(isinstance(result, PyMongoError) for result in results)
    assert all("closing" in str(result) for result in results)


async def test_close_fails_inserts_whose_writer_never_ran() -> None:
    group, coll = GroupCommit(), FakeInbox()
    futures = [group.submit(coll, doc(f"m{n}")) for n in range(2)]
    await group.close()  # before the writer task took its first step
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(result, PyMongoError) for result in results)
    assert coll.batches == []


# --- sequenced commit: positions --------------------------------------------------------


async def test_positions_are_handed_out_in_submit_order() -> None:
    group, coll = SequencedCommit(), FakeInbox()
    coll.gate.clear()
    first = group.submit(coll, doc("m1"))
    await in_flight(coll)
    rest = [group.submit(coll, doc(f"m{n}")) for n in range(2, 6)]
    coll.gate.set()
    assert await asyncio.gather(first, *rest) == [True] * 5
    # The second batch went on from where the first ended, without asking again.
    assert coll.positions() == {"m1": 1, "m2": 2, "m3": 3, "m4": 4, "m5": 5}
    assert len(coll.batches) == 2


async def test_positions_go_on_after_the_highest_one_taken() -> None:
    group, coll = SequencedCommit(), FakeInbox()
    coll.docs.append({**doc("old", CAROL), "seq": 7})
    assert await group.submit(coll, doc("m1")) is True
    assert coll.positions()["m1"] == 8


async def test_a_resend_in_the_middle_of_a_batch_leaves_no_gap() -> None:
    group, coll = SequencedCommit(), FakeInbox()
    assert await group.submit(coll, doc("m2")) is True
    futures = [group.submit(coll, doc(f"m{n}")) for n in (1, 2, 3)]
    assert await asyncio.gather(*futures) == [True, False, True]
    assert coll.positions() == {"m2": 1, "m1": 2, "m3": 3}


async def test_a_position_another_process_took_is_renumbered() -> None:
    mine, theirs, coll = SequencedCommit(), SequencedCommit(), FakeInbox()
    assert await mine.submit(coll, doc("a1")) is True  # mine now expects 2 next
    assert await theirs.submit(coll, doc("b1", CAROL)) is True  # ... which theirs took
    assert await mine.submit(coll, doc("a2")) is True
    assert coll.positions() == {"a1": 1, "b1": 2, "a2": 3}
    assert coll.batches[-2:] == [["a2"], ["a2"]], "refused once, then written renumbered"


async def test_a_position_taken_in_the_middle_of_a_write_renumbers_the_rest() -> None:
    mine, coll = SequencedCommit(), FakeInbox()
    assert await mine.submit(coll, doc("a0")) is True
    # Another process commits position 3 between this write's 2 and 3.
    coll.intrude = (1, {**doc("b1", CAROL), "seq": 3})
    futures = [mine.submit(coll, doc(f"a{n}")) for n in (1, 2, 3)]
    assert await asyncio.gather(*futures) == [True, True, True]
    assert coll.positions() == {"a0": 1, "a1": 2, "b1": 3, "a2": 4, "a3": 5}
    assert coll.batches[-1] == ["a2", "a3"]


async def test_after_a_failed_write_the_next_position_is_read_again() -> None:
    # How far a failed write got is unknown; the next one must not trust its count.
    group, coll = SequencedCommit(), FakeInbox()
    assert await group.submit(coll, doc("m1")) is True
    coll.fail_with = AutoReconnect("connection closed")
    with pytest.raises(AutoReconnect):
        await group.submit(coll, doc("m2"))
    coll.fail_with = None
    coll.docs.append({**doc("elsewhere", CAROL), "seq": 5})
    assert await group.submit(coll, doc("m3")) is True
    assert coll.positions()["m3"] == 6


async def test_a_bulk_error_that_is_no_duplicate_fails_the_sequenced_batch() -> None:
    group, coll = SequencedCommit(), FakeInbox()
    coll.fail_with = BulkWriteError(
        {"writeErrors": [{"index": 1, "code": 121, "errmsg": "validation"}], "nInserted": 1}
    )
    futures = [group.submit(coll, doc("m1")), group.submit(coll, doc("m2"))]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(result, BulkWriteError) for result in results)


async def test_close_fails_sequenced_inserts_still_waiting() -> None:
    group, coll = SequencedCommit(), FakeInbox()
    coll.gate.clear()
    futures = [group.submit(coll, doc("m0"))]
    await in_flight(coll)
    futures.append(group.submit(coll, doc("m1")))
    await group.close()
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(result, PyMongoError) for result in results)


# --- sequenced commit on nx-27017 -------------------------------------------------------


@pytest.fixture
async def inboxes(nx: NxServer) -> AsyncIterator[list[AsyncCollection[Document]]]:
    """One inbox with Tidings' indexes, opened by two clients as two processes would."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    clients: list[AsyncMongoClient[Document]] = [
        AsyncMongoClient(nx.uri, tz_aware=True) for _ in range(2)
    ]
    try:
        colls = [client[name]["m_inbox"] for client in clients]
        # The unique position index is what refuses a position taken twice.
        await colls[0].create_indexes(MESSAGE_INDEXES)
        yield colls
        await clients[0].drop_database(name)
    finally:
        for client in clients:
            await client.close()


async def test_a_resend_in_the_middle_of_a_batch_on_a_server(
    inboxes: list[AsyncCollection[Document]],
) -> None:
    # The server's own BulkWriteError says where the ordered write stopped.
    coll = inboxes[0]
    group = SequencedCommit()
    try:
        assert await group.submit(coll, doc("m2")) is True
        futures = [group.submit(coll, doc(f"m{n}")) for n in (1, 2, 3)]
        assert await asyncio.gather(*futures) == [True, False, True]
    finally:
        await group.close()
    docs = await coll.find({}).sort("seq", 1).to_list()
    assert [(d["mid"], d["seq"]) for d in docs] == [("m2", 1), ("m1", 2), ("m3", 3)]


async def test_two_processes_never_share_a_position(
    inboxes: list[AsyncCollection[Document]],
) -> None:
    one, two = SequencedCommit(max_batch=7), SequencedCommit(max_batch=7)
    submitted: dict[str, list[str]] = {"a": [], "b": []}
    try:
        for round_ in range(6):
            futures = []
            # Interleaved: each writer's remembered next position goes stale
            # whenever the other one commits in between.
            for n in range(10):
                for label, group, coll in (("a", one, inboxes[0]), ("b", two, inboxes[1])):
                    mid = f"{label}{round_}-{n}"
                    submitted[label].append(mid)
                    futures.append(group.submit(coll, doc(mid, ALICE if label == "a" else CAROL)))
            assert await asyncio.gather(*futures) == [True] * len(futures)
    finally:
        await one.close()
        await two.close()

    docs = await inboxes[0].find({"k": INBOX}).sort("seq", 1).to_list()
    total = len(submitted["a"]) + len(submitted["b"])
    assert [d["seq"] for d in docs] == list(range(1, total + 1))
    # Each process's own documents are in the order it submitted them.
    for label in ("a", "b"):
        assert [d["mid"] for d in docs if d["mid"].startswith(label)] == submitted[label]
