"""The WebSocket protocol against peers that stop reading, on a real uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.types import ASGIApp
from starlette.websockets import WebSocket
from uvicorn.server import ServerState
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame
from websockets.protocol import State
from websockets.uri import parse_uri

from tests.helpers import TIMEOUT, client
from tidings.config import Settings
from tidings.server import server_config
from tidings.wsprotocol import CORK_LIMIT, BoundedCloseProtocol

# Small enough that the peer's TCP window stays tiny, so the server's kernel
# cannot swallow the flood and the protocol's own write buffer fills.
TINY_BUFFER = 4096
CHUNK = b"x" * 65536


class RawClient:
    """A WebSocket client on a bare socket: it reads its handshake response, then nothing.

    A library client would keep reading into its own buffers; this one leaves
    every byte after the handshake in the kernel, like a stalled peer.
    """

    def __init__(self, sock: socket.socket, conn: ClientProtocol) -> None:
        self.sock = sock
        self._conn = conn

    @classmethod
    async def connect(cls, url: str) -> RawClient:
        """Complete the opening handshake with ``url``."""
        loop = asyncio.get_running_loop()
        wsuri = parse_uri(url)
        sock = socket.socket()
        sock.setblocking(False)
        # Before connect: the window scale is agreed in the SYN and cannot grow later.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TINY_BUFFER)
        conn = ClientProtocol(wsuri)
        try:
            async with asyncio.timeout(TIMEOUT):
                await loop.sock_connect(sock, (wsuri.host, wsuri.port))
                conn.send_request(conn.connect())
                await loop.sock_sendall(sock, b"".join(conn.data_to_send()))
                # One byte at a time, so that not a byte past the response is read.
                while conn.state is State.CONNECTING and conn.handshake_exc is None:
                    byte = await loop.sock_recv(sock, 1)
                    if not byte:
                        raise ConnectionError("the server closed during the handshake")
                    conn.receive_data(byte)
        except BaseException:
            sock.close()
            raise
        if conn.handshake_exc is not None:
            sock.close()
            raise conn.handshake_exc
        return cls(sock, conn)

    @property
    def port(self) -> int:
        """The client's local port."""
        port: int = self.sock.getsockname()[1]
        return port

    async def send_text(self, text: str) -> None:
        """Send one text frame."""
        self._conn.send_text(text.encode())
        await asyncio.get_running_loop().sock_sendall(
            self.sock, b"".join(self._conn.data_to_send())
        )

    async def read_to_end(self) -> Close | None:
        """Read until the server closes the TCP connection; the close frame it sent."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(TIMEOUT):
            while data := await loop.sock_recv(self.sock, 65536):
                self._conn.receive_data(data)
        self._conn.receive_eof()
        return self._conn.close_rcvd

    def unread(self) -> int:
        """Bytes the kernel holds for this client that it has not read."""
        raw = fcntl.ioctl(self.sock, termios.FIONREAD, struct.pack("i", 0))
        count: int = struct.unpack("i", raw)[0]
        return count

    def close(self) -> None:
        self.sock.close()


def server_holds(server_port: int, client_port: int) -> bool:
    """Whether an ESTABLISHED socket from ``server_port`` to ``client_port`` exists."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local, remote, state = fields[1], fields[2], fields[3]
                if (
                    state == "01"
                    and int(local.rsplit(":", 1)[1], 16) == server_port
                    and int(remote.rsplit(":", 1)[1], 16) == client_port
                ):
                    return True
    return False


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``TIMEOUT``."""
    try:
        async with asyncio.timeout(TIMEOUT):
            # The kernel's socket table offers nothing to wait on.
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {TIMEOUT}s: {what}") from None


@dataclass
class Running:
    """A uvicorn server started by :func:`running`."""

    server: uvicorn.Server
    task: asyncio.Task[None]
    port: int

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


@asynccontextmanager
async def running(
    app: ASGIApp, settings: Settings, sndbuf: int | None = None
) -> AsyncIterator[Running]:
    """``app`` under uvicorn with Tidings' ``server_config``, as ``tests.helpers.serve`` runs it.

    ``sndbuf`` caps the kernel send buffer of accepted sockets, which inherit it
    from the listening socket.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, settings.model_copy(update={"port": port})))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(TIMEOUT):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield Running(server, task, port)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, TIMEOUT)
        sock.close()


@dataclass
class Flood:
    """A Starlette app that sends to each client until it stops taking data, then acts.

    ``?then=close`` closes; ``?then=give_up`` closes but stops waiting for it
    sooner than the protocol's close timeout, as Tidings' ``SocketTransport``
    may; ``?then=return`` returns without closing; ``?then=wait`` waits for
    the disconnect. What happened is recorded.
    """

    stalled: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> Starlette:
        return Starlette(routes=[WebSocketRoute("/ws", self._serve)])

    async def _serve(self, websocket: WebSocket) -> None:
        await websocket.accept()
        then = websocket.query_params["then"]
        # A send with room in the buffer never suspends, so one that is still
        # pending after the timeout is waiting on the peer, not on this machine.
        with contextlib.suppress(TimeoutError):
            while True:
                async with asyncio.timeout(0.5):
                    await websocket.send_bytes(CHUNK)
        self.stalled.set()
        if then == "return":
            return
        if then == "close":
            await websocket.close(4000, "flooded")
            self.closed.set()
        if then == "give_up":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await websocket.close(4000, "flooded")
        message = await websocket.receive()
        assert message["type"] == "websocket.disconnect"
        self.disconnected.set()


FAST = Settings(dev=True, close_timeout=0.5)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("then", "settings"),
    [
        pytest.param("close", FAST, id="close"),
        pytest.param("give_up", FAST, id="give_up"),
        pytest.param("return", FAST, id="return"),
        # Nothing but the keepalive ends this one: the peer never answers a ping.
        pytest.param(
            "wait",
            FAST.model_copy(update={"ping_interval": 0.3, "ping_timeout": 0.3}),
            id="keepalive",
        ),
    ],
)
async def test_a_peer_that_does_not_read_is_dropped(then: str, settings: Settings) -> None:
    flood = Flood()
    async with running(flood.app(), settings) as srv:
        peer = await RawClient.connect(f"{srv.url}?then={then}")
        try:
            assert server_holds(srv.port, peer.port)
            await eventually(
                lambda: not server_holds(srv.port, peer.port), "the server dropped the peer"
            )
            assert peer.unread() > 0
            if then != "return":
                async with asyncio.timeout(TIMEOUT):
                    await flood.disconnected.wait()
            assert flood.closed.is_set() == (then == "close")
        finally:
            peer.close()


@pytest.mark.e2e
async def test_a_close_written_but_never_read_is_dropped_when_the_handshake_times_out() -> None:
    # Less than uvicorn's write-buffer high-water mark, so the close is written at
    # once; but more than the tiny kernel buffers take, so it is never read.
    sent = asyncio.Event()

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_bytes(b"x" * 48 * 1024)
        await websocket.close(4000, "bye")
        sent.set()

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    async with running(app, FAST, sndbuf=TINY_BUFFER) as srv:
        peer = await RawClient.connect(srv.url)
        try:
            async with asyncio.timeout(TIMEOUT):
                await sent.wait()
            await eventually(
                lambda: not server_holds(srv.port, peer.port), "the server dropped the peer"
            )
            assert peer.unread() > 0
        finally:
            peer.close()


@pytest.mark.e2e
async def test_shutdown_is_not_held_up_by_a_peer_that_does_not_read() -> None:
    flood = Flood()
    async with running(flood.app(), FAST) as srv:
        peer = await RawClient.connect(f"{srv.url}?then=wait")
        try:
            # Only once the flood has filled the buffers would the flush hang.
            async with asyncio.timeout(TIMEOUT):
                await flood.stalled.wait()
            assert server_holds(srv.port, peer.port)
            srv.server.should_exit = True
            async with asyncio.timeout(TIMEOUT):
                await asyncio.shield(srv.task)
            assert not server_holds(srv.port, peer.port)
            assert peer.unread() > 0
        finally:
            peer.close()


@pytest.mark.e2e
async def test_a_reading_peer_gets_every_frame_and_the_close() -> None:
    count = 200

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        # Far more than the buffers hold: the close waits for room while the peer reads.
        for n in range(count):
            await websocket.send_text(f'{{"n": {n}, "pad": "{"x" * 16000}"}}')
        await websocket.close(4001, "that is all")

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    async with running(app, FAST) as srv, client(srv.url, contract=False) as ws:
        frames: list[dict[str, object]] = []
        close = await ws.close_frame(into=frames)
    assert (close.code, close.reason) == (4001, "that is all")
    assert [frame["n"] for frame in frames] == list(range(count))


@pytest.mark.e2e
async def test_a_peer_that_reads_but_never_answers_the_close_still_gets_it() -> None:
    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close(4002, "no answer needed")

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    async with running(app, FAST) as srv:
        peer = await RawClient.connect(srv.url)
        try:
            # It answers nothing, so the close handshake times out: with nothing
            # left to flush, that must be an orderly close, not an abort.
            close = await peer.read_to_end()
        finally:
            peer.close()
    assert close is not None
    assert (close.code, close.reason) == (4002, "no answer needed")


def test_server_config_uses_the_settings_close_timeout() -> None:
    config = server_config(Starlette(), Settings(dev=True, close_timeout=2.5))
    assert isinstance(config.ws, type)
    assert issubclass(config.ws, BoundedCloseProtocol)
    assert config.ws.default_close_timeout == 2.5


# --- corking --------------------------------------------------------------------------------


class RecordingTransport(asyncio.Transport):
    """A transport that keeps what is written to it, one entry a ``write`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self._wrote = asyncio.Event()
        self._closing = False

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait, checking after each write, until ``condition`` holds."""
        async with asyncio.timeout(TIMEOUT):
            while not condition():
                self._wrote.clear()
                await self._wrote.wait()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        self._wrote.set()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def abort(self) -> None:
        self._closing = True

    def get_write_buffer_size(self) -> int:
        return 0


async def corked_connection(
    endpoint: Callable[[WebSocket], Awaitable[None]], transport: RecordingTransport
) -> tuple[BoundedCloseProtocol, ClientProtocol]:
    """``endpoint`` behind the protocol on ``transport``, past the handshake."""
    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    config = server_config(app, FAST)
    config.load()
    protocol = BoundedCloseProtocol(config, ServerState(), {}, asyncio.get_running_loop())
    protocol.connection_made(transport)
    peer = ClientProtocol(parse_uri("ws://127.0.0.1:8000/ws"))
    peer.send_request(peer.connect())
    protocol.data_received(b"".join(peer.data_to_send()))
    await transport.until(lambda: bool(transport.writes))  # the handshake response
    peer.receive_data(transport.writes.pop(0))
    assert peer.state is State.OPEN
    peer.events_received()  # the handshake response
    return protocol, peer


def frames_in(peer: ClientProtocol, writes: list[bytes]) -> list[str]:
    """The text of the frames ``writes`` carry, in order."""
    for data in writes:
        peer.receive_data(data)
    return [bytes(e.data).decode() for e in peer.events_received() if isinstance(e, Frame)]


async def test_frames_sent_in_one_turn_of_the_loop_go_out_in_one_write() -> None:
    done = asyncio.Event()

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        for n in range(5):
            await websocket.send_text(f"frame {n}")
        await done.wait()

    transport = RecordingTransport()
    protocol, peer = await corked_connection(endpoint, transport)
    try:
        await transport.until(lambda: bool(transport.writes))
        assert len(transport.writes) == 1
        assert frames_in(peer, transport.writes) == [f"frame {n}" for n in range(5)]
    finally:
        done.set()
        protocol.connection_lost(None)


async def test_corked_frames_keep_their_place_before_a_pong_and_a_close() -> None:
    sent = asyncio.Event()
    go_on = asyncio.Event()

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("first")
        sent.set()
        await go_on.wait()
        await websocket.send_text("last")
        await websocket.close(4003, "done")

    transport = RecordingTransport()
    protocol, peer = await corked_connection(endpoint, transport)
    try:
        async with asyncio.timeout(TIMEOUT):
            await sent.wait()
        # A ping answered before the corked frame was written: the pong goes after it.
        peer.send_ping(b"hi")
        protocol.data_received(b"".join(peer.data_to_send()))
        go_on.set()
        await transport.until(lambda: protocol.close_sent)
        for data in transport.writes:
            peer.receive_data(data)
        events = peer.events_received()
        assert [(type(e).__name__, getattr(e, "data", b"")) for e in events] == [
            ("Frame", b"first"),
            ("Frame", b"hi"),
            ("Frame", b"last"),
            ("Frame", b"\x0f\xa3done"),
        ]
        assert [e.opcode.name for e in events if isinstance(e, Frame)] == [
            "TEXT",
            "PONG",
            "TEXT",
            "CLOSE",
        ]
    finally:
        protocol.connection_lost(None)


async def test_a_large_cork_is_written_at_once_so_that_flow_control_applies() -> None:
    half = "x" * (CORK_LIMIT // 2 + 1)
    written_before_yield: list[int] = []
    transport = RecordingTransport()

    go = asyncio.Event()

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await go.wait()
        await websocket.send_text(half)
        written_before_yield.append(len(transport.writes))
        await websocket.send_text(half)  # past the limit: written now
        written_before_yield.append(len(transport.writes))

    protocol, peer = await corked_connection(endpoint, transport)
    go.set()
    try:
        await transport.until(lambda: len(written_before_yield) == 2)
        assert written_before_yield == [0, 1]
        assert frames_in(peer, transport.writes) == [half, half]
    finally:
        protocol.connection_lost(None)


async def test_nothing_corked_is_written_to_a_closing_transport() -> None:
    sent = asyncio.Event()
    done = asyncio.Event()
    transport = RecordingTransport()

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("too late")
        transport.close()  # as uvicorn does when the server shuts down
        sent.set()
        await done.wait()

    protocol, _ = await corked_connection(endpoint, transport)
    try:
        async with asyncio.timeout(TIMEOUT):
            await sent.wait()
        await asyncio.sleep(0)  # the turn ends; the cork comes out
        assert transport.writes == []
    finally:
        done.set()
        protocol.connection_lost(None)
