"""Authentication: who a connection is allowed to identify as."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from starlette.requests import HTTPConnection

from tidings.config import Settings

log = logging.getLogger("tidings.auth")


class ConfigError(Exception):
    """The settings cannot run a safe service; the message says how to fix them."""


class AuthFailed(Exception):
    """A handshake is refused. The message is for the server log, never the client."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated connection. ``email`` is ``None`` only in dev mode: anyone."""

    email: str | None

    def may_identify(self, email: str) -> bool:
        """True when this connection may identify as ``email`` (already normalised)."""
        return self.email is None or self.email == email


class Authenticator(Protocol):
    """Decides, before a WebSocket is accepted, who is on the other end."""

    def authenticate(self, conn: HTTPConnection) -> Principal:
        """The principal of ``conn``; raise ``AuthFailed`` to refuse it."""


class DevAuthenticator:
    """Dev mode: no credentials, and a connection may identify as anyone."""

    def authenticate(self, conn: HTTPConnection) -> Principal:
        return Principal(email=None)


def build_authenticator(settings: Settings) -> Authenticator:
    """The authenticator the settings ask for; refuse to guess when they ask for none."""
    if settings.dev:
        log.warning(
            "dev_mode",
            extra={"detail": "TIDINGS_DEV=1: no authentication, anyone may identify as anyone"},
        )
        return DevAuthenticator()
    raise ConfigError(
        "no authentication is configured. For a local trial without authentication "
        "set TIDINGS_DEV=1 (or pass --dev)."
    )
