"""Shared test helpers: a real uvicorn server on a free loopback port and a WebSocket client."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from tests.asyncapi_check import server_frame
from tidings.app import create_app
from tidings.config import Settings
from tidings.server import server_config

# Long enough for a loaded CI machine, short enough that a lost frame fails fast.
TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[str]:
    """Run the app under uvicorn in this event loop; yield its ``ws://`` URL."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = server_config(create_app(settings), settings.model_copy(update={"port": port}))
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(TIMEOUT):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield f"ws://127.0.0.1:{port}/ws"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, TIMEOUT)
        sock.close()


class Client:
    """A real WebSocket client speaking Tidings' JSON frames."""

    def __init__(self, ws: ClientConnection, contract: bool = True) -> None:
        self.ws = ws
        # Off only for a server that is not Tidings (the bare apps of test_wsprotocol).
        self._decode: Callable[[str | bytes], dict[str, Any]] = (
            server_frame if contract else orjson.loads
        )

    async def send(self, frame: dict[str, Any] | str) -> None:
        """Send a frame: a dict as JSON, a string as it is."""
        await self.ws.send(frame if isinstance(frame, str) else orjson.dumps(frame).decode())

    async def recv(self, within: float = TIMEOUT) -> dict[str, Any]:
        """The next frame, decoded; ``TimeoutError`` if none comes ``within`` seconds.

        Every frame is checked against docs/asyncapi.yaml, so each test that reads
        frames also checks that the server sends what the contract says.
        """
        return self._decode(await asyncio.wait_for(self.ws.recv(), within))

    async def recv_until(
        self, accept: Callable[[dict[str, Any]], bool], within: float = TIMEOUT
    ) -> list[dict[str, Any]]:
        """Frames up to and including the first that ``accept`` takes."""
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(within):
            while True:
                frames.append(await self.recv())
                if accept(frames[-1]):
                    return frames

    async def next_is(self, sentinel: Callable[[dict[str, Any]], bool], what: str) -> None:
        """Assert that the next frame is the ``sentinel``, and so that nothing came before it.

        How a test shows that something does not arrive: the sentinel travels
        the path the unwanted frame would have taken, and is ordered after it
        (a later message to the same recipient, a later state to the same
        sender), so a wait cannot pass merely because the machine was slow.
        """
        frame = await self.recv()
        assert sentinel(frame), f"expected {what} next, got {frame}"

    async def close_frame(
        self, within: float = TIMEOUT, into: list[dict[str, Any]] | None = None
    ) -> Close:
        """Read until the server closes; the close it sent. Frames go ``into`` a list."""
        try:
            async with asyncio.timeout(within):
                while True:
                    frame = self._decode(await self.ws.recv())
                    if into is not None:
                        into.append(frame)
        except ConnectionClosed as closed:
            if closed.rcvd is None:
                raise AssertionError(f"closed without a close frame: {closed}") from closed
            return closed.rcvd

    async def identify(self, email: str, **extra: Any) -> dict[str, Any]:
        """Send ``#email`` and return the reply."""
        await self.send({"type": "#email", "email": email, **extra})
        reply = await self.recv()
        assert reply["type"] == "#email", reply
        return reply

    async def send_message(self, to: str, content: str, **extra: Any) -> None:
        """Send a ``message`` frame."""
        await self.send({"type": "message", "to": to, "content": content, **extra})

    async def states(self, message_id: str, until: str) -> list[str]:
        """The states reported for ``message_id`` up to ``until``, other frames skipped."""
        frames = await self.recv_until(
            lambda f: f["type"] == "state" and f["id"] == message_id and f["state"] == until
        )
        return [f["state"] for f in frames if f["type"] == "state" and f["id"] == message_id]


@asynccontextmanager
async def client(url: str, contract: bool = True, **options: Any) -> AsyncIterator[Client]:
    """Open a WebSocket client to ``url``; ``contract=False`` for a server that is not Tidings."""
    async with connect(url, open_timeout=TIMEOUT, close_timeout=2, **options) as ws:
        yield Client(ws, contract)


class ThreadedServer:
    """The app under uvicorn in a thread of its own, for tests that are not async.

    Hypothesis drives its examples synchronously, so its tests talk to this
    server with the synchronous WebSocket client.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        config = server_config(
            create_app(settings), settings.model_copy(update={"port": self.port})
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        """The ``ws://`` URL of the endpoint."""
        return f"ws://127.0.0.1:{self.port}/ws"

    def _run(self) -> None:
        # uvicorn leaves signals alone outside the main thread; this stops by its flag.
        asyncio.run(self._server.serve(sockets=[self._sock]))

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the threaded server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(TIMEOUT)
        self._sock.close()
