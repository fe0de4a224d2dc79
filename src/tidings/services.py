"""The resources one running app shares between its connections."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from tidings.auth import Authenticator
from tidings.config import SHUTDOWN_MARGIN, Settings
from tidings.connection import Connection
from tidings.engine import Engine
from tidings.errors import CloseCode
from tidings.handlers import Handlers
from tidings.hub import Hub
from tidings.metrics import Metrics
from tidings.recorder import Recorder

log = logging.getLogger("tidings.services")


@dataclass(eq=False)
class Services:
    """Built by the lifespan and reached through ``app.state.services``."""

    settings: Settings
    engine: Engine
    hub: Hub
    recorder: Recorder
    handlers: Handlers
    authenticator: Authenticator
    draining: bool = False
    # Why the engine is not prepared yet (its database has not answered); None once it is.
    unready: str | None = None
    # Every open connection, so that a drain can finish them all.
    connections: set[Connection] = field(default_factory=set)
    # What /metrics reports; the app's own, made by create_app.
    metrics: Metrics = field(default_factory=Metrics)

    async def drain(self) -> None:
        """Turn not-ready, stop taking frames, finish what is in hand, close every connection.

        Readiness is 503 for ``drain_delay`` seconds first, so that load
        balancers stop routing here. Then every connection stops taking frames
        (those read ahead are dropped: nobody saw them answered), the frames
        being handled finish, each client gets what was queued for it and a
        1012 close that tells it to reconnect elsewhere. All of it fits in
        ``drain_deadline`` from the start, less what the shutdown after it
        needs (the last state writes, within one operation budget).
        """
        settings = self.settings
        loop = asyncio.get_running_loop()
        end = loop.time() + settings.drain_deadline - settings.store_timeout - SHUTDOWN_MARGIN
        self.draining = True
        log.info("draining", extra={"connections": len(self.connections)})
        await asyncio.sleep(min(settings.drain_delay, max(0.0, end - loop.time())))
        left = max(0.0, end - loop.time())
        flush = min(settings.write_timeout, left / 2)
        await asyncio.gather(
            *(
                connection.drain(
                    CloseCode.SERVICE_RESTART,
                    "server restarting; reconnect",
                    settle=left - flush,
                    flush=flush,
                )
                for connection in list(self.connections)
            )
        )
        log.info("drained")
