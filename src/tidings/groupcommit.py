"""Group commit: concurrent inserts into one collection share one round trip."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

from pymongo.errors import BulkWriteError, PyMongoError

DUPLICATE_KEY = 11000

Document = dict[str, Any]


class Insertable(Protocol):
    """The part of a PyMongo async collection that group commit writes through."""

    @property
    def name(self) -> str: ...

    async def insert_many(self, documents: list[Document], *, ordered: bool) -> Any: ...


class GroupCommit:
    """Batches inserts per collection, in the order they were asked for.

    The first insert into an idle collection is written at once; inserts that
    arrive while it is on its way wait and then go together in one
    ``insert_many``. No timer is involved, so a lone insert is not delayed, and
    under load the batches grow by themselves. Writes are ordered, so documents
    are committed in the order they were queued; a duplicate key fails only
    its own document, and the rest of the batch is written after it.
    """

    def __init__(self, max_batch: int = 500) -> None:
        self._max_batch = max_batch
        self._queues: dict[str, list[tuple[Document, asyncio.Future[bool]]]] = {}
        self._writers: dict[str, asyncio.Task[None]] = {}

    async def insert(self, collection: Insertable, doc: Document) -> bool:
        """Insert ``doc``; ``False`` when its unique key is already taken.

        Database errors are raised as they are. A caller that stops waiting
        does not stop the write: the document may still be committed.
        """
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        # A caller that stopped waiting must not leave the outcome unretrieved.
        future.add_done_callback(_retrieve)
        self._queues.setdefault(collection.name, []).append((doc, future))
        if collection.name not in self._writers:
            self._writers[collection.name] = asyncio.create_task(
                self._write(collection), name=f"group-commit:{collection.name}"
            )
        return await asyncio.shield(future)

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
                await self._write_batch(collection, batch)
        finally:
            self._writers.pop(name, None)
            _fail(self._queues.pop(name, []), PyMongoError("the store is closing"))

    async def _write_batch(
        self, collection: Insertable, batch: list[tuple[Document, asyncio.Future[bool]]]
    ) -> None:
        while batch:
            try:
                await collection.insert_many([doc for doc, _ in batch], ordered=True)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors") or []
                first = errors[0] if errors else None
                if first is None or first.get("code") != DUPLICATE_KEY:
                    _fail(batch, exc)
                    return
                failed = int(first["index"])
                for _, future in batch[:failed]:
                    _settle(future, True)
                _settle(batch[failed][1], False)
                batch = batch[failed + 1 :]  # An ordered write stopped here; go on.
                continue
            except asyncio.CancelledError:
                _fail(batch, PyMongoError("the store is closing"))
                raise
            except Exception as exc:
                _fail(batch, exc)
                return
            for _, future in batch:
                _settle(future, True)
            return


def _retrieve(future: asyncio.Future[bool]) -> None:
    if not future.cancelled():
        future.exception()


def _settle(future: asyncio.Future[bool], inserted: bool) -> None:
    if not future.done():
        future.set_result(inserted)


def _fail(batch: list[tuple[Document, asyncio.Future[bool]]], exc: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
