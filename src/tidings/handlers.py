"""Handlers: what each client frame does."""

from __future__ import annotations

import logging
import secrets
from typing import Protocol

from bson import ObjectId

from tidings.errors import ClientError, ErrorCode, StoreUnavailable
from tidings.models import Message, User, utcnow
from tidings.protocol import (
    AckFrame,
    ClientFrame,
    EmailFrame,
    MessageState,
    PingFrame,
    SendFrame,
    UserFrame,
    state_frame,
)
from tidings.session import Session
from tidings.store import Store

log = logging.getLogger("tidings.handlers")


class Identity(Protocol):
    """Who authenticated on this connection, as far as handlers need to know."""

    def may_identify(self, email: str) -> bool:
        """True when this connection may identify as ``email`` (already normalised)."""


class Handlers:
    """Turns validated frames into store operations and replies.

    Errors are raised as ``ClientError``; the endpoint turns them into frames.
    """

    def __init__(self, store: Store, max_content_chars: int) -> None:
        self._store = store
        self._max_content = max_content_chars

    async def handle(self, session: Session, identity: Identity, frame: ClientFrame) -> None:
        """Act on one frame from ``session``'s client."""
        if isinstance(frame, PingFrame):
            session.push({"type": "#pong", "ts": frame.ts})
        elif isinstance(frame, EmailFrame):
            await self._identify(session, identity, frame)
        elif isinstance(frame, UserFrame):
            await self._lookup(session, frame)
        elif isinstance(frame, SendFrame):
            await self._send(session, frame)
        else:
            await self._acknowledge(session, frame)

    async def _identify(self, session: Session, identity: Identity, frame: EmailFrame) -> None:
        if session.user is not None:
            raise ClientError(
                ErrorCode.INVALID,
                f"this connection is already identified as {session.user.email}; "
                "open a new connection to identify as someone else",
                frame.type,
            )
        if not identity.may_identify(frame.email):
            raise ClientError(
                ErrorCode.FORBIDDEN, "your credentials do not allow this e-mail", frame.type
            )
        since: ObjectId | None = None
        if frame.since is not None:
            found = await self._store.find_inbox(frame.email, frame.since, None)
            if not found:
                raise ClientError(
                    ErrorCode.NOT_FOUND,
                    f"no message {frame.since!r} was sent to you; identify without 'since'",
                    frame.since,
                )
            since = found[0].oid
        user = await self._store.ensure_user(frame.email)
        session.push(
            {"type": "#email", "email": user.email, "user": {**user.public(), "online": True}}
        )
        await session.identify(user, since)
        log.info("identified", extra=session.log_fields)

    async def _lookup(self, session: Session, frame: UserFrame) -> None:
        _require_user(session, frame.type)
        user = await self._store.find_user(frame.email)
        if user is None:
            raise ClientError(ErrorCode.NOT_FOUND, f"no user {frame.email}", frame.type)
        session.push({"type": "#user", "user": user.public()})

    async def _send(self, session: Session, frame: SendFrame) -> None:
        sender = _require_user(session, frame.id or frame.type)
        if len(frame.content) > self._max_content:
            raise ClientError(
                ErrorCode.TOO_LARGE,
                f"'content' is {len(frame.content)} characters; the limit is {self._max_content}",
                frame.id or frame.type,
            )
        # Server-assigned ids are 22 URL-safe characters, inside the id alphabet.
        message_id = frame.id or secrets.token_urlsafe(16)
        fields = {**session.log_fields, "message_id": message_id}
        session.push(state_frame(message_id, MessageState.RECEIVED, utcnow()))
        try:
            recipient = await self._store.find_user(frame.to, presence=False)
            if recipient is None:
                self._fail(session, message_id, ErrorCode.NOT_FOUND, f"no user {frame.to}")
                return
            outcome = await self._store.send(
                sender.email, recipient, message_id, frame.content, session.conn_id
            )
        except ClientError as exc:
            # Refused by the store, such as an id still on its way to someone else.
            self._fail(session, message_id, exc.code, exc.message)
            return
        except StoreUnavailable as exc:
            log.warning("store_failed", extra={**fields, "error": str(exc)})
            self._fail(
                session,
                message_id,
                ErrorCode.INTERNAL,
                "the message could not be stored; send it again with the same id",
            )
            return
        # The sending connection hears ``stored`` first, before the receipt moves
        # on and the feed tells the sender's other connections.
        session.push(state_frame(outcome.id, outcome.state, outcome.at))
        if outcome.stored is None:
            log.info("message_resent", extra={**fields, "state": outcome.state.value})
            return
        log.info("message_stored", extra={**fields, "state": outcome.state.value})
        try:
            await self._store.confirm(outcome.stored)
        except StoreUnavailable as exc:
            # The message is stored and this connection knows; only the sender's
            # other connections miss the ``stored`` notice.
            log.warning("confirm_failed", extra={**fields, "error": str(exc)})

    @staticmethod
    def _fail(session: Session, message_id: str, code: ErrorCode, reason: str) -> None:
        log.info(
            "message_failed",
            extra={
                **session.log_fields,
                "message_id": message_id,
                "state": "failed",
                "code": code.value,
            },
        )
        session.push(state_frame(message_id, MessageState.FAILED, utcnow(), code.value, reason))

    async def _acknowledge(self, session: Session, frame: AckFrame) -> None:
        user = _require_user(session, frame.id)
        # Only the caller's own collection is searched: nobody acks another's message.
        found = await self._store.find_inbox(user.email, frame.id, frame.sender)
        if not found:
            raise ClientError(ErrorCode.NOT_FOUND, f"you have no message {frame.id!r}", frame.id)
        if len(found) > 1:
            raise ClientError(
                ErrorCode.INVALID,
                f"several senders used the id {frame.id!r}; add 'from' to say whose",
                frame.id,
            )
        state = MessageState.DELIVERED if frame.type == "ack" else MessageState.READ
        message: Message = found[0]
        moved = await self._store.advance(message, state)
        log.info(
            "message_" + state.value if moved else "stale_transition",
            extra={**session.log_fields, "message_id": message.id, "state": state.value},
        )


def _require_user(session: Session, ref: str) -> User:
    if session.user is None:
        raise ClientError(
            ErrorCode.NOT_IDENTIFIED, 'identify first with {"type":"#email",...}', ref
        )
    return session.user
