"""The bare baseline: a Starlette app that echoes every text frame.

``python -m bench.echo`` serves it under ``tidings.server.server_config`` with
``Settings()`` read from the same TIDINGS_* variables as Tidings, so that
both run with identical uvicorn options (frame limit, pings, compression,
concurrency limit) and the same garbage-collector set-up after start-up.
``/readyz`` exists only so that the harness can wait for it the same way.
"""

from __future__ import annotations

import sys

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from bench.proc import raise_nofile_limit


async def echo(websocket: WebSocket) -> None:
    """Send every text frame back as it came."""
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        return


async def ready(request: Request) -> Response:
    """200 once uvicorn serves."""
    return PlainTextResponse("ok")


def create_echo_app() -> Starlette:
    """The echo app: one WebSocket route, and a readiness probe."""
    return Starlette(routes=[WebSocketRoute("/ws", echo), Route("/readyz", ready)])


def main() -> int:
    """Serve the echo app with Tidings' uvicorn configuration."""
    raise_nofile_limit()
    from tidings.config import Settings
    from tidings.server import TunedServer, server_config

    TunedServer(server_config(create_echo_app(), Settings())).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
