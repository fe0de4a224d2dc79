"""Users: the record each e-mail gets the first time it identifies."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from tidings.models import User, collection_for, utcnow


class Users:
    """User records, keyed by normalised e-mail."""

    def __init__(self, records: AsyncCollection[dict[str, Any]]) -> None:
        self._records = records

    async def ensure(self, email: str) -> User:
        """The record for ``email``, created if this is its first identification."""
        fresh = {
            "id": uuid.uuid4().hex,
            "email": email,
            "name": email.partition("@")[0],
            "collection": collection_for(email),
            "created_at": utcnow(),
        }
        # DuplicateKeyError: two first identifications raced and the other one won.
        with contextlib.suppress(DuplicateKeyError):
            await self._records.update_one({"_id": email}, {"$setOnInsert": fresh}, upsert=True)
        user = await self.find(email)
        assert user is not None, "the user record was just written"
        return user

    async def find(self, email: str) -> User | None:
        """The record for ``email``, or ``None``."""
        doc = await self._records.find_one({"_id": email})
        if doc is None:
            return None
        return User(
            id=doc["id"], email=doc["email"], name=doc["name"], collection=doc["collection"]
        )
