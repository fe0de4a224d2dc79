"""``create_app``: builds the ASGI app and owns its resources for its lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute

from tidings.auth import build_authenticator
from tidings.config import Settings
from tidings.endpoint import TidingsEndpoint
from tidings.engine import open_engine
from tidings.engine.mongo.presence import PRESENCE_TTL
from tidings.handlers import Handlers
from tidings.health import healthz, readyz
from tidings.hub import Hub
from tidings.recorder import Recorder
from tidings.services import Services

log = logging.getLogger("tidings.app")


def create_app(settings: Settings | None = None) -> Starlette:
    """The Tidings ASGI app. Nothing is connected until its lifespan starts."""
    settings = settings or Settings()
    authenticator = build_authenticator(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_engine(settings) as engine:
            hub = Hub(engine.feed)
            recorder = Recorder(engine.store)
            services = Services(
                settings=settings,
                engine=engine,
                hub=hub,
                recorder=recorder,
                handlers=Handlers(
                    engine.store, engine.presence, recorder, settings.max_content_chars
                ),
                authenticator=authenticator,
            )
            app.state.services = services
            tasks = [
                asyncio.create_task(engine.feed.run(hub.dispatch), name="change-feed"),
                asyncio.create_task(recorder.run(), name="recorder"),
                asyncio.create_task(_keep_presence(services), name="presence"),
            ]
            log.info("started", extra={"store": engine.name})
            try:
                yield
            finally:
                services.draining = True
                # The recorder goes last: on its way out it writes what still waits.
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                log.info("stopped")

    return Starlette(
        routes=[
            WebSocketRoute("/ws", TidingsEndpoint),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
        ],
        lifespan=lifespan,
    )


async def _keep_presence(services: Services) -> None:
    """Refresh this process's presence records well before they expire."""
    while not services.draining:
        await asyncio.sleep(PRESENCE_TTL.total_seconds() / 3)
        try:
            await services.engine.presence.refresh(services.hub.online())
        except Exception:
            log.exception("presence_refresh_failed")
