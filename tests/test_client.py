"""tidings.client against a real server (and, for close codes a real server cannot be made
to send on demand, a small scripted WebSocket server)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve

from tests.fakes import FlakyStore, until
from tests.helpers import TIMEOUT, client, serve
from tests.proxy import Proxy
from tidings.auth import JWTAuthenticator
from tidings.client import (
    AuthRefused,
    Backoff,
    Client,
    ConnectFailed,
    ConnectionEnded,
    MessageFailed,
    StateChange,
)
from tidings.config import Settings
from tidings.engine import Engine
from tidings.engine.memory import memory_engine
from tidings.errors import StoreUnavailable
from tidings.models import Draft, Outcome

pytestmark = pytest.mark.e2e

ALICE = "alice@example.com"
BOB = "bob@example.com"
SECRET = "a-test-secret-that-is-long-enough-for-hs256"


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[str]:
    """A dev-mode server on the embedded store (the client does not care about the store)."""
    async with serve(settings) as url:
        yield url


class States:
    """A state callback that remembers every change and lets a test wait for one."""

    def __init__(self) -> None:
        self.changes: list[StateChange] = []
        self._arrived = asyncio.Event()

    def __call__(self, change: StateChange) -> None:
        self.changes.append(change)
        self._arrived.set()

    def of(self, message_id: str) -> list[str]:
        """The states seen for ``message_id``, in order."""
        return [change.state for change in self.changes if change.id == message_id]

    async def wait(self, message_id: str, state: str) -> None:
        """Until ``message_id`` reached ``state``."""
        async with asyncio.timeout(TIMEOUT):
            while state not in self.of(message_id):
                self._arrived.clear()
                await self._arrived.wait()


class Sleeps:
    """An injected sleep: records each delay and does not wait."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


async def test_send_returns_once_stored_and_messages_are_acked_when_the_next_is_taken(
    server: str,
) -> None:
    states = States()
    async with Client(server, BOB) as bob, Client(server, ALICE) as alice:
        alice.on_state(states)
        assert await alice.send(BOB, "one", id="m1") == "m1"
        assert "stored" in states.of("m1")
        second = await alice.send(BOB, "two")  # the id is made by the client
        assert len(second) == 22

        async with contextlib.aclosing(bob.messages()) as incoming:
            first = await anext(incoming)
            assert (first.sender, first.id, first.content) == (ALICE, "m1", "one")
            taken = await anext(incoming)  # taking the next acknowledges m1
            await states.wait("m1", "delivered")
            assert (taken.id, taken.content) == (second, "two")
            await bob.read(taken)
            await states.wait(second, "read")
    assert states.of("m1")[:2] == ["received", "stored"]


async def test_a_message_taken_but_not_finished_with_comes_back(server: str) -> None:
    async with Client(server, BOB):
        pass  # bob exists
    async with client(server) as alice:
        await alice.identify(ALICE)
        await alice.send_message(BOB, "keep me", id="k1")
        await alice.states("k1", until="stored")

    with pytest.raises(RuntimeError, match="application crashed"):  # noqa: PT012
        async with Client(server, BOB) as bob:
            async for message in bob.messages():
                assert message.id == "k1"
                raise RuntimeError("application crashed")

    async with client(server) as bob_again:
        await bob_again.identify(BOB)
        redelivered = await bob_again.recv()
        assert (redelivered["id"], redelivered["content"]) == ("k1", "keep me")


async def test_a_refused_message_raises_message_failed(settings: Settings) -> None:
    limited = settings.model_copy(update={"max_content_chars": 5})
    async with serve(limited) as url, Client(url, ALICE) as alice:
        with pytest.raises(MessageFailed) as unknown:
            await alice.send("nobody@example.com", "hi", id="f1")
        assert (unknown.value.code, unknown.value.message_id) == ("not_found", "f1")
        with pytest.raises(MessageFailed) as too_long:
            await alice.send(ALICE, "much too long", id="f2")
        assert too_long.value.code == "too_large"
        with pytest.raises(ValueError, match="an id is"):
            await alice.send(ALICE, "hi", id="not an id")


class LosesFirstReply(FlakyStore):
    """Stores the first batch, then fails as if the database's answer never came."""

    lost = False

    async def send(self, sender: str, conn: str, drafts: Sequence[Draft]) -> list[Outcome]:
        outcomes = await super().send(sender, conn, drafts)
        if not self.lost:
            self.lost = True
            raise StoreUnavailable("send: the answer was lost")
        return outcomes


async def test_unavailable_resends_the_same_id_and_the_message_is_stored_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    stores: list[LosesFirstReply] = []

    @asynccontextmanager
    async def open_engine(_: Settings) -> AsyncIterator[Engine]:
        engine = memory_engine()
        store = LosesFirstReply(engine.store)
        stores.append(store)
        await store.start()
        try:
            yield dataclasses.replace(engine, store=store)
        finally:
            await store.close()

    monkeypatch.setattr("tidings.app.open_engine", open_engine)
    sleeps = Sleeps()
    async with serve(settings) as url:
        async with Client(url, BOB):
            pass  # bob exists, and is offline: no `sent` can answer for the lost reply
        backoff = Backoff(random=lambda: 0.5)
        async with Client(url, ALICE, sleep=sleeps, backoff=backoff) as alice:
            assert await alice.send(BOB, "once", id="u1") == "u1"
            assert stores[0].calls.count("send") == 2
            assert sleeps.delays == [0.5 * 0.1]  # one pause, of the first backoff step
            await alice.send(BOB, "after", id="u2")
        async with client(url) as bob:  # a raw client: it drops no duplicate
            await bob.identify(BOB)
            assert [(await bob.recv())["id"] for _ in range(2)] == ["u1", "u2"]


async def test_a_lost_connection_is_resumed_without_losing_or_repeating_a_message(
    server: str,
) -> None:
    port = int(server.rsplit(":", 1)[1].split("/")[0])
    sleeps = Sleeps()
    async with Proxy(port) as proxy, client(server) as alice:
        await alice.identify(ALICE)
        async with (
            Client(f"ws://127.0.0.1:{proxy.port}/ws", BOB, sleep=sleeps) as bob,
            contextlib.aclosing(bob.messages()) as incoming,
        ):
            for n in (1, 2):
                await alice.send_message(BOB, f"note {n}", id=f"a{n}")
                await alice.states(f"a{n}", until="sent")
            assert (await anext(incoming)).id == "a1"  # taken, not yet acknowledged

            assert proxy.cut() == 1
            # Sent while the connection is down: it goes once bob is back.
            assert await bob.send(ALICE, "back", id="b1") == "b1"
            assert bob.reconnects == 1
            assert len(sleeps.delays) == 1

            await alice.send_message(BOB, "note 3", id="a3")
            # a1 and a2 were redelivered on reconnection and dropped as duplicates.
            assert [(await anext(incoming)).id for _ in range(2)] == ["a2", "a3"]
            frames = await alice.recv_until(
                lambda f: (
                    f.get("type") == "state"
                    and f.get("id") == "a2"
                    and f.get("state") == "delivered"
                )
            )
        assert any(f.get("id") == "b1" and f["type"] == "message" for f in frames)


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    top = Backoff(base=1.0, cap=8.0, random=lambda: 0.999)
    assert [top.ceiling(n) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert all(top.ceiling(n) * 0.99 < top.delay(n) < top.ceiling(n) for n in range(6))
    assert Backoff(random=lambda: 0.0).delay(5) == 0.0
    assert Backoff(cap=30.0).ceiling(10_000) == 30.0  # no overflow


async def test_a_token_authenticates_and_a_bad_one_is_refused() -> None:
    settings = Settings(jwt_secret=SECRET)
    minter = JWTAuthenticator(SECRET, {}, None, None)
    async with serve(settings) as url:
        async with (
            Client(url, BOB, minter.mint(BOB, 60)),
            Client(url, ALICE, minter.mint(ALICE, 60)) as alice,
        ):
            assert await alice.send(BOB, "signed", id="t1") == "t1"
        with pytest.raises(AuthRefused, match="403"):
            async with Client(url, ALICE, "not-a-token"):
                pass
        with pytest.raises(AuthRefused, match="identify as alice"):
            async with Client(url, ALICE, minter.mint("mallory@example.com", 60)):
                pass


async def test_an_unreachable_server_fails_the_first_connect(settings: Settings) -> None:
    async with serve(settings) as url:
        pass  # the port is free again once the server stopped
    with pytest.raises(ConnectFailed):
        async with Client(url, ALICE):
            pass


Script = Callable[[ServerConnection, int], Awaitable[None]]


@asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[str]:
    """A WebSocket server whose ``n``-th connection (0-based) runs ``script(ws, n)``."""
    count = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal count
        count += 1
        await script(ws, count - 1)

    async with ws_serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws"


async def identified(ws: ServerConnection) -> dict[str, Any]:
    """Take the client's ``#email`` and answer it; the frame it sent."""
    frame: dict[str, Any] = orjson.loads(await ws.recv())
    assert frame["type"] == "#email"
    await ws.send(orjson.dumps({"type": "#email", "email": frame["email"], "user": {}}).decode())
    return frame


def message_frame(mid: str, state: str = "stored") -> str:
    return orjson.dumps(
        {
            "type": "message",
            "id": mid,
            "from": ALICE,
            "to": BOB,
            "content": mid,
            "sent_at": "2026-01-02T03:04:05.678Z",
            "state": state,
        }
    ).decode()


async def test_a_policy_close_ends_the_client_without_reconnecting() -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await identified(ws)
        await ws.close(1008, "rate limit exceeded")

    sleeps = Sleeps()
    async with scripted(script) as url, Client(url, BOB, sleep=sleeps) as bob:
        with pytest.raises(ConnectionEnded) as ended:
            async for _ in bob.messages():
                pass
        assert (ended.value.code, ended.value.reason) == (1008, "rate limit exceeded")
        assert sleeps.delays == []
        with pytest.raises(ConnectionEnded):
            await bob.send(ALICE, "too late")


async def test_a_restart_close_reconnects_since_the_last_message_taken() -> None:
    took_m1 = asyncio.Event()
    identifications: list[dict[str, Any]] = []

    async def script(ws: ServerConnection, n: int) -> None:
        identifications.append(await identified(ws))
        if n == 0:
            await ws.send(message_frame("m1"))
            await took_m1.wait()
            await ws.close(1012, "server restarting; reconnect")
            return
        await ws.send(message_frame("m1", state="sent"))  # the redelivery
        await ws.send(message_frame("m2"))
        await ws.wait_closed()

    sleeps = Sleeps()
    backoff = Backoff(base=1.0, random=lambda: 0.25)
    async with (
        scripted(script) as url,
        Client(url, BOB, sleep=sleeps, backoff=backoff) as bob,
        contextlib.aclosing(bob.messages()) as incoming,
    ):
        assert (await anext(incoming)).id == "m1"
        took_m1.set()
        assert (await anext(incoming)).id == "m2"
        await until(lambda: bob.reconnects == 1)
    assert [frame.get("since") for frame in identifications] == [None, "m1"]
    assert sleeps.delays == [0.25]


async def test_the_example_of_docs_client_md_runs(server: str) -> None:
    doc = (Path(__file__).parent.parent / "docs" / "client.md").read_text()
    example = doc.split("```python\n", 1)[1].split("```", 1)[0]
    example = example.replace("ws://127.0.0.1:8000/ws", server)
    example = example.replace("asyncio.run(main())", "")
    namespace: dict[str, Any] = {}
    exec(compile(example, "docs/client.md", "exec"), namespace)  # noqa: S102
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        await namespace["main"]()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("stored: ")
    assert lines[1] == "alice@example.com says Hi Bob!"
