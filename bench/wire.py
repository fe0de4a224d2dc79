"""A bare WebSocket client on an asyncio ``Protocol``: cheap enough to load a server from one core.

The ``websockets`` library costs the load generator more per frame than a
bare echo server spends answering it, so a run driven by it measures the
client. This client does only what the wire requires: the opening handshake,
client frames built once and masked with a fixed key, and a parser of
unmasked server frames that hands each text frame's payload to a callback.
Everything a connection writes while handling one read goes out in one
``write`` call.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable
from urllib.parse import urlsplit

# RFC 6455 makes clients mask every frame with an unpredictable key, so that
# script in a browser cannot make a frame look like HTTP to a proxy between it
# and the server (cache poisoning). A load generator on loopback, talking to
# our own server with no intermediary and no untrusted payload, has nothing to
# defend against; servers unmask with whatever key the frame carries and do not
# judge its randomness. The all-zero key makes the masked payload equal the
# plain one, so a frame is a header and the bytes as they are.
MASK_KEY = b"\x00\x00\x00\x00"
TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA
HANDSHAKE_LIMIT = 16_384

OnText = Callable[[bytes], None]


class WireError(RuntimeError):
    """The handshake failed or the connection broke."""


def client_frame(payload: bytes, opcode: int = TEXT) -> bytes:
    """One final, masked client frame carrying ``payload``."""
    size = len(payload)
    first = 0x80 | opcode
    if size < 126:
        header = bytes((first, 0x80 | size))
    elif size < 65_536:
        header = bytes((first, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, 0x80 | 127)) + size.to_bytes(8, "big")
    return header + MASK_KEY + payload


class Conn(asyncio.Protocol):
    """One connection: ``on_text`` sees every text frame; ``send`` queues frames for one write."""

    def __init__(self, host: str, path: str) -> None:
        self.on_text: OnText = _drop
        self.closed = asyncio.get_running_loop().create_future()
        self._request = _handshake(host, path)
        self._open = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._upgraded = False
        self._handling = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = repr(exc) if exc else "connection closed"
        if not self._open.done():
            self._open.set_exception(WireError(reason))
        if not self.closed.done():
            self.closed.set_result(reason)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._upgraded and not self._upgrade():
            return
        self._handling = True
        try:
            self._frames()
        finally:
            self._handling = False
            self.flush()

    def send(self, frame: bytes) -> None:
        """Queue a built frame; written at the end of the read being handled, or at once."""
        self._out.append(frame)
        if not self._handling:
            self.flush()

    def flush(self) -> None:
        """Write what is queued in one call."""
        if self._out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(self._out))
        self._out.clear()

    async def opened(self) -> None:
        """Wait for the server's 101."""
        await self._open

    def close(self) -> None:
        """Send a close frame and drop the connection; no closing handshake is awaited."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(client_frame(b"\x03\xe8", CLOSE))
            self._transport.close()

    def _upgrade(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > HANDSHAKE_LIMIT:
                self._fail("handshake response too long")
            return False
        status = bytes(self._buffer[: self._buffer.find(b"\r\n")])
        del self._buffer[: end + 4]
        # The accept key is not checked: the server is ours, on loopback.
        if b" 101 " not in status:
            self._fail(f"handshake refused: {status.decode(errors='replace')}")
            return False
        self._upgraded = True
        if not self._open.done():
            self._open.set_result(None)
        return True

    def _frames(self) -> None:
        buf = self._buffer
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            first, length = buf[pos], buf[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > size:
                break
            opcode = first & 0x0F
            if opcode == TEXT:
                # Servers do not fragment the small frames these runs exchange.
                self.on_text(bytes(buf[start:end]))
            elif opcode == PING:
                self._out.append(client_frame(bytes(buf[start:end]), PONG))
            elif opcode == CLOSE:
                self.close()
            pos = end
        del buf[:pos]

    def _fail(self, reason: str) -> None:
        if not self._open.done():
            self._open.set_exception(WireError(reason))
        if self._transport is not None:
            self._transport.close()


def _drop(payload: bytes) -> None:
    """The callback of a connection nobody reads."""


def _handshake(host: str, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def connect(url: str, budget: float = 15.0) -> Conn:
    """Open ``ws://host:port/path`` and wait for the upgrade."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(budget):
        _, conn = await loop.create_connection(
            lambda: Conn(f"{host}:{port}", parts.path or "/"), host, port
        )
        await conn.opened()
    return conn
