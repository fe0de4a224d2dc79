"""Health probes: liveness and readiness."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from tidings.errors import StoreUnavailable
from tidings.services import Services


async def healthz(request: Request) -> Response:
    """200 while the process is alive and serving HTTP."""
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    """200 only while the database answers and the change feed runs; 503 with why not."""
    services: Services = request.app.state.services
    response = await _readiness(services)
    services.metrics.readiness(response.status_code == 200)
    return response


async def _readiness(services: Services) -> Response:
    if services.draining:
        return _unready("draining: the server is shutting down")
    if services.unready is not None:
        return _unready(f"starting: {services.unready}")
    feed = services.engine.feed
    if not feed.running:
        return _unready(f"change feed: {feed.problem or 'not running'}")
    try:
        async with asyncio.timeout(services.settings.ready_timeout):
            await services.engine.store.ping()
    except (StoreUnavailable, TimeoutError) as exc:
        return _unready(f"database is not answering: {str(exc) or 'timed out'}")
    return JSONResponse({"status": "ready"})


def _unready(reason: str) -> Response:
    return JSONResponse({"status": "unready", "reason": reason}, status_code=503)
