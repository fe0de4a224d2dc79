"""The resources one running app shares between its connections."""

from __future__ import annotations

from dataclasses import dataclass

from tidings.auth import Authenticator
from tidings.config import Settings
from tidings.feed import ChangeFeed
from tidings.handlers import Handlers
from tidings.hub import Hub
from tidings.store import Store


@dataclass(eq=False)
class Services:
    """Built by the lifespan and reached through ``app.state.services``."""

    settings: Settings
    store: Store
    feed: ChangeFeed
    hub: Hub
    handlers: Handlers
    authenticator: Authenticator
    draining: bool = False
