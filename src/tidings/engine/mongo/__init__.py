"""The MongoDB engine: ``MongoStore``, the change-stream feed and shared presence."""

from __future__ import annotations

import asyncio
import logging
import re
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from tidings.config import Settings
from tidings.engine.base import Engine
from tidings.engine.mongo.documents import Document
from tidings.engine.mongo.errors import mapped
from tidings.engine.mongo.feed import MongoChangeFeed
from tidings.engine.mongo.presence import MongoPresence
from tidings.engine.mongo.store import MongoStore
from tidings.errors import ConfigError, StoreUnavailable

__all__ = ["MongoChangeFeed", "MongoPresence", "MongoStore", "check_uri", "open_mongo"]

log = logging.getLogger("tidings.engine")

_USERINFO = re.compile(r"//[^@/]*@")


def redacted(uri: str) -> str:
    """``uri`` without its user name and password, fit for a log line."""
    return _USERINFO.sub("//***@", uri)


def check_uri(uri: str) -> None:
    """Raise ``ConfigError`` unless the driver accepts ``uri``; nothing is connected."""
    try:
        # The asynchronous client connects, and resolves mongodb+srv names, on
        # its first operation only: making one checks the URI and its options.
        # An option it cannot use it would only warn about, and ignore.
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            AsyncMongoClient(uri, connect=False)
    except (PyMongoError, ValueError, UserWarning) as exc:  # the parser raises ValueError too
        raise ConfigError(f"TIDINGS_MONGODB_URI is not a MongoDB URI: {exc}") from None


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

        async def prepare() -> None:
            try:
                with mapped():
                    await presence.start()
            except StoreUnavailable as exc:
                raise StoreUnavailable(
                    f"cannot reach {redacted(settings.mongodb_uri or '')}: {exc}; check "
                    "TIDINGS_MONGODB_URI and that the database answers"
                ) from exc

        feed = MongoChangeFeed(db, db.get_collection, settings.change_stream_scope)
        store = MongoStore(db, settings.retention)
        yield Engine("mongodb", store, feed, presence, prepare)
    finally:
        # Closing ends the server sessions with a command that a frozen
        # database never answers, and no operation budget covers it: bound it
        # here, so that a drain is not held to its deadline by it.
        try:
            await asyncio.wait_for(client.close(), settings.mongodb_timeout)
        except TimeoutError:
            log.warning("database_close_timed_out", extra={"seconds": settings.mongodb_timeout})
