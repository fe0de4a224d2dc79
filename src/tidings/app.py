"""``create_app``: builds the ASGI app and owns its resources for its lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Route, WebSocketRoute

from tidings.auth import build_authenticator
from tidings.config import Settings
from tidings.console import console_routes
from tidings.endpoint import TidingsEndpoint
from tidings.engine import check, open_engine
from tidings.errors import StoreUnavailable
from tidings.handlers import Handlers
from tidings.health import healthz, readyz
from tidings.hub import Hub
from tidings.metrics import Metrics
from tidings.metrics.exposition import metrics_route, metrics_server
from tidings.metrics.timed import TimedStore
from tidings.recorder import Recorder
from tidings.services import Services

log = logging.getLogger("tidings.app")

# Seconds between two attempts to prepare a database that does not answer:
# doubling from the first to the last, then every last.
PREPARE_FIRST_RETRY = 1.0
PREPARE_LAST_RETRY = 30.0


def create_app(settings: Settings | None = None) -> Starlette:
    """The Tidings ASGI app. Nothing is connected until its lifespan starts.

    ``/metrics`` is one of its routes, unless ``metrics_port`` is set: then the
    lifespan serves it on that port alone.
    """
    settings = settings or Settings()
    authenticator = build_authenticator(settings)
    check(settings)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_engine(settings) as opened:
            # Every store call of the core is timed at the seam; the engine opens
            # and closes its own store, untimed.
            engine = dataclasses.replace(opened, store=TimedStore(opened.store, metrics))
            hub = Hub(engine.feed)
            recorder = Recorder(engine.store, metrics=metrics)
            services = Services(
                settings=settings,
                engine=engine,
                hub=hub,
                recorder=recorder,
                handlers=Handlers(
                    engine.store,
                    engine.presence,
                    recorder,
                    settings.max_content_chars,
                    metrics=metrics,
                ),
                authenticator=authenticator,
                metrics=metrics,
                unready="the database has not answered yet",
            )
            metrics.bind(
                connections=lambda: [connection.session for connection in services.connections],
                users=hub.users,
                draining=lambda: services.draining,
                feed=engine.feed,
            )
            app.state.services = services
            tasks = [
                asyncio.create_task(_prepare(services), name="prepare"),
                asyncio.create_task(engine.feed.run(hub.dispatch), name="change-feed"),
                asyncio.create_task(recorder.run(), name="recorder"),
            ]
            if (interval := engine.presence.refresh_interval) is not None:
                tasks.append(
                    asyncio.create_task(_keep_presence(services, interval), name="presence")
                )
            log.info("started", extra={"store": engine.name})
            exposing: AbstractAsyncContextManager[None] = contextlib.nullcontext()
            if settings.metrics_port is not None:
                exposing = metrics_server(metrics, settings.host, settings.metrics_port)
            try:
                async with exposing:
                    yield
            finally:
                services.draining = True
                # The recorder goes last: on its way out it writes what still waits.
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                log.info("stopped")

    routes: list[BaseRoute] = [
        WebSocketRoute("/ws", TidingsEndpoint),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        # The web console at `/`: static files under a strict Content-Security-Policy.
        *console_routes(),
    ]
    if settings.metrics_port is None:
        routes.append(metrics_route(metrics))
    return Starlette(routes=routes, lifespan=lifespan)


async def _prepare(services: Services) -> None:
    """Prepare the engine's database, trying again until it answers; readiness waits for it.

    The process starts whatever the database does: a pod that exited instead
    would be restarted with a back-off of up to five minutes, and come back
    that late after the database did.
    """
    delay = PREPARE_FIRST_RETRY
    while True:
        try:
            await services.engine.prepare()
        except StoreUnavailable as exc:
            services.unready = str(exc)
            log.warning("database_unreachable", extra={"error": str(exc), "retry_in": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, PREPARE_LAST_RETRY)
        else:
            services.unready = None
            log.info("database_ready")
            return


async def _keep_presence(services: Services, interval: float) -> None:
    """Refresh this process's presence records as often as the engine asks."""
    while not services.draining:
        await asyncio.sleep(interval)
        try:
            await services.engine.presence.refresh(services.hub.online())
        except Exception:
            log.exception("presence_refresh_failed")
