"""Presence: which users have a connection on some process, shared through MongoDB."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection

from tidings.engine.mongo.errors import guarded
from tidings.models import utcnow

# A process refreshes its users' records well within this; a crashed
# process's users go offline once it passes.
PRESENCE_TTL = timedelta(seconds=60)


class MongoPresence:
    """One record per user and process that holds a connection of theirs, with an expiry.

    The records carry their own expiry time, so that a record past it counts as
    offline at once; the TTL index only removes it later.
    """

    def __init__(self, records: AsyncCollection[dict[str, Any]]) -> None:
        self._records = records
        self._process = uuid.uuid4().hex

    @property
    def refresh_interval(self) -> float:
        """A third of the records' lifetime: two refreshes may fail before a user looks offline."""
        return PRESENCE_TTL.total_seconds() / 3

    async def start(self) -> None:
        """Create the indexes: expiry (TTL) and look-up by e-mail."""
        await self._records.create_indexes(
            [
                IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0, name="expiry"),
                IndexModel([("email", ASCENDING), ("expires_at", ASCENDING)], name="email"),
            ]
        )

    @guarded
    async def is_online(self, email: str) -> bool:
        """Whether any process holds a connection of ``email``."""
        live = {"email": email, "expires_at": {"$gt": utcnow()}}
        return await self._records.find_one(live) is not None

    @guarded
    async def set(self, email: str, online: bool) -> None:
        """Record that this process does or no longer holds a connection of ``email``."""
        if online:
            await self._records.update_one(
                self._key(email), {"$set": self._fields(email)}, upsert=True
            )
        else:
            await self._records.delete_one(self._key(email))

    @guarded
    async def refresh(self, emails: Sequence[str]) -> None:
        """Keep this process's records alive, creating any that a failed write left out."""
        if not emails:
            return
        await self._records.update_many(
            {"process": self._process, "email": {"$in": list(emails)}},
            {"$set": {"expires_at": utcnow() + PRESENCE_TTL}},
        )
        present = set(await self._records.distinct("email", {"process": self._process}))
        for email in set(emails) - present:
            await self.set(email, True)

    def _key(self, email: str) -> dict[str, str]:
        return {"_id": f"{self._process}/{email}"}

    def _fields(self, email: str) -> dict[str, Any]:
        return {"email": email, "process": self._process, "expires_at": utcnow() + PRESENCE_TTL}
