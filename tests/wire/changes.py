"""Change streams: the oplog every write appends to, and the cursors that read it.

A write gets the next cluster time, ``Timestamp(epoch, n)`` with ``n``
counting from 1; its resume token names that position (``_data`` is hex, as
MongoDB's is, and means nothing to the driver). A cursor stands *after* a
position, so an event's token and a high-water mark at the same position
resume at the same place. The oplog keeps everything from ``oldest`` on;
``forget()`` moves ``oldest`` past now, and every token before it, a live
cursor's position included, is then history lost (286), as when MongoDB's
oplog rolls over.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bson import Int64, Timestamp
from mongomock import filtering

from tests.wire.errors import CommandError

# Operations that end a stream: after them comes an invalidate (see ``_ends``).
_DROPS = frozenset({"drop", "rename"})
_DEFAULT_AWAIT_MS = 1000
_DEFAULT_BATCH = 101
# mongomock's query engine, typed: what evaluates a stream's $match against an event.
_applies: Callable[[Mapping[str, Any], Mapping[str, Any]], bool] = filtering.filter_applies


@dataclass(frozen=True)
class Entry:
    """One write, as the oplog keeps it: enough to build its change event."""

    n: int
    db: str
    coll: str | None  # None for dropDatabase
    operation: str
    key: Any = None  # the document's _id
    doc: Mapping[str, Any] | None = None  # insert and replace: the document written
    updated: Mapping[str, Any] | None = None
    removed: tuple[str, ...] = ()
    to: Mapping[str, str] | None = None  # rename: the new namespace
    wall: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass
class Cursor:
    """A change-stream cursor, which stands after ``position`` in the oplog."""

    id: int
    db: str
    coll: str | None  # None: the whole database
    position: int
    stages: list[Mapping[str, Any]]
    full_document: str
    batch_size: int = _DEFAULT_BATCH
    invalidated: bool = False  # after its invalidate, a cursor is gone

    @property
    def ns(self) -> str:
        """The namespace its batches name."""
        return f"{self.db}.{self.coll or '$cmd.aggregate'}"


class Oplog:
    """The history of writes, and the change-stream cursors open on it."""

    def __init__(self, lookup: Callable[[str, str, Any], Mapping[str, Any] | None]) -> None:
        # Where updateLookup finds a document's current version.
        self._lookup = lookup
        self.epoch = int(time.time())
        self.entries: list[Entry] = []
        self.end = 0  # the last position written
        self.oldest = 0  # the earliest position a stream may resume after
        self.cursors: dict[int, Cursor] = {}
        self._ids = itertools.count(1 << 40)
        # Set and replaced on every change: whoever waits checks its condition again.
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ writing

    def now(self) -> Timestamp:
        """The cluster time of the last write (what replies carry as ``operationTime``)."""
        return Timestamp(self.epoch, self.end)

    def append(self, db: str, coll: str | None, operation: str, **fields: Any) -> None:
        """Record a write at the next cluster time; parked getMores see it."""
        self.end += 1
        self.entries.append(Entry(self.end, db, coll, operation, **fields))
        self.notify()

    def forget(self) -> None:
        """Lose every position before now, as an oplog that rolled over.

        MongoDB's oplog is never empty; the no-op written here keeps the end
        past the last position a stream stands at, so that position is lost too.
        """
        self.end += 1
        self.oldest = self.end
        self.entries = [e for e in self.entries if e.n >= self.oldest]
        self.notify()

    def notify(self) -> None:
        """Wake every waiter, so that each checks its own condition again."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, predicate: Callable[[], bool], within: float) -> bool:
        """Wait until ``predicate`` holds, or ``within`` seconds pass; whether it holds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while not predicate():
                    await self._changed.wait()
        return predicate()

    # ------------------------------------------------------------------ opening

    def open(self, db: str, coll: str | None, spec: Mapping[str, Any], stages: list[Any]) -> Cursor:
        """A cursor for ``$changeStream`` options ``spec``, followed by ``stages``."""
        for stage in stages:
            if list(stage) != ["$match"]:
                raise CommandError(2, f"the fake applies only $match, not {list(stage)}")
        position = self._start(spec)
        if position < self.oldest:
            raise CommandError(286, "the resume point may no longer be in the oplog")
        cursor = Cursor(
            next(self._ids), db, coll, position, stages, spec.get("fullDocument", "default")
        )
        self.cursors[cursor.id] = cursor
        return cursor

    def _start(self, spec: Mapping[str, Any]) -> int:
        if "resumeAfter" in spec or "startAfter" in spec:
            token = spec.get("startAfter") or spec["resumeAfter"]
            position, invalidate = parse_token(token)
            if invalidate and "startAfter" not in spec:
                raise CommandError(
                    260, "cannot resume a change stream after an invalidate; use startAfter"
                )
            return position
        at = spec.get("startAtOperationTime")
        if isinstance(at, Timestamp):
            if at.time != self.epoch:
                return -1 if at.time < self.epoch else self.end
            return at.inc - 1  # startAtOperationTime includes the write at that time
        return self.end

    # ------------------------------------------------------------------ reading

    def batch(self, cursor: Cursor) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """The next events for ``cursor``, and the batch's postBatchResumeToken.

        The token is the last event's when the batch is full or ends with an
        invalidate, otherwise the high-water mark: the end of the oplog, past
        the events the pipeline filtered out.
        """
        if cursor.position < self.oldest:
            raise CommandError(286, "the resume point may no longer be in the oplog")
        events: list[dict[str, Any]] = []
        for entry in self.entries:
            if entry.n <= cursor.position or not self._sees(cursor, entry):
                continue
            for event in self._events(cursor, entry):
                if all(_applies(stage["$match"], event) for stage in cursor.stages):
                    events.append(event)
            cursor.position = entry.n
            if cursor.invalidated:
                return events, events[-1]["_id"]
            if len(events) >= cursor.batch_size:
                return events, events[-1]["_id"]
        cursor.position = self.end
        return events, token(self.epoch, self.end)

    def _sees(self, cursor: Cursor, entry: Entry) -> bool:
        if entry.db != cursor.db:
            return False
        # System collections never show in a stream; a whole database's end does.
        if entry.coll is not None and entry.coll.startswith("system."):
            return False
        return cursor.coll is None or entry.coll in (cursor.coll, None)

    def _events(self, cursor: Cursor, entry: Entry) -> list[dict[str, Any]]:
        """The change events ``entry`` makes for ``cursor``: itself, then any invalidate.

        A collection's stream ends with its drop or rename, and with its
        database's; a database's stream only with the database's drop.
        """
        if cursor.coll is not None and entry.operation == "dropDatabase":
            return [self._event(cursor, entry, "drop"), self._invalidate(cursor, entry)]
        events = [self._event(cursor, entry, entry.operation)]
        ends = entry.operation == "dropDatabase" or (
            cursor.coll is not None and entry.operation in _DROPS
        )
        if ends:
            events.append(self._invalidate(cursor, entry))
        return events

    def _event(self, cursor: Cursor, entry: Entry, operation: str) -> dict[str, Any]:
        event: dict[str, Any] = {
            "_id": token(self.epoch, entry.n),
            "operationType": operation,
            "clusterTime": Timestamp(self.epoch, entry.n),
            "wallTime": entry.wall,
        }
        coll = entry.coll or (cursor.coll if operation == "drop" else None)
        event["ns"] = {"db": entry.db, "coll": coll} if coll else {"db": entry.db}
        if entry.operation in ("insert", "replace"):
            event["fullDocument"] = dict(entry.doc or {})
        elif entry.operation == "update" and cursor.full_document in (
            "updateLookup",
            "whenAvailable",
            "required",
        ):
            # The document as it is when the event is read, not as this write left it.
            assert entry.coll is not None
            event["fullDocument"] = self._lookup(entry.db, entry.coll, entry.key)
        if entry.key is not None:
            event["documentKey"] = {"_id": entry.key}
        if entry.operation == "update":
            event["updateDescription"] = {
                "updatedFields": dict(entry.updated or {}),
                "removedFields": list(entry.removed),
                "truncatedArrays": [],
            }
        if entry.to is not None:
            event["to"] = dict(entry.to)
        return event

    def _invalidate(self, cursor: Cursor, entry: Entry) -> dict[str, Any]:
        cursor.invalidated = True
        return {
            "_id": token(self.epoch, entry.n, invalidate=True),
            "operationType": "invalidate",
            "clusterTime": Timestamp(self.epoch, entry.n),
            "wallTime": entry.wall,
        }

    def reply(
        self, cursor: Cursor, events: list[dict[str, Any]], pbrt: Mapping[str, Any], first: bool
    ) -> dict[str, Any]:
        """A cursor reply; a cursor that sent its invalidate is closed (id 0)."""
        if cursor.invalidated:
            self.cursors.pop(cursor.id, None)
        return {
            "cursor": {
                "firstBatch" if first else "nextBatch": events,
                "postBatchResumeToken": dict(pbrt),
                "id": Int64(0 if cursor.invalidated else cursor.id),
                "ns": cursor.ns,
            },
            "ok": 1.0,
        }

    @staticmethod
    def await_ms(command: Mapping[str, Any]) -> int:
        """How long a getMore may wait for events (PyMongo sends maxAwaitTimeMS as maxTimeMS)."""
        return int(command.get("maxTimeMS") or _DEFAULT_AWAIT_MS)


def token(epoch: int, n: int, *, invalidate: bool = False) -> dict[str, str]:
    """The resume token of position ``n``; an invalidate's token is a different one."""
    return {"_data": f"82{epoch:08X}{n:08X}{'01' if invalidate else '00'}"}


def parse_token(resume_token: Any) -> tuple[int, bool]:
    """The position a token names, and whether it is an invalidate's."""
    data = resume_token.get("_data") if isinstance(resume_token, Mapping) else None
    if not isinstance(data, str) or len(data) != 20 or not data.startswith("82"):
        raise CommandError(260, f"not a resume token of this server: {resume_token!r}")
    try:
        return int(data[10:18], 16), data[18:] == "01"
    except ValueError:
        raise CommandError(260, f"not a resume token of this server: {resume_token!r}") from None
