"""Schema versions and the migration between them.

A collection's documents are laid out as ``documents`` says, schema version
2 (``SCHEMA``). A collection written by Tidings 0.1 holds version 1 inbox
documents, without a ``seq``; ``prepare`` numbers them in the order of their
ObjectIds, which is the order 0.1 delivered them in, drops 0.1's backlog
index and leaves a marker, so that the work is done once a collection and
costs one look-up per collection and process afterwards.
"""

from __future__ import annotations

import contextlib

from pymongo import ASCENDING, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, OperationFailure

from tidings.engine.mongo.batch import next_position
from tidings.engine.mongo.documents import INBOX, MESSAGE_INDEXES, SCHEMA, Document
from tidings.engine.mongo.retention import apply_retention

# The ``_id`` of the document that marks a collection whose inbox documents all have a ``seq``.
SCHEMA_MARKER = "schema"
# Schema 1's backlog index, which sorted by ``_id``; nothing reads it any more.
SCHEMA_1_BACKLOG_INDEX = "backlog"


async def prepare(coll: AsyncCollection[Document], retention: float | None = None) -> None:
    """Number the schema 1 inbox documents of ``coll`` and make its indexes.

    ``retention``: seconds finished messages are kept; ``None`` keeps them all.
    """
    if await coll.find_one({"_id": SCHEMA_MARKER}) is None:
        await number_schema_1(coll)
        with contextlib.suppress(OperationFailure):
            await coll.drop_index(SCHEMA_1_BACKLOG_INDEX)
        await coll.create_indexes(MESSAGE_INDEXES)
        await coll.update_one({"_id": SCHEMA_MARKER}, {"$set": {"v": SCHEMA}}, upsert=True)
    else:
        await coll.create_indexes(MESSAGE_INDEXES)
    await apply_retention(coll, retention)


async def number_schema_1(coll: AsyncCollection[Document]) -> None:
    """Give inbox documents without a position the next ones, in ObjectId order.

    Another process doing the same at once may take a position first; its
    write wins, ours stops there, and what is left is numbered on a later read.
    """
    old = coll.find({"k": INBOX, "seq": {"$exists": False}}).sort("_id", ASCENDING)
    ids = [doc["_id"] async for doc in old]
    if not ids:
        return
    first = await next_position(coll)
    updates = [
        UpdateOne(
            {"_id": oid, "seq": {"$exists": False}}, {"$set": {"seq": first + n, "v": SCHEMA}}
        )
        for n, oid in enumerate(ids)
    ]
    with contextlib.suppress(BulkWriteError):
        await coll.bulk_write(updates, ordered=True)
