"""Settings, read from ``TIDINGS_*`` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

# Seconds a drain keeps, beyond one operation budget, for uvicorn and the
# lifespan to stop once every connection is closed.
SHUTDOWN_MARGIN = 1.0


class Settings(BaseSettings):
    """Everything Tidings can be told from outside; docs/configuration.md documents each one.

    The names of the first block are fixed by the specification because deployments
    rely on them; the rest are Tidings' own knobs with production defaults.
    """

    model_config = SettingsConfigDict(env_prefix="TIDINGS_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # When set, /metrics is served on this port only (not on ``port``), so that
    # it can be kept off the public listener.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    mongodb_uri: str | None = None
    database: str = "tidings"
    change_stream_scope: Literal["database", "collection"] = "database"
    dev: bool = False
    jwt_secret: str | None = Field(default=None, repr=False)
    jwt_public_key_file: str | None = None
    jwt_jwks_file: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    allowed_origins: str | None = None
    max_frame_bytes: PositiveInt = 65536
    ping_interval: PositiveFloat = 20.0
    ping_timeout: PositiveFloat = 20.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    # Frames a connection may send per second, and in one burst; over it, frames
    # are refused with rate_limited, and after rate_abuse refused frames (drained
    # at a quarter of rate_limit) the connection is closed with 1008.
    rate_limit: PositiveFloat = 100.0
    rate_burst: PositiveInt = 200
    rate_abuse: PositiveInt = 1000
    # Connections (and HTTP requests) served at once; beyond, handshakes get 503.
    max_connections: PositiveInt = 10000
    # Seconds a connection may stay open without identifying.
    identify_timeout: PositiveFloat = 30.0
    # Deepest nesting of arrays and objects accepted in a frame.
    max_json_depth: PositiveInt = 32
    # permessage-deflate: off, since compressing attacker-influenced content next
    # to secrets invites CRIME/BREACH-style attacks and costs memory per socket.
    websocket_compression: bool = False
    # Frames a connection may have waiting to be written. Beyond it, live
    # messages are dropped from memory and read again from the store once the
    # client catches up; a client that takes no frame for write_timeout while
    # frames wait is disconnected as a slow consumer.
    send_queue_size: PositiveInt = 256
    # Frames read from a connection ahead of the one being handled, so that
    # WebSocket pongs are still read while a handler waits on the database.
    read_ahead: PositiveInt = 64
    # Longest message content, in characters.
    max_content_chars: PositiveInt = 16384
    # Backlog documents read from the store per round trip.
    backlog_batch: PositiveInt = 200
    # The budget of every database operation, retries included (the driver's
    # client-side operation timeout); a message that cannot be stored within it
    # is answered ``unavailable`` and may be sent again with the same id.
    mongodb_timeout: PositiveFloat = 5.0
    # How long /readyz waits for the database before calling it down.
    ready_timeout: PositiveFloat = 2.0
    # On SIGTERM: seconds /readyz answers 503 before connections are closed, so
    # that load balancers stop sending new ones here first.
    drain_delay: NonNegativeFloat = 5.0
    # On SIGTERM: seconds until the process has exited, whatever it is doing
    # then; the drain (the delay above, the frames in hand, the last flush to
    # each client, the last state writes) is fitted inside it.
    drain_deadline: PositiveFloat = 25.0
    # How long a client may take no frame while frames wait for it before it
    # is closed as a slow consumer; also the most a drain waits for a client to
    # take what was queued for it.
    write_timeout: PositiveFloat = 5.0
    # How long a closing connection may take to flush its close frame, or the
    # peer to answer it, before the TCP connection is aborted.
    close_timeout: PositiveFloat = 5.0
    # Seconds a message is kept once it is delivered or read (counted from its
    # latest of those states), on MongoDB by a TTL index. Unset: kept for ever.
    # Never applies to a message not yet delivered: it is still owed.
    retention: PositiveFloat | None = None

    @field_validator("mongodb_uri")
    @classmethod
    def _uri_not_empty(cls, value: str | None) -> str | None:
        # An empty Secret must not quietly give every pod a memory store of its own.
        if value is not None and not value.strip():
            raise ValueError(
                "TIDINGS_MONGODB_URI is set but empty; unset it for the embedded store"
            )
        return value

    @model_validator(mode="after")
    def _drain_fits(self) -> Settings:
        # The drain must leave the frames in hand one operation budget, and the
        # shutdown after it another; a deadline shorter would cut them every time.
        needed = self.drain_delay + 2 * self.mongodb_timeout + SHUTDOWN_MARGIN
        if self.drain_deadline <= needed:
            raise ValueError(
                f"TIDINGS_DRAIN_DEADLINE ({self.drain_deadline:g} s) must exceed "
                f"TIDINGS_DRAIN_DELAY plus twice TIDINGS_MONGODB_TIMEOUT plus "
                f"{SHUTDOWN_MARGIN:g} s ({needed:g} s)"
            )
        return self

    @property
    def origins(self) -> frozenset[str]:
        """The configured browser origins, normalised; empty means "same origin only"."""
        if not self.allowed_origins:
            return frozenset()
        return frozenset(
            o.strip().rstrip("/").lower() for o in self.allowed_origins.split(",") if o.strip()
        )

    @property
    def store_timeout(self) -> float:
        """Seconds any store call may take: the database's budget (``TIDINGS_MONGODB_TIMEOUT``)."""
        return self.mongodb_timeout

    @property
    def embedded(self) -> bool:
        """True when no MongoDB is configured and the in-memory store is used."""
        return self.mongodb_uri is None
