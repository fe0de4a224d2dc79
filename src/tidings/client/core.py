"""``Client``: one user's connection to Tidings, kept up across reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import datetime
from types import TracebackType
from typing import Any, Final

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from tidings.client.backoff import Backoff
from tidings.client.models import (
    AuthRefused,
    ClientClosed,
    ClientError,
    ConnectFailed,
    ConnectionEnded,
    Message,
    MessageFailed,
    SendTimeout,
    StateChange,
)
from tidings.client.seen import Mark, Seen
from tidings.ids import ID, ID_RULE, new_id

log = logging.getLogger("tidings.client")

SUBPROTOCOL: Final = Subprotocol("tidings.v1")
# Any of these means the message is durable: states only move forward.
_STORED: Final = frozenset({"stored", "sent", "delivered", "read"})
# Codes after which reconnecting the same way would repeat the refusal.
_POLICY: Final = 1008
_TOO_BIG: Final = 1009

StateCallback = Callable[[StateChange], None]
Sleep = Callable[[float], Awaitable[None]]


class _Retry:
    """An attempt's outcome: send the same frame again (``unavailable``: after a pause)."""

    def __init__(self, pause: bool) -> None:
        self.pause = pause


_STORED_OK: Final = object()
_RESEND_NOW: Final = _Retry(pause=False)
_RESEND_LATER: Final = _Retry(pause=True)
_END: Final = object()
Outcome = object  # _STORED_OK, a _Retry, or the ClientError to raise


class Client:
    """A Tidings client for one user, for use as ``async with Client(...) as client:``.

    Entering connects and identifies once, raising :class:`AuthRefused` or
    :class:`ConnectFailed` if that fails. From then on a background task owned
    by the client reads frames and, when the connection drops, reconnects with
    full-jitter backoff and identifies again (``since`` the last message the
    application took), until the client is closed or the server ends the
    connection for good (close code 1008, a refused handshake, or
    ``reconnect_attempts`` failed attempts in a row).

    The token goes in the ``Authorization: Bearer`` header, the first place the
    server looks; ``tidings.v1`` is offered as the subprotocol.
    """

    def __init__(
        self,
        url: str,
        email: str,
        token: str | None = None,
        *,
        send_timeout: float = 30.0,
        reply_timeout: float = 10.0,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        backoff: Backoff | None = None,
        reconnect_attempts: int | None = None,
        seen_capacity: int = 10_000,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.url = url
        self.email = email.strip().lower()
        self._token = token
        self._send_timeout = send_timeout
        self._reply_timeout = reply_timeout
        self._open_timeout = open_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._backoff = backoff or Backoff()
        self._reconnect_attempts = reconnect_attempts
        self._sleep = sleep
        self._seen = Seen(seen_capacity)
        self._inbox: asyncio.Queue[Message | object] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[Outcome]] = {}
        self._callbacks: list[StateCallback] = []
        self._ws: ClientConnection | None = None
        self._ready = asyncio.Event()
        self._ended: ClientError | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_taken: Message | None = None
        self._since: str | None = None
        self.reconnects = 0

    # -- lifetime -----------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Leaving cleanly means the application dealt with what it took; leaving
        # on an exception may mean it did not, so the last one comes back.
        if exc_type is None and self._last_taken is not None:
            with contextlib.suppress(ClientError):
                await self.ack(self._last_taken)
        await self.close()

    async def connect(self) -> None:
        """Connect and identify, then keep the connection up in the background."""
        if self._task is not None:
            raise RuntimeError("this client is already connected")
        ws = await self._open()
        self._task = asyncio.create_task(self._run(ws), name=f"tidings-client-{self.email}")

    async def close(self) -> None:
        """Close the connection and stop reconnecting; pending sends raise ``ClientClosed``."""
        self._end(ClientClosed("the client was closed"))
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def connected(self) -> bool:
        """Whether the client is identified on a live connection right now."""
        return self._ready.is_set() and self._ended is None

    # -- sending --------------------------------------------------------------

    async def send(self, to: str, content: str, id: str | None = None) -> str:
        """Send ``content`` to ``to``; the message id once the message is ``stored``.

        The id is made here unless given, so that every attempt carries the same
        one and the server stores the message once: after ``unavailable`` (with
        backoff), after a lost connection (once reconnected), and when no reply
        came within ``reply_timeout`` (a frame dropped as ``rate_limited``).
        Raises :class:`MessageFailed` when the server refuses it for good,
        :class:`SendTimeout` after ``send_timeout`` seconds, and
        :class:`ConnectionEnded`/:class:`ClientClosed` if the client ends first.
        """
        message_id = new_id() if id is None else id
        if not ID.fullmatch(message_id):
            raise ValueError(f"an id is {ID_RULE}")
        if message_id in self._pending:
            raise ValueError(f"message {message_id!r} is already being sent")
        frame = {"type": "message", "to": to, "content": content, "id": message_id}
        pauses = 0
        try:
            async with asyncio.timeout(self._send_timeout):
                while True:
                    await self._wait_ready()
                    attempt: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
                    self._pending[message_id] = attempt
                    await self._post(frame)
                    try:
                        outcome = await asyncio.wait_for(attempt, self._reply_timeout)
                    except TimeoutError:
                        outcome = _RESEND_NOW
                    if outcome is _STORED_OK:
                        return message_id
                    if isinstance(outcome, ClientError):
                        raise outcome
                    if isinstance(outcome, _Retry) and outcome.pause:
                        await self._sleep(self._backoff.delay(pauses))
                        pauses += 1
        except TimeoutError as exc:
            if isinstance(exc, ClientError):
                raise
            raise SendTimeout(message_id) from exc
        finally:
            self._pending.pop(message_id, None)

    def on_state(self, callback: StateCallback) -> Callable[[], None]:
        """Call ``callback`` with every state change of this user's messages; returns a
        function that removes it. Callbacks run in the reader: they must not block."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    # -- receiving ------------------------------------------------------------

    async def messages(self) -> AsyncGenerator[Message, None]:
        """Messages to this user, in order, without duplicates, until the client ends.

        Each message is acknowledged when the application asks for the next one
        (or calls ``message.ack()`` / :meth:`read`), so a message the
        application never finished with comes back after a reconnect or a
        restart. Ends quietly when the client is closed; raises the reason when
        the connection ended for good.
        """
        while True:
            if self._last_taken is not None:
                await self.ack(self._last_taken)
            item = await self._inbox.get()
            if item is _END:
                self._inbox.put_nowait(_END)  # for any other iterator
                if isinstance(self._ended, ClientClosed) or self._ended is None:
                    return
                raise self._ended
            assert isinstance(item, Message)
            if self._seen.get(item.key) is Mark.QUEUED:
                self._seen.mark(item.key, Mark.TAKEN)
            self._last_taken = item
            self._since = item.id
            yield item

    async def ack(self, message: Message) -> None:
        """Acknowledge ``message`` (idempotent): its sender sees ``delivered``."""
        if self._seen.get(message.key) in (Mark.ACKED, Mark.READ):
            return
        self._seen.mark(message.key, Mark.ACKED)
        await self._post({"type": "ack", "id": message.id, "from": message.sender})

    async def read(self, message: Message) -> None:
        """Mark ``message`` read (idempotent): its sender sees ``read``."""
        if self._seen.get(message.key) is Mark.READ:
            return
        self._seen.mark(message.key, Mark.READ)
        await self._post({"type": "read", "id": message.id, "from": message.sender})

    # -- the connection ---------------------------------------------------------

    async def _open(self) -> ClientConnection:
        """A new connection, identified; raises ``AuthRefused`` or ``ConnectFailed``."""
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        try:
            ws = await connect(
                self.url,
                additional_headers=headers,
                subprotocols=[SUBPROTOCOL],
                open_timeout=self._open_timeout,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_timeout,
                close_timeout=2,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise AuthRefused(f"the server refused the handshake: HTTP {status}") from exc
            raise ConnectFailed(f"the server answered the handshake with HTTP {status}") from exc
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ConnectFailed(
                f"cannot connect to {self.url}: {exc or type(exc).__name__}"
            ) from exc
        try:
            async with asyncio.timeout(self._open_timeout):
                await self._identify(ws)
        except BaseException as exc:
            await ws.close()
            if isinstance(exc, ClientError):
                raise
            if isinstance(exc, TimeoutError | ConnectionClosed):
                raise ConnectFailed(f"identification failed: {exc}") from exc
            raise
        self._ws = ws
        self._ready.set()
        return ws

    async def _identify(self, ws: ClientConnection) -> None:
        since = self._since
        while True:
            frame: dict[str, Any] = {"type": "#email", "email": self.email}
            if since is not None:
                frame["since"] = since
            await ws.send(orjson.dumps(frame).decode())
            reply = orjson.loads(await ws.recv())
            if reply.get("type") == "#email":
                return
            code = reply.get("code")
            if code == "forbidden":
                raise AuthRefused(f"the server does not let this token identify as {self.email}")
            if code == "not_found" and since is not None:
                # The anchor expired (retention): the backlog alone still has every
                # message not yet acknowledged.
                since = self._since = None
                continue
            raise ConnectFailed(f"identification refused: {reply}")

    async def _run(self, ws: ClientConnection) -> None:
        """Read until the connection drops, then reconnect; the client's one background task."""
        while True:
            await self._pump(ws)
            self._lost()
            code, reason = ws.close_code, ws.close_reason or ""
            if self._ended is not None:
                return
            if code in (_POLICY, _TOO_BIG):
                self._end(ConnectionEnded(f"closed by the server: {code} {reason}", code, reason))
                return
            log.info("reconnecting", extra={"code": code, "reason": reason})
            try:
                ws = await self._reconnect()
            except ClientError as exc:
                self._end(exc)
                return

    async def _reconnect(self) -> ClientConnection:
        attempt = 0
        while True:
            await self._sleep(self._backoff.delay(attempt))
            attempt += 1
            try:
                ws = await self._open()
            except ConnectFailed as exc:
                if self._reconnect_attempts is not None and attempt >= self._reconnect_attempts:
                    raise ConnectionEnded(f"gave up after {attempt} reconnect attempts") from exc
                log.info("reconnect_failed", extra={"attempt": attempt, "error": str(exc)})
                continue
            self.reconnects += 1
            return ws

    async def _pump(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                frame = orjson.loads(raw)
                if isinstance(frame, dict):
                    await self._dispatch(frame)

    def _lost(self) -> None:
        """The connection is gone: every send in flight resends once reconnected."""
        self._ws = None
        if self._ended is not None:
            return  # senders must see why it ended, not wait for a reconnect
        self._ready.clear()
        for attempt in self._pending.values():
            if not attempt.done():
                attempt.set_result(_RESEND_NOW)

    def _end(self, reason: ClientError) -> None:
        if self._ended is not None:
            return
        self._ended = reason
        self._ready.set()  # wakes senders, who then see why
        for attempt in self._pending.values():
            if not attempt.done():
                attempt.set_result(reason)
        self._inbox.put_nowait(_END)

    async def _wait_ready(self) -> None:
        await self._ready.wait()
        if self._ended is not None:
            raise self._ended

    async def _post(self, frame: dict[str, Any]) -> None:
        """Send ``frame`` if connected; if not, it is lost, and what needs it again
        (a resend, an ack on redelivery) happens after the reconnect."""
        ws = self._ws
        if ws is None or not self._ready.is_set():
            return
        with contextlib.suppress(ConnectionClosed):
            await ws.send(orjson.dumps(frame).decode())

    # -- incoming frames ----------------------------------------------------------

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "message":
            await self._on_message(frame)
        elif kind == "state":
            self._on_state(StateChange.from_frame(frame))
        elif kind == "error":
            self._on_error(frame)

    async def _on_message(self, frame: dict[str, Any]) -> None:
        key = (str(frame["from"]), str(frame["id"]))
        mark = self._seen.get(key)
        if mark is not None:
            # A duplicate (a redelivery after a reconnect). The application has
            # it already; if our ack or read was lost, say it again.
            state = frame.get("state")
            if mark is Mark.READ and state != "read":
                await self._post({"type": "read", "id": key[1], "from": key[0]})
            elif mark is Mark.ACKED and state in ("stored", "sent"):
                await self._post({"type": "ack", "id": key[1], "from": key[0]})
            return
        self._seen.mark(key, Mark.QUEUED)
        self._inbox.put_nowait(
            Message(
                id=key[1],
                sender=key[0],
                recipient=str(frame["to"]),
                content=str(frame["content"]),
                sent_at=datetime.fromisoformat(frame["sent_at"]),
                state=str(frame["state"]),
                _ack=self.ack,
                _read=self.read,
            )
        )

    def _on_state(self, change: StateChange) -> None:
        attempt = self._pending.get(change.id)
        if attempt is not None and not attempt.done():
            if change.state in _STORED:
                attempt.set_result(_STORED_OK)
            elif change.state == "failed":
                attempt.set_result(
                    MessageFailed(change.id, change.code or "failed", change.reason or "")
                )
        for callback in list(self._callbacks):
            try:
                callback(change)
            except Exception:
                log.exception("state_callback_failed", extra={"id": change.id})

    def _on_error(self, frame: dict[str, Any]) -> None:
        ref, code = frame.get("ref"), str(frame.get("code"))
        attempt = self._pending.get(ref) if isinstance(ref, str) else None
        if attempt is None or attempt.done() or not isinstance(ref, str):
            log.info("server_error", extra={"code": code, "detail": frame.get("message")})
            return
        if code == "unavailable":
            attempt.set_result(_RESEND_LATER)
        elif code == "not_identified":
            attempt.set_result(_RESEND_NOW)
        else:
            attempt.set_result(MessageFailed(ref, code, str(frame.get("message", ""))))
