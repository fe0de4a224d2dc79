"""One connection's I/O on Starlette's WebSocket: the adapters the endpoint wires in.

The endpoint decides what happens on a connection; this module is how it is
done on the socket: a handshake refused as an HTTP error (``deny``), frames
written for the session's outbox (``SocketTransport``), frames read ahead
of the handler within a bound (``ReadAhead``), and the connection as a drain
sees it (``Connection``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass

from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from tidings.errors import CloseCode, ConnectionGone
from tidings.session import Session

log = logging.getLogger("tidings.connection")

# A frame as read: its text, or bytes for a binary frame (refused when handled).
Raw = str | bytes


class SocketTransport:
    """Adapts Starlette's WebSocket to a session's ``Transport`` (see ``outbox``)."""

    def __init__(self, websocket: WebSocket, close_timeout: float) -> None:
        self._websocket = websocket
        self._close_timeout = close_timeout

    async def send_text(self, text: str) -> None:
        """Write one text frame; a peer that is not there raises ``ConnectionGone``."""
        if self._websocket.application_state is not WebSocketState.CONNECTED:
            raise ConnectionGone
        try:
            await self._websocket.send_text(text)
        except (WebSocketDisconnect, OSError, RuntimeError) as exc:
            # uvicorn reports a vanished peer as an OSError subclass, Starlette a
            # send after close as RuntimeError: both mean nobody is listening.
            raise ConnectionGone from exc

    async def close(self, code: int, reason: str) -> None:
        """Close, unless closed already; give up after ``close_timeout``."""
        if self._websocket.application_state is not WebSocketState.CONNECTED:
            return
        # A peer that stopped reading may never take the close frame.
        with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError, TimeoutError):
            async with asyncio.timeout(self._close_timeout):
                await self._websocket.close(code, reason)


async def deny(websocket: WebSocket, status: int, reason: str) -> None:
    """Answer a handshake with an HTTP error instead of accepting it."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(PlainTextResponse(reason, status_code=status))
    else:  # Servers without the denial extension answer a close before accept with 403.
        await websocket.close(CloseCode.POLICY_VIOLATION, reason)


class ReadAhead:
    """Frames read from the socket and not yet handled, at most ``limit`` of them.

    Reading ahead keeps the socket read (and WebSocket pongs with it) while a
    handler waits on the database; the limit keeps a client from making the
    server buffer without bound.
    """

    __slots__ = ("_frames", "_limit", "_space", "stopped")

    def __init__(self, limit: int) -> None:
        self._frames: deque[Raw] = deque()
        self._limit = limit
        self._space: asyncio.Future[None] | None = None
        self.stopped = False

    @property
    def waiting(self) -> bool:
        """Whether frames wait to be handled."""
        return bool(self._frames)

    def add(self, raw: Raw) -> None:
        """A frame was read; once stopped, it is dropped."""
        if not self.stopped:
            self._frames.append(raw)

    def stop(self) -> int:
        """Take no more frames and drop those not handled yet; how many were dropped.

        Nobody saw them answered, so their senders send them again, with the
        same ids, to the server they reconnect to: dropping them is safe.
        """
        self.stopped = True
        dropped = len(self._frames)
        self.take()
        return dropped

    async def space(self) -> None:
        """Wait until fewer than ``limit`` frames wait, before reading the next."""
        if len(self._frames) >= self._limit:
            self._space = asyncio.get_running_loop().create_future()
            await self._space

    def take(self) -> list[Raw]:
        """Everything read so far, to be handled together."""
        frames = list(self._frames)
        self._frames.clear()
        if self._space is not None and not self._space.done():
            self._space.set_result(None)
        return frames


@dataclass(eq=False)
class Connection:
    """An open connection as a drain sees it: its session, the frames read ahead
    of the handler, and the task handling them (``None`` while none runs)."""

    session: Session
    reads: ReadAhead
    handler: asyncio.Task[None] | None = None

    async def drain(self, code: int, reason: str, settle: float, flush: float) -> None:
        """Stop taking frames, let the frames being handled finish within ``settle``
        seconds, then close with ``code`` after writing what is queued (``flush``).

        Frames read ahead and not yet handled are dropped; a handler still
        running after ``settle`` is cancelled, and its frames go unanswered,
        which a client answers by sending them again elsewhere.
        """
        dropped = self.reads.stop()
        abandoned = False
        if self.handler is not None and not self.handler.done():
            await asyncio.wait({self.handler}, timeout=settle)
            if not self.handler.done():
                abandoned = True
                self.handler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.handler
        if dropped or abandoned:
            log.info(
                "drain_dropped_frames",
                extra={**self.session.log_fields, "dropped": dropped, "abandoned": abandoned},
            )
        await self.session.finish(code, reason, flush)
