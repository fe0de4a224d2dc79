"""``create_app``: builds the ASGI app and owns its resources for its lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

from mongomock_motor import AsyncMongoMockClient
from pymongo import AsyncMongoClient
from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute

from tidings.auth import build_authenticator
from tidings.changestream import MongoChangeFeed
from tidings.config import Settings
from tidings.endpoint import TidingsEndpoint
from tidings.feed import ChangeFeed, MemoryFeed
from tidings.handlers import Handlers
from tidings.health import healthz, readyz
from tidings.hub import Hub
from tidings.presence import PRESENCE_TTL
from tidings.services import Services
from tidings.store import Document, MongoStore

log = logging.getLogger("tidings.app")


def create_app(settings: Settings | None = None) -> Starlette:
    """The Tidings ASGI app. Nothing is connected until its lifespan starts."""
    settings = settings or Settings()
    authenticator = build_authenticator(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with _backend(settings) as (store, feed):
            await store.start()
            hub = Hub(feed)
            services = Services(
                settings=settings,
                store=store,
                feed=feed,
                hub=hub,
                handlers=Handlers(store, settings.max_content_chars),
                authenticator=authenticator,
            )
            app.state.services = services
            tasks = [
                asyncio.create_task(feed.run(hub.dispatch), name="change-feed"),
                asyncio.create_task(_keep_presence(services), name="presence"),
            ]
            log.info("started", extra={"store": "embedded" if settings.embedded else "mongodb"})
            try:
                yield
            finally:
                services.draining = True
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await store.close()
                log.info("stopped")

    return Starlette(
        routes=[
            WebSocketRoute("/ws", TidingsEndpoint),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
        ],
        lifespan=lifespan,
    )


@asynccontextmanager
async def _backend(settings: Settings) -> AsyncIterator[tuple[MongoStore, ChangeFeed]]:
    """The store and feed the settings ask for, open for the app's lifetime."""
    if settings.mongodb_uri is None:
        log.warning(
            "embedded_store",
            extra={
                "detail": "TIDINGS_MONGODB_URI is not set: messages live in memory and are "
                "LOST when the process exits. Set it for anything but a trial."
            },
        )
        memory = MemoryFeed()
        # mongomock-motor mirrors the collection API of PyMongo's AsyncDatabase,
        # which is all MongoStore uses.
        mock = cast("AsyncMongoClient[Document]", AsyncMongoMockClient(tz_aware=True))
        yield MongoStore(mock[settings.database], on_change=memory.publish), memory
        return
    client: AsyncMongoClient[Document] = AsyncMongoClient(
        settings.mongodb_uri,
        tz_aware=True,
        appname="tidings",
        serverSelectionTimeoutMS=int(settings.mongodb_timeout * 1000),
    )
    try:
        db = client[settings.database]
        feed = MongoChangeFeed(db, db.get_collection, settings.change_stream_scope)
        yield MongoStore(db), feed
    finally:
        await client.close()


async def _keep_presence(services: Services) -> None:
    """Refresh this process's presence records well before they expire."""
    while not services.draining:
        await asyncio.sleep(PRESENCE_TTL.total_seconds() / 3)
        try:
            await services.store.refresh_presence(services.hub.online())
        except Exception:
            log.exception("presence_refresh_failed")
