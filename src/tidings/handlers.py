"""Handlers: what each client frame does.

Refusals are raised (or, for a batch, returned) as ``FrameRefused``; the
endpoint turns them into frames.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

from tidings.auth import Principal
from tidings.client_frames import AckFrame, EmailFrame, PingFrame, SendFrame, UserFrame
from tidings.engine import Presence, Store
from tidings.errors import ErrorCode, FrameRefused
from tidings.ids import new_id
from tidings.metrics import Metrics
from tidings.models import Draft, Message, Outcome, Transition, User, utcnow
from tidings.recorder import Recorder
from tidings.server_frames import email_reply, pong, state_frame, user_reply
from tidings.session import Session
from tidings.states import MessageState

log = logging.getLogger("tidings.handlers")


class KnownUsers:
    """E-mails known to have a user record. Records are never deleted, so a hit stays true."""

    def __init__(self, capacity: int = 10000) -> None:
        self._capacity = capacity
        self._known: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, email: object) -> bool:
        if email in self._known:
            self._known.move_to_end(email)  # type: ignore[arg-type]
            return True
        return False

    def add(self, email: str) -> None:
        """Remember ``email``, forgetting the least recently used beyond capacity."""
        self._known[email] = None
        self._known.move_to_end(email)
        if len(self._known) > self._capacity:
            self._known.popitem(last=False)


class Handlers:
    """Turns validated frames into store operations and replies.

    With ``metrics`` it counts messages received, stored and failed; the
    recorder counts the states after those.
    """

    def __init__(
        self,
        store: Store,
        presence: Presence,
        recorder: Recorder,
        max_content_chars: int,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._counts = metrics.messages if metrics is not None else None
        self._presence = presence
        self._recorder = recorder
        self._max_content = max_content_chars
        self._known = KnownUsers()

    async def handle(
        self, session: Session, principal: Principal, frame: EmailFrame | PingFrame | UserFrame
    ) -> None:
        """Act on one frame that is neither a message nor an acknowledgement."""
        if isinstance(frame, PingFrame):
            session.push(pong(frame.ts))
        elif isinstance(frame, EmailFrame):
            await self._identify(session, principal, frame)
        else:
            await self._lookup(session, frame)

    async def _identify(self, session: Session, principal: Principal, frame: EmailFrame) -> None:
        if session.user is not None:
            raise FrameRefused(
                ErrorCode.INVALID,
                f"this connection is already identified as {session.user.email}; "
                "open a new connection to identify as someone else",
                frame.type,
            )
        if not principal.may_identify(frame.email):
            raise FrameRefused(
                ErrorCode.FORBIDDEN, "your credentials do not allow this e-mail", frame.type
            )
        since = None
        if frame.since is not None:
            found = await self._store.find_inbox(frame.email, [frame.since])
            if not found:
                raise FrameRefused(
                    ErrorCode.NOT_FOUND,
                    f"no message {frame.since!r} was sent to you; identify without 'since'",
                    frame.since,
                )
            since = max(message.position for message in found)
        user = await self._store.ensure_user(frame.email)
        self._known.add(user.email)
        session.push(email_reply(user))
        await session.identify(user, since)
        log.info("identified", extra=session.log_fields)

    async def _lookup(self, session: Session, frame: UserFrame) -> None:
        _require_user(session, frame.type)
        user = await self._store.find_user(frame.email)
        if user is None:
            raise FrameRefused(ErrorCode.NOT_FOUND, f"no user {frame.email}", frame.type)
        online = await self._presence.is_online(frame.email)
        session.push(user_reply(user, online))

    def draft(self, session: Session, frame: SendFrame) -> Draft:
        """Check a ``message`` frame and answer ``received``; the draft to store."""
        _require_user(session, frame.id or frame.type)
        if len(frame.content) > self._max_content:
            raise FrameRefused(
                ErrorCode.TOO_LARGE,
                f"'content' is {len(frame.content)} characters; the limit is {self._max_content}",
                frame.id or frame.type,
            )
        draft = Draft(frame.id or new_id(), frame.to, frame.content)
        session.push(state_frame(draft.id, MessageState.RECEIVED, utcnow()))
        if self._counts is not None:
            self._counts[MessageState.RECEIVED] += 1
        return draft

    async def send(self, session: Session, drafts: Sequence[Draft]) -> None:
        """Store consecutive messages of one connection together, in order.

        Raises ``StoreUnavailable`` when the outcome is unknown: the client
        resends with the same ids, which is safe.
        """
        sender = _require_user(session, drafts[0].id)
        missing = set()
        for email in {draft.recipient for draft in drafts} - {sender.email}:
            if email not in self._known:
                if await self._store.find_user(email) is None:
                    missing.add(email)
                else:
                    self._known.add(email)
        accepted = [draft for draft in drafts if draft.recipient not in missing]
        outcomes = iter(
            await self._store.send(sender.email, session.conn_id, accepted) if accepted else []
        )
        stored: list[str] = []
        resent: list[str] = []
        for draft in drafts:
            if draft.recipient in missing:
                outcome = Outcome(
                    draft.id,
                    MessageState.FAILED,
                    utcnow(),
                    code=ErrorCode.NOT_FOUND.value,
                    reason=f"no user {draft.recipient}",
                )
            else:
                outcome = next(outcomes)
            session.push(
                state_frame(outcome.id, outcome.state, outcome.at, outcome.code, outcome.reason)
            )
            if self._counts is not None and (
                outcome.stored or outcome.state is MessageState.FAILED
            ):
                self._counts[outcome.state] += 1
            if outcome.state is MessageState.FAILED:
                fields = {**session.log_fields, "message_id": outcome.id, "code": outcome.code}
                log.info("message_failed", extra={**fields, "state": outcome.state.value})
            else:
                (stored if outcome.stored else resent).append(outcome.id)
        # One line a batch, not a message: at load, logging would cost more than storing.
        if stored:
            _log_batch("messages_stored", session, stored, MessageState.STORED)
        if resent:
            _log_batch("messages_resent", session, resent, None)

    async def acknowledge(self, session: Session, frames: Sequence[AckFrame]) -> list[FrameRefused]:
        """Record consecutive ``ack``/``read`` frames together; the refusals among them.

        Waits until the transitions are written, so that a database that does
        not answer is reported (``StoreUnavailable``), never silently dropped.
        """
        user = _require_user(session, frames[0].id)
        # Only the caller's own inbox is searched: nobody acks another's message.
        found: dict[str, list[Message]] = {}
        for message in await self._store.find_inbox(user.email, [f.id for f in frames]):
            found.setdefault(message.id, []).append(message)
        refused: list[FrameRefused] = []
        transitions: list[Transition] = []
        for frame in frames:
            candidates = [m for m in found.get(frame.id, ()) if frame.sender in (None, m.sender)]
            if not candidates:
                refused.append(
                    FrameRefused(ErrorCode.NOT_FOUND, f"you have no message {frame.id!r}", frame.id)
                )
            elif len(candidates) > 1:
                refused.append(
                    FrameRefused(
                        ErrorCode.INVALID,
                        f"several senders used the id {frame.id!r}; add 'from' to say whose",
                        frame.id,
                    )
                )
            else:
                state = MessageState.DELIVERED if frame.type == "ack" else MessageState.READ
                transitions.append(Transition.of(candidates[0], state))
        if transitions:
            await self._recorder.write(transitions)
            for state in (MessageState.DELIVERED, MessageState.READ):
                ids = [t.id for t in transitions if t.state is state]
                if ids:
                    _log_batch("messages_" + state.value, session, ids, state)
        return refused


def _log_batch(event: str, session: Session, ids: list[str], state: MessageState | None) -> None:
    # DEBUG: at INFO a line per message was a fifth of the server's CPU at 600
    # unbatched messages a second (py-spy), and as many lines as messages for the
    # log pipeline. Anomalies (failures, refusals, the database) stay INFO and up.
    if not log.isEnabledFor(logging.DEBUG):
        return
    fields = {**session.log_fields, "message_ids": ids, "count": len(ids)}
    if state is not None:
        fields["state"] = state.value
    log.debug(event, extra=fields)


def _require_user(session: Session, ref: str) -> User:
    if session.user is None:
        raise FrameRefused(
            ErrorCode.NOT_IDENTIFIED, 'identify first with {"type":"#email",...}', ref
        )
    return session.user
