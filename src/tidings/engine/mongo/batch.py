"""Group commit: concurrent inserts into one collection share one round trip.

Inbox documents also get their positions here, in commit order.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

from pymongo.errors import BulkWriteError, PyMongoError

from tidings.engine.mongo.documents import INBOX, Document

DUPLICATE_KEY = 11000

Entry = tuple[Document, "asyncio.Future[bool]"]


class Insertable(Protocol):
    """The part of a PyMongo async collection that group commit writes through."""

    @property
    def name(self) -> str: ...

    async def insert_many(self, documents: list[Document], *, ordered: bool) -> Any: ...

    async def find_one(self, filter: Document, *args: Any, **kwargs: Any) -> Document | None: ...


class GroupCommit:
    """Batches inserts per collection, in the order they were submitted.

    The first insert into an idle collection is written at once; inserts that
    arrive while it is on its way wait and then go together in one ordered
    ``insert_many``. No timer is involved, so a lone insert is not delayed, and
    under load the batches grow by themselves. A duplicate key fails only its
    own document, and the rest of the batch is written after it.
    """

    def __init__(self, max_batch: int = 500) -> None:
        self._max_batch = max_batch
        self._queues: dict[str, list[Entry]] = {}
        self._writers: dict[str, asyncio.Task[None]] = {}

    def submit(self, collection: Insertable, doc: Document) -> asyncio.Future[bool]:
        """Queue ``doc``; the future says ``False`` when its unique key is already taken.

        Queued at once, so documents submitted one after another are written in
        that order. Database errors come through the future as they are. A
        caller that stops waiting does not stop the write.
        """
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        # A caller that stopped waiting must not leave the outcome unretrieved.
        future.add_done_callback(_retrieve)
        self._queues.setdefault(collection.name, []).append((doc, future))
        if collection.name not in self._writers:
            self._writers[collection.name] = asyncio.create_task(
                self._write(collection), name=f"group-commit:{collection.name}"
            )
        return future

    async def close(self) -> None:
        """Stop every writer; inserts still waiting fail with a ``PyMongoError``."""
        writers = list(self._writers.values())
        for writer in writers:
            writer.cancel()
        for writer in writers:
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        # A writer cancelled before it started never ran its own clean-up.
        self._writers.clear()
        for queue in self._queues.values():
            _fail(queue, PyMongoError("the store is closing"))
        self._queues.clear()

    async def _write(self, collection: Insertable) -> None:
        name = collection.name
        try:
            while self._queues.get(name):
                queue = self._queues[name]
                batch, self._queues[name] = queue[: self._max_batch], queue[self._max_batch :]
                try:
                    await self._write_batch(collection, batch)
                except asyncio.CancelledError:
                    _fail(batch, PyMongoError("the store is closing"))
                    raise
                except Exception as exc:
                    _fail(batch, exc)
        finally:
            self._writers.pop(name, None)
            _fail(self._queues.pop(name, []), PyMongoError("the store is closing"))

    async def _write_batch(self, collection: Insertable, batch: list[Entry]) -> None:
        while batch:
            failed = await _insert(collection, batch)
            if failed is None:
                return
            _settle(batch[failed][1], False)
            batch = batch[failed + 1 :]  # An ordered write stopped there; go on after it.


class SequencedCommit(GroupCommit):
    """Group commit of inbox documents, each given the next position (``seq``) of its inbox.

    Positions must grow in the order documents are committed, also when several
    processes write to one inbox, or the backlog (sorted by position) and the
    change stream (in commit order) would disagree. A process therefore writes
    position ``n`` only after it has seen ``n - 1`` committed: its own previous
    write, or the highest position read from the inbox. The unique position
    index refuses a position another process took meanwhile; the writer then
    reads the highest position again and renumbers the rest of its batch. In
    the usual case (one process writes to an inbox) this costs no extra
    command at all: the next position is remembered between batches.
    """

    def __init__(self, max_batch: int = 500) -> None:
        super().__init__(max_batch)
        self._next: dict[str, int] = {}

    async def _write_batch(self, collection: Insertable, batch: list[Entry]) -> None:
        name = collection.name
        while batch:
            if name not in self._next:
                self._next[name] = await next_position(collection)
            first = self._next[name]
            for offset, (doc, _) in enumerate(batch):
                doc["seq"] = first + offset
            try:
                failed = await _insert(collection, batch)
            except BaseException:
                self._next.pop(name, None)  # Unknown how far the write got: ask again.
                raise
            if failed is None:
                self._next[name] = first + len(batch)
                return
            self._next[name] = first + failed
            doc, future = batch[failed]
            if await collection.find_one({"k": INBOX, "mid": doc["mid"], "from": doc["from"]}):
                _settle(future, False)  # A resend: its position is free for the next one.
                batch = batch[failed + 1 :]
            else:
                del self._next[name]  # Another process took the position.
                batch = batch[failed:]


async def next_position(collection: Insertable) -> int:
    """The position after the highest one in ``collection``'s inbox."""
    # ``seq`` exists only on inbox documents; the unique index serves the sort.
    last = await collection.find_one(
        {"seq": {"$gte": 0}}, projection={"seq": True, "_id": False}, sort=[("seq", -1)]
    )
    return int(last["seq"]) + 1 if last else 1


async def _insert(collection: Insertable, batch: list[Entry]) -> int | None:
    """Write ``batch`` in order; the index of a duplicate it stopped at, or ``None``.

    Entries before the duplicate are settled as written, the duplicate is not.
    """
    try:
        await collection.insert_many([doc for doc, _ in batch], ordered=True)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors") or []
        first = errors[0] if errors else None
        if first is None or first.get("code") != DUPLICATE_KEY:
            raise
        failed = int(first["index"])
        for _, future in batch[:failed]:
            _settle(future, True)
        return failed
    for _, future in batch:
        _settle(future, True)
    return None


def _retrieve(future: asyncio.Future[bool]) -> None:
    if not future.cancelled():
        future.exception()


def _settle(future: asyncio.Future[bool], inserted: bool) -> None:
    if not future.done():
        future.set_result(inserted)


def _fail(batch: list[Entry], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
