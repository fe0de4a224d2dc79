"""The ``tidings`` command.

``tidings chat`` and ``tidings send`` are clients: this module imports the
server's modules (and pydantic, for its settings) only in the commands that
run it, so the clients start without them (``tests/test_package.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tidings.client import chat as terminal

if TYPE_CHECKING:
    from tidings.config import Settings


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
    settings = _settings(args)
    if settings is None:
        return 2
    if args.command == "token":
        return _mint(settings, args.email, args.ttl)
    return _serve(settings)


def _settings(args: argparse.Namespace) -> Settings | None:
    """The server's settings, the command line over the environment; ``None`` if invalid."""
    # Imported here, as is every server module below: ``tidings chat`` and
    # ``tidings send`` need none of them, nor pydantic.
    from pydantic import ValidationError

    from tidings.config import Settings

    overrides: dict[str, Any] = {
        key: value
        for key, value in vars(args).items()
        if key in {"host", "port", "dev"} and value is not None
    }
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        print(f"tidings: invalid settings:\n{exc}", file=sys.stderr)
        return None


def _serve(settings: Settings) -> int:
    from tidings.app import create_app
    from tidings.errors import ConfigError
    from tidings.logs import configure_logging
    from tidings.server import DrainingServer, server_config

    configure_logging(settings.log_level)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        print(f"tidings: refusing to start: {exc}", file=sys.stderr)
        return 2
    DrainingServer(server_config(app, settings), app, settings.drain_deadline).run()
    return 0


def _mint(settings: Settings, email: str, ttl: int) -> int:
    from tidings.auth import JWTAuthenticator
    from tidings.emails import normalise_email
    from tidings.errors import ConfigError

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
