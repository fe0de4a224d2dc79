"""The WebSocket endpoint: one per connection, and the one place errors become frames."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from starlette.endpoints import WebSocketEndpoint
from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from tidings.auth import AuthFailed, Principal, origin_allowed
from tidings.errors import ClientError, CloseCode, CloseConnection, ErrorCode, StoreUnavailable
from tidings.limits import TokenBucket
from tidings.protocol import error_frame, parse_frame
from tidings.services import Services
from tidings.session import ConnectionGone, Session

log = logging.getLogger("tidings.endpoint")


class SocketTransport:
    """Adapts Starlette's WebSocket to the session's ``Transport``."""

    def __init__(self, websocket: WebSocket, close_timeout: float) -> None:
        self._websocket = websocket
        self._close_timeout = close_timeout

    async def send_text(self, text: str) -> None:
        if self._websocket.application_state is not WebSocketState.CONNECTED:
            raise ConnectionGone
        try:
            await self._websocket.send_text(text)
        except (WebSocketDisconnect, OSError, RuntimeError) as exc:
            # uvicorn reports a vanished peer as an OSError subclass, Starlette a
            # send after close as RuntimeError: both mean nobody is listening.
            raise ConnectionGone from exc

    async def close(self, code: int, reason: str) -> None:
        if self._websocket.application_state is not WebSocketState.CONNECTED:
            return
        # A peer that stopped reading may never take the close frame.
        with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError, TimeoutError):
            async with asyncio.timeout(self._close_timeout):
                await self._websocket.close(code, reason)


async def _deny(websocket: WebSocket, status: int, reason: str) -> None:
    """Answer a handshake with an HTTP error instead of accepting it."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(PlainTextResponse(reason, status_code=status))
    else:  # Servers without the denial extension answer a close before accept with 403.
        await websocket.close(CloseCode.POLICY_VIOLATION, reason)


class TidingsEndpoint(WebSocketEndpoint):
    """``/ws``: authenticates the handshake, then hands each frame to the handlers."""

    encoding = None
    session: Session
    principal: Principal
    bucket: TokenBucket

    async def dispatch(self) -> None:
        websocket = WebSocket(self.scope, receive=self.receive, send=self.send)
        if not await self._admit(websocket):
            return
        await self.on_connect(websocket)
        close_code = CloseCode.NORMAL.value
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    close_code = int(message.get("code") or CloseCode.NORMAL)
                    break
                await self.on_receive(websocket, await self.decode(websocket, message))
        finally:
            await self.on_disconnect(websocket, close_code)

    async def _admit(self, websocket: WebSocket) -> bool:
        """Refuse, before accepting, a handshake that may not connect (an HTTP error).

        The client hears only a generic status; the server log says why.
        """
        services: Services = websocket.app.state.services
        if services.draining:
            await _deny(websocket, 503, "shutting down; reconnect to another server")
            return False
        try:
            origin = websocket.headers.get("origin")
            if origin is not None and not origin_allowed(
                origin, websocket.headers.get("host"), services.settings.origins
            ):
                raise AuthFailed(f"origin {origin!r} is not allowed")
            self.principal = services.authenticator.authenticate(websocket)
        except AuthFailed as exc:
            log.warning("handshake_refused", extra={"reason": str(exc)})
            await _deny(websocket, 403, "forbidden")
            return False
        return True

    async def on_connect(self, websocket: WebSocket) -> None:
        services: Services = websocket.app.state.services
        conn_id = uuid.uuid4().hex[:12]
        await websocket.accept(subprotocol=self.principal.subprotocol)
        settings = services.settings
        self.bucket = TokenBucket(settings.rate_limit, settings.rate_burst)
        self.session = Session(
            conn_id,
            SocketTransport(websocket, settings.close_timeout),
            services.store,
            services.hub,
            settings.send_queue_size,
            settings.backlog_batch,
        )
        self.session.start(settings.identify_timeout)
        services.sessions.add(self.session)
        if self.principal.expires_at is not None:
            self.session.expire(self.principal.expires_at - time.time())
        log.info("connection_opened", extra={"conn": conn_id})

    async def on_receive(self, websocket: WebSocket, data: Any) -> None:
        services: Services = websocket.app.state.services
        settings = services.settings
        session = self.session
        try:
            if not self.bucket.take():
                if self.bucket.strikes > settings.rate_abuse:
                    raise CloseConnection(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
                raise ClientError(
                    ErrorCode.RATE_LIMITED,
                    f"over {settings.rate_limit:g} frames a second; this frame was dropped",
                )
            frame = parse_frame(data, settings.max_json_depth)
            await services.handlers.handle(session, self.principal, frame)
        except ClientError as exc:
            # A flood must not flood the logs too: refusals for rate are DEBUG.
            level = logging.DEBUG if exc.code is ErrorCode.RATE_LIMITED else logging.INFO
            log.log(
                level,
                "invalid_frame",
                extra={
                    **session.log_fields,
                    "code": exc.code.value,
                    "detail": exc.message,
                    "ref": exc.ref,
                },
            )
            session.push(error_frame(exc.code, exc.message, exc.ref))
        except StoreUnavailable as exc:
            log.warning("store_unavailable", extra={**session.log_fields, "error": str(exc)})
            session.push(
                error_frame(
                    ErrorCode.INTERNAL, "the database is unavailable; try again shortly", None
                )
            )
        except CloseConnection as exc:
            await session.close(exc.code, exc.reason)
        except Exception:
            log.exception("frame_crashed", extra=session.log_fields)
            await session.close(CloseCode.INTERNAL_ERROR, "internal error")

    async def on_disconnect(self, websocket: WebSocket, close_code: int) -> None:
        session = getattr(self, "session", None)
        if session is None:
            return
        websocket.app.state.services.sessions.discard(session)
        await session.stop()
        log.info("connection_closed", extra={**session.log_fields, "code": close_code})
