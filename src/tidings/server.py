"""uvicorn as Tidings runs it: its configuration, and a drain on SIGTERM within a deadline."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import threading
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp

from tidings.config import Settings
from tidings.wsprotocol import bounded_close_protocol

log = logging.getLogger("tidings.server")
# The exit status when the drain deadline ends the process: not a clean stop.
EXIT_DEADLINE = 70  # EX_SOFTWARE
# The collector runs a young-generation pass every GC_THRESHOLD[0] allocations
# (CPython's default is 700) and a full pass every 100 young passes. A server
# allocates a few dicts per frame and keeps few of them: at the default, 20
# pairs x 3,000 messages on the embedded engine spent 1.5 of 13 CPU-seconds in
# the collector, most of it in nine full passes over every stored message and
# module object; with this threshold and the freeze in ``tune_gc``, 0.2 s.
# Cycles are still collected, only in fewer, larger passes (at most this many
# young objects are waiting).
GC_THRESHOLD = (10_000, 10, 10)


def server_config(app: ASGIApp, settings: Settings) -> uvicorn.Config:
    """The uvicorn configuration Tidings runs under; the end-to-end tests use it too."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        # Connection events are logged by Tidings itself; the access log would
        # print query strings, which may carry tokens.
        access_log=False,
        lifespan="on",
        limit_concurrency=settings.max_connections,
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=settings.ping_interval,
        ws_ping_timeout=settings.ping_timeout,
        ws_per_message_deflate=settings.websocket_compression,
        # uvicorn's own protocol waits forever on a peer that stops reading.
        ws=bounded_close_protocol(settings.close_timeout),
    )


def tune_gc() -> None:
    """Set the collector up for serving, once the app has started.

    What exists after start-up (modules, the app, its resources) lives as long
    as the process, so it is frozen: full passes no longer walk it, which
    halved their cost. Garbage is collected first, so none of it is kept.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


class TunedServer(uvicorn.Server):
    """uvicorn, with the collector set up for serving (``tune_gc``) once it has started."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        tune_gc()


class DrainingServer(TunedServer):
    """uvicorn, with a graceful drain on the first SIGTERM or SIGINT, within a deadline.

    uvicorn alone stops listening and closes every WebSocket at once. Here the
    first signal turns the app not-ready and drains it (``Services.drain``);
    only then does uvicorn shut down. Whatever happens, the process is gone
    ``deadline`` seconds after that signal: a watchdog thread ends it, since a
    loop stuck on something cannot be relied on to notice. A second signal
    stops at once, skipping the drain's waits and the lifespan's shutdown.
    """

    def __init__(self, config: uvicorn.Config, app: Starlette, deadline: float) -> None:
        super().__init__(config)
        self._app = app
        self._deadline = deadline
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None
        self._watchdog: threading.Timer | None = None

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            super().run(sockets)
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None:
            log.warning("stopping_now", extra={"signal": sig})
            self.force_exit = True
        if self._drain is not None or self._loop is None or not self.started:
            super().handle_exit(sig, frame)
            return
        self._watchdog = threading.Timer(self._deadline, self._give_up)
        self._watchdog.daemon = True
        self._watchdog.start()
        # Signal handlers run between bytecodes of the main thread, not in the loop.
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._app.state.services.drain()
        finally:
            self.should_exit = True

    def _give_up(self) -> None:
        log.error("drain_deadline_passed", extra={"deadline": self._deadline})
        logging.shutdown()  # flush the log line above: os._exit skips it
        os._exit(EXIT_DEADLINE)
