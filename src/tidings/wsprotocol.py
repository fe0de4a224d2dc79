"""uvicorn's WebSocket protocol, made to let go of a peer that stops reading.

This adapts ``WebSocketsSansIOProtocol`` as uvicorn 0.54 ships it
(``uvicorn/protocols/websockets/websockets_sansio_impl.py``, the class its
``ws="auto"`` picks when ``websockets`` is installed). Two things there wait
on the peer without a bound:

* ``send()`` starts with ``await self.writable.wait()``, and ``writable`` is
  cleared while the transport's write buffer is above its high-water mark. To
  a peer that reads nothing, the app's ``websocket.close`` is never written and
  the app's ``send`` never returns.
* Every way it ends a connection (the close-handshake timer, the keepalive
  timeout, the app returning, server shutdown) calls ``transport.close()``,
  which first flushes the write buffer: to a peer that reads nothing, the
  socket is never closed. Only ``transport.abort()`` drops it.

A client that is cut for being slow therefore kept its TCP connection, and the
server its memory, for as long as the client cared to stay. Here each of those
waits is bounded by ``close_timeout``; a peer that reads still gets the close
frame and a clean close, since nothing is aborted that could still flush.

The other closes in uvicorn (the peer's close frame, a protocol error) hand
the app a disconnect, so they end through ``run_asgi`` and are bounded there.

It also corks text frames: uvicorn writes each frame to the socket as it is
sent, one system call a frame, which py-spy put at a tenth of the server's CPU
under load. Here frames sent in one turn of the event loop go out in one write
at the end of it. Order is kept: every other write uvicorn makes (pongs, the
close frame) takes the connection's pending bytes first.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from uvicorn._types import ASGISendEvent
from uvicorn.config import Config
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.exceptions import InvalidState

# Corked bytes that are written at once rather than at the end of the turn.
CORK_LIMIT = 64 * 1024


class BoundedCloseProtocol(WebSocketsSansIOProtocol):
    """A WebSocket protocol that drops, rather than waits on, a peer that does not read.

    Closing gets ``close_timeout`` seconds, counted from whichever of these
    happens: the app's close frame waiting for room in the write buffer, the
    close handshake, or the flush of a transport uvicorn has closed. After it,
    the transport is aborted.
    """

    #: The close timeout of instances; :func:`bounded_close_protocol` sets another.
    default_close_timeout: ClassVar[float] = 5.0

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # uvicorn's own attribute (fixed at 10 s there), so its close handshake
        # timer follows the same setting as everything added here.
        self.close_timeout = self.default_close_timeout
        self._abort_timer: asyncio.TimerHandle | None = None
        self._corked = False  # an _uncork is scheduled
        self._corked_bytes = 0

    async def send(self, message: ASGISendEvent) -> None:
        """uvicorn's ``send``, except that a close cannot hang on a full write buffer.

        A text frame on an open connection with room in its write buffer is
        corked: written with whatever else is sent in this turn of the loop.
        """
        if (
            message["type"] == "websocket.send"
            and (text := message.get("text")) is not None
            and self.writable.is_set()
            and self.handshake_complete
            and not (self.close_sent or self.disconnected or self.initial_response)
        ):
            data = text.encode()
            try:
                self.conn.send_text(data)
            except InvalidState:
                raise ClientDisconnected() from None
            self._corked_bytes += len(data)
            if self._corked_bytes >= CORK_LIMIT:
                # Written now, so that a full buffer pauses the next send, as in uvicorn.
                self._write_corked()
            elif not self._corked:
                self._corked = True
                self.loop.call_soon(self._uncork)
            return
        if message["type"] == "websocket.close" and not await self._room_for_close():
            return
        earlier_timer = self.close_timer
        await super().send(message)
        if self.close_timer is not None and self.close_timer is not earlier_timer:
            # uvicorn's timer would call transport.close(), which waits for the
            # flush forever. Nothing is awaited inside super().send() after the
            # frame is written, so swapping the timer here loses no time.
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, self._handshake_expired)
        # Refusing a handshake (403 or a denial response) closes the transport at once.
        self._abort_unless_flushed_in_time()

    def _uncork(self) -> None:
        """At the end of a turn of the loop: write what it corked."""
        self._corked = False
        self._write_corked()

    def _write_corked(self) -> None:
        """Write the frames corked so far, unless another write took them already."""
        self._corked_bytes = 0
        output = self.conn.data_to_send()
        if output and not self.transport.is_closing():
            self.transport.write(b"".join(output))

    async def run_asgi(self) -> None:
        """Run the app; then, if uvicorn closed the transport, bound its flush."""
        await super().run_asgi()
        self._abort_unless_flushed_in_time()

    def keepalive_timeout(self) -> None:
        """Fail the connection on a missed pong, as uvicorn does, but bound its flush."""
        super().keepalive_timeout()
        # uvicorn queues no disconnect for the app here, so the app cannot end
        # the connection either: without a bound it lives as long as the peer.
        self._abort_unless_flushed_in_time()

    def shutdown(self) -> None:
        """Close for server shutdown; a peer that does not read must not hold it up."""
        super().shutdown()
        self._abort_unless_flushed_in_time()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the abort deadline of a connection that is gone."""
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        super().connection_lost(exc)

    async def _room_for_close(self) -> bool:
        """Wait up to ``close_timeout`` for the write buffer to take a close frame.

        False when it did not and the transport was aborted instead: the app
        asked for the connection to end, and it has, so its ``send`` returns
        as a completed close. uvicorn then reports the disconnect to the app.
        """
        if self.writable.is_set():
            return True
        try:
            async with asyncio.timeout(self.close_timeout):
                await self.writable.wait()
        except TimeoutError:
            self.transport.abort()
            return False
        except asyncio.CancelledError:
            # The caller gave up on its close (Tidings bounds it by the same
            # timeout, so its deadline may come first). Starlette already counts
            # the socket as closed and will not try again, so nothing else would
            # ever end this connection.
            self.transport.abort()
            raise
        return True

    def _handshake_expired(self) -> None:
        # The peer neither answered the close nor, if bytes are still buffered,
        # even read it within close_timeout: flushing longer is waiting on it.
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def _abort_unless_flushed_in_time(self) -> None:
        """Abort a closing transport that has not flushed within ``close_timeout``.

        A transport closed on an empty buffer is gone at once; only one still
        flushing to a peer that does not read is ever aborted.
        """
        if self._abort_timer is None and self.transport.is_closing() and not self.disconnected:
            self._abort_timer = self.loop.call_later(self.close_timeout, self.transport.abort)


def bounded_close_protocol(close_timeout: float) -> type[BoundedCloseProtocol]:
    """:class:`BoundedCloseProtocol` with ``close_timeout`` seconds, for ``uvicorn.Config(ws=...)``.

    A subclass rather than a ``functools.partial``: uvicorn takes the protocol
    as a class and builds it with fixed keyword arguments.
    """

    class Configured(BoundedCloseProtocol):
        default_close_timeout = close_timeout

    return Configured
