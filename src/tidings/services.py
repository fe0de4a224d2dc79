"""The resources one running app shares between its connections."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from tidings.auth import Authenticator
from tidings.config import Settings
from tidings.engine import Engine
from tidings.errors import CloseCode
from tidings.handlers import Handlers
from tidings.hub import Hub
from tidings.recorder import Recorder
from tidings.session import Session

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
    # Every open connection's session, so that a drain can close them all.
    sessions: set[Session] = field(default_factory=set)

    async def drain(self) -> None:
        """Stop taking connections, turn not-ready, then close every connection.

        Readiness is 503 for ``drain_delay`` seconds first, so that load balancers
        stop routing here; each client then gets what was already queued for it
        and a 1012 close that tells it to reconnect elsewhere.
        """
        self.draining = True
        log.info("draining", extra={"connections": len(self.sessions)})
        await asyncio.sleep(self.settings.drain_delay)
        await asyncio.gather(
            *(
                session.finish(
                    CloseCode.SERVICE_RESTART,
                    "server restarting; reconnect",
                    self.settings.close_timeout,
                )
                for session in list(self.sessions)
            )
        )
