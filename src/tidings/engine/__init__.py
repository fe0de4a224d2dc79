"""Storage engines behind one seam (``base``): ``memory`` and ``mongo``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext

from tidings.config import Settings
from tidings.engine.base import Engine, Feed, FeedHealth, Presence, Sink, Store
from tidings.engine.memory import memory_engine
from tidings.engine.mongo import check_uri, open_mongo

__all__ = ["Engine", "Feed", "FeedHealth", "Presence", "Sink", "Store", "check", "open_engine"]

log = logging.getLogger("tidings.engine")


def check(settings: Settings) -> None:
    """Raise ``ConfigError`` if the engine the settings name could never open.

    Called before anything runs, so that ``tidings serve`` refuses to start in
    one line instead of failing its start-up with a traceback.
    """
    if settings.mongodb_uri is not None:
        check_uri(settings.mongodb_uri)


@asynccontextmanager
async def open_engine(settings: Settings) -> AsyncIterator[Engine]:
    """The engine the settings ask for, open for the lifetime of the context."""
    opened: AbstractAsyncContextManager[Engine]
    if settings.embedded:
        log.warning(
            "embedded_store",
            extra={
                "detail": "TIDINGS_MONGODB_URI is not set: messages live in memory and are "
                "LOST when the process exits. Set it for anything but a trial."
            },
        )
        opened = nullcontext(memory_engine(settings.retention))
    else:
        opened = open_mongo(settings)
    async with opened as engine:
        await engine.store.start()
        try:
            yield engine
        finally:
            await engine.store.close()
