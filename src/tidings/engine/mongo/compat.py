"""Where nx-27017 (the MongoDB wire-protocol server on SQLite the tests run on) differs.

Tidings is written to MongoDB's documented behaviour. Each difference of the
stand-in that the code has to allow for is handled here, and only here:

- change-stream documents come in NeoSQLite's JSON encoding instead of BSON
  (``typed``);
- a datetime written with ``$set`` comes back as an ISO string (``as_datetime``),
  and range queries on it compare wrongly (receipts keep ``moved`` as a number,
  ``documents.moved_at``);
- it sends no ``updateDescription`` with update events; its ``fullDocument`` is
  the document as that write left it (see ``documents.event_of``);
- it cannot watch a database, only collections (the tests run it in
  ``collection`` scope);
- it answers an idle ``getMore`` at once instead of waiting ``maxAwaitTimeMS``
  (the change-stream feed pauses between empty batches);
- it closes a change stream's cursor when the connection that opened it closes,
  which MongoDB does only after an invalidate (the feed resumes such a stream);
- it names indexes its own way (``idx_<collection>_<fields>``), replaces an
  index whose options differ when asked to create it, which MongoDB refuses
  (error 85), and answers ``collMod`` without changing the index
  (``retime_ttl``). Its TTL monitor deletes expired documents as MongoDB's does,
  and it keeps no ``partialFilterExpression`` (the retention index needs none).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from pymongo import IndexModel
from pymongo.asynchronous.collection import AsyncCollection


def typed(value: Any) -> Any:
    """Undo nx-27017's encoding of a change-stream document; a no-op on MongoDB's BSON.

    nx-27017 sends ObjectIds as ``{"__neosqlite_objectid__": true, "id": HEX}``
    and dates as ``{"$date": ISO}``.
    """
    if isinstance(value, dict):
        if value.get("__neosqlite_objectid__") is True:
            return ObjectId(value["id"])
        if set(value) == {"$date"} and isinstance(value["$date"], str):
            return datetime.fromisoformat(value["$date"])
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return value


def as_datetime(value: datetime | str) -> datetime:
    """A stored timestamp as an aware datetime (nx-27017 turns ``$set`` datetimes into strings).

    Those strings carry no offset; the time in them is UTC, as in every BSON date.
    """
    if isinstance(value, datetime):
        return value
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def retime_ttl(
    coll: AsyncCollection[Any], name: str, index: IndexModel, seconds: int
) -> None:
    """Change the ``expireAfterSeconds`` of ``coll``'s TTL index ``name`` in place.

    ``collMod`` is what does it on MongoDB; the index created afterwards is then
    the same one and nothing happens. nx-27017 ignores ``collMod``'s index
    options, and the create is what replaces its index.
    """
    await coll.database.command(
        {"collMod": coll.name, "index": {"name": name, "expireAfterSeconds": seconds}}
    )
    await coll.create_indexes([index])
