"""Serving ``/metrics``: a route of the app, or a small server on a port of its own.

With ``TIDINGS_METRICS_PORT`` the metrics are served by a second uvicorn
server that the app's lifespan starts and stops, in the same event loop. The
same loop matters: the collector reads the sessions and the feed, which only
the loop's thread may touch, so prometheus_client's ``start_http_server``
(a thread of its own) would not do. uvicorn rather than a hand-written
responder, because it already speaks HTTP correctly (keep-alive, bad
requests, slow clients); it is only kept from taking the process's signals,
which belong to the main server's drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator

import uvicorn
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tidings.metrics.counts import Metrics
from tidings.metrics.scrape import Scrape

log = logging.getLogger("tidings.metrics")

# Seconds a scrape in flight may take to finish once the app stops.
_STOP_TIMEOUT = 2


def registry_of(metrics: Metrics) -> CollectorRegistry:
    """A registry of its own for ``metrics`` and this process: what one scrape reports."""
    registry = CollectorRegistry()
    registry.register(Scrape(metrics))
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    return registry


def metrics_route(metrics: Metrics) -> Route:
    """``GET /metrics``: the exposition format Prometheus asks for (text, or OpenMetrics)."""
    registry = registry_of(metrics)

    async def endpoint(request: Request) -> Response:
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(registry), headers={"Content-Type": content_type})

    return Route("/metrics", endpoint, methods=["GET"])


class _MetricsServer(uvicorn.Server):
    """uvicorn serving ``/metrics`` alone; SIGTERM and SIGINT stay with the main server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def metrics_server(metrics: Metrics, host: str, port: int) -> AsyncIterator[None]:
    """Serve ``/metrics`` on ``host``:``port`` for the lifetime of the context.

    The socket is bound here, so that a port already taken fails the app's
    start-up with the error, rather than uvicorn exiting the process.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    config = uvicorn.Config(
        Starlette(routes=[metrics_route(metrics)]),
        log_config=None,
        access_log=False,
        lifespan="off",
        # A scrape endpoint needs few connections; a flood of them gets 503.
        limit_concurrency=32,
        timeout_graceful_shutdown=_STOP_TIMEOUT,
    )
    server = _MetricsServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="metrics-server")
    log.info("metrics_serving", extra={"host": host, "port": port})
    try:
        yield
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, _STOP_TIMEOUT * 2)
        finally:
            sock.close()
