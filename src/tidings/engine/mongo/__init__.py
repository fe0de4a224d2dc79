"""The MongoDB engine: ``MongoStore``, the change-stream feed and shared presence."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pymongo import AsyncMongoClient

from tidings.config import Settings
from tidings.engine.base import Engine
from tidings.engine.mongo.documents import Document
from tidings.engine.mongo.errors import mapped
from tidings.engine.mongo.feed import MongoChangeFeed
from tidings.engine.mongo.presence import MongoPresence
from tidings.engine.mongo.store import MongoStore

__all__ = ["MongoChangeFeed", "MongoPresence", "MongoStore", "open_mongo"]

log = logging.getLogger("tidings.engine")


@asynccontextmanager
async def open_mongo(settings: Settings) -> AsyncIterator[Engine]:
    """The MongoDB engine the settings name, connected for the lifetime of the context."""
    assert settings.mongodb_uri, "Settings refuses an empty TIDINGS_MONGODB_URI"
    budget_ms = int(settings.mongodb_timeout * 1000)
    client: AsyncMongoClient[Document] = AsyncMongoClient(
        settings.mongodb_uri,
        tz_aware=True,
        appname="tidings",
        # Every operation, retries included, ends within the budget (the
        # driver's client-side operation timeout): a slow or frozen database
        # fails requests instead of hanging them.
        timeoutMS=budget_ms,
        serverSelectionTimeoutMS=budget_ms,
    )
    try:
        db = client[settings.database]
        presence = MongoPresence(db["presence"])
        with mapped():
            await presence.start()
        feed = MongoChangeFeed(db, db.get_collection, settings.change_stream_scope)
        yield Engine("mongodb", MongoStore(db, settings.retention), feed, presence)
    finally:
        # Closing ends the server sessions with a command that a frozen
        # database never answers, and no operation budget covers it: bound it
        # here, so that a drain is not held to its deadline by it.
        try:
            await asyncio.wait_for(client.close(), settings.mongodb_timeout)
        except TimeoutError:
            log.warning("database_close_timed_out", extra={"seconds": settings.mongodb_timeout})
