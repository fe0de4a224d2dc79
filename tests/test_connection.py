"""The per-connection adapters on a Starlette ``WebSocket`` over a tiny fake ASGI server.

``Peer`` is the server side of the ASGI interface: it answers ``receive`` with a
connect, and keeps what the app ``send``s, or raises or hangs as a vanished or
stalled peer would. The end-to-end suites drive the same code through uvicorn;
here each way a peer can fail is made to happen, one at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import pytest
from starlette.websockets import WebSocket, WebSocketDisconnect

from tests.fakes import TIMEOUT, spin
from tidings.connection import ReadAhead, SocketTransport, deny
from tidings.errors import CloseCode, ConnectionGone

Event = MutableMapping[str, Any]


class Peer:
    """A fake ASGI server: what the app sent, and how the next ``send`` fails."""

    def __init__(self, extensions: dict[str, Any] | None = None) -> None:
        self.scope: dict[str, Any] = {
            "type": "websocket",
            "path": "/ws",
            "headers": [],
            "extensions": extensions or {},
        }
        self.sent: list[Event] = []
        # When set, every send after the handshake raises it.
        self.fail_with: BaseException | None = None
        # When cleared, every send after the handshake waits: a peer that does not read.
        self.flowing = asyncio.Event()
        self.flowing.set()

    async def receive(self) -> Event:
        return {"type": "websocket.connect"}

    async def send(self, event: Event) -> None:
        if event["type"] != "websocket.accept":
            await self.flowing.wait()
            if self.fail_with is not None:
                raise self.fail_with
        self.sent.append(event)

    def websocket(self) -> WebSocket:
        return WebSocket(self.scope, receive=self.receive, send=self.send)


async def accepted(peer: Peer, close_timeout: float = TIMEOUT) -> SocketTransport:
    websocket = peer.websocket()
    await websocket.accept()
    return SocketTransport(websocket, close_timeout)


# --- SocketTransport ----------------------------------------------------------------------


async def test_send_text_writes_a_text_frame() -> None:
    peer = Peer()
    transport = await accepted(peer)
    await transport.send_text('{"type":"#pong"}')
    assert peer.sent[-1] == {"type": "websocket.send", "text": '{"type":"#pong"}'}


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(OSError("connection reset"), id="vanished-peer"),  # uvicorn
        pytest.param(WebSocketDisconnect(1006), id="disconnect"),
        pytest.param(RuntimeError("send after close"), id="send-after-close"),  # Starlette
    ],
)
async def test_a_peer_that_has_gone_is_connection_gone(failure: BaseException) -> None:
    peer = Peer()
    transport = await accepted(peer)
    peer.fail_with = failure
    with pytest.raises(ConnectionGone):
        await transport.send_text("x")


async def test_a_send_before_accept_or_after_close_is_connection_gone() -> None:
    peer = Peer()
    with pytest.raises(ConnectionGone):
        await SocketTransport(peer.websocket(), TIMEOUT).send_text("x")  # never accepted
    transport = await accepted(peer)
    await transport.close(CloseCode.NORMAL, "bye")
    with pytest.raises(ConnectionGone):
        await transport.send_text("x")
    assert [e["type"] for e in peer.sent] == ["websocket.accept", "websocket.close"]


async def test_close_sends_the_close_once() -> None:
    peer = Peer()
    transport = await accepted(peer)
    await transport.close(CloseCode.TRY_AGAIN_LATER, "later")
    await transport.close(CloseCode.NORMAL, "again")
    assert peer.sent[1:] == [
        {"type": "websocket.close", "code": CloseCode.TRY_AGAIN_LATER, "reason": "later"}
    ]


async def test_close_never_raises_when_the_peer_has_gone() -> None:
    peer = Peer()
    transport = await accepted(peer)
    peer.fail_with = OSError("connection reset")
    await transport.close(CloseCode.NORMAL, "bye")
    assert [e["type"] for e in peer.sent] == ["websocket.accept"]  # no close went out


async def test_close_gives_up_on_a_peer_that_does_not_take_it() -> None:
    peer = Peer()
    transport = await accepted(peer, close_timeout=0.01)
    peer.flowing.clear()
    await asyncio.wait_for(transport.close(CloseCode.NORMAL, "bye"), TIMEOUT)
    assert [e["type"] for e in peer.sent] == ["websocket.accept"]  # no close went out


# --- deny -------------------------------------------------------------------------------


async def test_deny_answers_with_an_http_error_where_the_server_can() -> None:
    peer = Peer(extensions={"websocket.http.response": {}})
    await deny(peer.websocket(), 503, "shutting down")
    start, body = peer.sent
    assert start["type"] == "websocket.http.response.start"
    assert start["status"] == 503
    assert body == {"type": "websocket.http.response.body", "body": b"shutting down"}


async def test_deny_closes_before_accept_where_the_server_cannot() -> None:
    peer = Peer()
    await deny(peer.websocket(), 403, "forbidden")
    assert peer.sent == [
        {"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION, "reason": "forbidden"}
    ]


# --- ReadAhead --------------------------------------------------------------------------


async def test_read_ahead_holds_frames_in_order_until_taken() -> None:
    reads = ReadAhead(limit=3)
    assert not reads.waiting
    assert reads.take() == []
    reads.add("one")
    reads.add(b"two")
    assert reads.waiting
    await asyncio.wait_for(reads.space(), TIMEOUT)  # two of three: room for the next
    assert reads.take() == ["one", b"two"]
    assert not reads.waiting


async def test_read_ahead_reads_no_more_than_its_limit_until_frames_are_taken() -> None:
    reads = ReadAhead(limit=2)
    reads.add("one")
    reads.add("two")
    reading = asyncio.create_task(reads.space())
    await spin()
    assert not reading.done()  # the socket is not read while two frames wait
    assert reads.take() == ["one", "two"]
    await asyncio.wait_for(reading, TIMEOUT)
