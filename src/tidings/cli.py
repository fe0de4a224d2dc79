"""The ``tidings`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
from pydantic import ValidationError
from starlette.types import ASGIApp

from tidings.app import create_app
from tidings.auth import ConfigError
from tidings.config import Settings
from tidings.logs import configure_logging


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
    args = parser.parse_args(argv)

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
    configure_logging(settings.log_level)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        print(f"tidings: refusing to start: {exc}", file=sys.stderr)
        return 2
    uvicorn.Server(server_config(app, settings)).run()
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
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=settings.ping_interval,
        ws_ping_timeout=settings.ping_timeout,
        ws_per_message_deflate=False,
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
