"""The ``tidings`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.types import ASGIApp

from tidings import chat as terminal
from tidings.app import create_app
from tidings.auth import JWTAuthenticator
from tidings.config import Settings
from tidings.errors import ConfigError
from tidings.logs import configure_logging
from tidings.protocol import normalise_email
from tidings.wsprotocol import bounded_close_protocol

log = logging.getLogger("tidings.cli")
# The exit status when the drain deadline ends the process: not a clean stop.
EXIT_DEADLINE = 70  # EX_SOFTWARE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tidings`` console script."""
    parser = argparse.ArgumentParser(prog="tidings", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the WebSocket server")
    serve.add_argument("--host", help="listen address (TIDINGS_HOST)")
    serve.add_argument("--port", type=int, help="listen port (TIDINGS_PORT)")
    serve.add_argument(
        "--dev",
        action="store_true",
        default=None,
        help="run without authentication (TIDINGS_DEV=1)",
    )
    token = commands.add_parser("token", help="mint a client token with TIDINGS_JWT_SECRET")
    token.add_argument("--email", required=True, help="the e-mail the token may identify as")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires (3600)")
    asyncapi = commands.add_parser("asyncapi", help="print the AsyncAPI 3.0 document")
    asyncapi.add_argument("--output", help="write it to this file (docs/asyncapi.yaml)")
    terminal.add_parsers(commands)
    args = parser.parse_args(argv)
    if args.command in terminal.COMMANDS:
        # Clients need none of the server's settings.
        return terminal.run(args)
    if args.command == "asyncapi":
        # Before the settings: the document does not depend on them.
        return _asyncapi(args.output)

    overrides: dict[str, Any] = {
        key: value
        for key, value in vars(args).items()
        if key in {"host", "port", "dev"} and value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"tidings: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "token":
        return _mint(settings, args.email, args.ttl)
    configure_logging(settings.log_level)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        print(f"tidings: refusing to start: {exc}", file=sys.stderr)
        return 2
    DrainingServer(server_config(app, settings), app, settings.drain_deadline).run()
    return 0


class DrainingServer(uvicorn.Server):
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


def _mint(settings: Settings, email: str, ttl: int) -> int:
    if settings.jwt_secret is None:
        print("tidings: set TIDINGS_JWT_SECRET to mint tokens", file=sys.stderr)
        return 2
    try:
        normalised = normalise_email(email)
    except ValueError as exc:
        print(f"tidings: --email {exc}", file=sys.stderr)
        return 2
    issuer = JWTAuthenticator(settings.jwt_secret, {}, settings.jwt_issuer, settings.jwt_audience)
    try:
        print(issuer.mint(normalised, ttl))
    except ConfigError as exc:
        print(f"tidings: {exc}", file=sys.stderr)
        return 2
    return 0


def _asyncapi(output: str | None) -> int:
    # Imported here: the generator is not needed to serve.
    from tidings.asyncapi import render

    text = render()
    if output is None:
        sys.stdout.write(text)
    else:
        with open(output, "w", encoding="utf-8", newline="\n") as file:
            file.write(text)
    return 0


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
