"""A TCP proxy between the app and its database, with network faults the test switches on.

The faults are what a network does to a long-lived database connection:

- ``latency(seconds)``: every chunk, both ways, arrives that much later, in order.
- ``cut()``: every open connection is reset at once, both ends (as a middlebox
  or a restarted load balancer does); new connections are accepted as usual.
- ``blackhole()``: a dead path. Connections stay open, nothing crosses in
  either direction and no end is told (no FIN, no RST): only a timeout can
  notice. New connections are accepted (the kernel completes the handshake)
  and never reach the database.
- ``heal()``: back to normal. The connections that were black-holed are reset
  then, as after a real partition: by the time packets flow again the peers'
  timeouts have given up on them, and their next segment meets an RST. Bytes
  sent into the black hole are lost, not delivered late.

A connection that one end closes is reset at the other end at once, black hole
or not: only the database could tell the difference, and no test asks it.

The proxy belongs to the test that enters it: every task it starts ends, and
every socket it opened is closed, when the ``async with`` block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType

from tests.helpers import TIMEOUT

CHUNK = 65536


class _Link:
    """One connection through the proxy: the app's end and, unless it never got one, the
    database's."""

    def __init__(self, app: asyncio.StreamWriter, black_holed: bool) -> None:
        self.app = app
        self.db: asyncio.StreamWriter | None = None
        self.black_holed = black_holed
        self.closed = False

    def reset(self) -> None:
        """Close both ends with an RST, now: queued bytes are dropped, not flushed."""
        self.closed = True
        for end in (self.app, self.db):
            if end is None or end.transport.is_closing():
                continue
            sock = end.transport.get_extra_info("socket")
            if sock is not None:
                # A zero linger makes close() send RST instead of FIN: the peer
                # sees "connection reset", as when a middlebox drops the flow.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            end.transport.abort()


class Proxy:
    """A TCP proxy on a free port of 127.0.0.1 in front of ``upstream_port``.

    Use it as an async context manager; ``uri`` is a MongoDB connection string
    that reaches the server through it.
    """

    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self._upstream = (host, upstream_port)
        self._host = host
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._errors: list[BaseException] = []
        self._latency = 0.0
        self._black_hole = False
        self._closing = False
        self.port = 0

    @property
    def uri(self) -> str:
        """A MongoDB URI that reaches the database through the proxy."""
        return f"mongodb://{self._host}:{self.port}/?directConnection=true"

    @property
    def black_holing(self) -> bool:
        """Whether traffic is black-holed right now."""
        return self._black_hole

    @property
    def connections(self) -> int:
        """Connections open through the proxy right now."""
        return len(self._links)

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, self._host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        self.cut()
        async with asyncio.timeout(TIMEOUT):
            while self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
        # Each connection's task closes both its sockets before it ends.
        assert not self._links, f"{len(self._links)} proxied connections outlived the proxy"
        if self._errors and exc is None:
            raise self._errors[0]

    # --- faults --------------------------------------------------------------------

    def latency(self, seconds: float) -> None:
        """Delay every chunk read from now on by ``seconds``, each way, keeping order."""
        self._latency = seconds

    def cut(self) -> int:
        """Reset every open connection, both ends; new ones are accepted as usual.

        Returns how many were open, so that a test can tell a cut hit something.
        """
        links = [link for link in self._links if not link.closed]
        for link in links:
            link.reset()
        return len(links)

    def blackhole(self) -> None:
        """Forward nothing and answer nothing, on open connections and new ones alike."""
        self._black_hole = True
        for link in self._links:
            link.black_holed = True

    def heal(self) -> None:
        """Back to normal: no latency, no black hole; black-holed connections are reset."""
        self._latency = 0.0
        self._black_hole = False
        for link in list(self._links):
            if link.black_holed:
                link.reset()

    # --- connections ---------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback rather than a coroutine, so that the proxy, not the
        # server, creates and owns the connection's task.
        link = _Link(writer, self._black_hole)
        if self._closing:
            link.reset()
            return
        self._links.add(link)
        task = asyncio.create_task(self._serve(link, reader), name=f"proxy:{self.port}")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        # A bug in the proxy must fail the test, not vanish into a log line.
        error = None if task.cancelled() else task.exception()
        if error is not None:
            self._errors.append(error)

    async def _serve(self, link: _Link, app: asyncio.StreamReader) -> None:
        try:
            if link.black_holed:
                # The connection never reaches the database: swallow what the app
                # sends until it gives up or heal() resets it.
                while not link.closed and await app.read(CHUNK):
                    pass
                return
            try:
                db, link.db = await asyncio.open_connection(*self._upstream)
            except OSError:
                return
            if link.closed:  # cut while connecting
                link.reset()
                return
            async with asyncio.TaskGroup() as group:
                group.create_task(self._carry(link, app, link.db))
                group.create_task(self._carry(link, db, link.app))
        finally:
            link.reset()
            self._links.discard(link)

    async def _carry(
        self, link: _Link, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        """Bytes one way until either end closes; then the link is reset, both ends.

        Each chunk is due the latency after it was read, and never before the
        chunk ahead of it, so a change of latency cannot reorder the stream.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not link.black_holed:  # in flight when the path died: lost
                    sink.write(data)
                    await sink.drain()

        delivering = asyncio.create_task(deliver())
        try:
            last = 0.0
            while data := await source.read(CHUNK):
                if link.black_holed:
                    continue
                last = max(last, loop.time() + self._latency)
                queue.put_nowait((last, data))
            if not link.closed:
                # The end closed: what it sent before closing still goes out first.
                queue.put_nowait(None)
                await delivering
        except OSError:
            pass  # reset by a cut, or by the peer
        finally:
            delivering.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await delivering
            link.reset()
