"""The WebSocket endpoint: one per connection, and the one place errors become frames."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence

from starlette.endpoints import WebSocketEndpoint
from starlette.websockets import WebSocket

from tidings.auth import Principal, origin_allowed
from tidings.client_frames import AckFrame, ClientFrame, SendFrame, parse_frame
from tidings.config import Settings
from tidings.connection import Connection, Raw, ReadAhead, SocketTransport, deny
from tidings.errors import (
    AuthFailed,
    CloseCode,
    CloseConnection,
    ErrorCode,
    FrameRefused,
    StoreUnavailable,
)
from tidings.limits import TokenBucket
from tidings.server_frames import error_frame
from tidings.services import Services
from tidings.session import Session

log = logging.getLogger("tidings.endpoint")


class TidingsEndpoint(WebSocketEndpoint):
    """``/ws``: authenticates the handshake, then hands the frames to the handlers.

    One task reads frames ahead into a bounded queue while another handles
    them, so that the socket is still read (and WebSocket pongs with it) while
    a handler waits on the database. The handler takes what has queued up in
    one go: consecutive messages are stored together, and so are consecutive
    acknowledgements.
    """

    encoding = None
    bucket: TokenBucket

    async def dispatch(self) -> None:
        websocket = WebSocket(self.scope, receive=self.receive, send=self.send)
        services: Services = websocket.app.state.services
        principal = await self._admit(websocket, services)
        if principal is None:
            return
        session = await self._open(websocket, services, principal)
        connection = Connection(session, ReadAhead(services.settings.read_ahead))
        reads = connection.reads
        services.connections.add(connection)
        close_code = CloseCode.NORMAL.value
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    close_code = int(message.get("code") or CloseCode.NORMAL)
                    break
                # Read on after a drain stopped taking frames (``add`` drops
                # them), so that the client's close and pongs are still heard.
                text = message.get("text")
                reads.add(text if text is not None else message.get("bytes") or b"")
                if reads.waiting and (connection.handler is None or connection.handler.done()):
                    connection.handler = asyncio.create_task(
                        self._handle(services, session, principal, reads)
                    )
                await reads.space()
        finally:
            if connection.handler is not None:
                connection.handler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connection.handler
            services.connections.discard(connection)
            await session.stop()
            services.metrics.connection_closed(close_code)
            log.info("connection_closed", extra={**session.log_fields, "code": close_code})

    async def _admit(self, websocket: WebSocket, services: Services) -> Principal | None:
        """Refuse, before accepting, a handshake that may not connect (an HTTP error).

        The client hears only a generic status; the server log says why.
        """
        if services.draining:
            services.metrics.handshake_refused(503)
            await deny(websocket, 503, "shutting down; reconnect to another server")
            return None
        try:
            origin = websocket.headers.get("origin")
            if origin is not None and not origin_allowed(
                origin, websocket.headers.get("host"), services.settings.origins
            ):
                raise AuthFailed(f"origin {origin!r} is not allowed")
            return services.authenticator.authenticate(websocket)
        except AuthFailed as exc:
            log.warning("handshake_refused", extra={"reason": str(exc)})
            services.metrics.handshake_refused(403)
            await deny(websocket, 403, "forbidden")
            return None

    async def _open(
        self, websocket: WebSocket, services: Services, principal: Principal
    ) -> Session:
        conn_id = uuid.uuid4().hex[:12]
        await websocket.accept(subprotocol=principal.subprotocol)
        settings = services.settings
        session = Session(
            conn_id,
            SocketTransport(websocket, settings.close_timeout),
            services.engine.store,
            services.engine.presence,
            services.hub,
            services.recorder,
            queue_size=settings.send_queue_size,
            backlog_batch=settings.backlog_batch,
            write_timeout=settings.write_timeout,
            metrics=services.metrics,
        )
        services.metrics.opened += 1
        session.start(settings.identify_timeout)
        self.bucket = TokenBucket(settings.rate_limit, settings.rate_burst)
        if principal.expires_at is not None:
            session.expire(principal.expires_at - time.time())
        log.info("connection_opened", extra={"conn": conn_id})
        return session

    async def _handle(
        self,
        services: Services,
        session: Session,
        principal: Principal,
        reads: ReadAhead,
    ) -> None:
        """Handle what was read, until nothing waits; the next frame starts this again."""
        settings = services.settings
        bucket = self.bucket
        metrics = services.metrics
        frames_in = metrics.frames_in
        batch: list[ClientFrame] = []

        async def flush() -> None:
            if batch:
                await self._run(services, session, principal, batch)
                batch.clear()

        try:
            while reads.waiting:
                await session.room()
                for raw in reads.take():
                    if reads.stopped:  # A drain began: what is not handled yet is dropped.
                        batch.clear()
                        break
                    try:
                        frame = _parse(bucket, settings, raw)
                    except FrameRefused as exc:
                        frames_in["invalid"] += 1
                        if exc.code is ErrorCode.RATE_LIMITED:
                            metrics.rate_limited += 1
                        await flush()  # Answers go out in the order the frames came.
                        self._refuse(session, exc)
                        continue
                    frames_in[frame.type] += 1
                    if batch and not (type(frame) is type(batch[0]) and _batches(frame)):
                        await flush()
                    batch.append(frame)
                await flush()
        except CloseConnection as exc:
            await session.close(exc.code, exc.reason)
        except Exception:
            log.exception("frame_crashed", extra=session.log_fields)
            await session.close(CloseCode.INTERNAL_ERROR, "internal error")

    async def _run(
        self,
        services: Services,
        session: Session,
        principal: Principal,
        batch: Sequence[ClientFrame],
    ) -> None:
        """Handle a batch of frames of one kind; errors become frames here."""
        handlers = services.handlers
        refs = [_ref(frame) for frame in batch]
        try:
            if isinstance(batch[0], SendFrame):
                drafts = []
                for frame in batch:
                    assert isinstance(frame, SendFrame)
                    try:
                        drafts.append(handlers.draft(session, frame))
                    except FrameRefused as exc:
                        self._refuse(session, exc)
                refs = [draft.id for draft in drafts]
                if drafts:
                    await handlers.send(session, drafts)
            elif isinstance(batch[0], AckFrame):
                acks = [frame for frame in batch if isinstance(frame, AckFrame)]
                for refusal in await handlers.acknowledge(session, acks):
                    self._refuse(session, refusal)
            else:
                (frame,) = batch
                assert not isinstance(frame, SendFrame | AckFrame)
                await handlers.handle(session, principal, frame)
        except FrameRefused as exc:
            self._refuse(session, exc)
        except StoreUnavailable as exc:
            log.warning("store_unavailable", extra={**session.log_fields, "error": str(exc)})
            for ref in refs:
                session.push(
                    error_frame(
                        ErrorCode.UNAVAILABLE,
                        "the database did not answer in time; the outcome is unknown: "
                        "send the same frame again",
                        ref,
                    )
                )

    @staticmethod
    def _refuse(session: Session, exc: FrameRefused) -> None:
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


def _parse(bucket: TokenBucket, settings: Settings, raw: Raw) -> ClientFrame:
    """The frame, if it is within the rate and well-formed; raise why not."""
    if not bucket.take():
        if bucket.strikes > settings.rate_abuse:
            raise CloseConnection(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
        raise FrameRefused(
            ErrorCode.RATE_LIMITED,
            f"over {settings.rate_limit:g} frames a second; this frame was dropped",
        )
    return parse_frame(raw, settings.max_json_depth)


# A tuple, not ``SendFrame | AckFrame``: the union would be built for every frame.
_BATCHED = (SendFrame, AckFrame)


def _batches(frame: ClientFrame) -> bool:
    """Whether consecutive frames of this kind are handled together."""
    return isinstance(frame, _BATCHED)


def _ref(frame: ClientFrame) -> str:
    frame_id = getattr(frame, "id", None)
    return frame_id if isinstance(frame_id, str) else frame.type
