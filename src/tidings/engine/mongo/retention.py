"""Retention on MongoDB: a TTL index on the moment a message was finished.

An inbox document and its receipt get ``done`` (a BSON date) when the
message reaches ``delivered`` or ``read``, and only then, whatever the
setting: a TTL index on ``done`` with ``expireAfterSeconds`` = the retention
deletes both once that much time has passed. A document without ``done``
never expires, so a message not yet delivered is never deleted, and neither
are documents finished by a release that did not write the field. The index
is made in each collection with the others (``schema.prepare``), once per
process and collection.

A changed retention is applied with ``collMod``, which changes the index in
place: dropping and re-creating it would rebuild it over every document and
leave a moment without it. An unset retention drops the index. Processes
that disagree (a rolling change of the setting) only change how long
finished messages are kept, never whether an owed one is: each collection
keeps the value of the process that last opened it, until it is opened again.
"""

from __future__ import annotations

import math
from typing import Any

from pymongo import ASCENDING, IndexModel, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import OperationFailure

from tidings.engine.mongo.compat import retime_ttl
from tidings.engine.mongo.documents import RECEIPT, Document, moved_at
from tidings.states import FINISHED, MessageState

# Set to when a message reached delivered or read; the TTL index reads it.
DONE = "done"
RETENTION_INDEX = "retention"
# MongoDB's answers to an index that exists with the same name or key and other options.
_INDEX_CONFLICTS = (85, 86)
_INDEX_NOT_FOUND = 27
_FINISHED = sorted(state.value for state in FINISHED)


def ttl_seconds(retention: float) -> int:
    """``expireAfterSeconds`` for a retention: whole seconds, rounded up (never early)."""
    return max(1, math.ceil(retention))


def retention_index(retention: float) -> IndexModel:
    """The TTL index that deletes finished messages ``retention`` seconds after ``done``."""
    return IndexModel(
        [(DONE, ASCENDING)], name=RETENTION_INDEX, expireAfterSeconds=ttl_seconds(retention)
    )


async def apply_retention(coll: AsyncCollection[Any], retention: float | None) -> None:
    """Make ``coll``'s retention index say ``retention``; drop it when that is ``None``."""
    if retention is None:
        for name in await _indexes_on_done(coll):
            try:
                await coll.drop_index(name)
            except OperationFailure as exc:
                if exc.code != _INDEX_NOT_FOUND:  # another process dropped it first
                    raise
        return
    index = retention_index(retention)
    try:
        await coll.create_indexes([index])
    except OperationFailure as exc:
        if exc.code not in _INDEX_CONFLICTS:
            raise
        for name in await _indexes_on_done(coll):
            await retime_ttl(coll, name, index, ttl_seconds(retention))


async def _indexes_on_done(coll: AsyncCollection[Any]) -> list[str]:
    """The names of the indexes on ``done`` alone (nx-27017 names indexes its own way)."""
    indexes = await coll.index_information()
    return [name for name, info in indexes.items() if list(info["key"]) == [(DONE, 1)]]


def reclaim(receipt: Document) -> UpdateOne:
    """Turn a finished receipt into ``receipt``, ``stored``: its id names a new message now.

    For a resend whose earlier message had left the inbox with its retention
    while its receipt, in the sender's collection, was still there.
    """
    now = receipt["sent_at"]
    fields = {key: value for key, value in receipt.items() if key != "_id"}
    stored = MessageState.STORED.value
    return UpdateOne(
        {"k": RECEIPT, "mid": receipt["mid"], "from": receipt["from"], "state": {"$in": _FINISHED}},
        {
            "$set": {**fields, "state": stored, "at": {stored: now}, "moved": moved_at(now)},
            "$unset": {DONE: ""},
        },
    )
